//! Caller control (Unix peer uid, local token), the path policy, request size
//! limits with JSON answers, client idle and upstream stream idle timeouts, and the Unix socket
//! created safely. Raw sockets wherever the client's exact bytes matter.

mod support;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous bound on waits for something the proxy must do by itself.
const BOUND: Duration = Duration::from_secs(10);

/// A proxy listening only on a Unix socket (allowed_uids refuses a TCP listener beside it).
struct UnixProxy {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl UnixProxy {
    async fn start(upstream: &TestUpstream, extra: &str) -> UnixProxy {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("api-key");
        std::fs::write(&key_file, TEST_KEY).unwrap();
        let socket = dir.path().join("proxy.sock");
        let text = proxy_config_text(
            &upstream.url(),
            &upstream.pki.ca_file,
            &key_file,
            &format!("[listen]\nunix_socket = \"{}\"\n{extra}", socket.display()),
        );
        let mut table: toml::Table = toml::from_str(&text).unwrap();
        table["listen"].as_table_mut().unwrap().remove("address");
        let config =
            smallest_proxy::config::load_text(None, &toml::to_string(&table).unwrap(), &[]).expect("valid config");
        let listeners = smallest_proxy::Listeners::bind(&config.listen).await.expect("bind");
        let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            smallest_proxy::run(config, listeners, async move {
                let _ = rx.await;
            })
            .await
            .expect("proxy run");
        });
        UnixProxy {
            socket,
            _dir: dir,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

/// Send `request` (which should say `Connection: close`) over the Unix socket; read to EOF.
async fn unix_exchange(socket: &Path, request: &str) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut out))
        .await
        .expect("the proxy answered and closed")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a raw response.
fn body_json(response: &str) -> serde_json::Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    json(body.as_bytes())
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// Read one response with a Content-Length body from a kept-alive connection.
async fn read_one_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(BOUND, stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed mid-response: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// True when the peer closes the connection within the bound (reading nothing more).
async fn closed_by_peer(stream: &mut tokio::net::TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(BOUND, stream.read_to_end(&mut rest)).await,
        Ok(Ok(_))
    )
}

fn my_uid() -> u32 {
    // SAFETY: geteuid has no preconditions. SO_PEERCRED reports the effective uid.
    unsafe { libc::geteuid() }
}

#[tokio::test]
async fn unix_callers_are_admitted_by_uid() {
    let upstream = TestUpstream::start().await;
    let request = "POST /waves/v1/lightning/get_speech HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi";

    let proxy = UnixProxy::start(&upstream, &format!("allowed_uids = [{}]\n", my_uid())).await;
    let response = unix_exchange(&proxy.socket, request).await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(upstream.records().len(), 1);
    proxy.stop().await;

    let proxy = UnixProxy::start(&upstream, &format!("allowed_uids = [{}]\n", my_uid().wrapping_add(1))).await;
    let response = unix_exchange(&proxy.socket, request).await;
    assert_eq!(status_of(&response), 403, "{response}");
    let body = body_json(&response);
    assert_eq!(body["code"], "FORBIDDEN_CALLER");
    assert!(body["error"].as_str().unwrap().contains(&my_uid().to_string()));
    assert!(body["request_id"].is_string());
    // Admin endpoints too: a refused caller learns nothing.
    let health = unix_exchange(
        &proxy.socket,
        "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&health), 403, "{health}");
    assert_eq!(upstream.records().len(), 1, "nothing forwarded for a refused caller");
    proxy.stop().await;
}

#[tokio::test]
async fn allowed_uids_with_a_tcp_listener_is_a_config_error() {
    let e = smallest_proxy::config::load_text(
        None,
        "[listen]\naddress = \"127.0.0.1:0\"\nallowed_uids = [1000]\n",
        &[],
    )
    .unwrap_err();
    assert_eq!(e.key, "listen.allowed_uids");
}

#[tokio::test]
async fn the_unix_socket_gets_its_mode_and_leaves_nothing_behind() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let listener = smallest_proxy::server::bind_unix(&socket, 0o640).expect("bind");
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("proxy.sock")],
        "the private staging dir is gone"
    );

    // Live: never replaced, and still served.
    let e = smallest_proxy::server::bind_unix(&socket, 0o600).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    let accepted = tokio::spawn(async move { listener.accept().await.is_ok() });
    tokio::net::UnixStream::connect(&socket)
        .await
        .expect("the live socket still answers");
    assert!(accepted.await.unwrap());

    // Stale (its listener is gone): replaced, with the new mode.
    let replaced = smallest_proxy::server::bind_unix(&socket, 0o600).expect("stale socket replaced");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    drop(replaced);

    // Not a socket: refused.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = smallest_proxy::server::bind_unix(&file, 0o600).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

