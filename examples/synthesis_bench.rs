//! What counting live-TTS syntheses costs per message: the same WebSocket traffic through the
//! plain byte tunnel (`proxy::tunnel::run`) and through the counting tunnel
//! (`proxy::synthesis::run`, with the `smallest` profile's `tts` class), in one process over
//! in-memory pipes, so only the tunnels differ. `benches/synthesis_tunnel.sh` runs it.
//!
//! Each synthesis: the client sends one text frame `{"voice_id":..,"text":..}`; the upstream
//! answers `CHUNKS` text frames `{"status":"chunk","data":{"audio":"<base64>"}}` and one
//! `{"status":"complete"}`. The time is from the client's send to its read of `complete`, one
//! synthesis at a time, after a warm-up. Prints one JSON line per tunnel and the added p50.
//!
//! Usage: synthesis_bench [SYNTHESES] [CHUNKS] [CHUNK_BYTES]

use futures_util::{SinkExt, StreamExt};
use smallest_proxy::limits::Limiter;
use smallest_proxy::metrics::Metrics;
use smallest_proxy::proxy::{synthesis, tunnel};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, PartialEq)]
enum Tunnel {
    Bytes,
    Counting,
}

async fn run(kind: Tunnel, syntheses: usize, chunks: usize, chunk_bytes: usize) -> Vec<Duration> {
    let config = smallest_proxy::config::load_text(None, "", &[]).expect("default config");
    let limiter = Limiter::new(&config.limits, &Metrics::new(), None);
    let class = limiter.class_for("/waves/v1/tts/live").clone();
    let (client_side, client) = tokio::io::duplex(1 << 20);
    let (upstream_side, upstream) = tokio::io::duplex(1 << 20);
    let close = CancellationToken::new();
    tokio::spawn(async move {
        let _ = match kind {
            Tunnel::Bytes => tunnel::run(client_side, upstream_side, close).await,
            Tunnel::Counting => synthesis::run(client_side, upstream_side, close, class, "bench".into()).await,
        };
    });
    let audio = "A".repeat(chunk_bytes);
    tokio::spawn(async move {
        let mut ws = WebSocketStream::from_raw_socket(upstream, Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if !matches!(message, Message::Text(_)) {
                continue;
            }
            for _ in 0..chunks {
                let chunk = format!(r#"{{"status":"chunk","data":{{"audio":"{audio}"}}}}"#);
                if ws.send(Message::Text(chunk)).await.is_err() {
                    return;
                }
            }
            if ws.send(Message::Text(r#"{"status":"complete"}"#.into())).await.is_err() {
                return;
            }
        }
    });
    let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let mut times = Vec::with_capacity(syntheses);
    for i in 0..syntheses + syntheses / 10 {
        let started = Instant::now();
        ws.send(Message::Text(format!(
            r#"{{"voice_id":"emily","text":"synthesis number {i}"}}"#
        )))
        .await
        .expect("send");
        loop {
            match ws.next().await.expect("open").expect("frame") {
                Message::Text(text) if text.contains("\"complete\"") => break,
                _ => {}
            }
        }
        // The first tenth warms up.
        if i >= syntheses / 10 {
            times.push(started.elapsed());
        }
    }
    times
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn main() {
    let mut args = std::env::args().skip(1);
    let syntheses: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let chunks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let chunk_bytes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4096);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut p50 = Vec::new();
    for (kind, name) in [(Tunnel::Bytes, "bytes"), (Tunnel::Counting, "counting")] {
        let mut times = runtime.block_on(run(kind, syntheses, chunks, chunk_bytes));
        times.sort();
        let (median, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
        p50.push(median);
        println!(
            "{{\"tunnel\":\"{name}\",\"syntheses\":{},\"messages_per_synthesis\":{},\"chunk_bytes\":{chunk_bytes},\"p50_us\":{median:.1},\"p99_us\":{p99:.1}}}",
            times.len(),
            chunks + 2,
        );
    }
    let added = p50[1] - p50[0];
    println!(
        "{{\"added_p50_us_per_synthesis\":{added:.1},\"added_p50_us_per_message\":{:.1}}}",
        added / (chunks + 2) as f64
    );
}
