//! Usage per app (`[[app]]`, `[usage]`, `/usage`): apps told apart by token and by Unix uid,
//! TTS characters, STT seconds and LLM tokens metered over HTTP, SSE and WebSocket with exact
//! totals in `/metrics` and `/usage`, daily budgets with a test clock, totals kept across a
//! restart (`state_file`) and shared by two replicas on one `redis-server`, and no text,
//! audio or token in any log line (trace level).

mod support;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::{Message, Role};

use smallest_proxy::usage::TestClock;
use support::upstream::TestPki;
use support::{json, metric, TEST_KEY};

/// What a log sweep must never find.
const TTS_TEXT: &str = "Geheimnis-Ωμέγα-text"; // 20 scalar values
const PROMPT: &str = "prompt-words-never-logged";
const AGENT_TOKEN: &str = "tok-agent-8fK2pQ";
const BATCH_TOKEN: &str = "tok-batch-3mZ7wX";
/// 2026-11-26T20:00:00Z: four hours before the day turns.
const T0: u64 = 1_795_723_200;

// ---------------------------------------------------------------- logs, captured at trace

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        // Everything at trace, but the test's own WebSocket client and stand-in server
        // (tungstenite: the proxy does not use it), which log the messages they handle.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "trace,tungstenite=off,tokio_tungstenite=off",
            ))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

// ---------------------------------------------------------------- the upstream

/// A Smallest-like upstream: TTS (sync, SSE), STT, LLM (JSON, SSE), live TTS and realtime STT
/// sockets, and one path that always answers 401.
async fn upstream(pki: &TestPki) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config(&[b"http/1.1"])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service_fn(answer))
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .unwrap()
}