#[tokio::test]
async fn the_local_token_is_required_and_never_forwarded() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "local-t0ken-xyz\n").unwrap();
    let proxy = TestProxy::start(
        &upstream,
        &format!("[listen]\ntoken_file = \"{}\"\n", token_file.display()),
    )
    .await;
    let url = proxy.url("/waves/v1/lightning/get_voices");
    for token in [None, Some("wrong"), Some("local-t0ken-xy")] {
        let mut req = Request::get(&url);
        if let Some(t) = token {
            req = req.header("x-proxy-token", t);
        }
        let (status, _, body) = send(req.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(json(&body)["code"], "PROXY_TOKEN_REQUIRED");
        assert!(!String::from_utf8_lossy(&body).contains("local-t0ken"));
    }
    assert!(upstream.records().is_empty());
    let req = Request::get(&url)
        .header("x-proxy-token", "local-t0ken-xyz")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, _) = send(req).await;
    assert_eq!(status, StatusCode::OK);
    let seen = upstream.records();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key("x-proxy-token"),
        "the token reached the upstream"
    );
    assert_eq!(
        get(&proxy.url("/health")).await.0,
        StatusCode::OK,
        "health needs no token"
    );
    proxy.stop().await;
}

async fn call(proxy: &TestProxy, method: Method, path: &str) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(req).await;
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, body)
}

#[tokio::test]
async fn the_smallest_preset_refuses_risky_paths_until_switched_on() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[policy]\npreset = \"smallest\"\n").await;
    assert_eq!(
        call(&proxy, Method::POST, "/waves/v1/lightning-v2/get_speech").await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&proxy, Method::GET, "/api/v1/lightning/get_voices").await.0,
        StatusCode::OK
    );
    for (method, path) in [
        (Method::DELETE, "/waves/v1/lightning-large"),
        (Method::POST, "/waves/v1/pronunciation-dicts"),
        (Method::POST, "/not/smallest"),
        (Method::GET, "/waves/v1/analytics/asr/logs"),
        (Method::DELETE, "/waves/v1/analytics/asr/history/r1"),
    ] {
        let (status, body) = call(&proxy, method.clone(), path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(body["code"], "FORBIDDEN_PATH");
    }
    // A dot-segment detour to a refused path, in raw bytes (clients would normalise it).
    let response = raw_exchange(
        proxy.addr,
        b"POST /waves/v1/lightning/get_speech/../../pronunciation-dicts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 403, "{response}");
    assert_eq!(upstream.records().len(), 2, "only the allowed calls were forwarded");
    proxy.stop().await;

    let proxy = TestProxy::start(
        &upstream,
        "[policy]\npreset = \"smallest\"\nallow_voice_clone_delete = true\nallow_pronunciation_edits = true\ndeny = [\"POST /waves/v1/*/add_voice\"]\n",
    )
    .await;
    assert_eq!(
        call(&proxy, Method::DELETE, "/waves/v1/lightning-large").await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&proxy, Method::PUT, "/waves/v1/pronunciation-dicts").await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&proxy, Method::POST, "/waves/v1/lightning-large/add_voice")
            .await
            .0,
        StatusCode::FORBIDDEN,
        "deny wins over the preset"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn header_and_uri_limits_answer_json_and_hyper_bounds_the_rest() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let head = |extra: &str, path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n").into_bytes()
    };

    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let response = raw_exchange(proxy.addr, &head(&many, "/api/v1/voices")).await;
    assert_eq!(status_of(&response), 431, "{response}");
    assert_eq!(body_json(&response)["code"], "HEADERS_TOO_LARGE");

    let big = format!("x-big: {}\r\n", "a".repeat(33 * 1024));
    let response = raw_exchange(proxy.addr, &head(&big, "/api/v1/voices")).await;
    assert_eq!(status_of(&response), 431, "{response}");
    assert!(body_json(&response)["error"]
        .as_str()
        .unwrap()
        .contains("max_header_bytes"));

    let path = format!("/api/v1/voices?q={}", "a".repeat(9000));
    let response = raw_exchange(proxy.addr, &head("", &path)).await;
    assert_eq!(status_of(&response), 414, "{response}");
    assert_eq!(body_json(&response)["code"], "URI_TOO_LONG");

    // Past twice the limits hyper's parser stops it: a bare 431, then the connection closes.
    let huge = format!("x-big: {}\r\n", "a".repeat(100 * 1024));
    let response = raw_exchange(proxy.addr, &head(&huge, "/api/v1/voices")).await;
    assert_eq!(status_of(&response), 431, "{response}");
    let flood: String = (0..201).map(|i| format!("x-h{i}: v\r\n")).collect();
    let response = raw_exchange(proxy.addr, &head(&flood, "/api/v1/voices")).await;
    assert_eq!(status_of(&response), 431, "{response}");

    assert!(upstream.records().is_empty(), "nothing oversized was forwarded");
    proxy.stop().await;
}

