//! Test support: start a real TLS upstream and the proxy (in-process through `lib.rs` like
//! `main.rs` does, or as the real binary when a test needs its process: RSS, logs, signals),
//! and talk to it with real clients.
#![allow(dead_code)] // each test binary uses its own subset

pub mod pattern;
pub mod rotation;
pub mod servers;
pub mod smallest;
pub mod standin;
pub mod upstream;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(unused_imports)]
pub use upstream::{TestUpstream, UpstreamOptions};

/// The key every test proxy injects unless a test says otherwise. Distinctive so a log sweep
/// cannot miss it.
pub const TEST_KEY: &str = "sk-test-Zq8vK2mWn4Rt7Yp1";

/// Deep-merge `extra` into `base` (tables merge, anything else replaces).
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A config for a proxy in front of `upstream`, on a free loopback port, with the key in a
/// file under `key_dir`; `extra` (TOML) is merged on top.
pub fn proxy_config_text(
    upstream_url: &str,
    ca_file: &std::path::Path,
    key_file: &std::path::Path,
    extra: &str,
) -> String {
    let mut table: toml::Table = toml::from_str(&format!(
        r#"
[listen]
address = "127.0.0.1:0"
[upstream]
url = "{upstream_url}"
ca_file = "{}"
[key]
source = "file"
file = "{}"
"#,
        ca_file.display(),
        key_file.display()
    ))
    .expect("base config");
    merge(&mut table, toml::from_str(extra).expect("extra config"));
    toml::to_string(&table).expect("config text")
}

