//! Client-side limits against a test upstream that answers 429 like Smallest when more than one
//! request is in flight: waits instead of 429s, FIFO queues that shed with a clear answer,
//! pacing, upstream 429 retries, WebSocket caps, and slots that are never leaked.

mod support;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::*;

fn tts_class(extra: &str) -> String {
    format!("[[limits.class]]\nname = \"tts\"\npaths = [\"/waves/v1/lightning\", \"/waves/v1/tts\", \"/hang\", \"/sse\", \"/flaky\"]\nmax_concurrent = 1\n{extra}\n")
}

fn speech_request(url: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"text":"hello","voice_id":"emily"}"#)))
        .unwrap()
}

fn assert_shed(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let body = json(body);
    assert_eq!(body["code"], "RATE_LIMIT_EXCEEDED");
    assert_eq!(body["retry_after"], retry_after);
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_tts_requests_wait_instead_of_failing() {
    let upstream = TestUpstream::start().await;
    upstream.state.concurrency_limit.store(1, Ordering::SeqCst);
    upstream.state.work_ms.store(10, Ordering::SeqCst);
    let proxy = TestProxy::start(&upstream, &tts_class("")).await;
    let requests: Vec<_> = (0..30)
        .map(|_| tokio::spawn(send(speech_request(&proxy.url("/waves/v1/lightning-v2/get_speech")))))
        .collect();
    for request in requests {
        let (status, _, _) = request.await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        upstream.state.max_in_flight.load(Ordering::SeqCst),
        1,
        "the upstream saw two requests at once"
    );
    assert_eq!(upstream.state.rejected_429.load(Ordering::SeqCst), 0);
    let base = proxy.url("");
    assert_eq!(
        metric(&base, "smallest_proxy_limit_admitted_total{class=\"tts\"}").await,
        30.0
    );
    assert_eq!(
        metric(
            &base,
            "smallest_proxy_upstream_throttled_total{class=\"tts\",status=\"429\"}"
        )
        .await,
        0.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_at_once_and_the_queued_are_served() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, &tts_class("max_queue = 3")).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..10 {
        let (tx, url) = (tx.clone(), proxy.url("/hang"));
        tokio::spawn(async move {
            let _ = tx.send(get(&url).await);
        });
    }
    // With the upstream holding the one admitted request, 3 wait and 6 are shed at once.
    for _ in 0..6 {
        let (status, headers, body) = rx.recv().await.unwrap();
        assert_shed(status, &headers, &body);
    }
    upstream.state.wait_arrivals(1).await;
    assert_eq!(
        upstream.records().len(),
        1,
        "only the admitted request reached the upstream"
    );
    assert_eq!(
        metric(&proxy.url(""), "smallest_proxy_limit_queue_depth{class=\"tts\"}").await,
        3.0
    );
    upstream.state.hold.0.add_permits(4);
    for _ in 0..4 {
        let (status, _, _) = rx.recv().await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let base = proxy.url("");
    assert_eq!(
        metric(
            &base,
            "smallest_proxy_limit_shed_total{class=\"tts\",reason=\"queue_full\"}"
        )
        .await,
        6.0
    );
    assert_eq!(
        metric(&base, "smallest_proxy_limit_queue_depth{class=\"tts\"}").await,
        0.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_wait_past_queue_timeout_is_shed() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, &tts_class("queue_timeout = \"300ms\"")).await;
    let held = {
        let url = proxy.url("/hang");
        tokio::spawn(async move { get(&url).await })
    };
    upstream.state.wait_arrivals(1).await;
    let started = Instant::now();
    let (status, headers, body) = get(&proxy.url("/waves/v1/lightning-v2/get_speech")).await;
    assert_shed(status, &headers, &body);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "shed before queue_timeout"
    );
    assert_eq!(
        metric(
            &proxy.url(""),
            "smallest_proxy_limit_shed_total{class=\"tts\",reason=\"queue_timeout\"}"
        )
        .await,
        1.0
    );
    upstream.state.hold.0.add_permits(1);
    assert_eq!(held.await.unwrap().0, StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_of_10_per_second_holds_in_every_window() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[limits]\nrate = 10\nper = \"1s\"\n").await;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = proxy.url("/api/v1/voices");
            tokio::spawn(async move {
                for _ in 0..8 {
                    assert_eq!(get(&url).await.0, StatusCode::OK);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let mut arrivals: Vec<Instant> = upstream.records().iter().map(|r| r.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 32);
    // Every window of one second (less 50 ms for loopback jitter between the proxy's pacing
    // and the upstream's clock) holds at most 10 arrivals.
    let window = Duration::from_millis(950);
    for (i, start) in arrivals.iter().enumerate() {
        let inside = arrivals[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < window)
            .count();
        assert!(inside <= 10, "{inside} requests within one second");
    }
    let span = arrivals[31].duration_since(arrivals[0]);
    assert!(
        span >= Duration::from_millis(3000),
        "32 requests at 10/s took only {span:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstream_429_is_retried_to_success_and_pauses_the_class() {
    let upstream = TestUpstream::start().await;
    upstream.state.flaky_remaining.store(1, Ordering::SeqCst);
    let proxy = TestProxy::start(&upstream, &tts_class("upstream_retries = 2")).await;
    let started = Instant::now();
    let (status, _, body) = send(speech_request(&proxy.url("/flaky?retry_after=1"))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
    assert_eq!(upstream.records().len(), 2);
    let base = proxy.url("");
    assert_eq!(
        metric(
            &base,
            "smallest_proxy_upstream_throttled_total{class=\"tts\",status=\"429\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&base, "smallest_proxy_upstream_retries_total{class=\"tts\"}").await,
        1.0
    );

    // Retries exhausted: the upstream's own 429 reaches the client unchanged.
    upstream.state.flaky_remaining.store(10, Ordering::SeqCst);
    let (status, headers, body) = send(speech_request(&proxy.url("/flaky?retry_after=0"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "0");
    assert_eq!(json(&body), serde_json::json!({"error": "rate limited"}));
    assert_eq!(upstream.records().len(), 2 + 3, "one send and two resends");
    proxy.stop().await;
}

#[tokio::test]
async fn a_big_streamed_body_is_not_resent_after_429() {
    let upstream = TestUpstream::start().await;
    upstream.state.flaky_remaining.store(1, Ordering::SeqCst);
    let proxy = TestProxy::start(&upstream, &tts_class("")).await;
    let big = Bytes::from(vec![b'a'; 100 * 1024]);
    let req = Request::post(proxy.url("/flaky?retry_after=0"))
        .body(Full::new(big))
        .unwrap();
    let (status, _, body) = send(req).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json(&body), serde_json::json!({"error": "rate limited"}));
    assert_eq!(upstream.records().len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_handshakes_beyond_the_cap_wait_then_get_429() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(
        &upstream,
        "[[limits.class]]\nname = \"live\"\npaths = [\"/waves/v1/tts/live\"]\nmax_websockets = 2\nqueue_timeout = \"300ms\"\n",
    )
    .await;
    let url = format!("ws://{}/waves/v1/tts/live", proxy.addr);
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    match tokio_tungstenite::connect_async(&url).await {
        Err(WsError::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            assert_shed(response.status(), response.headers(), &body);
        }
        other => panic!("a third tunnel was allowed: {other:?}"),
    }
    // The open tunnels work; closing one frees its slot.
    second.send(Message::Text("ping".into())).await.unwrap();
    assert_eq!(second.next().await.unwrap().unwrap(), Message::Text("ping".into()));
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    wait_metric(
        &proxy.url(""),
        "smallest_proxy_websockets_active{class=\"live\"}",
        |v| v == 1.0,
    )
    .await;
    let (mut third, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("a freed slot admits a new tunnel");
    third.send(Message::Text("again".into())).await.unwrap();
    assert_eq!(third.next().await.unwrap().unwrap(), Message::Text("again".into()));
    // Hang up first: the drain waits for open tunnels (up to drain_timeout).
    drop((second, third));
    proxy.stop().await;
}

#[tokio::test]
async fn a_class_limits_only_its_own_paths() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, &tts_class("queue_timeout = \"200ms\"")).await;
    let held = {
        let url = proxy.url("/hang");
        tokio::spawn(async move { get(&url).await })
    };
    upstream.state.wait_arrivals(1).await;
    let (status, _, _) = get(&proxy.url("/api/v1/voices")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the default class is not blocked by the tts class"
    );
    let (status, _, _) = get(&proxy.url("/waves/v1/lightning/get_voices")).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "a tts path waits for the tts slot"
    );
    upstream.state.hold.0.add_permits(1);
    held.await.unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn an_sse_stream_holds_its_slot_to_the_end() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, &tts_class("")).await;
    let response = support::client().get(proxy.url("/sse").parse().unwrap()).await.unwrap();
    let mut stream = response.into_body();
    stream.frame().await.unwrap().unwrap();
    let second = tokio::spawn(send(speech_request(&proxy.url("/waves/v1/lightning-v2/get_speech"))));
    let base = proxy.url("");
    wait_metric(&base, "smallest_proxy_limit_queue_depth{class=\"tts\"}", |v| v == 1.0).await;
    assert_eq!(
        upstream.records().len(),
        1,
        "the second request went out while the stream held the slot"
    );
    upstream.state.sse_release.notify_one();
    stream.collect().await.unwrap();
    assert_eq!(second.await.unwrap().0, StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test]
async fn slots_are_released_after_errors_and_client_disconnects() {
    // Upstream unreachable: the error answer must free the slot.
    let pki = upstream::TestPki::new();
    let port = support::servers::free_port();
    let dead = TestProxy::start_for(
        &format!("https://localhost:{port}"),
        &pki.ca_file,
        &tts_class("queue_timeout = \"1s\""),
    )
    .await;
    for _ in 0..3 {
        let (status, _, body) = get(&dead.url("/waves/v1/lightning/get_voices")).await;
        assert_eq!(
            json(&body)["code"],
            "UPSTREAM_UNAVAILABLE",
            "a leaked slot would make this a 429"
        );
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    dead.stop().await;

    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, &tts_class("queue_timeout = \"5s\"")).await;
    let base = proxy.url("");
    let in_flight = "smallest_proxy_limit_in_flight{class=\"tts\"}";
    // A client that leaves in the middle of an SSE stream.
    let response = support::client().get(proxy.url("/sse").parse().unwrap()).await.unwrap();
    let mut stream = response.into_body();
    stream.frame().await.unwrap().unwrap();
    assert_eq!(metric(&base, in_flight).await, 1.0);
    drop(stream);
    wait_metric(&base, in_flight, |v| v == 0.0).await;

    // A client that leaves while queued.
    let held = {
        let url = proxy.url("/hang");
        tokio::spawn(async move { get(&url).await })
    };
    upstream.state.wait_arrivals(2).await;
    let mut queued = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut queued,
        b"GET /waves/v1/lightning/get_voices HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await
    .unwrap();
    wait_metric(&base, "smallest_proxy_limit_queue_depth{class=\"tts\"}", |v| v == 1.0).await;
    drop(queued);
    wait_metric(&base, "smallest_proxy_limit_queue_depth{class=\"tts\"}", |v| v == 0.0).await;
    upstream.state.hold.0.add_permits(1);
    assert_eq!(held.await.unwrap().0, StatusCode::OK);
    // The slot is free again: a new request goes straight through.
    assert_eq!(
        get(&proxy.url("/waves/v1/lightning/get_voices")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        upstream.records().len(),
        3,
        "the request whose client left never reached the upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn health_ready_and_metrics_are_never_limited() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[limits]\nmax_concurrent = 1\nmax_queue = 0\n").await;
    let held = {
        let url = proxy.url("/hang");
        tokio::spawn(async move { get(&url).await })
    };
    upstream.state.wait_arrivals(1).await;
    let (status, _, _) = get(&proxy.url("/x")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "the default class is full");
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(&proxy.url(path)).await.0, StatusCode::OK, "{path} was limited");
    }
    upstream.state.hold.0.add_permits(1);
    held.await.unwrap();
    proxy.stop().await;
}

/// No `[limits]` at all: the built-in `smallest` profile's `tts` class (auto concurrency,
/// starting at one) turns an account limit of one into waits, and `/ready` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_config_concurrent_tts_calls_all_succeed() {
    let upstream = TestUpstream::start().await;
    upstream.state.concurrency_limit.store(1, Ordering::SeqCst);
    upstream.state.work_ms.store(5, Ordering::SeqCst);
    let proxy = TestProxy::start(&upstream, "").await;
    let paths = [
        "/waves/v1/tts",
        "/waves/v1/lightning-v2/get_speech",
        "/waves/v1/lightning/get_speech/stream",
        "/waves/v1/lightning-large/stream",
        "/waves/v1/streaming-tts/lightning",
    ];
    let requests: Vec<_> = (0..30)
        .map(|i| tokio::spawn(send(speech_request(&proxy.url(paths[i % paths.len()])))))
        .collect();
    for request in requests {
        let (status, _, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    let (_, ready) = proxy.ready().await;
    let tts = &ready["limits"]["tts"];
    // 1, or 2 when a raise came at the end of the burst and no request has tried it yet.
    let learned = tts["concurrency"].as_u64().unwrap();
    assert!((1..=2).contains(&learned), "{ready}");
    assert_eq!(tts["learned"], true);
    assert_eq!(tts["from_profile"], true);
    assert_eq!(tts["max_websockets"], 5);
    assert_eq!(ready["limits"]["default"]["concurrency"], "unlimited");
    let base = proxy.url("");
    assert_eq!(
        metric(&base, "smallest_proxy_limit_admitted_total{class=\"tts\"}").await as usize,
        30 + upstream.state.rejected_429.load(Ordering::SeqCst),
        "every upstream 429 (a probe's) was resent through admission"
    );
    assert_eq!(
        metric(&base, "smallest_proxy_limit_concurrency{class=\"tts\"}").await,
        learned as f64
    );
    proxy.stop().await;
}