async fn answer(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TEST_KEY}")) {
        return Ok(reply(
            StatusCode::UNAUTHORIZED,
            "application/json",
            r#"{"error":"bad key"}"#,
        ));
    }
    assert!(
        req.headers().get("x-proxy-token").is_none(),
        "the app token reached the upstream"
    );
    if req.headers().contains_key("sec-websocket-key") {
        let live_tts = req.uri().path() == "/waves/v1/tts/live";
        let key = req.headers()["sec-websocket-key"].clone();
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else { return };
            let mut ws =
                tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            let mut audio_bytes = 0usize;
            while let Some(Ok(message)) = ws.next().await {
                match message {
                    Message::Text(_) if live_tts => {
                        let _ = ws
                            .send(Message::Text(
                                r#"{"status":"chunk","data":{"audio":"UklGRg=="}}"#.into(),
                            ))
                            .await;
                        let _ = ws.send(Message::Text(r#"{"status":"complete"}"#.into())).await;
                    }
                    Message::Binary(b) => audio_bytes += b.len(),
                    Message::Text(_) => {
                        let _ = ws
                            .send(Message::Text(format!(r#"{{"audio_bytes":{audio_bytes}}}"#)))
                            .await;
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Ok(match path.as_str() {
        "/waves/v1/tts" | "/waves/v1/lightning/get_speech" => reply(StatusCode::OK, "audio/wav", "RIFF-audio"),
        "/waves/v1/lightning-v2/stream" => reply(
            StatusCode::OK,
            "text/event-stream",
            "data: {\"status\":\"chunk\"}\n\ndata: {\"status\":\"complete\"}\n\n",
        ),
        "/waves/v1/pulse/get_text" => reply(StatusCode::OK, "application/json", r#"{"status":"success"}"#),
        "/waves/v1/chat/completions" if body.windows(13).any(|w| w == b"\"stream\":true") => reply(
            StatusCode::OK,
            "text/event-stream",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\ndata: [DONE]\n\n",
        ),
        "/waves/v1/chat/completions" => reply(
            StatusCode::OK,
            "application/json",
            r#"{"choices":[{"message":{"content":"Hello"}}],"usage":{"prompt_tokens":11,"completion_tokens":22,"total_tokens":33}}"#,
        ),
        "/waves/v1/refused" => reply(StatusCode::FORBIDDEN, "application/json", r#"{"error":"no"}"#),
        _ => reply(StatusCode::NOT_FOUND, "application/json", r#"{"error":"not found"}"#),
    })
}

// ---------------------------------------------------------------- the proxy

struct Proxy {
    addr: SocketAddr,
    socket: Option<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(config: String, clock: &TestClock) -> Proxy {
        let config = smallest_proxy::config::load_text(None, &config, &[]).expect("valid config");
        let socket = config.listen.unix_socket.clone();
        let listeners = smallest_proxy::Listeners::bind(&config.listen).await.expect("bind");
        let addr = listeners.tcp_addresses()[0];
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let clock = Arc::new(clock.clone());
        let task = tokio::spawn(async move {
            smallest_proxy::run_with_clock(
                config,
                listeners,
                async move {
                    let _ = rx.await;
                },
                None,
                clock,
            )
            .await
            .expect("proxy run");
        });
        let proxy = Proxy {
            addr,
            socket,
            stop: Some(tx),
            task,
        };
        assert_eq!(proxy.get("/health").await.0, 200);
        proxy
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|tx| tx.send(()));
        let _ = self.task.await;
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn get(&self, path: &str) -> (u16, Bytes) {
        let (status, _, body) = support::get(&format!("{}{path}", self.base())).await;
        (status.as_u16(), body)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: impl Into<Bytes>) -> (u16, http::HeaderMap, Bytes) {
        let mut req = Request::post(format!("{}{path}", self.base())).header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            req = req.header("x-proxy-token", token);
        }
        let (status, headers, body) = support::send(req.body(Full::new(body.into())).unwrap()).await;
        (status.as_u16(), headers, body)
    }

    /// A POST over the Unix socket (no token: the caller's uid tells the app).
    async fn post_unix(&self, path: &str, body: &str) -> u16 {
        let mut stream = tokio::net::UnixStream::connect(self.socket.as_ref().unwrap())
            .await
            .unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response);
        text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    async fn usage(&self) -> serde_json::Value {
        let (status, body) = self.get("/usage").await;
        assert_eq!(status, 200);
        json(&body)
    }

    async fn metric(&self, series: &str) -> f64 {
        metric(&self.base(), series).await
    }

    async fn websocket(
        &self,
        path_and_query: &str,
        token: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
        tokio_tungstenite::tungstenite::Error,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}{path_and_query}", self.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("x-proxy-token", token.parse().unwrap());
        tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
    }
}

fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// `[[app]]` agent (token, TTS budget 45), batch (token), ops (the uid of this test process
/// on the Unix socket), plus `extra`.
fn config(dir: &Path, upstream: SocketAddr, ca: &Path, extra: &str) -> String {
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, format!("{TEST_KEY}\n")).unwrap();
    // The uid of this process: the owner of a file it just made.
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&key_file).unwrap());
    format!(
        r#"
[listen]
address = "127.0.0.1:0"
unix_socket = "{socket}"
[upstream]
url = "https://localhost:{port}"
ca_file = "{ca}"
[key]
source = "file"
file = "{key}"
[log]
level = "trace"
{extra}

[[app]]
name = "agent"
token_file = "{agent}"
daily_tts_characters = 45

[[app]]
name = "batch"
token_file = "{batch}"
daily_llm_tokens = 1000

[[app]]
name = "ops"
uids = [{uid}]
"#,
        socket = dir.join("proxy.sock").display(),
        port = upstream.port(),
        ca = ca.display(),
        key = key_file.display(),
        agent = token_file(dir, "agent-token", AGENT_TOKEN).display(),
        batch = token_file(dir, "batch-token", BATCH_TOKEN).display(),
    )
}

fn tts_body(text: &str) -> String {
    serde_json::json!({"text": text, "voice_id": "emily"}).to_string()
}

/// A WAV header for 16 kHz mono linear16 (32 000 bytes a second) and `seconds` of silence.
fn wav(seconds: f64) -> Vec<u8> {
    let data = (32_000.0 * seconds) as u32;
    let mut w = b"RIFF".to_vec();
    w.extend_from_slice(&(36 + data).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&16_000u32.to_le_bytes());
    w.extend_from_slice(&32_000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data.to_le_bytes());
    w.resize(44 + data as usize, 0x5a);
    w
}

/// Wait until `/usage` satisfies `done` (usage is reported as each response ends).
async fn usage_until(proxy: &Proxy, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..500 {
        let usage = proxy.usage().await;
        if done(&usage) {
            return usage;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("usage never reached the expected totals: {}", proxy.usage().await);
}

#[tokio::test]
async fn apps_are_metered_exactly_and_budgets_refuse_until_the_day_turns() {
    logs();
    let pki = TestPki::new();
    let up = upstream(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::at(T0);
    let proxy = Proxy::start(config(dir.path(), up, &pki.ca_file, ""), &clock).await;

    // TTS by token: sync (20 characters), a deprecated path (20), SSE (3).
    let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body(TTS_TEXT)).await;
    assert_eq!(s, 200);
    let (s, _, _) = proxy
        .post("/waves/v1/lightning/get_speech", Some(AGENT_TOKEN), tts_body(TTS_TEXT))
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = proxy
        .post("/waves/v1/lightning-v2/stream", Some(AGENT_TOKEN), tts_body("abc"))
        .await;
    assert_eq!(s, 200);
    // A wrong token is refused, not counted as another app.
    let (s, _, body) = proxy.post("/waves/v1/tts", Some("tok-wrong"), tts_body("zz")).await;
    assert_eq!((s, json(&body)["code"].as_str()), (401, Some("PROXY_TOKEN_REQUIRED")));

    // STT: a 3 s WAV upload (streamed: over the 64 KiB buffer) and a raw mulaw one named by
    // its query (8000 bytes at 8 kHz = 1 s), and one that cannot be measured.
    let (s, _, _) = proxy
        .post("/waves/v1/pulse/get_text", Some(BATCH_TOKEN), wav(3.0))
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = proxy
        .post(
            "/waves/v1/pulse/get_text?encoding=mulaw&sample_rate=8000",
            Some(BATCH_TOKEN),
            vec![0x7fu8; 8000],
        )
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = proxy
        .post("/waves/v1/pulse/get_text", Some(BATCH_TOKEN), &b"ID3-mp3"[..])
        .await;
    assert_eq!(s, 200);

    // LLM: JSON usage (11 + 22) and SSE usage in the final chunk (5 + 7).
    let chat = serde_json::json!({"messages": [{"role": "user", "content": PROMPT}]}).to_string();
    let (s, _, _) = proxy.post("/waves/v1/chat/completions", Some(BATCH_TOKEN), chat).await;
    assert_eq!(s, 200);
    let chat = serde_json::json!({"messages": [{"role": "user", "content": PROMPT}], "stream": true}).to_string();
    let (s, _, _) = proxy.post("/waves/v1/chat/completions", Some(BATCH_TOKEN), chat).await;
    assert_eq!(s, 200);

    // By uid over the Unix socket, and the default app over TCP with no token.
    assert_eq!(proxy.post_unix("/waves/v1/tts", &tts_body("hello")).await, 200);
    let (s, _, _) = proxy.post("/waves/v1/tts", None, tts_body("hi")).await;
    assert_eq!(s, 200);
    // An upstream 403, counted for the app.
    let (s, _, _) = proxy.post("/waves/v1/refused", Some(BATCH_TOKEN), "{}").await;
    assert_eq!(s, 403);

    let usage = usage_until(&proxy, |u| {
        u["apps"]["batch"]["llm_tokens"]["total"] == 45 && u["apps"]["default"]["tts_characters"] == 2
    })
    .await;
    assert_eq!(usage["apps"]["agent"]["tts_characters"], 43, "{usage}");
    assert_eq!(usage["apps"]["agent"]["budgets"]["daily_tts_characters"], 45);
    assert_eq!(usage["apps"]["ops"]["tts_characters"], 5);
    assert_eq!(usage["apps"]["default"]["tts_characters"], 2);
    assert_eq!(usage["apps"]["batch"]["stt_seconds"], 4.0);
    assert_eq!(usage["apps"]["batch"]["stt_unmetered_requests"], 1);
    assert_eq!(usage["apps"]["batch"]["llm_tokens"]["prompt"], 16);
    assert_eq!(usage["apps"]["batch"]["llm_tokens"]["completion"], 29);
    assert_eq!(usage["apps"]["batch"]["upstream_auth_failures"]["403"], 1);
    assert_eq!(usage["day"], "2026-11-26");

    let m = |s: &'static str| proxy.metric(s);
    assert_eq!(
        m(r#"smallest_proxy_usage_tts_characters_total{app="agent"}"#).await,
        43.0
    );
    assert_eq!(m(r#"smallest_proxy_usage_tts_characters_total{app="ops"}"#).await, 5.0);
    assert_eq!(
        m(r#"smallest_proxy_usage_stt_seconds_total{app="batch",how="wav_header"}"#).await,
        3.0
    );
    assert_eq!(
        m(r#"smallest_proxy_usage_stt_seconds_total{app="batch",how="bitrate"}"#).await,
        1.0
    );
    assert_eq!(
        m(r#"smallest_proxy_usage_stt_unmetered_requests_total{app="batch"}"#).await,
        1.0
    );
    assert_eq!(
        m(r#"smallest_proxy_usage_llm_tokens_total{app="batch",kind="prompt"}"#).await,
        16.0
    );
    assert_eq!(
        m(r#"smallest_proxy_usage_llm_tokens_total{app="batch",kind="completion"}"#).await,
        29.0
    );
    assert_eq!(
        m(r#"smallest_proxy_app_upstream_auth_failures_total{app="batch",status="403"}"#).await,
        1.0
    );
    assert_eq!(
        m(r#"smallest_proxy_requests_total{class="tts",app="agent",status="200"}"#).await,
        3.0
    );

    // The budget: 43 of 45 spent, so the next request starts (and crosses the line: 63).
    let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body(TTS_TEXT)).await;
    assert_eq!(s, 200);
    usage_until(&proxy, |u| u["apps"]["agent"]["tts_characters"] == 63).await;
    let (s, headers, body) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body("x")).await;
    let body = json(&body);
    assert_eq!((s, body["code"].as_str()), (429, Some("BUDGET_EXCEEDED")), "{body}");
    assert_eq!(body["app"], "agent");
    assert_eq!(body["resets_at"], "2026-11-27T00:00:00Z");
    assert_eq!(headers[header::RETRY_AFTER], "14400");
    // A WebSocket handshake of the spent app gets the 429 too.
    match proxy.websocket("/waves/v1/tts/live", AGENT_TOKEN).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("handshake with the budget spent: {:?}", other.map(|_| "opened")),
    }
    // Other apps and other kinds of work are not held back.
    let (s, _, _) = proxy.post("/waves/v1/tts", Some(BATCH_TOKEN), tts_body("ok")).await;
    assert_eq!(s, 200);
    assert!(log_text().contains("an app passed 80% of its daily budget"));

    // The day turns: served again, from zero.
    clock.advance(Duration::from_secs(4 * 3600));
    let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body("abcd")).await;
    assert_eq!(s, 200);
    let usage = usage_until(&proxy, |u| u["apps"]["agent"]["tts_characters"] == 4).await;
    assert_eq!(usage["day"], "2026-11-27");

    // The access line names the app; no text, prompt, audio or token is in any log line.
    let logs = log_text();
    assert!(
        logs.contains("app=\"agent\"") || logs.contains("app=agent"),
        "access line without app"
    );
    for secret in [
        TTS_TEXT,
        "Geheimnis",
        PROMPT,
        AGENT_TOKEN,
        BATCH_TOKEN,
        TEST_KEY,
        "ZZZZZZZZ",
    ] {
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!("{secret:?} appeared in the logs: {line}");
        }
    }
    let metrics = proxy.get("/metrics").await.1;
    // The usage families parse as strict OpenMetrics (the f64 seconds counter included).
    let mut parser = std::process::Command::new(support::python_with("prometheus_client.openmetrics.parser"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/parse_metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    parser.stdin.take().unwrap().write_all(&metrics).unwrap();
    let parsed = parser.wait_with_output().unwrap();
    assert!(parsed.status.success(), "{}", String::from_utf8_lossy(&parsed.stderr));
    let metrics = String::from_utf8_lossy(&metrics);
    for secret in [TTS_TEXT, PROMPT, AGENT_TOKEN, BATCH_TOKEN] {
        assert!(!metrics.contains(secret), "{secret:?} appeared in a metric");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn require_app_refuses_a_caller_that_is_no_app() {
    logs();
    let pki = TestPki::new();
    let up = upstream(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::at(T0);
    let text = config(dir.path(), up, &pki.ca_file, "").replace("[upstream]", "require_app = true\n[upstream]");
    let proxy = Proxy::start(text, &clock).await;
    let (s, _, body) = proxy.post("/waves/v1/tts", None, tts_body("hi")).await;
    assert_eq!((s, json(&body)["code"].as_str()), (401, Some("APP_REQUIRED")));
    let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body("hi")).await;
    assert_eq!(s, 200);
    assert_eq!(
        proxy.post_unix("/waves/v1/tts", &tts_body("hi")).await,
        200,
        "ops by uid"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_restart_with_a_state_file_keeps_the_days_totals() {
    logs();
    let pki = TestPki::new();
    let up = upstream(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::at(T0);
    let state = dir.path().join("usage.json");
    let extra = format!("[usage]\nstate_file = \"{}\"\n", state.display());
    let proxy = Proxy::start(config(dir.path(), up, &pki.ca_file, &extra), &clock).await;
    let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body(TTS_TEXT)).await;
    assert_eq!(s, 200);
    usage_until(&proxy, |u| u["apps"]["agent"]["tts_characters"] == 20).await;
    proxy.stop().await;
    let saved = std::fs::read_to_string(&state).expect("state file written at shutdown");
    assert!(!saved.contains("Geheimnis"));

    let proxy = Proxy::start(config(dir.path(), up, &pki.ca_file, &extra), &clock).await;
    assert_eq!(proxy.usage().await["apps"]["agent"]["tts_characters"], 20);
    let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body(TTS_TEXT)).await;
    assert_eq!(s, 200);
    usage_until(&proxy, |u| u["apps"]["agent"]["tts_characters"] == 40).await;
    proxy.stop().await;
}

#[tokio::test]
async fn two_replicas_on_one_redis_spend_one_budget() {
    logs();
    let redis = support::servers::Redis::start();
    let pki = TestPki::new();
    let up = upstream(&pki).await;
    let clock = TestClock::at(T0);
    let extra = format!("[limits.shared]\nredis_url = \"{}\"\n", redis.url());
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = Proxy::start(config(dir_a.path(), up, &pki.ca_file, &extra), &clock).await;
    let b = Proxy::start(config(dir_b.path(), up, &pki.ca_file, &extra), &clock).await;
    // 20 + 20 on two replicas, then 20 more crossing 45 on the first.
    for proxy in [&a, &b, &a] {
        let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body(TTS_TEXT)).await;
        assert_eq!(s, 200);
    }
    usage_until(&b, |u| {
        u["apps"]["agent"]["tts_characters"] == 60 && u["shared"] == true
    })
    .await;
    // The second replica refuses too: the budget is the pair's.
    let (s, _, body) = b.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body("x")).await;
    assert_eq!((s, json(&body)["code"].as_str()), (429, Some("BUDGET_EXCEEDED")));
    a.stop().await;
    b.stop().await;
}

#[test]
fn the_readme_usage_config_loads_as_written() {
    let readme = include_str!("../README.md");
    let after = readme
        .split("<!-- tested: usage-config -->")
        .nth(1)
        .expect("README marker");
    let block = after
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("toml block");
    // The token file must exist to load: point it at one.
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), "agent-token", AGENT_TOKEN);
    let text = block.replace("/run/secrets/agent-token", &token.display().to_string());
    let config = smallest_proxy::config::load_text(None, &text, &[]).expect("README usage config loads");
    assert_eq!(config.apps.len(), 2);
    assert_eq!(config.apps[0].daily_tts_characters, Some(200_000));
    assert_eq!(config.apps[1].uids, vec![1001]);
    assert!(config.usage.state_file.is_some());
}

/// The next text message from the socket (pings and audio skipped).
async fn next_text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn websockets_are_metered_per_synthesis_and_by_audio_bytes() {
    logs();
    let pki = TestPki::new();
    let up = upstream(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::at(T0);
    let proxy = Proxy::start(config(dir.path(), up, &pki.ca_file, ""), &clock).await;

    // Live TTS: three syntheses of 20 characters on one socket; the third crosses 45 and is
    // served, the fourth gets an error frame and the socket stays open.
    let mut ws = proxy
        .websocket("/waves/v1/tts/live", AGENT_TOKEN)
        .await
        .expect("handshake");
    for _ in 0..3 {
        ws.send(Message::Text(tts_body(TTS_TEXT))).await.unwrap();
        assert_eq!(next_text(&mut ws).await["status"], "chunk");
        assert_eq!(next_text(&mut ws).await["status"], "complete");
    }
    usage_until(&proxy, |u| u["apps"]["agent"]["tts_characters"] == 60).await;
    ws.send(Message::Text(tts_body("one more"))).await.unwrap();
    let refusal = next_text(&mut ws).await;
    assert_eq!(refusal["status"], "error");
    assert_eq!(refusal["code"], "BUDGET_EXCEEDED");
    assert_eq!(refusal["app"], "agent");
    assert_eq!(refusal["resets_at"], "2026-11-27T00:00:00Z");
    // The same socket serves again once the day turns.
    clock.advance(Duration::from_secs(4 * 3600));
    ws.send(Message::Text(tts_body("abcd"))).await.unwrap();
    assert_eq!(next_text(&mut ws).await["status"], "chunk");
    assert_eq!(next_text(&mut ws).await["status"], "complete");
    usage_until(&proxy, |u| u["apps"]["agent"]["tts_characters"] == 4).await;
    ws.close(None).await.unwrap();

    // Realtime STT, linear16 at 16 kHz: 32 000 + 16 000 audio bytes = 1.5 s.
    let mut ws = proxy
        .websocket(
            "/waves/v1/stt/live?encoding=linear16&sample_rate=16000&language=en",
            BATCH_TOKEN,
        )
        .await
        .expect("handshake");
    ws.send(Message::Binary(vec![0x11; 32_000])).await.unwrap();
    ws.send(Message::Binary(vec![0x11; 16_000])).await.unwrap();
    ws.send(Message::Text("{\"type\":\"finalize\"}".into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await["audio_bytes"], 48_000);
    ws.close(None).await.unwrap();
    let usage = usage_until(&proxy, |u| u["apps"]["batch"]["stt_seconds"] == 1.5).await;
    assert_eq!(usage["apps"]["batch"]["stt_seconds"], 1.5);
    assert_eq!(
        proxy
            .metric(r#"smallest_proxy_usage_stt_seconds_total{app="batch",how="pcm_bytes"}"#)
            .await,
        1.5
    );
    // An encoding the query does not make measurable: the seconds the socket was open.
    let mut ws = proxy
        .websocket("/waves/v1/pulse/get_text?encoding=opus", BATCH_TOKEN)
        .await
        .expect("handshake");
    ws.send(Message::Binary(vec![0x11; 1000])).await.unwrap();
    ws.send(Message::Text("{}".into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await["audio_bytes"], 1000);
    ws.close(None).await.unwrap();
    for _ in 0..500 {
        let text = String::from_utf8_lossy(&proxy.get("/metrics").await.1).into_owned();
        if text.contains(r#"smallest_proxy_usage_stt_seconds_total{app="batch",how="connection_seconds"}"#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = String::from_utf8_lossy(&proxy.get("/metrics").await.1).into_owned();
    assert!(text.contains(r#"how="connection_seconds""#), "{text}");
    let logs = log_text();
    for secret in [TTS_TEXT, AGENT_TOKEN, BATCH_TOKEN] {
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!("{secret:?} appeared in the logs: {line}");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn usage_is_served_on_the_admin_address_when_one_is_set() {
    logs();
    let pki = TestPki::new();
    let up = upstream(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::at(T0);
    let admin = format!("127.0.0.1:{}", support::servers::free_port());
    let extra = format!("[admin]\naddress = \"{admin}\"\n");
    let proxy = Proxy::start(config(dir.path(), up, &pki.ca_file, &extra), &clock).await;
    let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body("hello")).await;
    assert_eq!(s, 200);
    let (status, body) = proxy.get("/usage").await;
    assert_eq!(
        (status, json(&body)["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "not on the main port"
    );
    for _ in 0..500 {
        let (status, _, body) = support::get(&format!("http://{admin}/usage")).await;
        assert_eq!(status, 200);
        if json(&body)["apps"]["agent"]["tts_characters"] == 5 {
            proxy.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the admin address never showed the app's usage");
}

#[tokio::test]
async fn with_redis_down_usage_is_counted_in_the_process_and_requests_are_served() {
    logs();
    let pki = TestPki::new();
    let up = upstream(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::at(T0);
    // Nothing listens on this port.
    let extra = format!(
        "[limits.shared]\nredis_url = \"redis://127.0.0.1:{}\"\n",
        support::servers::free_port()
    );
    let proxy = Proxy::start(config(dir.path(), up, &pki.ca_file, &extra), &clock).await;
    for _ in 0..3 {
        let (s, _, _) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body(TTS_TEXT)).await;
        assert_eq!(s, 200);
    }
    usage_until(&proxy, |u| u["apps"]["agent"]["tts_characters"] == 60).await;
    // The budget still holds, on this replica's own count.
    let (s, _, body) = proxy.post("/waves/v1/tts", Some(AGENT_TOKEN), tts_body("x")).await;
    assert_eq!((s, json(&body)["code"].as_str()), (429, Some("BUDGET_EXCEEDED")));
    assert!(log_text().contains("usage totals: Redis failed"));
    proxy.stop().await;
}
