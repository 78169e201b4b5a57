//! A real TLS upstream for the tests: rustls with certificates made by rcgen, HTTP/1.1 and
//! HTTP/2 (ALPN), WebSocket echo, SSE, big streamed bodies. It records every request exactly as
//! it arrived so a test can assert what the proxy sent.

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::pattern;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: http::Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The body, for requests to paths other than `/upload` (which only counts).
    pub body: Bytes,
    /// When the request arrived.
    pub at: std::time::Instant,
}

/// Test certificates: a CA the proxy trusts (written to `ca_file`) and a leaf for
/// `localhost` / `127.0.0.1` signed by it.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
    pub cert_der: rustls::pki_types::CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "smallest-proxy test CA");
        let ca_key = KeyPair::generate().expect("ca key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("leaf params");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_cert = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key).expect("leaf cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
        TestPki {
            dir,
            ca_file,
            cert_der: leaf_cert.der().clone(),
            key_der: leaf_key.serialize_der(),
        }
    }
}

impl TestPki {
    /// A rustls server config presenting the leaf certificate and offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert_der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
            )
            .expect("server cert");
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tls
    }
}

/// Options for one upstream.
#[derive(Clone, Copy)]
pub struct UpstreamOptions {
    /// Offer `h2` in ALPN (the proxy should then use HTTP/2).
    pub http2: bool,
}

impl Default for UpstreamOptions {
    /// HTTP/2 offered, unless `TEST_UPSTREAM_HTTP1=1`: `scripts/test.sh` runs the forwarding,
    /// streaming and limit tests a second time that way, through the proxy's HTTP/1.1 client.
    fn default() -> Self {
        UpstreamOptions {
            http2: std::env::var("TEST_UPSTREAM_HTTP1").map_or(true, |v| v != "1"),
        }
    }
}

#[derive(Default)]
pub struct UpstreamState {
    pub records: Mutex<Vec<Recorded>>,
    pub connections: AtomicUsize,
    /// Connections that have ended (closed by either side, or failed their TLS handshake);
    /// tests wait on it.
    pub closed_connections: tokio::sync::watch::Sender<usize>,
    /// `/sse` sends its first event, then waits for this before the rest.
    pub sse_release: Notify,
    /// Set once `/sse` has written its last event.
    pub sse_finished: AtomicBool,
    /// WebSocket handshakes the upstream accepted.
    pub websocket_handshakes: Mutex<Vec<HeaderMap>>,
    /// When set, only `Bearer <this>` is accepted; anything else gets 401 like Smallest. A
    /// test rotating the key holds this lock while it writes the new key to the source, so
    /// the upstream switches to the new key at the moment it is written.
    pub accepted_key: tokio::sync::Mutex<Option<String>>,
    /// Count of requests answered 200 with the accepted key; tests wait on it.
    pub accepted_count: tokio::sync::watch::Sender<u64>,
    /// Like Smallest: more than this many requests in flight at once get 429 (0 = no limit).
    pub concurrency_limit: AtomicUsize,
    pub in_flight: AtomicUsize,
    /// The most requests ever in flight at once.
    pub max_in_flight: AtomicUsize,
    /// 429s the upstream answered because of `concurrency_limit`.
    pub rejected_429: AtomicUsize,
    /// Simulated synthesis time of an ordinary request, in milliseconds.
    pub work_ms: std::sync::atomic::AtomicU64,
    /// `/hang` waits for a permit here; tests add permits to release held requests.
    pub hold: Hold,
    /// `/flaky` answers 429 (Retry-After: 1) while this is above zero, counting down.
    pub flaky_remaining: AtomicUsize,
    /// Requests recorded so far; tests wait on it.
    pub arrivals: tokio::sync::watch::Sender<usize>,
}

/// A semaphore that starts closed (no permits).
pub struct Hold(pub tokio::sync::Semaphore);

impl Default for Hold {
    fn default() -> Self {
        Hold(tokio::sync::Semaphore::new(0))
    }
}

/// Counts one upstream connection as ended when dropped.
struct ConnectionEnded(Arc<UpstreamState>);

impl Drop for ConnectionEnded {
    fn drop(&mut self) {
        self.0.closed_connections.send_modify(|n| *n += 1);
    }
}

/// Counts a request in flight from arrival to response head.
struct InFlight<'a>(&'a UpstreamState);

