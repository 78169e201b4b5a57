//! The key is a secret everywhere: a sweep of every log line at trace level, in both formats,
//! across plain, streamed, WebSocket and failing requests.

mod support;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

async fn exercise(proxy: &ProxyProcess, upstream: &TestUpstream) {
    for path in [
        "/waves/v1/lightning-v2/get_speech?x=1",
        "/status/401",
        "/status/429",
        "/ready",
        "/health",
        "/redirect",
    ] {
        let (status, _, _) = get(&proxy.url(path)).await;
        assert!(status.as_u16() > 0);
    }
    let response = support::client().get(proxy.url("/sse").parse().unwrap()).await.unwrap();
    upstream.state.sse_release.notify_one();
    response.into_body().collect().await.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/waves/v1/tts/live", proxy.addr))
        .await
        .unwrap();
    ws.send(Message::Text("hi".into())).await.unwrap();
    ws.next().await.unwrap().unwrap();
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_trace_level_contains_the_key() {
    for format in ["text", "json"] {
        let upstream = TestUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, TEST_KEY).unwrap();
        let config = proxy_config_text(
            &upstream.url(),
            &upstream.pki.ca_file,
            &key_file,
            &format!("[log]\nformat = \"{format}\"\n"),
        );
        let proxy = ProxyProcess::spawn(&config, &[("RUST_LOG", "trace")]);
        exercise(&proxy, &upstream).await;
        let records = upstream.records();
        assert!(records.iter().any(|r| r
            .headers
            .get("authorization")
            .is_some_and(|a| a.to_str().unwrap().contains(TEST_KEY))));
        // Let the process write its last lines for the requests above, then stop it.
        proxy.signal(libc::SIGTERM);
        let mut proxy = proxy;
        let _ = proxy.child.wait();
        let log = proxy.stderr_text();
        assert!(log.lines().count() > 50, "expected a trace-level log, got:\n{log}");
        assert!(
            log.contains("TRACE") || log.contains("\"level\":\"TRACE\""),
            "not at trace level"
        );
        assert!(!log.contains(TEST_KEY), "the key appears in the {format} log");
        // Nor any large piece of it (a truncated or split copy).
        assert!(
            !log.contains(&TEST_KEY[3..15]),
            "part of the key appears in the {format} log"
        );
        if format == "json" {
            for line in log.lines() {
                serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            }
        }
    }
}