#[tokio::test]
async fn an_oversized_body_is_refused_from_content_length_without_being_read() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[listen]\nmax_body_size = 1000\n").await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // The head only: the 413 must come without the proxy waiting for (or reading) the body.
    stream
        .write_all(
            b"POST /waves/v1/lightning/get_speech HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n",
        )
        .await
        .unwrap();
    let response = read_one_response(&mut stream).await;
    assert_eq!(status_of(&response), 413, "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert_eq!(body_json(&response)["code"], "PAYLOAD_TOO_LARGE");
    assert!(closed_by_peer(&mut stream).await, "the connection is closed after 413");

    // At the cap it passes.
    let body = "x".repeat(1000);
    let request = format!("POST /waves/v1/lightning/get_speech HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n{body}");
    assert_eq!(status_of(&raw_exchange(proxy.addr, request.as_bytes()).await), 200);
    assert_eq!(upstream.records().len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_chunked_body_past_the_cap_is_aborted_not_forwarded_whole() {
    for http2 in [true, false] {
        let upstream = TestUpstream::start_with(UpstreamOptions { http2 }).await;
        let proxy = TestProxy::start(&upstream, "[listen]\nmax_body_size = 1000\n").await;
        let chunk = format!("258\r\n{}\r\n", "y".repeat(600));
        let head = "POST /waves/v1/lightning/get_speech HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n";
        let over = format!("{head}{chunk}{chunk}0\r\n\r\n");
        let response = raw_exchange(proxy.addr, over.as_bytes()).await;
        assert_eq!(status_of(&response), 413, "h2={http2}: {response}");
        assert_eq!(body_json(&response)["code"], "PAYLOAD_TOO_LARGE");
        assert!(
            upstream.records().iter().all(|r| r.body.len() < 1200),
            "the upstream received the whole oversized body"
        );

        let under = format!("{head}{chunk}0\r\n\r\n");
        let response = raw_exchange(proxy.addr, under.as_bytes()).await;
        assert_eq!(status_of(&response), 200, "h2={http2}: {response}");
        assert!(upstream.records().iter().any(|r| r.body.len() == 600));
        proxy.stop().await;
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let upstream = TestUpstream::start().await;
    // The header timeout is far longer: only the idle timeout can close it within the bound.
    let proxy = TestProxy::start(
        &upstream,
        "[listen]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"30s\"\n",
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status_of(&read_one_response(&mut stream).await), 200);
    assert!(closed_by_peer(&mut stream).await, "idle connection still open");
    proxy.stop().await;
}

#[tokio::test]
async fn a_keep_alive_connection_outlives_the_header_timeout_but_a_started_head_does_not() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(
        &upstream,
        "[listen]\nidle_timeout = \"30s\"\nheader_read_timeout = \"200ms\"\n",
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status_of(&read_one_response(&mut stream).await), 200);
    // Idle for five header timeouts (the passing time is what is tested): hyper alone would
    // have closed the connection after one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status_of(&read_one_response(&mut stream).await), 200, "kept alive");

    // A head that starts but never ends is cut at the header timeout.
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: loc").await.unwrap();
    assert!(closed_by_peer(&mut stream).await, "unfinished head not cut");
    proxy.stop().await;
}

#[tokio::test]
async fn a_stalled_upstream_stream_is_cut_and_a_moving_one_is_not() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[upstream]\nstream_idle_timeout = \"500ms\"\n").await;

    // Keeps sending every 100 ms for 1.5 s: three idle timeouts in total, never one idle.
    let response = client()
        .get(proxy.url("/sse-ticks?n=16&every_ms=100").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(BOUND, response.into_body().collect())
        .await
        .expect("stream ended")
        .expect("a moving stream is not cut")
        .to_bytes();
    assert_eq!(String::from_utf8_lossy(&body).matches("event: tick").count(), 16);

    // Sends one event, then nothing (sse_release is never notified).
    let response = client().get(proxy.url("/sse").parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.expect("first event").expect("first event");
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("first"));
    let rest = tokio::time::timeout(BOUND, body.collect())
        .await
        .expect("stalled stream cut within the bound");
    assert!(rest.is_err(), "a cut stream must not look complete to the client");
    assert!(!upstream.state.sse_finished.load(std::sync::atomic::Ordering::SeqCst));
    proxy.stop().await;
}

#[tokio::test]
async fn a_silent_websocket_tunnel_is_closed_and_a_busy_one_is_not() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[upstream]\nstream_idle_timeout = \"300ms\"\n").await;
    let url = format!("ws://{}/waves/v1/tts/live", proxy.addr);

    // A message every 100 ms for 1.2 s: four idle timeouts in total, never one idle.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    for i in 0..12 {
        ws.send(Message::Text(format!("m{i}"))).await.unwrap();
        let echo = tokio::time::timeout(BOUND, ws.next()).await.expect("echo in time");
        assert_eq!(echo.unwrap().unwrap(), Message::Text(format!("m{i}")));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ws.close(None).await.unwrap();

    // Silent after one exchange: the proxy closes the tunnel by itself.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hi".into()));
    let ended = tokio::time::timeout(BOUND, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the silent tunnel is still open");
    proxy.stop().await;
}