impl<'a> InFlight<'a> {
    fn enter(state: &'a UpstreamState) -> (InFlight<'a>, usize) {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        (InFlight(state), now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl UpstreamState {
    fn record(&self, recorded: Recorded) {
        let mut records = self.records.lock().expect("records");
        records.push(recorded);
        let n = records.len();
        drop(records);
        self.arrivals.send_replace(n);
    }

    /// Wait until at least `n` requests have arrived (bounded).
    pub async fn wait_arrivals(&self, n: usize) {
        let mut rx = self.arrivals.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(30), rx.wait_for(|count| *count >= n))
            .await
            .unwrap_or_else(|_| panic!("upstream did not see {n} requests within 30 s"))
            .expect("watch closed");
    }

    /// Wait until at least `n` connections have ended (bounded).
    pub async fn wait_closed_connections(&self, n: usize) {
        let mut rx = self.closed_connections.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(30), rx.wait_for(|count| *count >= n))
            .await
            .unwrap_or_else(|_| panic!("upstream did not see {n} connections end within 30 s"))
            .expect("watch closed");
    }

    /// Wait until at least `n` requests have been accepted in total (bounded).
    pub async fn wait_accepted(&self, n: u64) {
        let mut rx = self.accepted_count.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(30), rx.wait_for(|count| *count >= n))
            .await
            .expect("upstream did not see enough accepted requests within 30 s")
            .expect("watch closed");
    }
}

pub struct TestUpstream {
    pub addr: SocketAddr,
    pub pki: TestPki,
    pub state: Arc<UpstreamState>,
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        Self::start_with(UpstreamOptions::default()).await
    }

    pub async fn start_with(options: UpstreamOptions) -> TestUpstream {
        let pki = TestPki::new();
        let alpn: &[&[u8]] = if options.http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(UpstreamState::default());
        let (counted, served) = (state.clone(), state.clone());
        serve_tls(
            listener,
            pki.server_config(alpn),
            move || {
                counted.connections.fetch_add(1, Ordering::SeqCst);
                // Counts the connection as ended however its task finishes.
                ConnectionEnded(counted.clone())
            },
            move |req| handle(req, served.clone()),
        );
        TestUpstream { addr, pki, state }
    }

    /// `https://localhost:PORT`, what the proxy's `upstream.url` should be.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn records(&self) -> Vec<Recorded> {
        self.state.records.lock().expect("records").clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Connections that have ended so far.
    pub fn closed_connections(&self) -> usize {
        *self.state.closed_connections.borrow()
    }
}

/// The response body every TLS stand-in in these tests answers with.
pub type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serve `handler` over TLS on `listener`, a task per connection: HTTP/1.1 or h2 as ALPN
/// agrees, upgrades allowed. `guard()` runs as each connection is accepted, and what it returns
/// is held until that connection's task ends (its TLS handshake failing included).
pub fn serve_tls<H, F, G>(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    guard: impl Fn() -> G + Send + 'static,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<UpBody>, Infallible>> + Send + 'static,
    G: Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let held = guard();
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let _held = held;
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service_fn(handler))
                    .await;
            });
        }
    });
}

