//! A stand-in for api.smallest.ai that answers the routes the SDKs call with bodies of the
//! shapes they parse (TTS audio, SSE events, live-TTS WebSocket frames, transcription, voice
//! clone, LLM chat), over real TLS from [`super::upstream::TestPki`] (HTTP/2 and HTTP/1.1, or
//! HTTP/1.1 only under `TEST_UPSTREAM_HTTP1=1`, as the other upstreams). Like Smallest, it answers
//! 401 to any `Authorization` but `Bearer <accepted key>`, and it records the method, path and
//! `Authorization` of every request and WebSocket handshake so a test can prove the key was
//! injected by the proxy.

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

use super::upstream::{TestPki, UpstreamOptions};

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub websocket: bool,
    pub body_len: usize,
}

pub struct SmallestStandIn {
    pub addr: std::net::SocketAddr,
    pub pki: TestPki,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed())
        .expect("response")
}

/// A few bytes that start like a WAV file.
pub const AUDIO: &[u8] = b"RIFF\x24\x00\x00\x00WAVEfmt stand-in audio";

impl SmallestStandIn {
    /// Listen on a free loopback port, accepting only `Bearer <accepted_key>`.
    pub async fn start(accepted_key: &str) -> SmallestStandIn {
        let pki = TestPki::new();
        // HTTP/2 offered like the other upstreams, unless the suite runs HTTP/1.1 only.
        let alpn: &[&[u8]] = if UpstreamOptions::default().http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stand-in");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let expected = format!("Bearer {accepted_key}");
        let record = seen.clone();
        super::upstream::serve_tls(
            listener,
            pki.server_config(alpn),
            || (),
            move |req| handle(req, record.clone(), expected.clone()),
        );
        SmallestStandIn { addr, pki, seen }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    expected: String,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let websocket = req.headers().contains_key("sec-websocket-key");
    let authorised = authorization.as_deref() == Some(expected.as_str());
    if websocket {
        seen.lock().expect("seen").push(Seen {
            method,
            path: path.clone(),
            authorization,
            websocket,
            body_len: 0,
        });
        if !authorised {
            return Ok(answer(
                StatusCode::UNAUTHORIZED,
                "application/json",
                r#"{"error":"Invalid API key"}"#,
            ));
        }
        return Ok(live_tts(req));
    }
    let (_, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    seen.lock().expect("seen").push(Seen {
        method: method.clone(),
        path: path.clone(),
        authorization,
        websocket,
        body_len: body.len(),
    });
    if !authorised {
        return Ok(answer(
            StatusCode::UNAUTHORIZED,
            "application/json",
            r#"{"error":"Invalid API key"}"#,
        ));
    }
    Ok(match (method.as_str(), path.as_str()) {
        ("POST", "/waves/v1/tts") => answer(StatusCode::OK, "audio/wav", AUDIO),
        ("POST", "/waves/v1/tts/live") => answer(
            StatusCode::OK,
            "text/event-stream",
            "data: {\"status\":\"chunk\",\"data\":{\"audio\":\"UklGRg==\"}}\n\ndata: {\"status\":\"complete\"}\n\n",
        ),
        ("POST", "/waves/v1/stt" | "/waves/v1/stt/" | "/waves/v1/pulse/get_text") => answer(
            StatusCode::OK,
            "application/json",
            format!(
                r#"{{"status":"success","transcription":"hello from the stand-in","audio_bytes":{}}}"#,
                body.len()
            ),
        ),
        ("POST", "/waves/v1/voice-cloning") => answer(
            StatusCode::OK,
            "application/json",
            r#"{"message":"Voice clone created","data":{"voiceId":"voice_standin","displayName":"My voice"}}"#,
        ),
        ("POST", "/waves/v1/chat/completions") => answer(
            StatusCode::OK,
            "application/json",
            r#"{"id":"c1","object":"chat.completion","created":0,"model":"electron","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}]}"#,
        ),
        _ => answer(StatusCode::NOT_FOUND, "application/json", r#"{"error":"not found"}"#),
    })
}

/// Live TTS: for each text frame, one audio chunk and a `complete` frame, then close (as the
/// API does after `complete`).
fn live_tts(mut req: Request<Incoming>) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};

    let key = req
        .headers()
        .get("sec-websocket-key")
        .cloned()
        .unwrap_or_else(|| header::HeaderValue::from_static(""));
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(_) = message {
                let chunk = r#"{"status":"chunk","data":{"audio":"UklGRg=="}}"#;
                let complete = r#"{"status":"complete","data":{}}"#;
                if ws.send(Message::Text(chunk.into())).await.is_err()
                    || ws.send(Message::Text(complete.into())).await.is_err()
                {
                    return;
                }
                let _ = ws.close(None).await;
                return;
            }
        }
    });
    super::upstream::switching_protocols(key.as_bytes())
}