/// Send one keep-alive GET on `stream` and return the raw response.
async fn keep_alive_get(stream: &mut tokio::net::TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    read_one_response(stream).await
}

#[tokio::test]
async fn past_max_connections_a_client_waits_until_a_slot_frees() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[listen]\nmax_connections = 2\n").await;
    // Two kept-alive connections, each having completed a request, hold both slots. (The
    // start-up /health connection may still hold one for a moment: these then wait for it.)
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(status_of(&keep_alive_get(&mut first, "/api/v1/voices").await), 200);
    let mut second = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(status_of(&keep_alive_get(&mut second, "/api/v1/voices").await), 200);

    // The third connects (the kernel backlog takes it) but is not served while both are open.
    let mut third = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    third
        .write_all(b"GET /api/v1/voices HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut early = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(500), third.read(&mut early)).await;
    assert!(
        waited.is_err(),
        "a third connection was answered past max_connections: {waited:?}"
    );

    // Closing one of the two frees its slot: the waiting request is served.
    drop(first);
    let response = read_one_response(&mut third).await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(status_of(&keep_alive_get(&mut second, "/api/v1/voices").await), 200);
    proxy.stop().await;
}

/// A loopback listener that never accepts and whose accept queue is full: further connects
/// to it get no SYN-ACK on Linux (the kernel drops SYNs to a listener with a full queue),
/// so they hang until the connector's own timeout. Returns the port and the sockets that
/// fill the queue (keep them alive).
fn unanswering_listener() -> (tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // Connect until one attempt goes unanswered: the queue is then full.
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => fillers.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return (listener, fillers),
            Err(e) => panic!("filling the accept queue of {addr}: {e}"),
        }
    }
    panic!("{addr} kept completing connects with a listen backlog of 0; cannot make connects stall here");
}

