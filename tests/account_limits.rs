//! Zero-config protection from Smallest's account limit on every transport, against a stand-in
//! that enforces it (`support::standin`): sync HTTP, SSE and live-TTS WebSocket syntheses share
//! one in-flight count there, and over it the stand-in answers 429 or an error frame. With no
//! `[limits]` at all, the proxy's `smallest` profile must turn that into waits: every client
//! succeeds and no throttled answer reaches one. The learned limit (`max_concurrent = "auto"`)
//! must find an account that allows more, and follow one whose limit falls mid-run.
//! How much faster a learned limit of 3 finishes is measured in `benches/` (no timing
//! assertions here).

mod support;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Full;
use std::sync::atomic::Ordering;
use support::standin::StandIn;
use support::*;

fn speech(proxy: &TestProxy, path: &str) -> Request<Full<Bytes>> {
    Request::post(proxy.url(path))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"text":"hello","voice_id":"emily"}"#)))
        .unwrap()
}

/// `n` sync requests (spread over the sync TTS paths) and `sse` SSE streams, all at once; each
/// must succeed.
fn http_clients(proxy: &TestProxy, n: usize, sse: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let paths = [
        "/waves/v1/lightning-v2/get_speech",
        "/waves/v1/tts",
        "/waves/v1/lightning/get_speech",
    ];
    let mut clients: Vec<_> = (0..n)
        .map(|i| {
            let request = speech(proxy, paths[i % paths.len()]);
            tokio::spawn(async move {
                let (status, _, body) = send(request).await;
                assert_eq!(status, StatusCode::OK, "sync: {}", String::from_utf8_lossy(&body));
                assert_eq!(&body[..], b"RIFF-audio");
            })
        })
        .collect();
    clients.extend((0..sse).map(|_| {
        let request = speech(proxy, "/waves/v1/tts/live");
        tokio::spawn(async move {
            let (status, _, body) = send(request).await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::OK, "sse: {text}");
            assert!(text.ends_with("data: {\"status\":\"complete\"}\n\n"), "sse: {text}");
        })
    }));
    clients
}

/// Python `websockets` clients: `sockets` at once, `syntheses` one after another on each.
fn socket_clients(proxy: &TestProxy, sockets: usize, syntheses: usize) -> tokio::task::JoinHandle<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/tts_sockets.py");
    let url = format!("ws://{}/waves/v1/tts/live", proxy.addr);
    tokio::spawn(async move {
        let output = tokio::process::Command::new(python_with("websockets"))
            .args([script, &url, &sockets.to_string(), &syntheses.to_string()])
            .output()
            .await
            .expect("run python");
        assert!(
            output.status.success(),
            "websocket clients failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        json(&output.stdout)
    })
}

async fn concurrency(proxy: &TestProxy) -> u64 {
    let (_, ready) = proxy.ready().await;
    ready["limits"]["tts"]["concurrency"]
        .as_u64()
        .expect("tts concurrency in /ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_config_http_sse_and_websocket_syntheses_never_see_the_account_limit() {
    let standin = StandIn::start(1, 30).await;
    let proxy = TestProxy::start_for(&standin.url(), &standin.pki.ca_file, "").await;
    let sockets = socket_clients(&proxy, 3, 3);
    for client in http_clients(&proxy, 10, 5) {
        client.await.expect("client");
    }
    let seen = sockets.await.unwrap();
    assert_eq!(seen["complete"], 9, "{seen}");
    assert_eq!(seen["errors"], serde_json::json!([]), "an error frame reached a client");
    assert_eq!(seen["chunks"], 18);
    let account = &standin.account;
    assert_eq!(
        account.max_running.load(Ordering::SeqCst),
        1,
        "the account ran two syntheses at once"
    );
    assert_eq!(account.completed.load(Ordering::SeqCst), 10 + 5 + 9);
    // The socket's deflate offer never reached the stand-in, so its frames could be read.
    let offers = account.ws_extensions.lock().unwrap().clone();
    assert_eq!(offers, vec![None; 3]);
    assert_eq!(seen["extensions"], serde_json::json!([null, null, null]));
    // Anything the stand-in refused was a probe of the learned limit, resent unseen.
    let base = proxy.url("");
    let retries = metric(&base, "smallest_proxy_upstream_retries_total{class=\"tts\"}").await;
    assert_eq!(retries as usize, account.refused(), "every refusal was resent");
    assert!(concurrency(&proxy).await <= 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_allowing_three_is_learned_within_30_requests() {
    let standin = StandIn::start(3, 20).await;
    let proxy = TestProxy::start_for(&standin.url(), &standin.pki.ca_file, "").await;
    assert_eq!(concurrency(&proxy).await, 1);
    for client in http_clients(&proxy, 30, 0) {
        client.await.expect("client");
    }
    let learned = concurrency(&proxy).await;
    assert!(learned >= 3, "learned {learned} after 30 requests");
    assert_eq!(
        standin.account.max_running.load(Ordering::SeqCst),
        3,
        "the learned limit was used"
    );
    let (_, ready) = proxy.ready().await;
    assert_eq!(ready["limits"]["tts"]["learned"], true);
    assert_eq!(ready["limits"]["tts"]["adjusted"], true);
    let gauge = metric(&proxy.url(""), "smallest_proxy_limit_concurrency{class=\"tts\"}").await;
    assert_eq!(gauge as u64, learned);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_limit_falling_from_three_to_one_mid_run_costs_no_client_errors() {
    let standin = StandIn::start(3, 20).await;
    let proxy = TestProxy::start_for(&standin.url(), &standin.pki.ca_file, "").await;
    for client in http_clients(&proxy, 30, 0) {
        client.await.expect("client");
    }
    assert!(concurrency(&proxy).await >= 3);
    // A second run; the account's limit falls to one while it is in flight.
    let sockets = socket_clients(&proxy, 2, 3);
    let clients = http_clients(&proxy, 30, 5);
    let account = standin.account.clone();
    let completed_before = account.completed.load(Ordering::SeqCst);
    let mut completed = account.completed_watch.subscribe();
    completed
        .wait_for(|n| *n >= completed_before + 6)
        .await
        .expect("stand-in running");
    account.allow.store(1, Ordering::SeqCst);
    for client in clients {
        client.await.expect("client");
    }
    let seen = sockets.await.unwrap();
    assert_eq!(seen["complete"], 6, "{seen}");
    assert_eq!(seen["errors"], serde_json::json!([]), "an error frame reached a client");
    assert!(account.refused() > 0, "the fall was noticed by a refusal");
    assert_eq!(concurrency(&proxy).await, 1, "the limit followed the account");
    proxy.stop().await;
}
