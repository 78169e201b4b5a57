//! The client side on the wire, from raw sockets, against an upstream that answers byte for
//! byte and records the heads it was sent: methods refused in any letter case (TRACE, TRACK,
//! CONNECT) and policy rules matched in any case, response framing normalised before it reaches
//! the client (one `Content-Length`, none on 204), request heads that end in a bare LF line, and
//! absolute-form targets forwarded in origin form. Each shape is sent twice: on a fresh
//! connection (the proxy's own plain-request loop) and on a connection hyper already serves.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::upstream::TestPki;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on anything the proxy must do by itself.
const BOUND: Duration = Duration::from_secs(5);

/// A request that moves a fresh connection to hyper (a chunked upload), answered 200: send it
/// first and the requests after it are served by hyper.
const TO_HYPER: &str = "POST /to-hyper HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// A scripted upstream: TLS, HTTP/1.1 only, answers each head with the bytes its script gives.

/// What the upstream does with a request head: the bytes to answer with.
type Script = Arc<dyn Fn(&str) -> Vec<u8> + Send + Sync>;

struct RawUpstream {
    pki: TestPki,
    port: u16,
    /// Every request head, as it arrived.
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawUpstream {
    async fn start(script: Script) -> RawUpstream {
        let pki = TestPki::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config(&[b"http/1.1"])));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let heads2 = heads.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, script, heads) = (acceptor.clone(), script.clone(), heads2.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        serve_upstream(&mut tls, &script, &heads).await;
                    }
                });
            }
        });
        RawUpstream { pki, port, heads }
    }

    /// Answers with `answer(request_line)`; TRACE (any case) echoes the whole head back as a
    /// `message/http` body, as a server implementing it does.
    async fn echoing_trace(answer: fn(&str) -> Vec<u8>) -> RawUpstream {
        RawUpstream::start(Arc::new(move |head: &str| {
            let line = head.lines().next().unwrap_or("");
            if line.to_ascii_uppercase().starts_with("TRACE ") {
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: message/http\r\ncontent-length: {}\r\n\r\n",
                    head.len()
                )
                .into_bytes();
                out.extend_from_slice(head.as_bytes());
                out
            } else {
                answer(line)
            }
        }))
        .await
    }

    fn request_lines(&self) -> Vec<String> {
        let heads = self.heads.lock().expect("heads");
        heads
            .iter()
            .map(|h| h.lines().next().unwrap_or("").to_string())
            .collect()
    }

    async fn proxy(&self, extra: &str) -> TestProxy {
        TestProxy::start_for(&format!("https://localhost:{}", self.port), &self.pki.ca_file, extra).await
    }
}

/// Serve requests on one upstream connection, in order, keeping it open.
async fn serve_upstream<S: tokio::io::AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    script: &Script,
    heads: &Mutex<Vec<String>>,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if !read_more(io, &mut buf).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let lower = head.to_ascii_lowercase();
        if lower.contains("transfer-encoding: chunked") {
            // Skip the chunked body (the proxy writes it in canonical form).
            loop {
                let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
                    if !read_more(io, &mut buf).await {
                        return;
                    }
                    continue;
                };
                let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let Ok(size) = usize::from_str_radix(size_text.trim(), 16) else {
                    return;
                };
                while buf.len() < line_end + 2 + size + 2 {
                    if !read_more(io, &mut buf).await {
                        return;
                    }
                }
                buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < length {
                if !read_more(io, &mut buf).await {
                    return;
                }
            }
            buf.drain(..length);
        }
        let reply = script(&head);
        // Recorded before the answer is written, so a client holding the answer can look.
        heads.lock().expect("heads").push(head);
        if io.write_all(&reply).await.is_err() || io.flush().await.is_err() {
            return;
        }
    }
}

/// Every request answered `200 ok`.
fn always_ok(_: &str) -> Vec<u8> {
    ok("ok")
}

// ---------------------------------------------------------------------------------------------
// The client side: raw responses read one at a time.

#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// The head as sent, for counting repeated headers.
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    /// Every value of header `name`, in order.
    fn values(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    fn json(&self) -> serde_json::Value {
        json(&self.body)
    }
}