/// The proxy running in this process, through `smallest_proxy::run`.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub key_file: PathBuf,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    pub async fn start(upstream: &TestUpstream, extra: &str) -> TestProxy {
        Self::start_for(&upstream.url(), &upstream.pki.ca_file, extra).await
    }

    pub async fn start_for(upstream_url: &str, ca_file: &std::path::Path, extra: &str) -> TestProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("api-key");
        std::fs::write(&key_file, format!("{TEST_KEY}\n")).expect("key file");
        let text = proxy_config_text(upstream_url, ca_file, &key_file, extra);
        let config = smallest_proxy::config::load_text(None, &text, &[]).expect("test config is valid");
        let listeners = smallest_proxy::Listeners::bind(&config.listen).await.expect("bind");
        let addr = listeners.tcp_addresses()[0];
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            smallest_proxy::run(config, listeners, async move {
                let _ = rx.await;
            })
            .await
            .expect("proxy run");
        });
        let proxy = TestProxy {
            addr,
            key_file,
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
        };
        // The listener is bound already, but requests are served only once `run` has made its
        // first key fetch and entered the accept loop: one answered /health is that signal.
        let (status, _, _) = get(&proxy.url("/health")).await;
        assert_eq!(status, 200);
        proxy
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `/ready`'s JSON.
    pub async fn ready(&self) -> (http::StatusCode, serde_json::Value) {
        let (status, _, body) = get(&self.url("/ready")).await;
        (status, json(&body))
    }

    /// Poll `/ready` (the only view of the key state from outside) until `predicate` holds,
    /// bounded. The proxy publishes no push signal for key changes, so this is the signal.
    pub async fn wait_ready(
        &self,
        what: &str,
        predicate: impl Fn(http::StatusCode, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_ready_at(&self.url("/ready"), what, predicate).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Poll a `/ready` URL until `predicate` holds (30 s bound, 25 ms between looks).
pub async fn wait_ready_at(
    url: &str,
    what: &str,
    predicate: impl Fn(http::StatusCode, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = get(url).await;
        let body = json(&body);
        if predicate(status, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 30 s for {what}; last /ready: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One sample from `/metrics` (`series` is the name with its labels as printed, e.g.
/// `smallest_proxy_limit_admitted_total{class="tts"}`); 0 when absent.
pub async fn metric(base: &str, series: &str) -> f64 {
    let (_, _, body) = get(&format!("{base}/metrics")).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Poll `/metrics` until `series` satisfies `predicate` (30 s bound).
pub async fn wait_metric(base: &str, series: &str, predicate: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let value = metric(base, series).await;
        if predicate(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 30 s on {series}; last value {value}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain HTTP/1.1 client, the way an app on the same host talks to the proxy.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Send and collect: (status, headers, body).
pub async fn send(req: Request<Full<Bytes>>) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let response: Response<_> = client().request(req).await.expect("request through proxy");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    (parts.status, parts.headers, body)
}

pub async fn get(url: &str) -> (http::StatusCode, http::HeaderMap, Bytes) {
    send(Request::get(url).body(Full::new(Bytes::new())).expect("request")).await
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Write raw bytes to the proxy and read until it closes the connection (bounded).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The real binary, for tests that need its own process (RSS, logs, exit codes, signals).
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Notified for every new stderr line, so tests can wait for a log line (a signal).
    new_line: Arc<std::sync::Condvar>,
    _dir: tempfile::TempDir,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_smallest-proxy")
}

impl ProxyProcess {
    /// Start the binary with `config_text` and the given environment; wait for its "serving"
    /// log line (a signal, not a sleep) and read the bound address from it.
    pub fn spawn(config_text: &str, envs: &[(&str, &str)]) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config_text).expect("config");
        let mut command = Command::new(binary());
        command
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command.env_remove("RUST_LOG");
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn smallest-proxy");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(std::sync::Condvar::new());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        let notify = new_line.clone();
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("smallest-proxy serving") {
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                sink.lock().expect("lines").push(line);
                notify.notify_all();
            }
        });
        let line = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "proxy did not start; stderr:\n{}",
                    lines.lock().expect("lines").join("\n")
                );
            }
        };
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| c == ',' || c.is_whitespace() || c == '"').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        ProxyProcess {
            child,
            addr,
            stderr: lines,
            new_line,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The config file the process was started with (rewrite it, then SIGHUP, to reload).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("proxy.toml")
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status");
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM")
    }

    /// Block until `count` log lines contain `needle` (bounded by `within`).
    pub fn wait_for_log(&self, needle: &str, count: usize, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        let mut lines = self.stderr.lock().expect("lines");
        loop {
            if lines.iter().filter(|l| l.contains(needle)).count() >= count {
                return;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "waited {within:?} for {count} log lines with {needle:?}; log:\n{}",
                lines.join("\n")
            );
            lines = self.new_line.wait_timeout(lines, left).expect("lines").0;
        }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The project's `.venv` Python (else `python3`), checked to import `modules` (e.g. "httpx,
/// websockets"); fails saying how to get them.
pub fn python_with(modules: &str) -> String {
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let candidate = if std::path::Path::new(venv).exists() {
        venv.to_string()
    } else {
        "python3".to_string()
    };
    let check = Command::new(&candidate)
        .args(["-c", &format!("import {modules}")])
        .output();
    match check {
        Ok(out) if out.status.success() => candidate,
        _ => panic!(
            "Python with {modules} is missing: run ./scripts/test.sh (it installs scripts/test-requirements.txt into .venv)"
        ),
    }
}

/// Write [`TEST_KEY`] to `dir/key` (a `source = "file"` key) and return its path.
pub fn key_file(dir: &tempfile::TempDir) -> PathBuf {
    let key = dir.path().join("key");
    std::fs::write(&key, TEST_KEY).expect("write the test key");
    key
}

/// A fresh directory holding [`key_file`]; keep the directory alive as long as the key.
pub fn key_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = key_file(&dir);
    (dir, key)
}

/// Read once more from a raw socket into `buf`; `false` at EOF or on an error.
pub async fn read_more<S: tokio::io::AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 16384];
    match io.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// The bytes of a `200 OK` with a `text/plain` `body`, as a scripted upstream writes them.
pub fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A chunked body at the start of `rest` (trailers not expected): its data, and how many bytes
/// the coding took; `None` while it is incomplete.
pub fn dechunk(rest: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + rest[at..].windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[at..line_end]).ok()?.trim(), 16).expect("chunk size");
        at = line_end + 2;
        if rest.len() < at + size + 2 {
            return None;
        }
        if size == 0 {
            return Some((body, at + 2));
        }
        body.extend_from_slice(&rest[at..at + size]);
        at += size + 2;
    }
}
