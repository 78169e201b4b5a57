//! `[[route]]`: one sidecar in front of the Smallest cloud and a self-hosted server, each with
//! its own key and scheme. Two stand-ins: the "cloud" (the TLS test upstream, accepting only
//! `Bearer A`) and a plain-HTTP loopback "self-host" (accepting only `Token B`, answering 401
//! `INVALID_LICENSE` otherwise); both record every `Authorization` they see, so the tests can
//! prove that neither ever saw the other's key or scheme, on any path, fallback included.

mod support;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio_util::sync::CancellationToken;

/// The self-host's license key (B); the cloud's key (A) is `TEST_KEY`.
const LICENSE_KEY: &str = "lic-selfhost-B-Xw7Qp3Lm";
const ROUTE: &str = "selfhost-stt";

/// One request as the self-host saw it: its path and every `Authorization` value it carried.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Vec<String>,
}

#[derive(Default)]
struct SelfHostState {
    /// Only `Token <this>` is accepted. A test rotating the key holds this lock while it
    /// writes the new key file, so the server switches at the moment the source does.
    license: tokio::sync::Mutex<String>,
    seen: Mutex<Vec<Seen>>,
    /// Requests answered 200; tests wait on it.
    accepted: tokio::sync::watch::Sender<u64>,
    /// Connections open now; `stop` waits for none.
    open: tokio::sync::watch::Sender<usize>,
}

/// Counts one open connection until dropped.
struct Open(Arc<SelfHostState>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.send_modify(|n| *n -= 1);
    }
}

/// A self-hosted Smallest server stand-in: plain HTTP/1.1 on loopback. `/health` needs no
/// key; `.../busy` answers 503, `.../full` 429 and `.../slow` never answers; anything else
/// 200 with `selfhost <path>`.
struct SelfHost {
    addr: SocketAddr,
    state: Arc<SelfHostState>,
    stop: CancellationToken,
}

