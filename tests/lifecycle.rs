//! Signals to the real binary: SIGHUP reloads the config (applied to the next request, or kept
//! when the new file is broken), SIGTERM drains WebSocket tunnels and closes them with 1001 at
//! the deadline, and a second signal exits at once.

mod support;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const SECOND_KEY: &str = "sk-test-second-Key-Hh3Jk5";

fn authorization_of_last_request(upstream: &TestUpstream) -> String {
    let records = upstream.records();
    let last = records.last().expect("a request reached the upstream");
    last.headers["authorization"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_upstream_key_file_limit_and_log_level_to_the_next_request_only() {
    let upstream = TestUpstream::start().await;
    let moved_upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first_key = dir.path().join("first");
    let second_key = dir.path().join("second");
    std::fs::write(&first_key, TEST_KEY).unwrap();
    std::fs::write(&second_key, SECOND_KEY).unwrap();
    let mut proxy = ProxyProcess::spawn(
        &proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &first_key, ""),
        &[],
    );
    // Before: the first upstream and key, no limit (a request while a stream is open is fine),
    // info level.
    let in_flight = support::client().get(proxy.url("/sse").parse().unwrap()).await.unwrap();
    assert_eq!(get(&proxy.url("/echo")).await.0, 200);
    assert_eq!(authorization_of_last_request(&upstream), format!("Bearer {TEST_KEY}"));

    assert!(
        !proxy.stderr_text().contains(" DEBUG "),
        "debug lines before the reload"
    );
    // A new upstream (with its own CA), key file, limit and log level.
    std::fs::write(
        proxy.config_path(),
        proxy_config_text(
            &moved_upstream.url(),
            &moved_upstream.pki.ca_file,
            &second_key,
            "[limits]\nmax_concurrent = 1\nmax_queue = 0\n[log]\nlevel = \"smallest_proxy=debug\"\n",
        ),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reloaded", 1, Duration::from_secs(20));

    // The stream opened before the reload finishes on the old upstream.
    upstream.state.sse_release.notify_one();
    let rest = in_flight.into_body().collect().await.unwrap().to_bytes();
    assert!(rest.ends_with(b"data: event-3\n\n"), "{rest:?}");
    let old_count = upstream.records().len();

    // The next request: the new upstream, with the second key...
    assert_eq!(get(&proxy.url("/echo")).await.0, 200);
    assert_eq!(
        authorization_of_last_request(&moved_upstream),
        format!("Bearer {SECOND_KEY}")
    );
    assert_eq!(
        upstream.records().len(),
        old_count,
        "nothing more went to the old upstream"
    );
    // ...the new limit (one slot, no queue: a second request while one streams is shed)...
    let held = support::client().get(proxy.url("/sse").parse().unwrap()).await.unwrap();
    let (status, _, body) = get(&proxy.url("/echo")).await;
    assert_eq!(status, 429);
    assert_eq!(json(&body)["code"], "RATE_LIMIT_EXCEEDED");
    // ...and the debug level (the shed request's "answered locally" line is at debug).
    proxy.wait_for_log("answered locally", 1, Duration::from_secs(10));
    moved_upstream.state.sse_release.notify_one();
    held.into_body().collect().await.unwrap();
    wait_metric(
        &proxy.url(""),
        "smallest_proxy_config_reloads_total{result=\"success\"}",
        |v| v == 1.0,
    )
    .await;
    let log = proxy.stderr_text();
    assert!(!log.contains(TEST_KEY) && !log.contains(SECOND_KEY));
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.child.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_keeps_the_running_config_logs_line_and_column_and_counts_it() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir);
    let config = proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key, "");
    let proxy = ProxyProcess::spawn(&config, &[]);

    // A bad value on a known line: the error must point at it.
    let broken = format!("{config}\n[limits]\nmax_concurrent = \"many\"\n");
    let bad_line = broken.lines().position(|l| l.starts_with("max_concurrent")).unwrap() + 1;
    std::fs::write(proxy.config_path(), &broken).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reload failed", 1, Duration::from_secs(20));
    let log = proxy.stderr_text();
    let line = log.lines().find(|l| l.contains("config reload failed")).unwrap();
    let location = format!("{}:{bad_line}:", proxy.config_path().display());
    assert!(line.contains(&location), "no {location} in: {line}");
    assert!(line.contains("limits.max_concurrent"), "{line}");

    // A key source that cannot be built (the file is gone) is refused too.
    let missing = config.replace(key.to_str().unwrap(), "/nonexistent/key");
    std::fs::write(proxy.config_path(), &missing).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reload failed", 2, Duration::from_secs(20));

    // The running config is untouched: same key, still served.
    assert_eq!(get(&proxy.url("/echo")).await.0, 200);
    assert_eq!(authorization_of_last_request(&upstream), format!("Bearer {TEST_KEY}"));
    let (status, _, ready) = get(&proxy.url("/ready")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&ready));
    wait_metric(
        &proxy.url(""),
        "smallest_proxy_config_reloads_total{result=\"failure\"}",
        |v| v == 2.0,
    )
    .await;
    assert_eq!(
        metric(
            &proxy.url(""),
            "smallest_proxy_config_reloads_total{result=\"success\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_changed_listen_address_warns_and_keeps_serving_where_it_was() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir);
    let config = proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key, "");
    let proxy = ProxyProcess::spawn(&config, &[]);
    let moved = config.replace("127.0.0.1:0", "127.0.0.1:1");
    assert_ne!(moved, config);
    std::fs::write(proxy.config_path(), moved).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reloaded", 1, Duration::from_secs(20));
    assert!(proxy.stderr_text().contains("change only on restart"));
    assert_eq!(get(&proxy.url("/echo")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_an_open_websocket_working_until_drain_timeout_then_closes_it_with_1001() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir);
    let drain = Duration::from_secs(1);
    let mut proxy = ProxyProcess::spawn(
        &proxy_config_text(
            &upstream.url(),
            &upstream.pki.ca_file,
            &key,
            "[listen]\ndrain_timeout = \"1s\"\n",
        ),
        &[("RUST_LOG", "info,smallest_proxy::proxy=debug")],
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws/echo", proxy.addr))
        .await
        .expect("handshake");
    ws.send(Message::Text("before".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("before".into()));

    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    proxy.wait_for_log("shutdown requested", 1, Duration::from_secs(10));
    // Draining: the tunnel still carries messages both ways, a large binary one included.
    ws.send(Message::Text("during".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("during".into()));
    let audio: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    ws.send(Message::Binary(audio.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(audio));

    // At the deadline: Close(1001) from the proxy.
    let frame = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("a close frame within the bound")
        .expect("a message")
        .expect("a valid frame");
    let closed_after = signalled.elapsed();
    match frame {
        Message::Close(Some(close)) => assert_eq!(u16::from(close.code), 1001),
        other => panic!("expected Close(1001), got {other:?}"),
    }
    assert!(
        closed_after >= drain - Duration::from_millis(100),
        "closed after {closed_after:?}, before the {drain:?} drain"
    );
    // The client's Close reply ends the exchange; the process exits 0.
    while let Some(Ok(_)) = ws.next().await {}
    let status = proxy.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        proxy.stderr_text().contains("closed with 1001 at the drain deadline"),
        "{}",
        proxy.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_during_a_long_drain() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir);
    let mut proxy = ProxyProcess::spawn(
        &proxy_config_text(
            &upstream.url(),
            &upstream.pki.ca_file,
            &key,
            "[listen]\ndrain_timeout = \"10m\"\n",
        ),
        &[],
    );
    // An open WebSocket and an unfinished SSE stream would hold the drain for 10 minutes.
    let (_ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws/echo", proxy.addr))
        .await
        .expect("handshake");
    let _sse = support::client().get(proxy.url("/sse").parse().unwrap()).await.unwrap();
    proxy.signal(libc::SIGTERM);
    proxy.wait_for_log("shutdown requested", 1, Duration::from_secs(10));
    proxy.signal(libc::SIGINT);
    // Bounded wait for the exit (the drain would take 10 minutes).
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after a second signal");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(proxy.stderr_text().contains("second signal"));
}
