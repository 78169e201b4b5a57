//! The proxy's own HTTP/1.1 client (src/upstream/h1.rs) against a scripted TLS upstream that
//! answers byte for byte: every way a response body can be delimited, chunk-size lines as hyper
//! reads them, interim responses (and floods of them), heads that must be refused, responses
//! split or cut at every offset, connections the upstream closes, uploads it answers early or
//! echoes as they come (full duplex), and which connections are reused. The well-behaved paths
//! (SSE, big bodies, limits) also run over HTTP/1.1 through the rest of the suite:
//! `scripts/test.sh` runs those files a second time with `TEST_UPSTREAM_HTTP1=1`.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::upstream::TestPki;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// One request as the upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// What the upstream does for one request.
enum Reply {
    /// Write these bytes and keep the connection for the next request.
    Keep(Vec<u8>),
    /// Write these bytes and close the connection.
    Close(Vec<u8>),
    /// Write the first bytes, wait for `release`, then write the second and keep the connection.
    Held(Vec<u8>, Vec<u8>),
    /// Answer right after the head, without reading the body, then close.
    Early(Vec<u8>),
    /// Answer right after the head, then neither read nor close until `release`; then read
    /// (and drop) whatever comes until the proxy closes the connection.
    EarlyHeld(Vec<u8>),
    /// Write the first bytes right after the head, read this many more bytes of the request
    /// (its body goes on coming after the answer began), then write the second and close.
    EarlyThenRead(Vec<u8>, usize, Vec<u8>),
    /// Write these pieces one by one (each flushed, a moment apart), then keep the connection
    /// (`false`) or close it (`true`).
    Pieces(Vec<Vec<u8>>, bool),
    /// Full duplex: once the first chunk of a chunked upload is in, answer `200` (chunked) at
    /// once and echo that chunk and every later one as a chunk of the response; the end of the
    /// upload ends the response.
    Echo,
}

type Script = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// A TLS upstream (ALPN `http/1.1` only) that answers each request by its request line.
struct Scripted {
    pki: TestPki,
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted, and connections this upstream has closed.
    accepted: watch::Sender<usize>,
    closed: watch::Sender<usize>,
    release: Arc<Notify>,
}

impl Scripted {
    async fn start(script: Script) -> Scripted {
        let pki = TestPki::new();
        let tls = pki.server_config(&[b"http/1.1"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (accepted, closed) = (watch::Sender::new(0), watch::Sender::new(0));
        let release = Arc::new(Notify::new());
        let (seen2, accepted2, closed2, release2) = (seen.clone(), accepted.clone(), closed.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted2.send_modify(|n| *n += 1);
                let (acceptor, script, seen, closed, release) = (
                    acceptor.clone(),
                    script.clone(),
                    seen2.clone(),
                    closed2.clone(),
                    release2.clone(),
                );
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        serve(&mut tls, &script, &seen, &release).await;
                        let _ = tls.shutdown().await;
                    }
                    closed.send_modify(|n| *n += 1);
                });
            }
        });
        Scripted {
            pki,
            port,
            seen,
            accepted,
            closed,
            release,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_closed(&self, n: usize) {
        let mut rx = self.closed.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n))
            .await
            .expect("the upstream closed its connection")
            .unwrap();
    }
}