impl SelfHost {
    async fn start() -> SelfHost {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind self-host");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(SelfHostState::default());
        *state.license.lock().await = LICENSE_KEY.to_string();
        let stop = CancellationToken::new();
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                    // Dropping the listener: new connections are refused.
                    _ = accept_stop.cancelled() => return,
                };
                let (state, stop) = (accept_state.clone(), accept_stop.clone());
                state.open.send_modify(|n| *n += 1);
                let open = Open(state.clone());
                tokio::spawn(async move {
                    let _open = open;
                    let held = stop.clone();
                    let service = service_fn(move |req| handle_selfhost(req, state.clone(), held.clone()));
                    let connection =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
                    // Stopped: every open connection is closed too, like a killed server.
                    tokio::select! {
                        _ = connection => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        SelfHost { addr, state, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("seen").clone()
    }

    /// Stop accepting and close every connection; returns once every connection is closed
    /// and a connect is refused.
    async fn stop(&self) {
        self.stop.cancel();
        let mut open = self.state.open.subscribe();
        tokio::time::timeout(Duration::from_secs(10), open.wait_for(|n| *n == 0))
            .await
            .expect("the self-host's connections closed within 10 s")
            .expect("watch");
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the self-host still accepts connections after stop");
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn answer(status: StatusCode, body: String) -> Response {
    http::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("response")
}

type Response = http::Response<Body>;

async fn handle_selfhost(
    req: Request<Incoming>,
    state: Arc<SelfHostState>,
    stop: CancellationToken,
) -> Result<Response, Infallible> {
    let path = req.uri().path().to_string();
    let authorization: Vec<String> = req
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    state.seen.lock().expect("seen").push(Seen {
        path: path.clone(),
        authorization: authorization.clone(),
    });
    if path == "/health" {
        return Ok(answer(StatusCode::OK, r#"{"status":"healthy"}"#.into()));
    }
    {
        let license = state.license.lock().await;
        if authorization != [format!("Token {license}")] {
            return Ok(answer(
                StatusCode::UNAUTHORIZED,
                r#"{"error":"invalid license key","code":"INVALID_LICENSE"}"#.into(),
            ));
        }
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if path.ends_with("/busy") {
        return Ok(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"overloaded"}"#.into(),
        ));
    }
    if path.ends_with("/full") {
        let mut response = answer(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":"rate limit","code":"RATE_LIMIT_EXCEEDED","retry_after":1}"#.into(),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, "1".parse().expect("value"));
        return Ok(response);
    }
    if path.ends_with("/slow") {
        stop.cancelled().await;
    }
    state.accepted.send_modify(|n| *n += 1);
    Ok(answer(
        StatusCode::OK,
        format!("selfhost {path} {}", String::from_utf8_lossy(&body)),
    ))
}

/// The route under test, pointing at `selfhost`, with its license key in `license_file`.
fn route_toml(selfhost: &SelfHost, license_file: &std::path::Path, extra: &str) -> String {
    format!(
        r#"
[[route]]
name = "{ROUTE}"
paths = ["/v1/listen"]
upstream = "{}"
scheme = "Token"
fallback = "default"
response_timeout = "1s"
{extra}
[route.key]
source = "file"
file = "{}"
"#,
        selfhost.url(),
        license_file.display()
    )
}

/// The cloud stand-in accepting only `Bearer A`, the self-host accepting only `Token B`, and
/// the proxy routing `/v1/listen` to the self-host with fallback to the cloud.
struct Setup {
    cloud: TestUpstream,
    selfhost: SelfHost,
    proxy: TestProxy,
    license_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The self-host's license key in `dir`, as a mounted secret would hold it.
fn license_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("license-key");
    std::fs::write(&path, format!("{LICENSE_KEY}\n")).expect("license file");
    path
}

async fn setup(route_extra: &str) -> Setup {
    let cloud = TestUpstream::start().await;
    *cloud.state.accepted_key.lock().await = Some(TEST_KEY.to_string());
    let selfhost = SelfHost::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let license_file = license_file(&dir);
    let proxy = TestProxy::start(&cloud, &route_toml(&selfhost, &license_file, route_extra)).await;
    Setup {
        cloud,
        selfhost,
        proxy,
        license_file,
        _dir: dir,
    }
}

fn fallbacks(reason: &str) -> String {
    format!("smallest_proxy_route_fallbacks_total{{from=\"{ROUTE}\",to=\"default\",reason=\"{reason}\"}}")
}

async fn post(url: &str, body: &str) -> (StatusCode, Bytes) {
    let request = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        // A client's own credentials never reach either upstream.
        .header(header::AUTHORIZATION, "Bearer client-supplied-evil")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let (status, _, body) = send(request).await;
    (status, body)
}

/// Neither stand-in ever saw the other's key or scheme, nor a client's.
fn assert_keys_never_crossed(cloud: &TestUpstream, selfhost: &SelfHost) {
    for record in cloud.records() {
        let values: Vec<_> = record.headers.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(
            values,
            [format!("Bearer {TEST_KEY}").as_str()],
            "the cloud saw {values:?} on {}",
            record.uri
        );
    }
    for seen in selfhost.seen() {
        if seen.path == "/health" {
            continue;
        }
        assert_eq!(seen.authorization.len(), 1, "{seen:?}");
        let value = &seen.authorization[0];
        assert!(
            value.starts_with("Token lic-selfhost-"),
            "the self-host saw {value:?} on {}",
            seen.path
        );
        assert!(!value.contains(TEST_KEY) && !value.contains("Bearer"), "{seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_route_their_prefix_names_with_that_routes_key_and_scheme() {
    let s = setup("").await;
    // The route's prefix and a path under it go to the self-host...
    for path in ["/v1/listen", "/v1/listen/stream?language=en"] {
        let (status, body) = post(&s.proxy.url(path), r#"{"audio":"..."}"#).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(body.starts_with(b"selfhost /v1/listen"), "{body:?}");
    }
    // ...a longer word sharing the prefix, and every other path, to the cloud.
    for path in ["/v1/listening", "/waves/v1/lightning-v2/get_speech", "/v1"] {
        let (status, body) = post(&s.proxy.url(path), r#"{"text":"hi"}"#).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(!body.starts_with(b"selfhost"), "{path} went to the self-host");
    }
    let selfhost_paths: Vec<String> = s.selfhost.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(selfhost_paths, ["/v1/listen", "/v1/listen/stream"]);
    let cloud_paths: Vec<String> = s.cloud.records().iter().map(|r| r.uri.path().to_string()).collect();
    assert_eq!(
        cloud_paths,
        ["/v1/listening", "/waves/v1/lightning-v2/get_speech", "/v1"]
    );
    assert_keys_never_crossed(&s.cloud, &s.selfhost);

    // /ready lists both routes with their upstream, key source, fingerprint and state.
    let (status, ready) = s.proxy.ready().await;
    assert_eq!(status, 200);
    let routes = ready["routes"].as_array().expect("routes");
    assert_eq!(routes.len(), 2, "{ready}");
    assert_eq!(routes[0]["name"], "default");
    assert_eq!(routes[0]["upstream"], s.cloud.url());
    assert_eq!(routes[0]["scheme"], "Bearer");
    assert_eq!(routes[0]["state"], "ready");
    assert_eq!(routes[1]["name"], ROUTE);
    assert_eq!(routes[1]["upstream"], s.selfhost.url());
    assert_eq!(routes[1]["scheme"], "Token");
    assert_eq!(routes[1]["paths"], serde_json::json!(["/v1/listen"]));
    assert_eq!(routes[1]["fallback"], "default");
    assert_eq!(routes[1]["state"], "ready");
    assert_eq!(routes[1]["key"]["source"], "file");
    assert_eq!(
        routes[1]["key"]["fingerprint"],
        smallest_proxy::keys::fingerprint(LICENSE_KEY)
    );
    assert!(!ready.to_string().contains(LICENSE_KEY) && !ready.to_string().contains(TEST_KEY));
    // The route's requests are counted under its own class, named after it.
    let base = s.proxy.url("");
    let route_class = format!("smallest_proxy_requests_total{{class=\"{ROUTE}\",app=\"default\",status=\"200\"}}");
    wait_metric(&base, &route_class, |v| v == 2.0).await;
    wait_metric(
        &base,
        "smallest_proxy_requests_total{class=\"default\",app=\"default\",status=\"200\"}",
        |v| v == 2.0,
    )
    .await;
    // The deprecated TTS path is the default route's, in the built-in profile's `tts` class.
    wait_metric(
        &base,
        "smallest_proxy_requests_total{class=\"tts\",app=\"default\",status=\"200\"}",
        |v| v == 1.0,
    )
    .await;
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_self_host_sends_replayable_requests_to_the_cloud_with_the_clouds_key() {
    let s = setup("").await;
    assert_eq!(post(&s.proxy.url("/v1/listen"), "{}").await.0, 200);
    s.selfhost.stop().await;
    let before = s.selfhost.seen().len();
    for i in 0..5 {
        let (status, body) = post(&s.proxy.url("/v1/listen"), &format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        // The cloud stand-in echoes the body it got: the request, whole.
        assert_eq!(body, format!(r#"{{"n":{i}}}"#).as_bytes());
    }
    assert_eq!(s.selfhost.seen().len(), before, "a stopped self-host saw nothing");
    let cloud = s.cloud.records();
    assert_eq!(cloud.len(), 5);
    assert!(cloud.iter().all(|r| r.uri.path() == "/v1/listen"));
    assert_keys_never_crossed(&s.cloud, &s.selfhost);
    assert_eq!(metric(&s.proxy.url(""), &fallbacks("connect")).await, 5.0);

    // A streamed (chunked) body cannot be sent twice: it gets the first route's answer.
    let chunks = futures_util::stream::iter(
        [Bytes::from_static(b"audio-1"), Bytes::from_static(b"audio-2")].map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    let request = Request::post(s.proxy.url("/v1/listen"))
        .body(StreamBody::new(chunks))
        .expect("request");
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.expect("streamed request");
    let status = response.status();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["code"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(s.cloud.records().len(), 5, "the streamed body never went to the cloud");
    assert_eq!(metric(&s.proxy.url(""), &fallbacks("connect")).await, 5.0);
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_a_429_and_a_timeout_fall_back_once_before_any_resend_to_the_self_host() {
    let s = setup("").await;
    for (path, reason) in [
        ("/v1/listen/busy", "503"),
        ("/v1/listen/full", "429"),
        ("/v1/listen/slow", "timeout"),
    ] {
        let before = s.selfhost.seen().len();
        let (status, body) = post(&s.proxy.url(path), r#"{"x":1}"#).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        assert_eq!(body, &b"{\"x\":1}"[..], "{path}: the cloud answered");
        assert_eq!(
            s.selfhost.seen().len(),
            before + 1,
            "{path}: the self-host got the request once, never a resend"
        );
        assert_eq!(metric(&s.proxy.url(""), &fallbacks(reason)).await, 1.0, "{path}");
    }
    assert_keys_never_crossed(&s.cloud, &s.selfhost);
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_fallback_the_routes_own_answer_and_resends_stand() {
    // A route with no fallback: the self-host's 503 (after its class's resends) is the answer.
    let cloud = TestUpstream::start().await;
    let selfhost = SelfHost::start().await;
    let dir = tempfile::tempdir().unwrap();
    let license = license_file(&dir);
    let text = route_toml(&selfhost, &license, "").replace("fallback = \"default\"\n", "");
    let proxy = TestProxy::start(&cloud, &format!("{text}[route.limits]\nupstream_retries = 1\n")).await;
    let (status, body) = post(&proxy.url("/v1/listen/busy"), "{}").await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(selfhost.seen().len(), 2, "one resend, as the route's limits say");
    assert!(cloud.records().is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_hosts_license_key_rotates_under_load_with_no_client_error() {
    const CLIENTS: usize = 4;
    const PER_KEY: u64 = 12;
    let s = setup("").await;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for client_no in 0..CLIENTS {
        let (stop, errors, base) = (stop.clone(), errors.clone(), s.proxy.url(""));
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let url = if n % 2 == 0 {
                    format!("{base}/v1/listen")
                } else {
                    format!("{base}/v1/listen/stream")
                };
                let (status, body) = post(&url, &format!(r#"{{"client":{client_no},"n":{n}}}"#)).await;
                if status != 200 || !body.starts_with(b"selfhost") {
                    errors
                        .lock()
                        .expect("errors")
                        .push(format!("{status}: {}", String::from_utf8_lossy(&body)));
                }
            }
        }));
    }
    let mut accepted = s.selfhost.state.accepted.subscribe();
    wait_accepted(&mut accepted, PER_KEY).await;
    let mut keys = vec![LICENSE_KEY.to_string()];
    for round in 1..=5 {
        let key = format!("lic-selfhost-{round}-{:08x}", rand::random::<u32>());
        {
            // The server switches to the new key at the moment the file holds it.
            let mut license = s.selfhost.state.license.lock().await;
            let temp = s.license_file.with_extension("new");
            std::fs::write(&temp, &key).expect("write");
            std::fs::rename(&temp, &s.license_file).expect("rename");
            *license = key.clone();
        }
        keys.push(key);
        let seen = *s.selfhost.state.accepted.borrow();
        wait_accepted(&mut accepted, seen + PER_KEY).await;
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("client");
    }
    let errors = errors.lock().expect("errors").clone();
    assert!(
        errors.is_empty(),
        "{} client errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    // Every request carried one whole license key, and nothing went to the cloud.
    for seen in s.selfhost.seen() {
        let whole: Vec<String> = keys.iter().map(|k| format!("Token {k}")).collect();
        assert!(
            seen.authorization.len() == 1 && whole.contains(&seen.authorization[0]),
            "{seen:?}"
        );
    }
    assert!(s.cloud.records().is_empty(), "a 401 is not a reason to fall back");
    let (_, ready) = s.proxy.ready().await;
    assert_eq!(ready["routes"][1]["key"]["rotations"], 5, "{ready}");
    assert_eq!(ready["key"]["rotations"], 0, "the default route's key is its own");
    s.proxy.stop().await;
}

async fn wait_accepted(accepted: &mut tokio::sync::watch::Receiver<u64>, n: u64) {
    tokio::time::timeout(Duration::from_secs(30), accepted.wait_for(|c| *c >= n))
        .await
        .expect("the self-host accepted enough requests within 30 s")
        .expect("watch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_a_key_answers_key_unavailable_on_its_paths_and_ready_stays_200() {
    let cloud = TestUpstream::start().await;
    *cloud.state.accepted_key.lock().await = Some(TEST_KEY.to_string());
    let selfhost = SelfHost::start().await;
    let missing = std::path::Path::new("/nonexistent/license-key");
    let proxy = TestProxy::start(&cloud, &route_toml(&selfhost, missing, "")).await;
    for path in ["/v1/listen", "/v1/listen/stream"] {
        let (status, body) = post(&proxy.url(path), "{}").await;
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["code"], "KEY_UNAVAILABLE");
    }
    assert!(
        selfhost.seen().is_empty() && cloud.records().is_empty(),
        "nothing was forwarded"
    );
    // Other paths still work, and the proxy is ready: the default route has its key.
    assert_eq!(post(&proxy.url("/waves/v1/lightning/get_speech"), "{}").await.0, 200);
    let (status, ready) = proxy.ready().await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["routes"][1]["state"], "key_unavailable");
    assert!(ready["routes"][1]["key"]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("/nonexistent/license-key")));
    proxy.stop().await;
}

#[tokio::test]
async fn a_plain_http_route_to_a_remote_host_is_a_config_error_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    let text = "[key]\nsource = \"file\"\nfile = \"/run/secrets/smallest\"\n\n[[route]]\nname = \"selfhost-stt\"\npaths = [\"/v1/listen\"]\nupstream = \"http://10.0.0.7:7100\"\nscheme = \"Token\"\n[route.key]\nsource = \"file\"\nfile = \"/run/secrets/license-key\"\n";
    std::fs::write(&config, text).unwrap();
    let output = std::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let expected = format!("{}:8:1: `route[0].upstream`: plain http to 10.0.0.7", config.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("allow_plaintext = true"), "{stderr}");

    // With allow_plaintext the same file is valid, and `check` prints the routing table.
    std::fs::write(
        &config,
        text.replace("scheme = \"Token\"", "scheme = \"Token\"\nallow_plaintext = true"),
    )
    .unwrap();
    let output = std::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("# routing table"), "{stdout}");
    assert!(
        stdout.contains("#   /v1/listen -> selfhost-stt http://10.0.0.7:7100 (Token key from file /run/secrets/license-key, allow_plaintext)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("#   * -> default https://api.smallest.ai (Bearer key from file /run/secrets/smallest)"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adding_a_route_takes_effect_and_the_access_line_notes_a_fallback() {
    let cloud = TestUpstream::start().await;
    *cloud.state.accepted_key.lock().await = Some(TEST_KEY.to_string());
    let selfhost = SelfHost::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir);
    let license = license_file(&dir);
    let base = proxy_config_text(&cloud.url(), &cloud.pki.ca_file, &key, "");
    let proxy = ProxyProcess::spawn(&base, &[]);

    // Before: /v1/listen goes to the cloud like every path.
    assert_eq!(post(&proxy.url("/v1/listen"), "{}").await.0, 200);
    assert_eq!(cloud.records().len(), 1);
    assert!(selfhost.seen().is_empty());

    std::fs::write(
        proxy.config_path(),
        format!("{base}{}", route_toml(&selfhost, &license, "")),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reloaded", 1, Duration::from_secs(20));
    let (status, body) = post(&proxy.url("/v1/listen"), "{}").await;
    assert_eq!(status, 200);
    assert!(body.starts_with(b"selfhost /v1/listen"), "{body:?}");
    assert_eq!(cloud.records().len(), 1, "the cloud saw nothing more");
    let (_, _, ready) = get(&proxy.url("/ready")).await;
    assert_eq!(json(&ready)["routes"][1]["name"], ROUTE);

    // The self-host goes away: the next request falls back, and its access line says so.
    selfhost.stop().await;
    assert_eq!(post(&proxy.url("/v1/listen"), "{}").await.0, 200);
    assert_eq!(cloud.records().len(), 2);
    proxy.wait_for_log("selfhost-stt->default (connect)", 1, Duration::from_secs(10));
    assert_keys_never_crossed(&cloud, &selfhost);
    let log = proxy.stderr_text();
    assert!(
        !log.contains(TEST_KEY) && !log.contains(LICENSE_KEY),
        "a key in the log"
    );

    // Removing the route again sends /v1/listen back to the cloud.
    std::fs::write(proxy.config_path(), &base).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reloaded", 2, Duration::from_secs(20));
    let (_, _, ready) = get(&proxy.url("/ready")).await;
    assert_eq!(json(&ready)["routes"].as_array().map(Vec::len), Some(1));
    let cloud_seen = cloud.records().len();
    assert_eq!(post(&proxy.url("/v1/listen"), "{}").await.0, 200);
    assert_eq!(cloud.records().len(), cloud_seen + 1);

    // A new route whose key source yields no key is refused: the running config stays.
    let keyless = route_toml(&selfhost, std::path::Path::new("/nonexistent/license-key"), "");
    std::fs::write(proxy.config_path(), format!("{base}{keyless}")).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reload failed", 1, Duration::from_secs(20));
    let log = proxy.stderr_text();
    let line = log
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap_or_default();
    assert!(line.contains("selfhost-stt"), "the error names the route: {line}");
    assert!(line.contains("/nonexistent/license-key"), "{line}");
    assert_eq!(post(&proxy.url("/v1/listen"), "{}").await.0, 200);
    assert_eq!(cloud.records().len(), cloud_seen + 2, "still the cloud's");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_falls_back_too_and_the_tunnel_works_with_the_clouds_key() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let s = setup("").await;
    s.selfhost.stop().await;
    let url = format!("ws://{}/v1/listen/live", s.proxy.addr);
    let (mut ws, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the handshake is answered by the cloud");
    assert_eq!(response.status(), 101);
    ws.send(Message::Text("hello".into())).await.expect("send");
    let echoed = ws.next().await.expect("a message").expect("not an error");
    assert_eq!(echoed, Message::Text("hello".into()));
    ws.close(None).await.expect("close");
    let handshakes = s.cloud.state.websocket_handshakes.lock().expect("handshakes").clone();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(
        handshakes[0][header::AUTHORIZATION],
        format!("Bearer {TEST_KEY}").as_str()
    );
    assert!(s.selfhost.seen().is_empty());
    assert_eq!(metric(&s.proxy.url(""), &fallbacks("connect")).await, 1.0);
    s.proxy.stop().await;
}

/// The `[[route]]` block from README.md's "routes" section.
fn readme_route_example() -> String {
    let readme = include_str!("../README.md");
    readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("name = \"selfhost-stt\""))
        .expect("README.md has the [[route]] example")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_route_example_runs_as_written() {
    let cloud = TestUpstream::start().await;
    *cloud.state.accepted_key.lock().await = Some(TEST_KEY.to_string());
    let selfhost = SelfHost::start().await;
    let dir = tempfile::tempdir().unwrap();
    let license = license_file(&dir);
    // Verbatim apart from the self-host's port and the license file's place.
    let example = readme_route_example()
        .replace("http://127.0.0.1:7100", &selfhost.url())
        .replace("/run/secrets/license-key", license.to_str().unwrap());
    let proxy = TestProxy::start(&cloud, &example).await;
    let (status, body) = post(&proxy.url("/v1/listen"), "{}").await;
    assert_eq!(status, 200);
    assert!(body.starts_with(b"selfhost /v1/listen"), "{body:?}");
    assert_eq!(post(&proxy.url("/v1/listening"), "{}").await.0, 200);
    selfhost.stop().await;
    assert_eq!(post(&proxy.url("/v1/listen"), "{}").await.0, 200);
    assert_eq!(cloud.records().len(), 2, "/v1/listening, then the fallback");
    assert_keys_never_crossed(&cloud, &selfhost);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_to_another_route_uses_that_routes_key_and_goes_no_further() {
    const EU_KEY: &str = "sk-test-eu-Rt5Vb8Nq";
    let cloud = TestUpstream::start().await;
    *cloud.state.accepted_key.lock().await = Some(TEST_KEY.to_string());
    let eu = TestUpstream::start().await;
    *eu.state.accepted_key.lock().await = Some(EU_KEY.to_string());
    let selfhost = SelfHost::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (license, eu_key) = (license_file(&dir), dir.path().join("eu-key"));
    std::fs::write(&eu_key, EU_KEY).unwrap();
    // The EU route falls back to the self-host in turn: a second hop must not be taken.
    let routes = format!(
        "{}\n[[route]]\nname = \"cloud-eu\"\npaths = [\"/status\"]\nupstream = \"{}\"\nca_file = \"{}\"\nfallback = \"{ROUTE}\"\n[route.key]\nsource = \"file\"\nfile = \"{}\"\n",
        route_toml(&selfhost, &license, "").replace("fallback = \"default\"", "fallback = \"cloud-eu\""),
        eu.url(),
        eu.pki.ca_file.display(),
        eu_key.display()
    );
    let proxy = TestProxy::start(&cloud, &routes).await;
    selfhost.stop().await;
    let (status, body) = post(&proxy.url("/v1/listen/busy"), r#"{"eu":1}"#).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen = eu.records();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri.path(), "/v1/listen/busy");
    assert_eq!(
        seen[0].headers[header::AUTHORIZATION],
        format!("Bearer {EU_KEY}").as_str()
    );
    assert!(cloud.records().is_empty(), "the default route was not involved");
    let series = format!("smallest_proxy_route_fallbacks_total{{from=\"{ROUTE}\",to=\"cloud-eu\",reason=\"connect\"}}");
    assert_eq!(metric(&proxy.url(""), &series).await, 1.0);

    // The EU upstream says 503: the EU route falls back to the self-host, which is down. The
    // self-host route's own fallback (the EU route again) is not taken: one fallback only.
    let (status, body) = post(&proxy.url("/status/503"), "{}").await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["code"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(eu.records().len(), 2, "the EU upstream saw the request once");
    let back = format!("smallest_proxy_route_fallbacks_total{{from=\"cloud-eu\",to=\"{ROUTE}\",reason=\"503\"}}");
    assert_eq!(metric(&proxy.url(""), &back).await, 1.0);
    assert_eq!(metric(&proxy.url(""), &series).await, 1.0, "no second hop");
    assert!(cloud.records().is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_route_without_a_key_leaves_the_first_answer_standing() {
    let cloud = TestUpstream::start().await;
    let eu = TestUpstream::start().await;
    let selfhost = SelfHost::start().await;
    let dir = tempfile::tempdir().unwrap();
    let license = license_file(&dir);
    let routes = format!(
        "{}\n[[route]]\nname = \"cloud-eu\"\npaths = [\"/eu\"]\nupstream = \"{}\"\nca_file = \"{}\"\n[route.key]\nsource = \"file\"\nfile = \"/nonexistent/eu-key\"\n",
        route_toml(&selfhost, &license, "[route.limits]\nupstream_retries = 0")
            .replace("fallback = \"default\"", "fallback = \"cloud-eu\""),
        eu.url(),
        eu.pki.ca_file.display(),
    );
    let proxy = TestProxy::start(&cloud, &routes).await;
    // The self-host's 503 is the answer, not the key-less fallback's KEY_UNAVAILABLE.
    let (status, body) = post(&proxy.url("/v1/listen/busy"), "{}").await;
    assert_eq!(status, 503);
    assert_eq!(body, &br#"{"error":"overloaded"}"#[..]);
    assert!(eu.records().is_empty() && cloud.records().is_empty());
    let (_, _, metrics) = get(&proxy.url("/metrics")).await;
    assert!(
        !String::from_utf8_lossy(&metrics).contains("smallest_proxy_route_fallbacks_total{"),
        "no fallback was counted"
    );
    proxy.stop().await;
}

/// A route's own limits take the profile like `[limits]`; its classes carry the route's name so
/// they never share a metrics label or Redis keys with the default route's `tts`.
#[test]
fn a_routes_profile_classes_are_named_after_the_route() {
    let config: smallest_proxy::config::LimitsConfig = toml::from_str("max_concurrent = 2").unwrap();
    let metrics = smallest_proxy::metrics::Metrics::new();
    let limiter = smallest_proxy::limits::Limiter::named("selfhost", &config, &metrics, None);
    let names: Vec<&str> = limiter.classes().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["selfhost", "selfhost.tts"]);
    assert_eq!(limiter.class_for("/waves/v1/tts").name(), "selfhost.tts");
    let default = smallest_proxy::limits::Limiter::new(&config, &metrics, None);
    let names: Vec<&str> = default.classes().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["default", "tts"]);
}