#[tokio::test]
async fn an_upstream_that_never_completes_the_connect_is_504_after_connect_timeout() {
    let (listener, _fillers) = unanswering_listener();
    let port = listener.local_addr().unwrap().port();
    let pki = support::upstream::TestPki::new();
    // The response timeout is far longer: only the connect timeout can answer within it.
    let proxy = TestProxy::start_for(
        &format!("https://127.0.0.1:{port}"),
        &pki.ca_file,
        "[upstream]\nconnect_timeout = \"300ms\"\nresponse_timeout = \"30s\"\n",
    )
    .await;
    let started = std::time::Instant::now();
    let (status, _, body) = tokio::time::timeout(BOUND, get(&proxy.url("/api/v1/voices")))
        .await
        .expect("an answer before the response timeout");
    let took = started.elapsed();
    let body = json(&body);
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["code"], "UPSTREAM_TIMEOUT", "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("connecting"), "{body}");
    assert!(
        took >= Duration::from_millis(300),
        "answered after {took:?}, before the connect timeout"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn idle_pooled_upstream_connections_expire_after_pool_idle_timeout() {
    for http2 in [true, false] {
        let upstream = TestUpstream::start_with(UpstreamOptions { http2 }).await;
        let proxy = TestProxy::start(&upstream, "[upstream]\npool_idle_timeout = \"1s\"\n").await;
        // Back to back, the second request reuses the pooled connection.
        for _ in 0..2 {
            let (status, _, _) = get(&proxy.url("/api/v1/voices")).await;
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(upstream.connections(), 1, "h2={http2}: not reused");
        assert_eq!(upstream.closed_connections(), 0, "h2={http2}");

        // Idle past the timeout, the pool closes it (the default would keep it for 90 s, far
        // past this wait's bound), and the next request needs a new connection.
        upstream.state.wait_closed_connections(1).await;
        let (status, _, _) = get(&proxy.url("/api/v1/voices")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(upstream.connections(), 2, "h2={http2}: no new connection");
        proxy.stop().await;
    }
}

/// With no policy at all, a path that an upstream would normalise into the `tts` class (or a
/// metered path) is refused, so it cannot slip past the class's limit or an app's budget; a
/// dot segment that stays in its class is forwarded as before.
#[tokio::test]
async fn a_dot_segment_detour_into_a_limited_or_metered_path_is_refused() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    for target in [
        "/x/../waves/v1/tts",
        "/waves/v1/x/%2e%2e/tts",
        "//waves/v1/lightning-v2/get_speech",
        "/v1/../waves/v1/pulse/get_text",
    ] {
        let head =
            format!("POST {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}");
        let response = raw_exchange(proxy.addr, head.as_bytes()).await;
        assert_eq!(status_of(&response), 403, "{target}: {response}");
        assert!(response.contains("FORBIDDEN_PATH"), "{response}");
    }
    assert!(upstream.records().is_empty(), "nothing was forwarded");
    let response = raw_exchange(
        proxy.addr,
        b"POST /a/b/../c HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    assert_eq!(status_of(&response), 200, "{response}");
    assert_eq!(upstream.records()[0].uri.path(), "/a/b/../c");
    proxy.stop().await;
}