/// Serve requests on one connection until the script closes it or the proxy does.
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    io: &mut S,
    script: &Script,
    seen: &Mutex<Vec<Seen>>,
    release: &Notify,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 16384];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let request_line = head.lines().next().unwrap_or("").to_string();
        let reply = script(&request_line);
        match reply {
            Reply::Early(bytes) => {
                seen.lock().unwrap().push(Seen { head, body: Vec::new() });
                let _ = io.write_all(&bytes).await;
                return;
            }
            Reply::EarlyHeld(bytes) => {
                seen.lock().unwrap().push(Seen { head, body: Vec::new() });
                let _ = io.write_all(&bytes).await;
                let _ = io.flush().await;
                release.notified().await;
                let mut sink = [0u8; 16384];
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(30), io.read(&mut sink)).await {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
            Reply::EarlyThenRead(first, more, rest) => {
                seen.lock().unwrap().push(Seen { head, body: Vec::new() });
                if io.write_all(&first).await.is_err() || io.flush().await.is_err() {
                    return;
                }
                while buf.len() < more {
                    if !read_more(io, &mut buf).await {
                        return;
                    }
                }
                let _ = io.write_all(&rest).await;
                return;
            }
            Reply::Echo => {
                let mut head_kept = head;
                let mut body = Vec::new();
                let mut answered = false;
                loop {
                    let Some(chunk) = read_chunk(io, &mut buf).await else {
                        return;
                    };
                    let mut out = Vec::new();
                    if !answered {
                        out.extend_from_slice(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
                        answered = true;
                    }
                    if chunk.is_empty() {
                        // Recorded before the last chunk goes out, so a client that has read
                        // the whole answer finds the upload here.
                        seen.lock().unwrap().push(Seen {
                            head: std::mem::take(&mut head_kept),
                            body: std::mem::take(&mut body),
                        });
                        out.extend_from_slice(b"0\r\n\r\n");
                    } else {
                        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                        out.extend_from_slice(&chunk);
                        out.extend_from_slice(b"\r\n");
                    }
                    if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
                        return;
                    }
                    if chunk.is_empty() {
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                continue;
            }
            _ => {}
        }
        let lower = head.to_ascii_lowercase();
        let body = if lower.contains("transfer-encoding: chunked") {
            let mut body = Vec::new();
            loop {
                let Some(chunk) = read_chunk(io, &mut buf).await else {
                    return;
                };
                if chunk.is_empty() {
                    break body;
                }
                body.extend_from_slice(&chunk);
            }
        } else {
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            while buf.len() < length {
                if !read_more(io, &mut buf).await {
                    return;
                }
            }
            buf.drain(..length).collect()
        };
        seen.lock().unwrap().push(Seen { head, body });
        match reply {
            Reply::Keep(bytes) => {
                if io.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::Close(bytes) => {
                let _ = io.write_all(&bytes).await;
                return;
            }
            Reply::Held(first, rest) => {
                let _ = io.write_all(&first).await;
                let _ = io.flush().await;
                release.notified().await;
                if io.write_all(&rest).await.is_err() {
                    return;
                }
            }
            Reply::Pieces(pieces, close) => {
                for piece in pieces {
                    if io.write_all(&piece).await.is_err() || io.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if close {
                    return;
                }
            }
            Reply::Early(_) | Reply::EarlyHeld(_) | Reply::EarlyThenRead(..) | Reply::Echo => {
                unreachable!("answered above")
            }
        }
        let _ = io.flush().await;
    }
}

/// One chunk of a chunked upload, decoded (empty for the last chunk); `None` if the connection
/// ended first.
async fn read_chunk<S: tokio::io::AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let line_end = loop {
        if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
            break at;
        }
        if !read_more(io, buf).await {
            return None;
        }
    };
    let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).ok()?, 16).ok()?;
    while buf.len() < line_end + 2 + size + 2 {
        if !read_more(io, buf).await {
            return None;
        }
    }
    let data = buf[line_end + 2..line_end + 2 + size].to_vec();
    buf.drain(..line_end + 2 + size + 2);
    Some(data)
}

async fn proxy_for(upstream: &Scripted, extra: &str) -> TestProxy {
    TestProxy::start_for(&upstream.url(), &upstream.pki.ca_file, extra).await
}

