//! Request smuggling, from raw sockets: for every ambiguous framing (the PortSwigger smuggler
//! and HTTP Garden shapes) the upstream never sees a second request hidden in the same bytes.
//!
//! The upstream only ever receives requests the proxy framed anew, so no parser behind it can
//! disagree with the one in front. What is left is what reaches the proxy's own code:
//! - framing hyper resolves by the RFC: `Content-Length` with `Transfer-Encoding` is read as
//!   chunked and the connection closed after the answer (RFC 9112 §6.1), so bytes past the
//!   chunked body are never read as a request; equal duplicate `Content-Length`s are one
//!   length (RFC 9110 §8.6);
//! - a coding before `chunked` (`gzip, chunked`, `chunked` twice, two headers), which the
//!   proxy could not forward faithfully, gets its JSON 400 with `Connection: close`
//!   (`src/server/framing.rs`), on any request of a connection;
//! - heads hyper's parser refuses (obs-fold, space before the colon, NUL/CR in a value, a
//!   Transfer-Encoding not ending in chunked, differing Content-Lengths) get hyper's bare 400
//!   and never reach the proxy's code. Bare LF line endings are accepted and normalised.

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What came back on one raw connection.
struct Answer {
    text: String,
    /// The proxy closed the connection (EOF or reset) within the bound.
    closed: bool,
}

impl Answer {
    fn status(&self) -> u16 {
        self.text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {:?}", self.text))
    }

    /// How many responses the connection carried.
    fn responses(&self) -> usize {
        self.text.matches("HTTP/1.1 ").count()
    }

    fn json_body(&self) -> serde_json::Value {
        let body = self.text.split("\r\n\r\n").nth(1).unwrap_or("");
        json(body.as_bytes())
    }
}

/// Write `request` and read until the proxy closes the connection (10 s bound).
async fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Answer {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
    }
}

/// After an exchange: one fresh request as a marker, then every path the upstream saw.
async fn upstream_paths_after(proxy: &TestProxy, upstream: &TestUpstream) -> Vec<String> {
    let before = upstream.records().len();
    let (status, _, _) = get(&proxy.url("/marker")).await;
    assert_eq!(status, 200);
    upstream.state.wait_arrivals(before + 1).await;
    upstream.records().iter().map(|r| r.uri.path().to_string()).collect()
}

