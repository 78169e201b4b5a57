//! A stand-in for Smallest's TTS API that enforces the account rule the proxy must respect:
//! at most `allow` syntheses in flight at once, counted together across sync HTTP
//! (`/waves/v1/*/get_speech`), SSE (`POST /waves/v1/tts/live`) and live-TTS WebSocket messages
//! (`/waves/v1/tts/live`). Over the limit it answers like Smallest: HTTP 429
//! `RATE_LIMIT_EXCEEDED` (with `Retry-After: 1`), or on a socket a text frame
//! `{"status":"error","code":"RATE_LIMIT_EXCEEDED"}`. A synthesis is released just before its
//! last byte (the final SSE event, the `complete` frame) goes out, as a real server finishes
//! its work before it says so.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};

use super::upstream::TestPki;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
pub struct Account {
    /// Syntheses allowed in flight at once; may change mid-run.
    pub allow: AtomicUsize,
    /// How long one synthesis takes.
    pub work_ms: AtomicUsize,
    pub in_flight: AtomicUsize,
    /// The most syntheses ever running at once (accepted ones only).
    pub max_running: AtomicUsize,
    /// Syntheses refused for the limit, by transport.
    pub refused_http: AtomicUsize,
    pub refused_ws: AtomicUsize,
    pub completed: AtomicUsize,
    /// `completed`, to wait on.
    pub completed_watch: tokio::sync::watch::Sender<usize>,
    /// `Sec-WebSocket-Extensions` of each WebSocket handshake (None = absent).
    pub ws_extensions: Mutex<Vec<Option<String>>>,
}

/// One accepted synthesis, released on drop.
pub struct Running(Arc<Account>);

impl Account {
    /// Try to start a synthesis: `None` when the account is at its limit.
    fn start(self: &Arc<Self>) -> Option<Running> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if now > self.allow.load(Ordering::SeqCst) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        self.max_running.fetch_max(now, Ordering::SeqCst);
        Some(Running(self.clone()))
    }

    fn work(&self) -> Duration {
        Duration::from_millis(self.work_ms.load(Ordering::SeqCst) as u64)
    }

    pub fn refused(&self) -> usize {
        self.refused_http.load(Ordering::SeqCst) + self.refused_ws.load(Ordering::SeqCst)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        let completed = self.0.completed.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.completed_watch.send_replace(completed);
    }
}

pub struct StandIn {
    pub addr: SocketAddr,
    pub pki: TestPki,
    pub account: Arc<Account>,
}

impl StandIn {
    pub async fn start(allow: usize, work_ms: usize) -> StandIn {
        let pki = TestPki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stand-in");
        let addr = listener.local_addr().expect("addr");
        let account = Arc::new(Account::default());
        account.allow.store(allow, Ordering::SeqCst);
        account.work_ms.store(work_ms, Ordering::SeqCst);
        let serving = account.clone();
        super::upstream::serve_tls(
            listener,
            pki.server_config(&[b"http/1.1"]),
            || (),
            move |req| handle(req, serving.clone()),
        );
        StandIn { addr, pki, account }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn too_many() -> Response<Body> {
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({"error": "Too many concurrent requests", "code": "RATE_LIMIT_EXCEEDED"}),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

async fn handle(mut req: Request<Incoming>, account: Arc<Account>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if req.headers().contains_key("sec-websocket-key") {
        return Ok(websocket(&mut req, account));
    }
    let _ = req.into_body().collect().await;
    if path == "/waves/v1/tts/live" {
        // SSE: three events over the synthesis's time; released before the last goes out.
        let Some(running) = account.start() else {
            account.refused_http.fetch_add(1, Ordering::SeqCst);
            return Ok(too_many());
        };
        let step = account.work() / 3;
        let events = futures_util::stream::unfold((0, Some(running)), move |(i, mut running)| async move {
            if i == 3 {
                return None;
            }
            tokio::time::sleep(step).await;
            let event = if i == 2 {
                drop(running.take());
                "data: {\"status\":\"complete\"}\n\n".to_string()
            } else {
                format!("data: {{\"status\":\"chunk\",\"audio\":\"AAAA{i}\"}}\n\n")
            };
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event))), (i + 1, running)))
        });
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(events)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        return Ok(response);
    }
    if path.ends_with("/get_speech") || path == "/waves/v1/tts" {
        let Some(running) = account.start() else {
            account.refused_http.fetch_add(1, Ordering::SeqCst);
            return Ok(too_many());
        };
        tokio::time::sleep(account.work()).await;
        drop(running);
        let mut response = Response::new(Full::new(Bytes::from_static(b"RIFF-audio")).boxed());
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("audio/wav"));
        return Ok(response);
    }
    Ok(json_response(
        StatusCode::NOT_FOUND,
        serde_json::json!({"error": "no such path"}),
    ))
}

/// Live TTS: each text message with `text` is one synthesis: two audio chunks, then
/// `complete`; over the limit an error frame instead.
fn websocket(req: &mut Request<Incoming>, account: Arc<Account>) -> Response<Body> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .cloned()
        .unwrap_or(header::HeaderValue::from_static(""));
    account.ws_extensions.lock().unwrap().push(
        req.headers()
            .get(header::SEC_WEBSOCKET_EXTENSIONS)
            .map(|v| v.to_str().unwrap_or("?").to_string()),
    );
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let (sink, mut stream) = ws.split();
        let sink = Arc::new(tokio::sync::Mutex::new(sink));
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else { continue };
            let Ok(request) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if request["text"].as_str().is_none_or(str::is_empty) {
                continue;
            }
            let Some(running) = account.start() else {
                account.refused_ws.fetch_add(1, Ordering::SeqCst);
                let error = serde_json::json!({"status": "error", "code": "RATE_LIMIT_EXCEEDED", "message": "Too many concurrent requests"});
                let _ = sink.lock().await.send(Message::Text(error.to_string())).await;
                continue;
            };
            let (sink, work) = (sink.clone(), account.work());
            // Syntheses run beside the reading, as on the real server.
            tokio::spawn(async move {
                for i in 0..2 {
                    tokio::time::sleep(work / 2).await;
                    let chunk = serde_json::json!({"status": "chunk", "data": {"audio": format!("AAAA{i}")}});
                    let _ = sink.lock().await.send(Message::Text(chunk.to_string())).await;
                }
                drop(running);
                let done = serde_json::json!({"status": "complete"});
                let _ = sink.lock().await.send(Message::Text(done.to_string())).await;
            });
        }
    });
    super::upstream::switching_protocols(key.as_bytes())
}