/// A raw client connection; `next` reads one response, keeping what follows it.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// The next response (`head_only` for the answer to a HEAD request), within [`BOUND`].
    async fn next(&mut self, head_only: bool) -> RawResponse {
        let read = async {
            loop {
                if let Some((response, used)) = parse_response(&self.buf, head_only) {
                    self.buf.drain(..used);
                    return Ok(response);
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return Err(String::from_utf8_lossy(&self.buf).into_owned()),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        match tokio::time::timeout(BOUND, read).await {
            Ok(Ok(response)) => response,
            Ok(Err(partial)) => panic!("the proxy closed the connection inside or before a response: {partial:?}"),
            Err(_) => panic!(
                "no response within {BOUND:?}; got so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }
}

/// A whole response at the start of `data` and its length; `None` until all of it is there.
/// Content-Length with several values takes the first; no body for 1xx, 204, 304 and HEAD.
fn parse_response(data: &[u8], head_only: bool) -> Option<(RawResponse, usize)> {
    let head_len = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&data[..head_len]).into_owned();
    let status: u16 = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {head:?}"));
    let mut response = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    let rest = &data[head_len..];
    if head_only || status < 200 || status == 204 || status == 304 {
        return Some((response, head_len));
    }
    if let Some(length) = response.values("content-length").first() {
        let length: usize = length.parse().expect("content-length");
        if rest.len() < length {
            return None;
        }
        response.body = rest[..length].to_vec();
        return Some((response, head_len + length));
    }
    assert!(
        response
            .values("transfer-encoding")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("chunked")),
        "a response without framing: {:?}",
        response.head
    );
    let (body, used) = dechunk(rest)?;
    response.body = body;
    Some((response, head_len + used))
}

/// Send `request` on a fresh connection and read one response: the proxy's own loop serves it
/// when it is plain.
async fn on_plain_path(proxy: &TestProxy, request: &str, head_only: bool) -> RawResponse {
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(request.as_bytes()).await;
    conn.next(head_only).await
}

/// Send `request` on a connection hyper already serves (after [`TO_HYPER`]) and read its
/// response.
async fn on_hyper_path(proxy: &TestProxy, request: &str, head_only: bool) -> RawResponse {
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(TO_HYPER.as_bytes()).await;
    // Answered by hyper, whatever the answer (a policy may refuse it).
    conn.next(false).await;
    conn.send(request.as_bytes()).await;
    conn.next(head_only).await
}

/// The request lines the upstream saw, without the hand-off requests.
fn forwarded(upstream: &RawUpstream) -> Vec<String> {
    upstream
        .request_lines()
        .into_iter()
        .filter(|l| !l.starts_with("POST /to-hyper "))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Methods the guard refuses.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_track_and_connect_are_405_in_any_case_and_the_key_is_never_echoed() {
    let upstream = RawUpstream::echoing_trace(always_ok).await;
    let proxy = upstream.proxy("").await;
    for method in [
        "TRACE", "trace", "Trace", "tRaCe", "TRACK", "track", "Track", "CONNECT", "connect", "Connect",
    ] {
        for target in ["/anything", "/waves/v1/lightning/get_speech?x=1"] {
            let request = format!(
                "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nMax-Forwards: 0\r\nContent-Length: 0\r\n\r\n"
            );
            for (path, response) in [
                ("plain", on_plain_path(&proxy, &request, false).await),
                ("hyper", on_hyper_path(&proxy, &request, false).await),
            ] {
                let body = String::from_utf8_lossy(&response.body);
                assert!(!body.contains(TEST_KEY), "{path}: {method} echoed the key: {body}");
                assert_eq!(response.status, 405, "{path}: {method} {target}: {body}");
                assert_eq!(response.json()["code"], "METHOD_NOT_ALLOWED", "{path}: {method}");
            }
        }
        // An authority-form target naming this loopback proxy: refused for the method too.
        let request = format!("{method} 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n");
        for (path, response) in [
            ("plain", on_plain_path(&proxy, &request, false).await),
            ("hyper", on_hyper_path(&proxy, &request, false).await),
        ] {
            assert_eq!(
                response.status, 405,
                "{path}: {method} authority-form: {:?}",
                response.head
            );
        }
    }
    // A TRACE after plain requests on one keep-alive connection, and one pipelined behind them.
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(b"GET /before HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\ntrace /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /after HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    assert_eq!(conn.next(false).await.status, 200);
    assert_eq!(conn.next(false).await.status, 405);
    assert_eq!(conn.next(false).await.status, 200);
    assert_eq!(forwarded(&upstream), ["GET /before HTTP/1.1", "GET /after HTTP/1.1"]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_in_any_case_are_forwarded_as_sent() {
    let upstream = RawUpstream::echoing_trace(always_ok).await;
    let proxy = upstream.proxy("").await;
    let long = "X".repeat(2000);
    for method in [
        "get",
        "Post",
        "PROPFIND",
        "M-SEARCH",
        "TRACES",
        "TRAC",
        "CONNECTX",
        "x!#$%&'*+-.^_`|~1",
        &long,
    ] {
        let request = format!("{method} /m HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            on_plain_path(&proxy, &request, false).await.status,
            200,
            "plain {method}"
        );
        assert_eq!(
            on_hyper_path(&proxy, &request, false).await.status,
            200,
            "hyper {method}"
        );
        let expected = format!("{method} /m HTTP/1.1");
        let lines = forwarded(&upstream);
        assert_eq!(lines.iter().filter(|l| **l == expected).count(), 2, "{lines:?}");
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The path policy and method case.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_rule_refuses_its_method_in_any_case() {
    let upstream = RawUpstream::echoing_trace(always_ok).await;
    let proxy = upstream.proxy("[policy]\ndeny = [\"DELETE /**\"]\n").await;
    for method in ["DELETE", "delete", "Delete", "dELETE"] {
        let request = format!("{method} /waves/v1/lightning-large HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        for (path, response) in [
            ("plain", on_plain_path(&proxy, &request, false).await),
            ("hyper", on_hyper_path(&proxy, &request, false).await),
        ] {
            assert_eq!(response.status, 403, "{path}: {method}: {:?}", response.head);
            assert_eq!(response.json()["code"], "FORBIDDEN_PATH");
        }
    }
    let response = on_plain_path(&proxy, "post /waves/v1/tts HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", false).await;
    assert_eq!(response.status, 200);
    assert_eq!(forwarded(&upstream), ["post /waves/v1/tts HTTP/1.1"]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smallest_preset_matches_methods_in_any_case() {
    let upstream = RawUpstream::echoing_trace(always_ok).await;
    let proxy = upstream
        .proxy("[policy]\npreset = \"smallest\"\ndeny = [\"POST /waves/v1/*/add_voice\"]\n")
        .await;
    for refused in [
        "delete /waves/v1/lightning-large",
        "Delete /api/v1/lightning-large/voices/abc",
        "put /waves/v1/pronunciation-dicts",
        "post /waves/v1/lightning-large/add_voice",
        "get /admin/keys",
    ] {
        let request = format!("{refused} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        for (path, response) in [
            ("plain", on_plain_path(&proxy, &request, false).await),
            ("hyper", on_hyper_path(&proxy, &request, false).await),
        ] {
            assert_eq!(response.status, 403, "{path}: {refused}: {:?}", response.head);
            assert_eq!(response.json()["code"], "FORBIDDEN_PATH");
        }
    }
    // What the preset allows passes in any case; GET rules cover HEAD in any case.
    for (allowed, head_only) in [
        ("post /waves/v1/lightning/get_speech", false),
        ("get /waves/v1/lightning-v2/get_voices", false),
        // Not HEAD to HTTP (methods are case-sensitive), so answered with a body.
        ("head /api/v1/lightning-v2/get_voices", false),
        ("Head /api/v1/lightning-v2/get_voices", false),
    ] {
        let request = format!("{allowed} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            on_plain_path(&proxy, &request, head_only).await.status,
            200,
            "{allowed}"
        );
    }
    assert_eq!(forwarded(&upstream).len(), 4, "{:?}", forwarded(&upstream));
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Response framing.

/// An upstream with framing headers that must not reach the client as they are.
fn odd_framing(line: &str) -> Vec<u8> {
    let head_request = line.starts_with("HEAD ");
    match line.split(' ').nth(1).unwrap_or("") {
        "/dup-length" if head_request => {
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\ncontent-length: 5\r\n\r\n".to_vec()
        }
        "/dup-length" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
        "/no-content" => b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nx-a: 1\r\n\r\n".to_vec(),
        "/no-content-dup" => b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\ncontent-length: 7\r\n\r\n".to_vec(),
        "/not-modified" => {
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\ncontent-length: 9\r\netag: \"e\"\r\n\r\n".to_vec()
        }
        "/empty-dup" => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n".to_vec(),
        // A 403 is read when small (to spot a licence refusal) and passed on unread when not.
        "/forbidden-dup" => b"HTTP/1.1 403 Forbidden\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nnope!".to_vec(),
        "/forbidden-big" => {
            let mut out = format!("HTTP/1.1 403 Forbidden\r\ncontent-length: {BIG}\r\ncontent-length: {BIG}\r\n\r\n")
                .into_bytes();
            out.resize(out.len() + BIG, b'x');
            out
        }
        _ => ok("ok"),
    }
}

/// A 403 body too big to be read for a licence code (over 16 KiB).
const BIG: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_reach_the_client_with_one_content_length_and_none_on_204() {
    let big = "x".repeat(BIG);
    let big_length = BIG.to_string();
    let upstream = RawUpstream::start(Arc::new(|head: &str| odd_framing(head.lines().next().unwrap_or("")))).await;
    let proxy = upstream.proxy("").await;
    for path in ["plain", "hyper"] {
        let mut conn = Conn::open(proxy.addr).await;
        if path == "hyper" {
            conn.send(TO_HYPER.as_bytes()).await;
            assert_eq!(conn.next(false).await.status, 200);
        }
        // All on one keep-alive connection: a stray length would also desynchronise it.
        for (method, target, status, lengths, body) in [
            ("GET", "/dup-length", 200, vec!["5"], "hello"),
            ("HEAD", "/dup-length", 200, vec!["5"], ""),
            ("GET", "/no-content", 204, vec![], ""),
            ("GET", "/no-content-dup", 204, vec![], ""),
            ("GET", "/not-modified", 304, vec!["9"], ""),
            ("GET", "/empty-dup", 200, vec!["0"], ""),
            ("GET", "/forbidden-dup", 403, vec!["5"], "nope!"),
            ("GET", "/forbidden-big", 403, vec![&*big_length], &*big),
            ("GET", "/plain", 200, vec!["2"], "ok"),
        ] {
            conn.send(format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
                .await;
            let response = conn.next(method == "HEAD").await;
            let what = format!("{path}: {method} {target}: {:?}", response.head);
            assert_eq!(response.status, status, "{what}");
            let sent = response.values("content-length");
            if status == 304 {
                // At most one (hyper's server drops it on a 304 to anything but HEAD).
                assert!(sent.len() <= 1 && sent.iter().all(|v| *v == lengths[0]), "{what}");
            } else {
                assert_eq!(sent, lengths, "{what}");
            }
            assert!(response.values("transfer-encoding").is_empty(), "{what}");
            assert_eq!(response.body, body.as_bytes(), "{what}");
        }
    }
    proxy.stop().await;
}

/// A 403 passed on unread holds its limit slot until its body ends, as any response does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_passed_on_unread_holds_its_limit_slot_until_its_body_ends() {
    // The head and the first 10 bytes of a 20 000-byte body; the rest never comes.
    let upstream = RawUpstream::start(Arc::new(|_: &str| {
        format!("HTTP/1.1 403 Forbidden\r\ncontent-length: {BIG}\r\n\r\n0123456789").into_bytes()
    }))
    .await;
    let proxy = upstream
        .proxy("[[limits.class]]\nname = \"one\"\npaths = [\"/one\"]\nmax_concurrent = 1\n")
        .await;
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    client
        .write_all(b"GET /one HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("send");
    let mut got = Vec::new();
    while !got.ends_with(b"0123456789") {
        assert!(read_more(&mut client, &mut got).await, "closed early: {got:?}");
    }
    assert!(got.starts_with(b"HTTP/1.1 403"), "{:?}", String::from_utf8_lossy(&got));
    let base = format!("http://{}", proxy.addr);
    let in_flight = "smallest_proxy_limit_in_flight{class=\"one\"}";
    assert_eq!(
        metric(&base, in_flight).await,
        1.0,
        "the slot was freed while the 403 body streams"
    );
    drop(client);
    wait_metric(&base, in_flight, |n| n == 0.0).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differing_content_lengths_from_the_upstream_are_a_502() {
    let upstream = RawUpstream::start(Arc::new(|_: &str| {
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_vec()
    }))
    .await;
    let proxy = upstream.proxy("").await;
    let request = "GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    for response in [
        on_plain_path(&proxy, request, false).await,
        on_hyper_path(&proxy, request, false).await,
    ] {
        assert_eq!(response.status, 502, "{:?}", response.head);
        assert_eq!(response.values("content-length").len(), 1);
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Request heads whose last line ends in a bare LF.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_ending_in_a_bare_lf_line_are_answered_on_every_path() {
    let upstream = RawUpstream::start(Arc::new(|head: &str| {
        ok(head.lines().next().unwrap_or("").split(' ').nth(1).unwrap_or(""))
    }))
    .await;
    let proxy = upstream.proxy("").await;
    let endings = ["\n\r\n", "\r\n\n", "\n\n"];
    for ending in endings {
        let head = format!("GET /lf HTTP/1.1\r\nHost: 127.0.0.1{ending}");
        for (path, response) in [
            ("plain", on_plain_path(&proxy, &head, false).await),
            ("hyper", on_hyper_path(&proxy, &head, false).await),
        ] {
            assert_eq!(
                (response.status, response.body.as_slice()),
                (200, &b"/lf"[..]),
                "{path}: {ending:?}"
            );
        }
        // The request line alone.
        let response = on_plain_path(&proxy, &format!("GET /line HTTP/1.1{ending}"), false).await;
        assert_eq!(response.status, 200, "request line alone, {ending:?}");

        // Split at every offset, in two writes.
        for at in 1..head.len() {
            let mut conn = Conn::open(proxy.addr).await;
            conn.send(&head.as_bytes()[..at]).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
            conn.send(&head.as_bytes()[at..]).await;
            let response = conn.next(false).await;
            assert_eq!(response.status, 200, "{ending:?} split at {at}");
        }
        // A byte per write.
        let mut conn = Conn::open(proxy.addr).await;
        for byte in head.as_bytes() {
            conn.send(std::slice::from_ref(byte)).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(conn.next(false).await.status, 200, "{ending:?} a byte per write");

        // Two such heads pipelined, then a plain one, then the same again on that connection.
        let mut conn = Conn::open(proxy.addr).await;
        let pipeline = format!(
            "GET /p1 HTTP/1.1\r\nHost: 127.0.0.1{ending}GET /p2 HTTP/1.1\r\nHost: 127.0.0.1{ending}GET /p3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        );
        conn.send(pipeline.as_bytes()).await;
        conn.send(pipeline.as_bytes()).await;
        let mut bodies = Vec::new();
        for _ in 0..6 {
            bodies.push(String::from_utf8(conn.next(false).await.body).expect("utf-8"));
        }
        assert_eq!(bodies, ["/p1", "/p2", "/p3", "/p1", "/p2", "/p3"], "{ending:?}");

        // A plain request first, then one such head, a plain one and a chunked upload in one
        // write.
        let mut conn = Conn::open(proxy.addr).await;
        conn.send(b"GET /q0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        assert_eq!(conn.next(false).await.body, b"/q0");
        conn.send(
            format!(
                "GET /q1 HTTP/1.1\r\nHost: 127.0.0.1{ending}GET /q2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n{TO_HYPER}GET /q3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let mut bodies = Vec::new();
        for _ in 0..4 {
            bodies.push(String::from_utf8(conn.next(false).await.body).expect("utf-8"));
        }
        assert_eq!(bodies, ["/q1", "/q2", "/to-hyper", "/q3"], "{ending:?}");
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Absolute-form request targets.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_is_forwarded_in_origin_form() {
    let upstream = RawUpstream::start(Arc::new(|_: &str| ok("ok"))).await;
    let proxy = upstream.proxy("[policy]\nallow = [\"GET /\", \"GET /v1/**\"]\n").await;
    let port = proxy.addr.port();
    let cases = [
        ("http://127.0.0.1?x=1".to_string(), "/?x=1"),
        (format!("http://127.0.0.1:{port}?x=1&y=2"), "/?x=1&y=2"),
        ("http://localhost".to_string(), "/"),
        (format!("http://[::1]:{port}"), "/"),
        ("http://127.0.0.1/v1/voices?x=1".to_string(), "/v1/voices?x=1"),
        (format!("HTTP://LOCALHOST:{port}/v1/a"), "/v1/a"),
    ];
    for (target, origin_form) in &cases {
        let request = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        for (path, response) in [
            ("plain", on_plain_path(&proxy, &request, false).await),
            ("hyper", on_hyper_path(&proxy, &request, false).await),
        ] {
            assert_eq!(response.status, 200, "{path}: {target}: {:?}", response.head);
            let lines = forwarded(&upstream);
            assert_eq!(
                lines.last().map(String::as_str),
                Some(format!("GET {origin_form} HTTP/1.1").as_str()),
                "{path}: {target}"
            );
        }
    }
    // The policy sees the origin form too: a path it does not allow is refused.
    let response = on_plain_path(
        &proxy,
        "GET http://127.0.0.1/admin?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(response.status, 403, "{:?}", response.head);
    // An authority-form target names no path: only CONNECT may use it, and that is refused.
    for (path, response) in [
        (
            "plain",
            on_plain_path(&proxy, "GET 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", false).await,
        ),
        (
            "hyper",
            on_hyper_path(&proxy, "GET 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", false).await,
        ),
    ] {
        assert_eq!(response.status, 400, "{path}: {:?}", response.head);
        assert_eq!(response.json()["code"], "BAD_REQUEST", "{path}");
    }
    assert_eq!(forwarded(&upstream).len(), cases.len() * 2);
    proxy.stop().await;
}
