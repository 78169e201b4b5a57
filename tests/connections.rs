//! Client connections, from raw sockets: plain requests are served by the proxy's own HTTP/1.1
//! loop (`src/server/front.rs`), and the first request that is not plain hands the connection
//! to hyper with nothing lost: the bytes already read are replayed, requests keep their order,
//! and an upgrade in the middle of a keep-alive connection still becomes a WebSocket.

mod support;

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// One parsed response off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads responses one at a time from a connection, keeping what follows each.
struct Reader {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Reader {
    /// The next response; `head_only` for the answer to a HEAD request.
    async fn next(&mut self, head_only: bool) -> RawResponse {
        tokio::time::timeout(Duration::from_secs(10), self.read(head_only))
            .await
            .expect("a response within 10 s")
    }

    async fn read(&mut self, head_only: bool) -> RawResponse {
        loop {
            if let Some((response, used)) = parse_response(&self.buf, head_only) {
                self.buf.drain(..used);
                return response;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "connection closed inside a response: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// True when the proxy closes the connection with nothing more sent.
    async fn closes(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) && self.buf.is_empty()
    }
}

/// A whole response at the start of `data` (Content-Length or chunked), and its length.
fn parse_response(data: &[u8], head_only: bool) -> Option<(RawResponse, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(data).expect("a valid response head") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let status = parsed.code.expect("status");
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let find = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let rest = &data[head_len..];
    if head_only {
        return Some((
            RawResponse {
                status,
                headers,
                body: Vec::new(),
            },
            head_len,
        ));
    }
    if let Some(length) = find("content-length") {
        let length: usize = length.parse().expect("content-length");
        if rest.len() < length {
            return None;
        }
        let body = rest[..length].to_vec();
        return Some((RawResponse { status, headers, body }, head_len + length));
    }
    assert_eq!(
        find("transfer-encoding").as_deref(),
        Some("chunked"),
        "unframed response"
    );
    let (body, used) = dechunk(rest)?;
    Some((RawResponse { status, headers, body }, head_len + used))
}

async fn connect(proxy: &TestProxy) -> Reader {
    Reader {
        stream: TcpStream::connect(proxy.addr).await.expect("connect"),
        buf: Vec::new(),
    }
}

#[tokio::test]
async fn pipelined_plain_requests_are_answered_in_order_and_close_is_honoured() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let mut conn = connect(&proxy).await;
    // Three requests in one write: the second and third arrive while the first is served.
    conn.stream
        .write_all(
            b"POST /one HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nfirst\
GET /two HTTP/1.1\r\nHost: localhost\r\n\r\n\
POST /three HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\nConnection: close\r\n\r\nthird!",
        )
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = [conn.next(false).await, conn.next(false).await, conn.next(false).await]
        .into_iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{r:?}");
            assert!(r.header("date").is_some(), "every response is dated: {r:?}");
            r.body
        })
        .collect();
    assert_eq!(bodies, vec![b"first".to_vec(), Vec::new(), b"third!".to_vec()]);
    assert!(
        conn.closes().await,
        "Connection: close ends the connection after its response"
    );
    let paths: Vec<String> = upstream.records().iter().map(|r| r.uri.path().to_string()).collect();
    assert_eq!(paths, ["/one", "/two", "/three"]);
}

#[tokio::test]
async fn a_request_that_is_not_plain_hands_the_connection_over_without_losing_bytes() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let mut conn = connect(&proxy).await;
    conn.stream
        .write_all(b"GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(conn.next(false).await.status, 200);
    // A chunked upload, with a plain request pipelined behind it: the chunked one moves the
    // connection to hyper, which must see both, in order.
    conn.stream
        .write_all(
            b"POST /chunked HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
HEAD /after HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await
        .unwrap();
    let chunked = conn.next(false).await;
    assert_eq!((chunked.status, chunked.body.as_slice()), (200, &b"hello world"[..]));
    let head = conn.next(true).await;
    assert_eq!(head.status, 200);
    // HTTP/1.0 on the same connection, still served (by hyper now), then closed.
    conn.stream
        .write_all(b"GET /old HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let old = conn.next(false).await;
    assert_eq!(old.status, 200);
    assert!(conn.closes().await, "an HTTP/1.0 request without keep-alive closes");
    let seen: Vec<(String, Vec<u8>)> = upstream
        .records()
        .iter()
        .map(|r| (r.uri.path().to_string(), r.body.to_vec()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/plain".to_string(), Vec::new()),
            ("/chunked".to_string(), b"hello world".to_vec()),
            ("/after".to_string(), Vec::new()),
            ("/old".to_string(), Vec::new()),
        ]
    );
}

#[tokio::test]
async fn head_responses_have_no_body_and_the_connection_stays_usable() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let mut conn = connect(&proxy).await;
    conn.stream
        .write_all(b"HEAD /h HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    let head = conn.next(true).await;
    assert_eq!(head.status, 200);
    // Had any body bytes followed the HEAD answer, this would not parse as the POST's answer.
    let post = conn.next(false).await;
    assert_eq!((post.status, post.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(post.header("x-upstream"), Some("test"));
    assert_eq!(post.header("keep-alive"), None, "hop-by-hop headers stay behind");
}

#[tokio::test]
async fn a_websocket_upgrade_after_plain_requests_on_the_same_connection_works() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let mut conn = connect(&proxy).await;
    for _ in 0..2 {
        conn.stream
            .write_all(
                b"POST /waves/v1/lightning/get_speech HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}",
            )
            .await
            .unwrap();
        assert_eq!(conn.next(false).await.status, 200);
    }
    assert!(conn.buf.is_empty());
    let url = format!("ws://{}/waves/v1/tts/live", proxy.addr);
    let (mut ws, response) = tokio_tungstenite::client_async(url, conn.stream)
        .await
        .expect("handshake on a connection that carried plain requests");
    assert_eq!(response.status(), 101);
    ws.send(Message::Text("ping".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("ping".into()));
    let auth: Vec<_> = upstream.state.websocket_handshakes.lock().unwrap()[0]
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(auth, [format!("Bearer {TEST_KEY}")]);
}

#[tokio::test]
async fn a_head_split_across_many_writes_is_assembled() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let mut conn = connect(&proxy).await;
    conn.stream.set_nodelay(true).unwrap();
    let request = b"POST /slow HTTP/1.1\r\nHost: localhost\r\nX-Long: abcdefghijklmnopqrstuvwxyz\r\nContent-Length: 11\r\n\r\nhello there";
    for piece in request.chunks(7) {
        conn.stream.write_all(piece).await.unwrap();
        conn.stream.flush().await.unwrap();
        // Most pieces go out as their own segment, so the proxy reads the head in pieces.
        tokio::task::yield_now().await;
    }
    let response = conn.next(false).await;
    assert_eq!((response.status, response.body.as_slice()), (200, &b"hello there"[..]));
    assert_eq!(upstream.records()[0].headers["x-long"], "abcdefghijklmnopqrstuvwxyz");
}

#[tokio::test]
async fn a_client_that_stalls_inside_a_small_body_is_dropped_after_the_idle_timeout() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[listen]\nidle_timeout = \"300ms\"\n").await;
    let mut conn = connect(&proxy).await;
    // Half of a declared 10-byte body, then nothing.
    conn.stream
        .write_all(b"POST /stalled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    assert!(conn.closes().await, "the stalled request was not dropped");
    assert!(
        upstream.records().is_empty(),
        "an incomplete request must not be forwarded"
    );
}