/// The `101` that accepts a WebSocket handshake carrying `key` (`Sec-WebSocket-Key`).
pub fn switching_protocols(key: &[u8]) -> Response<UpBody> {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()).boxed())
        .expect("response")
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<UpBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed())
        .expect("response")
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn handle(mut req: Request<Incoming>, state: Arc<UpstreamState>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_string();
    let params = query(&req);
    {
        let accepted = state.accepted_key.lock().await;
        if let Some(key) = accepted.as_ref() {
            let expected = format!("Bearer {key}");
            let ok = req
                .headers()
                .get_all(header::AUTHORIZATION)
                .iter()
                .map(|v| v.as_bytes())
                .eq([expected.as_bytes()]);
            if !ok {
                let rec = Recorded {
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    version: req.version(),
                    headers: req.headers().clone(),
                    body: Bytes::new(),
                    at: std::time::Instant::now(),
                };
                state.record(rec);
                return Ok(full(
                    StatusCode::UNAUTHORIZED,
                    "application/json",
                    r#"{"error":"Invalid API key"}"#,
                ));
            }
            state.accepted_count.send_modify(|c| *c += 1);
        }
    }
    let arrived = std::time::Instant::now();
    let record = |body: Bytes| Recorded {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
        body,
        at: arrived,
    };

    if path.starts_with("/ws") || path.ends_with("/live") || path.contains("realtime") {
        let rec = record(Bytes::new());
        state.record(rec);
        return Ok(websocket_echo(&mut req, &state));
    }
    if path == "/upload" {
        let rec = record(Bytes::new());
        state.record(rec);
        let mut body = req.into_body();
        let mut checker = pattern::Checker::default();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        checker.feed(data);
                    }
                }
                Err(e) => return Ok(full(StatusCode::BAD_REQUEST, "text/plain", format!("body error: {e}"))),
            }
        }
        let answer = serde_json::json!({"bytes": checker.len, "pattern_ok": checker.ok});
        return Ok(full(StatusCode::OK, "application/json", answer.to_string()));
    }

    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let rec = Recorded {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: bytes.clone(),
        at: arrived,
    };
    state.record(rec);
    let (_in_flight, now_in_flight) = InFlight::enter(&state);
    let limit = state.concurrency_limit.load(Ordering::SeqCst);
    if limit > 0 && now_in_flight > limit {
        state.rejected_429.fetch_add(1, Ordering::SeqCst);
        let mut response = full(
            StatusCode::TOO_MANY_REQUESTS,
            "application/json",
            r#"{"error":"Too many concurrent requests"}"#,
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return Ok(response);
    }

    let response = match path.as_str() {
        "/download" => {
            let total: u64 = params.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(1024);
            let stream = futures_util::stream::unfold(0u64, move |sent| async move {
                if sent >= total {
                    return None;
                }
                let n = (total - sent).min(64 * 1024) as usize;
                let chunk = pattern::chunk(sent, n);
                Some((Ok::<_, Infallible>(Frame::data(chunk)), sent + n as u64))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, total)
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response")
        }
        "/sse" => {
            let state = state.clone();
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"event: audio\ndata: first\n\n")).await;
                state.sse_release.notified().await;
                for i in 2..=3 {
                    let _ = tx.send(Bytes::from(format!("event: audio\ndata: event-{i}\n\n"))).await;
                }
                state.sse_finished.store(true, Ordering::SeqCst);
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response")
        }
        "/sse-ticks" => {
            // `n` events, one every `every_ms`: a stream that keeps moving for as long as a test
            // needs (longer than an idle timeout in total, never idle that long).
            let n: u32 = params.get("n").and_then(|v| v.parse().ok()).unwrap_or(5);
            let every =
                std::time::Duration::from_millis(params.get("every_ms").and_then(|v| v.parse().ok()).unwrap_or(100));
            let stream = futures_util::stream::unfold(0u32, move |i| async move {
                if i >= n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(every).await;
                }
                let event = Bytes::from(format!("event: tick\ndata: {i}\n\n"));
                Some((Ok::<_, Infallible>(Frame::data(event)), i + 1))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response")
        }
        "/hang" => {
            if let Ok(permit) = state.hold.0.acquire().await {
                permit.forget();
            }
            full(StatusCode::OK, "text/plain", "released")
        }
        "/flaky" => {
            let throttled = state
                .flaky_remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if throttled {
                let mut response = full(
                    StatusCode::TOO_MANY_REQUESTS,
                    "application/json",
                    r#"{"error":"rate limited"}"#,
                );
                let retry_after = params.get("retry_after").cloned().unwrap_or_else(|| "1".into());
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    header::HeaderValue::from_str(&retry_after).expect("retry-after"),
                );
                response
            } else {
                full(StatusCode::OK, "application/json", r#"{"ok":true}"#)
            }
        }
        "/redirect" => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "https://elsewhere.example/steal")
            .body(Full::new(Bytes::new()).boxed())
            .expect("response"),
        // A self-hosted server whose licence ran out, or whose quota is spent.
        "/license-expired" => full(
            StatusCode::FORBIDDEN,
            "application/json",
            r#"{"code":"LICENSE_EXPIRED","expires_at":"2026-01-31T00:00:00Z","message":"license expired"}"#,
        ),
        "/quota-exceeded" => full(
            StatusCode::FORBIDDEN,
            "application/json",
            r#"{"code":"QUOTA_EXCEEDED","message":"monthly quota used up"}"#,
        ),
        p if p.starts_with("/status/") => {
            let code = p.trim_start_matches("/status/").parse().unwrap_or(500);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            full(status, "application/json", format!("{{\"upstream_status\":{code}}}"))
        }
        _ => {
            let work = state.work_ms.load(Ordering::SeqCst);
            if work > 0 {
                // Simulated synthesis time, so unlimited requests would overlap.
                tokio::time::sleep(std::time::Duration::from_millis(work)).await;
            }
            let mut response = full(StatusCode::OK, "application/octet-stream", bytes);
            response
                .headers_mut()
                .insert("x-upstream", header::HeaderValue::from_static("test"));
            // A hop-by-hop header the proxy must not pass back.
            response
                .headers_mut()
                .insert("keep-alive", header::HeaderValue::from_static("timeout=5"));
            response
        }
    };
    Ok(response)
}

/// Accept a WebSocket handshake and echo messages; `close:<code>` makes the server close
/// with that code.
fn websocket_echo(req: &mut Request<Incoming>, state: &Arc<UpstreamState>) -> Response<UpBody> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Message, Role};

    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "not a websocket handshake");
    };
    if req.uri().path().contains("reject") {
        return full(
            StatusCode::FORBIDDEN,
            "application/json",
            "{\"error\":\"no websockets here\"}",
        );
    }
    state
        .websocket_handshakes
        .lock()
        .expect("handshakes")
        .push(req.headers().clone());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            let reply = match message {
                Message::Text(text) if text.starts_with("close:") => {
                    let code: u16 = text.trim_start_matches("close:").parse().unwrap_or(1000);
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: "server closing".into(),
                    };
                    Message::Close(Some(frame))
                }
                Message::Text(_) | Message::Binary(_) => message,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    switching_protocols(key.as_bytes())
}
