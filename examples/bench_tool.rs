//! The benchmark's own programs (benches/run.sh drives them), one binary with subcommands:
//!
//! - `upstream CERT KEY PORT_FILE`: a TLS (rustls) HTTP/1.1 upstream with `/sse` (20 events,
//!   each carrying its send time in CLOCK_REALTIME nanoseconds) and `/ws` (WebSocket echo).
//! - `sse URL STREAMS`: reads STREAMS event streams through a proxy; prints the first-event time
//!   and the lag (receive time − send time) of every event, as one JSON line.
//! - `ws URL ROUND_TRIPS`: WebSocket echo round trips through a proxy, one at a time; prints the
//!   median and p99 as one JSON line.
//! - `idle ADDR PATH COUNT PID...`: opens COUNT keep-alive connections to ADDR, one request on
//!   each, holds them open and prints the RSS growth of the PIDs per connection as one JSON line.
//!
//! Only loopback addresses are accepted; every wait is bounded.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::{Message, Role};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Events per SSE stream and the gap between them.
const SSE_EVENTS: usize = 20;
const SSE_INTERVAL: Duration = Duration::from_millis(10);
/// Upper bound for any single wait in a client subcommand.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let arg = |i: usize| -> Result<&str, BoxError> {
        args.get(i).map(String::as_str).ok_or_else(|| {
            "usage: bench_tool upstream CERT KEY PORT_FILE | sse URL STREAMS | ws URL N | idle ADDR PATH N PID..."
                .into()
        })
    };
    match arg(0)? {
        "upstream" => runtime.block_on(upstream(arg(1)?, arg(2)?, arg(3)?)),
        "sse" => runtime.block_on(sse(arg(1)?, arg(2)?.parse()?)),
        "ws" => runtime.block_on(ws(arg(1)?, arg(2)?.parse()?)),
        "idle" => {
            let pids: Vec<u32> = args[4..].iter().map(|p| p.parse()).collect::<Result<_, _>>()?;
            runtime.block_on(idle(arg(1)?.parse()?, arg(2)?, arg(3)?.parse()?, &pids))
        }
        other => Err(format!("unknown subcommand {other:?}").into()),
    }
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn loopback(addr: SocketAddr) -> Result<SocketAddr, BoxError> {
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!("{addr} is not a loopback address").into())
    }
}

// ---- upstream ----

async fn upstream(cert: &str, key: &str, port_file: &str) -> Result<(), BoxError> {
    let certs = rustls_pemfile::certs(&mut std::fs::read(cert)?.as_slice()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::fs::read(key)?.as_slice())?.ok_or("no private key in KEY")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    std::fs::write(port_file, listener.local_addr()?.port().to_string())?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service_fn(route))
                .with_upgrades()
                .await;
        });
    }
}

async fn route(mut req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    Ok(match req.uri().path() {
        "/sse" => sse_stream(),
        "/ws" => websocket_echo(&mut req),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap_or_default(),
    })
}

fn sse_stream() -> Response<UpBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(SSE_EVENTS);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SSE_INTERVAL);
        for _ in 0..SSE_EVENTS {
            tick.tick().await;
            let event = format!("data: {}\n\n", now_ns());
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_default()
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<UpBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap_or_default();
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if matches!(message, Message::Text(_) | Message::Binary(_)) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()).boxed())
        .unwrap_or_default()
}

