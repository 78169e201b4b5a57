//! Differential proof of the proxy's hand-written HTTP/1.1 code against hyper.
//!
//! Two properties, each over one proxy and one upstream for all its cases (the harness is
//! `tests/support/differential.rs`, shared with the cargo-fuzz targets in `fuzz/`):
//!
//! - **Requests**: pipelines of 1–4 requests (odd and lowercase methods, origin- and
//!   absolute-form targets, every framing header shape, chunk extensions and trailers,
//!   `Expect`, HTTP/1.0, bare LF, obs-fold, heads ending `\n\r\n`), cut into several writes, go
//!   through the proxy to a hyper server that records what it parses, and straight into a
//!   hyper server connection. The proxy forwards exactly the messages hyper parsed (method,
//!   path and query, end-to-end headers, body), answers each in order, and refuses only what
//!   the allow-list in the harness names, each with its reason; what hyper refuses, the proxy
//!   does not forward.
//! - **Responses**: upstream response bytes (1xx heads, 204/304, HEAD, every length and
//!   chunked shape, close-delimited bodies), cut into several writes, read by hyper's client
//!   through the proxy and straight from the upstream: same status, end-to-end headers and
//!   body; a 502 from the proxy only where hyper refuses too, or on the allow-list; and the
//!   proxy's own framing to its client valid (one Content-Length at most, none on a 204).
//!
//! Cases are drawn as choice bytes, so a failure shrinks toward the plainest request. The seed
//! is fixed (`PROPTEST_RNG_SEED=N` picks another); `PROPTEST_CASES=N` runs more cases.
//!
//! The named cases below pin each divergence found by hand (or by these properties), from raw
//! bytes, against what hyper does with the same bytes.
//!
//! For long runs the same harness is two cargo-fuzz targets, `fuzz/fuzz_targets/`:
//! `cd fuzz && cargo fuzz run request_differential -- -max_len=256 -len_control=0` (and
//! `response_differential`); on a stable toolchain prefix `RUSTC_BOOTSTRAP=1` and add `-s none`.

#[path = "support/differential.rs"]
mod differential;

use bytes::Bytes;
use differential::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 512;
/// Choice bytes per case: enough for four requests with every variation drawn.
const MAX_CHOICES: usize = 160;

fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        // A failing case that waits on the proxy's header timeout costs seconds: keep
        // shrinking bounded.
        max_shrink_iters: 1024,
        max_shrink_time: 30_000,
        rng_seed: match std::env::var_os("PROPTEST_RNG_SEED") {
            Some(_) => ProptestConfig::default().rng_seed,
            None => RngSeed::Fixed(0xD1FF_2026),
        },
        ..ProptestConfig::default()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[test]