/// One request on a fresh client connection: status, headers and body as the client got them.
async fn send(proxy: &TestProxy, method: &str, path: &str) -> (u16, http::HeaderMap, Result<Bytes, String>) {
    let req = http::Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client().request(req).await.expect("the proxy answered");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_reaches_the_client_whole_and_keeps_the_connection_when_it_may() {
    let upstream = Scripted::start(Arc::new(|line: &str| match line.split(' ').nth(1).unwrap_or("") {
        "/length" if line.starts_with("HEAD") => {
            Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n".to_vec())
        }
        "/length" => Reply::Keep(ok("hello")),
        "/chunked" => Reply::Keep(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
        ),
        "/no-content" => Reply::Keep(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()),
        "/interim" => Reply::Keep(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        ),
        "/until-close" => Reply::Close(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it".to_vec()),
        _ => Reply::Keep(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()),
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;

    let (status, headers, body) = send(&proxy, "GET", "/length").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"hello".as_ref()));
    assert_eq!(headers["content-length"], "5");
    let connections = || *upstream.accepted.borrow();
    assert_eq!(connections(), 1);
    let (status, _, body) = send(&proxy, "GET", "/chunked").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"hello world".as_ref()));
    assert_eq!(connections(), 1, "reused after a chunked body");
    let (status, _, body) = send(&proxy, "POST", "/no-content").await;
    assert_eq!((status, body.unwrap().len()), (204, 0));
    assert_eq!(connections(), 1, "reused after a 204");
    let (status, headers, body) = send(&proxy, "HEAD", "/length").await;
    assert_eq!((status, body.unwrap().len()), (200, 0));
    assert_eq!(
        headers["content-length"], "5",
        "HEAD keeps the length of what GET would send"
    );
    assert_eq!(connections(), 1, "reused after a HEAD");
    let (status, _, body) = send(&proxy, "GET", "/interim").await;
    assert_eq!(
        (status, body.unwrap().as_ref()),
        (200, b"ok".as_ref()),
        "1xx heads are skipped"
    );
    assert_eq!(connections(), 1, "reused after interim responses");

    let (status, _, body) = send(&proxy, "GET", "/until-close").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"all of it".as_ref()));
    // A close-delimited body ends its connection: the next request needs a new one.
    let (status, _, _) = send(&proxy, "GET", "/length").await;
    assert_eq!(status, 200);
    assert_eq!(connections(), 2);

    let seen = upstream.seen();
    assert!(seen[0].head.starts_with("GET /length HTTP/1.1\r\n"), "{}", seen[0].head);
    assert!(
        seen[0].head.contains(&format!("authorization: Bearer {TEST_KEY}\r\n")),
        "{}",
        seen[0].head
    );
    assert!(
        !seen[0].head.to_ascii_lowercase().contains("content-length"),
        "an empty GET has no length"
    );
    assert!(
        seen[2].head.to_ascii_lowercase().contains("content-length: 0"),
        "an empty POST says 0"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_that_cannot_be_delimited_or_are_too_big_are_refused_with_502_and_their_connection_dropped() {
    let upstream = Scripted::start(Arc::new(|line: &str| match line.split(' ').nth(1).unwrap_or("") {
        "/two-lengths" => {
            Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_vec())
        }
        "/bad-length" => Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5x\r\n\r\nhello".to_vec()),
        "/upgrade" => Reply::Keep(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n".to_vec()),
        "/garbage" => Reply::Keep(b"HTTP/1.1 2000 What\r\n\r\n".to_vec()),
        "/huge-head" => Reply::Keep(
            format!(
                "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
                "a".repeat(70_000)
            )
            .into_bytes(),
        ),
        "/endless-trailers" => Reply::Keep(
            format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: {}\r\n\r\n",
                "t".repeat(20_000)
            )
            .into_bytes(),
        ),
        _ => Reply::Keep(ok("fine")),
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    for (n, path) in ["/two-lengths", "/bad-length", "/upgrade", "/garbage", "/huge-head"]
        .iter()
        .enumerate()
    {
        let (status, _, body) = send(&proxy, "GET", path).await;
        let body = body.unwrap();
        let error: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
        assert_eq!(status, 502, "{path}: {error}");
        assert_eq!(error["code"], "UPSTREAM_UNAVAILABLE", "{path}: {error}");
        // The connection that sent it is not used again.
        upstream.wait_closed(n + 1).await;
    }
    // Past its head, a body whose trailers do not end within 16 KiB is cut off.
    let (status, _, body) = send(&proxy, "GET", "/endless-trailers").await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "{body:?}");
    upstream.wait_closed(6).await;
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(*upstream.accepted.borrow(), 7);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
    // The upstream closes after each answer without saying so (no `Connection: close`), as a
    // server whose keep-alive timeout passed does.
    let upstream = Scripted::start(Arc::new(|_: &str| Reply::Close(ok("once")))).await;
    let proxy = proxy_for(&upstream, "").await;
    for round in 1..=3 {
        let (status, _, body) = send(&proxy, "POST", "/x").await;
        assert_eq!(
            (status, body.unwrap().as_ref()),
            (200, b"once".as_ref()),
            "round {round}"
        );
        upstream.wait_closed(round).await;
    }
    assert_eq!(*upstream.accepted.borrow(), 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_upstream_cuts_short_is_cut_short_for_the_client_too() {
    let upstream = Scripted::start(Arc::new(|line: &str| {
        if line.contains("/short") {
            Reply::Close(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten!!".to_vec())
        } else {
            Reply::Keep(ok("next"))
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    let (status, _, body) = send(&proxy, "GET", "/short").await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "the client must see the body end early, got {body:?}");
    let (status, _, body) = send(&proxy, "GET", "/next").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"next".as_ref()));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_stream_reaches_the_client_as_each_part_arrives() {
    let upstream = Scripted::start(Arc::new(|_: &str| {
        Reply::Held(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n".to_vec(),
            b"9\r\ndata: 2\n\n\r\n0\r\n\r\n".to_vec(),
        )
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    let req = http::Request::builder()
        .uri(proxy.url("/sse"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // The first event arrives while the upstream is still holding the second.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first event came through before the stream ended")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap().as_ref(), b"data: 1\n\n");
    upstream.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest.as_ref(), b"data: 2\n\n");
    proxy.stop().await;
}

/// A streamed upload (too big to buffer) from a raw client: `framing` is its framing header.
async fn upload(proxy: &TestProxy, framing: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    if framing.starts_with("Transfer-Encoding") {
        for chunk in body.chunks(50_000) {
            stream
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await
                .unwrap();
            stream.write_all(chunk).await.unwrap();
            stream.write_all(b"\r\n").await.unwrap();
        }
        stream.write_all(b"0\r\n\r\n").await.unwrap();
    } else {
        stream.write_all(body).await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_uploads_arrive_whole_with_the_framing_their_size_allows() {
    let upstream = Scripted::start(Arc::new(|_: &str| Reply::Keep(ok("stored")))).await;
    let proxy = proxy_for(&upstream, "").await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let answer = upload(&proxy, &format!("Content-Length: {}", body.len()), &body).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = upload(&proxy, "Transfer-Encoding: chunked", &body).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0].head.to_ascii_lowercase().contains("content-length: 300000"),
        "{}",
        seen[0].head
    );
    assert!(
        seen[1].head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "{}",
        seen[1].head
    );
    for s in &seen {
        assert!(s.body == body, "the upload arrived changed ({} bytes)", s.body.len());
    }
    assert_eq!(*upstream.accepted.borrow(), 1, "both uploads went over one connection");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_upstream_answers_early_gets_that_answer() {
    let upstream = Scripted::start(Arc::new(|line: &str| {
        if line.contains("/upload") {
            Reply::Early(
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{\"error\":\"big\"}"
                    .to_vec(),
            )
        } else {
            Reply::Keep(ok("fine"))
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    // The client sends the head and a first part, then nothing: the answer must not wait for
    // an upload that is not coming.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("the early answer reached the client")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    drop(stream);
    // That connection is not reused (its upload never ended); the next request gets another.
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(*upstream.accepted.borrow(), 2);
    proxy.stop().await;
}

/// The proxy's answer read from a raw client connection, as it arrives: the head, then the
/// body's data (chunked or `Content-Length`) piece by piece.
struct Answer {
    read: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
    chunked: bool,
    /// Body bytes left of a `Content-Length` body.
    left: usize,
}

impl Answer {
    /// Read the head; `None` if the connection ended first.
    async fn start(read: tokio::net::tcp::OwnedReadHalf) -> (String, Answer) {
        let mut answer = Answer {
            read,
            buf: Vec::new(),
            chunked: false,
            left: 0,
        };
        let end = loop {
            if let Some(at) = answer.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(answer.more().await, "the connection ended before the answer's head");
        };
        let head = String::from_utf8_lossy(&answer.buf[..end]).into_owned();
        answer.buf.drain(..end);
        let lower = head.to_ascii_lowercase();
        answer.chunked = lower.contains("transfer-encoding: chunked");
        answer.left = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        (head, answer)
    }

    async fn more(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout(Duration::from_secs(10), self.read.read(&mut chunk)).await {
            Err(_) => panic!("the proxy sent nothing for 10 s"),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next piece of the body: `Ok(None)` at its end, `Err` if the connection ended first.
    async fn data(&mut self) -> Result<Option<Vec<u8>>, ()> {
        if !self.chunked {
            if self.left == 0 {
                return Ok(None);
            }
            while self.buf.is_empty() {
                if !self.more().await {
                    return Err(());
                }
            }
            let n = self.left.min(self.buf.len());
            self.left -= n;
            return Ok(Some(self.buf.drain(..n).collect()));
        }
        let line_end = loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            if !self.more().await {
                return Err(());
            }
        };
        let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16).unwrap();
        while self.buf.len() < line_end + 2 + size + 2 {
            if !self.more().await {
                return Err(());
            }
        }
        let data = self.buf[line_end + 2..line_end + 2 + size].to_vec();
        self.buf.drain(..line_end + 2 + size + 2);
        Ok((size > 0).then_some(data))
    }

    /// The rest of the body.
    async fn rest(&mut self) -> Result<Vec<u8>, ()> {
        let mut all = Vec::new();
        while let Some(data) = self.data().await? {
            all.extend_from_slice(&data);
        }
        Ok(all)
    }
}

fn chunk_of(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_duplex_upstream_streams_its_answer_while_the_upload_is_still_coming() {
    let upstream = Scripted::start(Arc::new(|line: &str| {
        if line.contains("/duplex") {
            Reply::Echo
        } else {
            Reply::Keep(ok("fine"))
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    let upload: Vec<u8> = support::pattern::chunk(0, 300_000).to_vec();

    // 300 KB in 10 KB chunks, written while the answer is read.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let sent = upload.clone();
    let writer = tokio::spawn(async move {
        write
            .write_all(b"POST /duplex HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        for part in sent.chunks(10_000) {
            write.write_all(&chunk_of(part)).await.unwrap();
        }
        write.write_all(b"0\r\n\r\n").await.unwrap();
        write
    });
    let (head, mut answer) = Answer::start(read).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let echoed = answer.rest().await.expect("the echo ended cleanly");
    assert!(echoed == upload, "the echo came back changed ({} bytes)", echoed.len());
    let _write = writer.await.unwrap();
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].body == upload,
        "the upload arrived changed ({} bytes)",
        seen[0].body.len()
    );

    // Both directions ended cleanly: the connection is reused.
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(*upstream.accepted.borrow(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_duplex_exchange_moves_in_lock_step_with_a_slow_trickle() {
    let upstream = Scripted::start(Arc::new(|_: &str| Reply::Echo)).await;
    let proxy = proxy_for(&upstream, "").await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(b"POST /duplex HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    write.write_all(&chunk_of(b"tick 0")).await.unwrap();
    let (head, mut answer) = Answer::start(read).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut all = Vec::new();
    // Each small chunk goes out only after the previous one came back: the upload is still
    // open every time the answer moves.
    for i in 0..20 {
        let expected = format!("tick {i}");
        let mut got = Vec::new();
        while got.len() < expected.len() {
            match answer.data().await {
                Ok(Some(data)) => got.extend_from_slice(&data),
                other => panic!("tick {i}: the answer ended early: {other:?}"),
            }
        }
        assert_eq!(String::from_utf8_lossy(&got), expected);
        all.extend_from_slice(&got);
        tokio::time::sleep(Duration::from_millis(10)).await;
        if i < 19 {
            write
                .write_all(&chunk_of(format!("tick {}", i + 1).as_bytes()))
                .await
                .unwrap();
        }
    }
    write.write_all(b"0\r\n\r\n").await.unwrap();
    assert_eq!(answer.data().await, Ok(None), "the end of the upload ends the answer");
    assert_eq!(upstream.seen()[0].body, all);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_duplex_never_gives_the_upstream_a_complete_upload() {
    let upstream = Scripted::start(Arc::new(|_: &str| Reply::Echo)).await;
    let proxy = proxy_for(&upstream, "").await;
    let (read, mut write) = TcpStream::connect(proxy.addr).await.unwrap().into_split();
    write
        .write_all(b"POST /duplex HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    write.write_all(&chunk_of(b"first")).await.unwrap();
    let (head, mut answer) = Answer::start(read).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(answer.data().await, Ok(Some(b"first".to_vec())));
    // Half a chunk, then the client is gone.
    write.write_all(b"10\r\nhalf a ch").await.unwrap();
    drop(write);
    drop(answer);
    upstream.wait_closed(1).await;
    assert!(
        upstream.seen().is_empty(),
        "the upstream saw the upload end: {:?}",
        upstream.seen()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_duplex_answer_that_turns_malformed_is_cut_and_its_upload_dropped() {
    // The upstream answers 200 at once, then sends a chunk-size line hyper refuses while the
    // upload is still coming.
    let upstream = Scripted::start(Arc::new(|line: &str| {
        if line.contains("/upload") {
            Reply::EarlyThenRead(
                chunked(b"5\r\nhello\r\n"),
                50_000,
                b"5\n;x\r\nworld\r\n0\r\n\r\n".to_vec(),
            )
        } else {
            Reply::Keep(ok("fine"))
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    let (read, mut write) = TcpStream::connect(proxy.addr).await.unwrap().into_split();
    write
        .write_all(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    write.write_all(&chunk_of(b"first")).await.unwrap();
    let (head, mut answer) = Answer::start(read).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(answer.data().await, Ok(Some(b"hello".to_vec())));
    // Only now the rest of the upload, which makes the upstream send the malformed line.
    let writer = tokio::spawn(async move {
        let part = chunk_of(&[b'x'; 16_000]);
        while write.write_all(&part).await.is_ok() {}
    });
    assert_eq!(answer.data().await, Err(()), "the answer is cut, not ended");
    writer.abort();
    upstream.wait_closed(1).await;
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(*upstream.accepted.borrow(), 2);
    proxy.stop().await;
}

/// A streamed upload that keeps coming until the task is aborted.
fn endless_upload(mut write: tokio::net::tcp::OwnedWriteHalf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if write
            .write_all(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        let part = chunk_of(&[b'x'; 16_000]);
        while write.write_all(&part).await.is_ok() {}
    })
}

const TOO_LARGE: &[u8] =
    b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{\"error\":\"big\"}";

/// Three endless uploads in turn, each on a fresh client connection: every one gets the whole
/// 413 while it is still uploading, and the upstream sees each connection closed.
async fn three_refused_uploads(proxy: &TestProxy, upstream: &Scripted) {
    for round in 1..=3 {
        let (read, write) = TcpStream::connect(proxy.addr).await.unwrap().into_split();
        let writer = endless_upload(write);
        let (head, mut answer) = Answer::start(read).await;
        assert!(head.starts_with("HTTP/1.1 413"), "round {round}: {head}");
        assert_eq!(
            answer.rest().await.as_deref(),
            Ok(&b"{\"error\":\"big\"}"[..]),
            "round {round}"
        );
        writer.abort();
        upstream.wait_closed(round).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_upstream_refuses_and_hangs_up_on_still_gets_the_refusal() {
    // The upstream answers after the head and closes while the client keeps uploading: the
    // proxy's writes fail, and the answer that came before must still reach the client.
    let upstream = Scripted::start(Arc::new(|line: &str| {
        if line.contains("/upload") {
            Reply::Early(TOO_LARGE.to_vec())
        } else {
            Reply::Keep(ok("fine"))
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    three_refused_uploads(&proxy, &upstream).await;
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(
        *upstream.accepted.borrow(),
        4,
        "no refused upload's connection was reused"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_upstream_refuses_and_stops_reading_still_gets_the_refusal() {
    // The upstream answers after the head, then neither reads nor closes: the upload backs up,
    // and the answer must not wait for it.
    let upstream = Scripted::start(Arc::new(|line: &str| {
        if line.contains("/upload") {
            Reply::EarlyHeld(TOO_LARGE.to_vec())
        } else {
            Reply::Keep(ok("fine"))
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    let (read, write) = TcpStream::connect(proxy.addr).await.unwrap().into_split();
    let writer = endless_upload(write);
    let (head, mut answer) = Answer::start(read).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(answer.rest().await.as_deref(), Ok(&b"{\"error\":\"big\"}"[..]));
    writer.abort();
    // The proxy gave that connection up (its upload never ended): once the upstream reads
    // again, it finds the connection closed.
    upstream.release.notify_one();
    upstream.wait_closed(1).await;
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(*upstream.accepted.borrow(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_does_not_stop_the_upload_until_the_upstream_hangs_up() {
    // The upstream sends its head at once, goes on reading 200 KB of the upload, then finishes
    // its answer and closes: the upload must go on after the head, and the failed writes after
    // the close must not cost the client the rest of the answer.
    let (head, body) = TOO_LARGE.split_at(TOO_LARGE.len() - 15);
    let (head, body) = (head.to_vec(), body.to_vec());
    let upstream = Scripted::start(Arc::new(move |line: &str| {
        if line.contains("/upload") {
            Reply::EarlyThenRead(head.clone(), 200_000, body.clone())
        } else {
            Reply::Keep(ok("fine"))
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    three_refused_uploads(&proxy, &upstream).await;
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(*upstream.accepted.borrow(), 4);
    proxy.stop().await;
}

/// A chunked response whose body is `chunks` (raw bytes after the head).
fn chunked(chunks: &[u8]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    out.extend_from_slice(chunks);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_size_lines_are_read_as_hyper_reads_them() {
    // Each path's body as the upstream writes it; `Some(body)` is what the client must get,
    // `None` that the response is refused.
    let cases: Vec<(&str, &[u8], Option<&str>)> = vec![
        ("/bare-lf-before-extension", b"5\n;x\r\nhello\r\n0\r\n\r\n", None),
        ("/form-feed-after-size", b"5\x0c\r\nhello\r\n0\r\n\r\n", None),
        ("/space-before-size", b" 5\r\nhello\r\n0\r\n\r\n", None),
        ("/bare-lf-line-end", b"5\nhello\r\n0\r\n\r\n", None),
        ("/bare-lf-in-extension", b"5;a\nb\r\nhello\r\n0\r\n\r\n", None),
        ("/cr-without-lf", b"5\rhello\r\n0\r\n\r\n", None),
        ("/digit-after-whitespace", b"5 5\r\nhello\r\n0\r\n\r\n", None),
        ("/size-overflow", b"10000000000000005\r\nhello\r\n0\r\n\r\n", None),
        (
            "/leading-zeros",
            b"000000000000000000005\r\nhello\r\n0000000000000000000\r\n\r\n",
            Some("hello"),
        ),
        ("/whitespace-after-size", b"5 \t \r\nhello\r\n0\r\n\r\n", Some("hello")),
        (
            "/quoted-extension",
            b"5;name=\"a;b \\\" c\"\r\nhello\r\n0\r\n\r\n",
            Some("hello"),
        ),
        (
            "/whitespace-then-extension",
            b"5\t ;x=1\r\nhello\r\n0\r\n\r\n",
            Some("hello"),
        ),
    ];
    let script: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(p, body, _)| (p.to_string(), chunked(body)))
        .collect();
    let upstream = Scripted::start(Arc::new(move |line: &str| {
        let path = line.split(' ').nth(1).unwrap_or("");
        match script.iter().find(|(p, _)| p == path) {
            Some((_, bytes)) => Reply::Keep(bytes.clone()),
            None => Reply::Keep(chunked(b"5\r\nhello\r\n5\n;x\r\nworld\r\n0\r\n\r\n")),
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    let mut closed = 0;
    for (path, _, expected) in &cases {
        let (status, _, body) = send(&proxy, "GET", path).await;
        match expected {
            Some(expected) => {
                assert_eq!(status, 200, "{path}");
                assert_eq!(body.as_deref(), Ok(expected.as_bytes()), "{path}");
            }
            None => {
                let body = body.unwrap();
                let error: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
                assert_eq!(status, 502, "{path}: {error}");
                assert_eq!(error["code"], "UPSTREAM_UNAVAILABLE", "{path}: {error}");
                closed += 1;
                upstream.wait_closed(closed).await;
            }
        }
    }
    // A bad size line after the first chunk: the head is already on its way, so the body is
    // cut short for the client (never delivered as complete) and the connection dropped.
    let (status, _, body) = send(&proxy, "GET", "/second-line-bad").await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "{body:?}");
    upstream.wait_closed(closed + 1).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_interim_heads_is_skipped_within_the_head_budget_and_refused_past_it() {
    let flood = |n: usize| {
        let mut bytes = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(n);
        bytes.extend_from_slice(&ok("after the flood"));
        bytes
    };
    // 2000 heads (50 KB) fit in the 64 KiB a response may spend before its body; 3000 do not.
    let (within, past) = (flood(2000), flood(3000));
    let upstream = Scripted::start(Arc::new(move |line: &str| {
        if line.contains("/past") {
            Reply::Keep(past.clone())
        } else {
            Reply::Keep(within.clone())
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    for _ in 0..2 {
        let (status, _, body) = send(&proxy, "GET", "/within").await;
        assert_eq!((status, body.unwrap().as_ref()), (200, b"after the flood".as_ref()));
    }
    assert_eq!(*upstream.accepted.borrow(), 1, "reused after the flood");
    let (status, _, body) = send(&proxy, "GET", "/past").await;
    let error: serde_json::Value = serde_json::from_slice(&body.unwrap()).expect("a JSON error");
    assert_eq!(
        (status, &error["code"]),
        (502, &serde_json::json!("UPSTREAM_UNAVAILABLE")),
        "{error}"
    );
    upstream.wait_closed(1).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_lengths_head_answers_and_bodiless_statuses_are_delimited_and_reused_only_when_clean() {
    let upstream = Scripted::start(Arc::new(|line: &str| match line.split(' ').nth(1).unwrap_or("") {
        "/equal-lengths" => {
            Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello".to_vec())
        }
        "/head" => Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec()),
        "/chunked-and-length" => Reply::Keep(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        ),
        "/no-content-tail" => Reply::Keep(b"HTTP/1.1 204 No Content\r\n\r\nhello".to_vec()),
        "/not-modified-tail" => Reply::Keep(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\nhello".to_vec()),
        _ => Reply::Keep(ok("fine")),
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    let connections = || *upstream.accepted.borrow();

    let (status, _, body) = send(&proxy, "GET", "/equal-lengths").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"hello".as_ref()));
    let (status, headers, body) = send(&proxy, "HEAD", "/head").await;
    assert_eq!((status, body.unwrap().len()), (200, 0));
    assert_eq!(headers["content-length"], "5");
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(connections(), 1, "all of these leave the connection clean");

    // Chunked wins over a length, and the connection is not trusted after it.
    let (status, _, body) = send(&proxy, "GET", "/chunked-and-length").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"hello".as_ref()));
    upstream.wait_closed(1).await;
    // 204 and 304 end at their heads; what follows is not a body, and not a next response.
    for (n, path) in ["/no-content-tail", "/not-modified-tail"].iter().enumerate() {
        let (status, _, body) = send(&proxy, "GET", path).await;
        assert!(status == 204 || status == 304, "{path}: {status}");
        assert_eq!(body.unwrap().len(), 0, "{path}");
        upstream.wait_closed(n + 2).await;
    }
    let (status, _, body) = send(&proxy, "GET", "/fine").await;
    assert_eq!((status, body.unwrap().as_ref()), (200, b"fine".as_ref()));
    assert_eq!(connections(), 4);
    proxy.stop().await;
}

/// An interim head, then a chunked body with an extension and a trailer.
const LAYERED: &[u8] = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=\"q\"\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_split_at_every_offset_or_sent_byte_by_byte_arrive_whole_on_one_connection() {
    let upstream = Scripted::start(Arc::new(|line: &str| {
        let path = line.split(' ').nth(1).unwrap_or("");
        if let Some(at) = path.strip_prefix("/split/") {
            let at: usize = at.parse().unwrap();
            Reply::Pieces(vec![LAYERED[..at].to_vec(), LAYERED[at..].to_vec()], false)
        } else {
            Reply::Pieces(LAYERED.iter().map(|&b| vec![b]).collect(), false)
        }
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    for at in 1..LAYERED.len() {
        let (status, _, body) = send(&proxy, "GET", &format!("/split/{at}")).await;
        assert_eq!(
            (status, body.as_deref()),
            (200, Ok(&b"hello world"[..])),
            "split at {at}"
        );
    }
    let (status, _, body) = send(&proxy, "GET", "/bytes").await;
    assert_eq!((status, body.as_deref()), (200, Ok(&b"hello world"[..])));
    assert_eq!(*upstream.accepted.borrow(), 1, "every split left the connection clean");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_at_any_offset_is_never_delivered_as_complete() {
    let head_end = LAYERED.windows(4).rposition(|w| w == b"\r\n\r\n").unwrap();
    let final_head_end = LAYERED.windows(6).position(|w| w == b"\r\n\r\n5;").unwrap() + 4;
    assert!(head_end > final_head_end);
    let upstream = Scripted::start(Arc::new(|line: &str| {
        let at: usize = line.split(' ').nth(1).unwrap_or("/0")[1..].parse().unwrap();
        Reply::Pieces(vec![LAYERED[..at].to_vec()], true)
    }))
    .await;
    let proxy = proxy_for(&upstream, "").await;
    for at in 0..LAYERED.len() {
        let (status, _, body) = send(&proxy, "GET", &format!("/{at}")).await;
        if at < final_head_end {
            assert_eq!(status, 502, "cut at {at}");
        } else {
            assert_eq!(status, 200, "cut at {at}");
            assert!(body.is_err(), "cut at {at}: {body:?}");
        }
        upstream.wait_closed(at + 1).await;
    }
    proxy.stop().await;
}