/// The smuggled request every payload hides after the first message.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// Payloads the proxy itself refuses with its JSON 400: codings it cannot forward faithfully.
fn refused_by_proxy() -> Vec<(&'static str, String)> {
    vec![
        (
            "Transfer-Encoding: chunked, chunked",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "two Transfer-Encoding headers",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "Transfer-Encoding: gzip, chunked",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "Transfer-Encoding: identity, chunked with a Content-Length",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
    ]
}

/// Content-Length with Transfer-Encoding: read as chunked, forwarded once with the chunked
/// body, and the connection closed after the answer. (name, payload, the body the upstream gets)
fn chunked_wins_then_close() -> Vec<(&'static str, String, String)> {
    vec![
        (
            "CL.TE",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            String::new(),
        ),
        (
            "TE.CL",
            format!(
                "POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            SMUGGLED.to_string(),
        ),
        (
            "CL.TE with a padded chunked value",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6\r\nTransfer-Encoding: \t chunked \r\n\r\n0\r\n\r\n{SMUGGLED}"),
            String::new(),
        ),
    ]
}

/// Payloads hyper's parser refuses before the proxy sees a request.
fn refused_by_hyper() -> Vec<(&'static str, String)> {
    vec![
        (
            "duplicate Content-Length, different values",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 48\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "Content-Length list",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5, 5\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "Transfer-Encoding: identity",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: identity\r\n\r\n{SMUGGLED}"),
        ),
        (
            "Transfer-Encoding: xchunked",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "Transfer-Encoding: chunkedx",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "obs-fold continuing Transfer-Encoding",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: identity\r\n chunked\r\nContent-Length: 5\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "obs-fold with a tab",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Foo: bar\r\n\tTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "leading space before the header name",
            format!("POST /a HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: 127.0.0.1\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "space before the colon",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "tab before the colon",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length\t: 5\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "NUL in a header value",
            format!("GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Foo: a\0b\r\n\r\n{SMUGGLED}"),
        ),
        (
            "CR inside a header value",
            format!("GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Foo: a\rContent-Length: 48\r\n\r\n{SMUGGLED}"),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!("POST /a HTTP/1.0\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "vertical tab in Transfer-Encoding",
            format!("POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codings_before_chunked_are_refused_with_json_400_and_closed() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    for (name, payload) in refused_by_proxy() {
        let answer = exchange(proxy.addr, payload.as_bytes()).await;
        assert_eq!(answer.status(), 400, "{name}: {}", answer.text);
        assert!(answer.closed, "{name}: the connection stayed open");
        assert_eq!(answer.responses(), 1, "{name}: more than one response: {}", answer.text);
        assert!(
            answer.text.to_ascii_lowercase().contains("connection: close"),
            "{name}: {}",
            answer.text
        );
        let body = answer.json_body();
        assert_eq!(body["code"], "BAD_REQUEST", "{name}");
        assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{name}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{name}");
    }
    // Nothing but the marker ever reached the upstream: not /a, not /smuggled.
    let paths = upstream_paths_after(&proxy, &upstream).await;
    assert_eq!(paths, vec!["/marker"], "the upstream saw requests it should not have");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_read_as_chunked_and_the_connection_closed() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    for (name, payload, body) in chunked_wins_then_close() {
        let before = upstream.records().len();
        let answer = exchange(proxy.addr, payload.as_bytes()).await;
        assert_eq!(answer.status(), 200, "{name}: {}", answer.text);
        assert!(answer.closed, "{name}: the connection stayed open");
        assert_eq!(answer.responses(), 1, "{name}: more than one response: {}", answer.text);
        upstream.state.wait_arrivals(before + 1).await;
        let records = upstream.records();
        let record = &records[before];
        assert_eq!(record.uri.path(), "/a", "{name}");
        assert_eq!(record.body, body.as_bytes(), "{name}: the upstream got another body");
        // Framed anew: one length or our own chunked coding, never both.
        let framings = ["content-length", "transfer-encoding"]
            .iter()
            .filter(|h| record.headers.contains_key(**h))
            .count();
        assert!(framings <= 1, "{name}: {:?}", record.headers);
    }
    let paths = upstream_paths_after(&proxy, &upstream).await;
    assert_eq!(
        paths,
        vec!["/a", "/a", "/a", "/marker"],
        "the upstream saw requests it should not have"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_duplicate_content_lengths_are_one_length() {
    // No parser can read `5` and `5` two ways: the body is five bytes, and what follows is the
    // client's own next request on its own connection.
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let payload = "POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello\
GET /next HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let answer = exchange(proxy.addr, payload.as_bytes()).await;
    assert_eq!(answer.responses(), 2, "{}", answer.text);
    assert_eq!(answer.text.matches("HTTP/1.1 200").count(), 2, "{}", answer.text);
    upstream.state.wait_arrivals(2).await;
    let records = upstream.records();
    assert_eq!(records[0].uri.path(), "/a");
    assert_eq!(records[0].body, "hello");
    assert_eq!(records[0].headers.get_all("content-length").iter().count(), 1);
    assert_eq!(records[1].uri.path(), "/next");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_head_of_a_connection_is_checked_after_an_upgrade_a_connect_or_many_headers() {
    // The framing rule holds for every request hyper reads on a connection, whatever came
    // before it: a refused upgrade, a refused CONNECT, a head with more headers than allowed.
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let many: String = (0..129).map(|i| format!("X-H{i}: v\r\n")).collect();
    let openers = [
        (
            "h2c upgrade",
            "GET /up HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".to_string(),
        ),
        (
            "CONNECT",
            "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_string(),
        ),
        (
            "129 headers",
            format!("GET /many HTTP/1.1\r\nHost: 127.0.0.1\r\n{many}\r\n"),
        ),
    ];
    for (name, opener) in openers {
        for (what, refused) in [
            ("identity, chunked", "POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n"),
            ("gzip, chunked with a length", "POST /a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ] {
            let payload = format!("{opener}{refused}{SMUGGLED}");
            let answer = exchange(proxy.addr, payload.as_bytes()).await;
            let last = answer.text.rfind("HTTP/1.1 ").map_or("", |i| &answer.text[i..]);
            assert!(answer.closed, "{name} then {what}: the connection stayed open: {}", answer.text);
            // The opener is answered (served without the upgrade, 405, 431) and the connection
            // stays open; the request after it is refused and nothing follows it.
            assert_eq!(answer.responses(), 2, "{name} then {what}: {}", answer.text);
            assert!(last.starts_with("HTTP/1.1 400"), "{name} then {what}: {}", answer.text);
            assert!(last.contains("BAD_REQUEST"), "{name} then {what}: {}", answer.text);
        }
    }
    let paths = upstream_paths_after(&proxy, &upstream).await;
    assert!(
        !paths.iter().any(|p| p == "/a" || p == "/smuggled"),
        "the upstream saw requests it should not have: {paths:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_hyper_refuses_get_400_and_close() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    for (name, payload) in refused_by_hyper() {
        let answer = exchange(proxy.addr, payload.as_bytes()).await;
        assert_eq!(answer.status(), 400, "{name}: {}", answer.text);
        assert!(answer.closed, "{name}: the connection stayed open");
        assert_eq!(answer.responses(), 1, "{name}: more than one response: {}", answer.text);
    }
    let paths = upstream_paths_after(&proxy, &upstream).await;
    assert_eq!(paths, vec!["/marker"], "the upstream saw requests it should not have");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_chunk_sizes_end_the_connection_without_a_second_request() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    for (name, body) in [
        ("negative size", "-1\r\nx\r\n0\r\n\r\n"),
        ("non-hex size", "g\r\nx\r\n0\r\n\r\n"),
        ("overflowing size", "1ffffffffffffffff\r\nx\r\n0\r\n\r\n"),
        ("size with a space inside", "1 1\r\nx\r\n0\r\n\r\n"),
        ("bare LF after the size", "1\nx\r\n0\r\n\r\n"),
        ("chunk longer than its size", "1\r\nxyz\r\n0\r\n\r\n"),
        ("0x prefix", "0x1\r\nx\r\n0\r\n\r\n"),
        ("LF in an extension", "1;a\nb\r\nx\r\n0\r\n\r\n"),
    ] {
        let payload =
            format!("POST /chunks HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}{SMUGGLED}");
        let answer = exchange(proxy.addr, payload.as_bytes()).await;
        assert!(answer.closed, "{name}: the connection stayed open: {}", answer.text);
        assert!(answer.responses() <= 1, "{name}: {}", answer.text);
        if answer.responses() == 1 {
            assert_ne!(answer.status(), 200, "{name}: a broken body was answered 200");
        }
    }
    let paths = upstream_paths_after(&proxy, &upstream).await;
    assert!(
        !paths.iter().any(|p| p == "/smuggled"),
        "a smuggled request reached the upstream: {paths:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_body_holding_a_request_stays_a_body() {
    // CL.0 style: a front end that ignored a GET's Content-Length would see two requests.
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let payload = format!(
        "GET /first HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{SMUGGLED}GET /second HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        SMUGGLED.len()
    );
    let answer = exchange(proxy.addr, payload.as_bytes()).await;
    assert_eq!(answer.responses(), 2, "{}", answer.text);
    assert!(answer.closed);
    upstream.state.wait_arrivals(2).await;
    let records = upstream.records();
    let paths: Vec<_> = records.iter().map(|r| r.uri.path().to_string()).collect();
    assert_eq!(paths, vec!["/first", "/second"]);
    assert_eq!(
        records[0].body,
        SMUGGLED.as_bytes(),
        "the GET's body was not kept as its body"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_keep_alive_requests_with_every_framing_are_all_served() {
    // Bodies are followed exactly, so a later request is never judged by bytes that are not
    // its head: a chunked body that looks like a refused head must not matter.
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let fake_head = "POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let payload = format!(
        "POST /one HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello\
POST /two HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{fake_head}\r\n0\r\nX-Trailer: t\r\n\r\n\
GET /three HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
GET /four HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        fake_head.len()
    );
    let answer = exchange(proxy.addr, payload.as_bytes()).await;
    assert_eq!(answer.responses(), 4, "{}", answer.text);
    assert_eq!(answer.text.matches("HTTP/1.1 200").count(), 4, "{}", answer.text);
    upstream.state.wait_arrivals(4).await;
    let records = upstream.records();
    let paths: Vec<_> = records.iter().map(|r| r.uri.path().to_string()).collect();
    assert_eq!(paths, vec!["/one", "/two", "/three", "/four"]);
    assert_eq!(records[1].body, fake_head.as_bytes());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_after_good_ones_on_the_same_connection() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let payload = format!(
        "GET /good HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
POST /bad HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    let answer = exchange(proxy.addr, payload.as_bytes()).await;
    assert_eq!(answer.responses(), 2, "{}", answer.text);
    assert!(answer.text.starts_with("HTTP/1.1 200"), "{}", answer.text);
    let second = answer.text.rfind("HTTP/1.1 ").map(|i| &answer.text[i..]).unwrap_or("");
    assert!(second.starts_with("HTTP/1.1 400"), "{}", answer.text);
    assert!(second.contains("BAD_REQUEST"));
    assert!(answer.closed);
    let paths = upstream_paths_after(&proxy, &upstream).await;
    assert_eq!(paths, vec!["/good", "/marker"]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_after_good_requests_ends_the_connection() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let payload = format!(
        "GET /good HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
POST /both HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    let answer = exchange(proxy.addr, payload.as_bytes()).await;
    assert_eq!(answer.responses(), 2, "{}", answer.text);
    assert_eq!(answer.text.matches("HTTP/1.1 200").count(), 2, "{}", answer.text);
    assert!(answer.closed, "{}", answer.text);
    let paths = upstream_paths_after(&proxy, &upstream).await;
    assert_eq!(paths, vec!["/good", "/both", "/marker"]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_line_endings_are_normalised_not_refused() {
    // Decision: accept. hyper re-serialises the request for the upstream with CRLF, so the
    // upstream never parses the client's bytes and cannot disagree with us about them.
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let answer = exchange(
        proxy.addr,
        b"POST /lf HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 2\nConnection: close\n\nok",
    )
    .await;
    assert_eq!(answer.status(), 200, "{}", answer.text);
    upstream.state.wait_arrivals(1).await;
    let record = &upstream.records()[0];
    assert_eq!(record.uri.path(), "/lf");
    assert_eq!(record.body, "ok");
    assert_eq!(record.headers.get_all("authorization").iter().count(), 1);
    proxy.stop().await;
}