fn the_proxy_forwards_exactly_the_requests_hyper_parses() {
    let runtime = runtime();
    let harness = runtime.block_on(RequestHarness::start());
    let mut runner = runner();
    let result = runner.run(&proptest::collection::vec(any::<u8>(), 0..MAX_CHOICES), |choices| {
        let case = harness.case_from_choices(&choices);
        runtime.block_on(harness.check(&case)).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let coverage = harness.coverage.lock().expect("coverage");
    println!("{coverage}");
    // A property that forwarded nothing, or never met a refusal, proved nothing.
    if coverage.cases >= 64 {
        assert!(
            2 * coverage.forwarded >= coverage.cases,
            "too little reached the upstream:\n{coverage}"
        );
        assert!(
            coverage.hyper_refused > 0 && !coverage.allowed.is_empty(),
            "no refusals exercised:\n{coverage}"
        );
    }
}

#[test]
fn the_proxy_passes_on_exactly_the_responses_hyper_reads() {
    let runtime = runtime();
    let harness = runtime.block_on(ResponseHarness::start());
    let result = runner().run(&proptest::collection::vec(any::<u8>(), 0..MAX_CHOICES), |choices| {
        let case = harness.case_from_choices(&choices);
        runtime.block_on(harness.check(&case)).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let coverage = harness.coverage.lock().expect("coverage");
    println!("{coverage}");
    if coverage.cases >= 64 {
        assert!(
            coverage.whole >= coverage.cases / 4 && coverage.refused_heads > 0 && coverage.failed_bodies > 0,
            "too little exercised:\n{coverage}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Named cases: each divergence found by hand, from raw bytes.

async fn request_case(bytes: &[u8]) {
    let harness = RequestHarness::start().await;
    if let Err(e) = harness.check(&RequestCase::raw(bytes)).await {
        panic!("{e}");
    }
}

async fn response_case(method: &'static str, bytes: &[u8]) {
    let harness = ResponseHarness::start().await;
    if let Err(e) = harness.check(&ResponseCase::raw(method, bytes)).await {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_ending_in_lf_crlf_is_answered_as_hyper_answers_it() {
    // httparse (so hyper) takes a bare LF as a line end anywhere, the blank line included.
    request_case(b"GET /lf-crlf HTTP/1.1\r\nHost: 127.0.0.1\n\r\n").await;
    request_case(b"POST /lf-crlf HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\n\r\nok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_without_a_path_reaches_the_upstream_with_the_path_slash() {
    // RFC 9112 §3.2.2: an absolute-form target with an empty path has the path "/".
    request_case(b"GET http://127.0.0.1?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    request_case(b"GET http://localhost:8787 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowercase_methods_are_forwarded_as_the_other_methods_they_are() {
    // Methods are case-sensitive (RFC 9110 §9.1): `get` is not GET, and hyper keeps it as sent.
    request_case(b"get /lower HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    request_case(b"post /lower HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello").await;
    request_case(b"head /lower HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /next HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowercase_connect_is_not_forwarded_with_its_target_rewritten() {
    // `connect` is not CONNECT, so the guard lets it by; hyper parses its authority-form target
    // (no path). Forwarding it as `connect /` changes the request: refuse it (400 or 405, on
    // the allow-list) or forward it as it is.
    request_case(b"connect 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_with_a_body_is_not_forwarded_without_it() {
    // hyper reads the body of any request, an upgrade request too. Dropping it sends the
    // upstream a different request (and leaves its bytes where the next request is looked
    // for): refuse it (400, on the allow-list) or forward it whole.
    request_case(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_duplicate_equal_content_length_reaches_the_client_once() {
    response_case(
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_204_reaches_the_client_without_a_content_length() {
    response_case("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").await;
    response_case("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_size_lines_hyper_refuses_are_refused() {
    // A bare LF and then an extension, and a form feed after the size: not RFC 9112 §7.1.
    response_case(
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\n;x\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    response_case(
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\x0c\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailer_lines_hyper_refuses_are_refused() {
    // hyper parses trailer fields as header fields; a line without a colon ends the body in an
    // error. Skipped unread, it lets a broken message through as whole.
    response_case(
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_response_with_transfer_encoding_is_refused() {
    // RFC 9112 §6.1: Transfer-Encoding is HTTP/1.1's; hyper's client refuses it in an HTTP/1.0
    // response. Read until the close, the chunked coding reaches the client as the body.
    response_case(
        "GET",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_list_of_one_value_is_read_as_hyper_reads_it() {
    // RFC 9110 §8.6 lets a recipient take `Content-Length: 5, 5` as 5; hyper's client does.
    response_case("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_sizes_with_many_leading_zeros_are_read_as_hyper_reads_them() {
    response_case(
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000005\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

/// An upstream that answers a streamed upload as soon as its head arrives, then reads the
/// whole upload, then ends the answer with the upload's length: it needs full duplex.
async fn duplex_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                buf.drain(..head_end);
                let first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                if tcp.write_all(first).await.is_err() {
                    return;
                }
                // The chunked upload, decoded, until its last chunk.
                let mut received = 0usize;
                loop {
                    if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                        let size =
                            usize::from_str_radix(&String::from_utf8_lossy(&buf[..end]), 16).expect("a chunk size");
                        if size == 0 {
                            break;
                        }
                        if buf.len() >= end + 2 + size + 2 {
                            received += size;
                            buf.drain(..end + 2 + size + 2);
                            continue;
                        }
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let last = format!("got {received:02} bytes");
                let rest = format!("{:x}\r\n{last}\r\n0\r\n\r\n", last.len());
                let _ = tcp.write_all(rest.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// Upload in two parts, the second only after the answer's first part arrived; the answer's
/// whole body.
async fn duplex_exchange(addr: SocketAddr) -> Result<Bytes, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    }));
    let request = http::Request::post("/duplex")
        .header("host", "127.0.0.1")
        .body(body)
        .map_err(|e| e.to_string())?;
    let bound = Duration::from_secs(10);
    tx.send(Ok(Frame::data(Bytes::from_static(b"part-one"))))
        .await
        .map_err(|_| "the upload was dropped".to_string())?;
    let response = tokio::time::timeout(bound, sender.send_request(request))
        .await
        .map_err(|_| "no answer head while the upload was open".to_string())?
        .map_err(|e| e.to_string())?;
    let mut body = response.into_body();
    let first = tokio::time::timeout(bound, body.frame())
        .await
        .map_err(|_| "the answer's first part did not come".to_string())?;
    let mut got = match first {
        Some(Ok(frame)) => frame.into_data().unwrap_or_default().to_vec(),
        other => return Err(format!("the answer's first part: {other:?}")),
    };
    // The rest of the upload goes after the answer has begun.
    tx.send(Ok(Frame::data(Bytes::from_static(b"part-two"))))
        .await
        .map_err(|_| "the rest of the upload was refused: the upload had been dropped".to_string())?;
    drop(tx);
    let rest = tokio::time::timeout(bound, body.collect())
        .await
        .map_err(|_| {
            format!(
                "the answer did not end within {bound:?}: the upstream never got the rest of the upload (got so far: {:?})",
                String::from_utf8_lossy(&got)
            )
        })?
        .map_err(|e| e.to_string())?;
    got.extend_from_slice(&rest.to_bytes());
    Ok(Bytes::from(got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_goes_on_after_the_response_head_arrives() {
    let upstream = duplex_upstream().await;
    let direct = duplex_exchange(upstream).await;
    assert_eq!(
        direct.as_deref(),
        Ok(b"firstgot 16 bytes".as_slice()),
        "hyper's client, straight to the upstream"
    );
    let proxy = Proxy::start(&format!("http://{upstream}")).await;
    let through = duplex_exchange(proxy.addr).await;
    assert_eq!(
        through.as_deref(),
        Ok(b"firstgot 16 bytes".as_slice()),
        "through the proxy, the upload must go on while the answer streams (full duplex, as hyper does)"
    );
    proxy.stop().await;
}
