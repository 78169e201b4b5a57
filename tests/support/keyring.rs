//! A real Secret Service for the keyring tests: GNOME Keyring's `gnome-keyring-daemon` on a
//! private D-Bus session bus, unlocked with a test password, in a throwaway HOME. A missing
//! tool fails the test saying how to get it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};

use super::binary;

const HOW_TO_GET: &str = "run ./scripts/test.sh, or: apt-get install gnome-keyring dbus libsecret-tools libglib2.0-bin";

fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is missing (the keyring tests need a real Secret Service): {HOW_TO_GET}"
    );
}

/// A private D-Bus session bus with GNOME Keyring's Secret Service on it, both children of
/// this test, in a throwaway HOME (so the keyring files live in a temporary directory).
pub struct KeyringSession {
    dir: tempfile::TempDir,
    bus: String,
    dbus: Child,
    keyring: Child,
}

impl KeyringSession {
    pub fn start() -> KeyringSession {
        for tool in ["dbus-daemon", "gnome-keyring-daemon", "gdbus", "secret-tool"] {
            require(tool);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = dir.path().join("run");
        std::fs::create_dir(&runtime).expect("runtime dir");
        std::fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("runtime dir mode");
        let mut dbus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .env("HOME", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting dbus-daemon: {e}: {HOW_TO_GET}"));
        // The bus prints its address once it listens.
        let mut bus = String::new();
        BufReader::new(dbus.stdout.take().expect("dbus stdout"))
            .read_line(&mut bus)
            .expect("dbus-daemon's address");
        let bus = bus.trim().to_string();
        assert!(bus.starts_with("unix:"), "dbus-daemon printed no address: {bus:?}");
        let mut keyring = Command::new("gnome-keyring-daemon")
            .args(["--foreground", "--unlock", "--components=secrets"])
            .env("HOME", dir.path())
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting gnome-keyring-daemon: {e}: {HOW_TO_GET}"));
        // The unlock password on standard input, then EOF.
        let mut stdin = keyring.stdin.take().expect("keyring stdin");
        stdin.write_all(b"testpw").expect("unlock password");
        drop(stdin);
        let session = KeyringSession {
            dir,
            bus,
            dbus,
            keyring,
        };
        // `gdbus wait` returns when the Secret Service's name is on the bus: the ready signal.
        let waited = Command::new("gdbus")
            .args(["wait", "--session", "--timeout", "30", "org.freedesktop.secrets"])
            .env("DBUS_SESSION_BUS_ADDRESS", &session.bus)
            .output()
            .expect("gdbus wait");
        assert!(
            waited.status.success(),
            "the Secret Service did not appear on the bus: {}",
            String::from_utf8_lossy(&waited.stderr)
        );
        session
    }

    /// The environment a process in this desktop session has.
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS", self.bus.clone()),
            ("HOME", self.dir.path().display().to_string()),
        ]
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env_remove("SMALLEST_API_KEY")
            .env_remove("SMALLEST_PROXY_CONFIG")
            .env_remove("RUST_LOG");
        for (k, v) in self.envs() {
            command.env(k, v);
        }
        command
    }

    /// `smallest-proxy ARGS` with `input` on standard input.
    pub fn proxy_cli(&self, args: &[&str], input: &str, envs: &[(&str, &str)]) -> Output {
        self.cli(binary(), args, input, envs)
    }

    /// `program ARGS` (a smallest-proxy binary) with `input` on standard input.
    pub fn cli(&self, program: &str, args: &[&str], input: &str, envs: &[(&str, &str)]) -> Output {
        let mut command = self.command(program);
        command
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("run smallest-proxy");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("smallest-proxy output")
    }

    pub fn key_set(&self, value: &str) {
        let out = self.proxy_cli(&["key", "set"], &format!("{value}\n"), &[]);
        assert!(
            out.status.success(),
            "key set: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What `secret-tool` (libsecret, the desktop's own client) finds for the entry.
    pub fn lookup(&self, service: &str, account: &str) -> Output {
        self.command("secret-tool")
            .args(["lookup", "service", service, "username", account])
            .output()
            .expect("secret-tool")
    }

    /// `key set` from inside an async test (the rotation scenario writes keys under a lock).
    pub async fn key_set_async(&self, value: String) {
        let mut command = tokio::process::Command::new(binary());
        command
            .args(["key", "set"])
            .env_remove("SMALLEST_PROXY_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in self.envs() {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("run key set");
        let mut stdin = child.stdin.take().expect("stdin");
        tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{value}\n").as_bytes())
            .await
            .expect("write the key");
        drop(stdin);
        let out = child.wait_with_output().await.expect("key set");
        assert!(
            out.status.success(),
            "key set: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for KeyringSession {
    fn drop(&mut self) {
        for child in [&mut self.keyring, &mut self.dbus] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