// ---- clients ----

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn sse(url: &str, streams: usize) -> Result<(), BoxError> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().ok_or("URL has no host")?.clone();
    let addr = loopback(authority.as_str().parse()?)?;
    let mut first_ms = Vec::new();
    let mut lag_ms = Vec::new();
    for _ in 0..streams {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::get(uri.clone())
            .header(header::HOST, authority.as_str())
            .header(header::ACCEPT, "text/event-stream")
            .body(http_body_util::Empty::<Bytes>::new())?;
        let started = Instant::now();
        let mut response = tokio::time::timeout(STEP_TIMEOUT, sender.send_request(req)).await??;
        if response.status() != StatusCode::OK {
            return Err(format!("SSE answered {}", response.status()).into());
        }
        let mut pending = Vec::new();
        let mut events = 0;
        while events < SSE_EVENTS {
            let Some(frame) = tokio::time::timeout(STEP_TIMEOUT, response.frame()).await? else {
                break;
            };
            let Ok(data) = frame?.into_data() else { continue };
            let received = now_ns();
            pending.extend_from_slice(&data);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let text = std::str::from_utf8(&event)?;
                let sent: u128 = text.trim().trim_start_matches("data: ").parse()?;
                if events == 0 {
                    first_ms.push(started.elapsed().as_secs_f64() * 1e3);
                }
                lag_ms.push(received.saturating_sub(sent) as f64 / 1e6);
                events += 1;
            }
        }
        if events < SSE_EVENTS {
            return Err(format!("stream ended after {events} of {SSE_EVENTS} events").into());
        }
    }
    first_ms.sort_by(f64::total_cmp);
    lag_ms.sort_by(f64::total_cmp);
    println!(
        "{{\"first_event_ms\":{:.3},\"lag_median_ms\":{:.3},\"lag_max_ms\":{:.3},\"events\":{}}}",
        percentile(&first_ms, 50.0),
        percentile(&lag_ms, 50.0),
        lag_ms.last().copied().unwrap_or(f64::NAN),
        lag_ms.len()
    );
    Ok(())
}

async fn ws(url: &str, round_trips: usize) -> Result<(), BoxError> {
    let uri: http::Uri = url.parse()?;
    loopback(uri.authority().ok_or("URL has no host")?.as_str().parse()?)?;
    let (mut socket, _) = tokio::time::timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(url)).await??;
    let payload = "x".repeat(64);
    let mut rtt_us = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let started = Instant::now();
        socket.send(Message::text(payload.clone())).await?;
        loop {
            match tokio::time::timeout(STEP_TIMEOUT, socket.next()).await? {
                Some(Ok(Message::Text(_))) => break,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err("the WebSocket closed".into()),
            }
        }
        rtt_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let _ = socket.close(None).await;
    rtt_us.sort_by(f64::total_cmp);
    println!(
        "{{\"rtt_median_us\":{:.1},\"rtt_p99_us\":{:.1},\"round_trips\":{}}}",
        percentile(&rtt_us, 50.0),
        percentile(&rtt_us, 99.0),
        rtt_us.len()
    );
    Ok(())
}

/// Resident set of every pid, in KiB (VmRSS).
fn rss_kib(pids: &[u32]) -> Result<u64, BoxError> {
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .ok_or("no VmRSS line")?;
        total += line.split_whitespace().nth(1).ok_or("bad VmRSS line")?.parse::<u64>()?;
    }
    Ok(total)
}

/// One GET on `stream`, read to the end of its response (Content-Length or chunked).
async fn one_request(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<(), BoxError> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(STEP_TIMEOUT, stream.read(&mut chunk)).await??;
        if n == 0 {
            return Err("the connection closed before the response ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!("answered {}", head.lines().next().unwrap_or("")).into());
        }
        let body = &buf[head_end + 4..];
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let done = match length {
            Some(length) => body.len() >= length,
            None => body.ends_with(b"0\r\n\r\n"),
        };
        if done {
            return Ok(());
        }
    }
}

async fn idle(addr: SocketAddr, path: &str, count: usize, pids: &[u32]) -> Result<(), BoxError> {
    let addr = loopback(addr)?;
    // One warm connection first so pools and lazily built state exist before the baseline.
    let mut warm = TcpStream::connect(addr).await?;
    one_request(&mut warm, addr, path).await?;
    let before = rss_kib(pids)?;
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await??;
        one_request(&mut stream, addr, path).await?;
        held.push(stream);
    }
    // Let the server side settle (buffers released after the response) before reading.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib(pids)?;
    println!(
        "{{\"connections\":{count},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"bytes_per_connection\":{:.0}}}",
        (after.saturating_sub(before) as f64 * 1024.0) / count as f64
    );
    drop(held);
    Ok(())
}
