//! `source = "keyring"` and `smallest-proxy key set|status`, against a real GNOME Keyring
//! (`gnome-keyring-daemon`, the freedesktop Secret Service) on a private D-Bus session bus,
//! unlocked with a test password: set from standard input, read by the proxy and injected,
//! rotation under load (by `key set`, the 401 path), SIGHUP and the periodic refresh, the key
//! absent from trace-level logs, and `key status`.

mod support;

use std::process::Command;
use support::keyring::KeyringSession;
use support::*;

fn keyring_proxy_config(upstream: &TestUpstream, extra: &str) -> String {
    proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        std::path::Path::new("/unused"),
        &format!("[key]\nsource = \"keyring\"\n{extra}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_set_then_the_proxy_injects_it_and_rotation_under_load_loses_nothing() {
    let session = KeyringSession::start();
    let first = "sk-keyring-Hw3nB8qLx2Vd";
    let out = session.proxy_cli(&["key", "set"], &format!("{first}\n"), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("fingerprint {}", smallest_proxy::keys::fingerprint(first))),
        "{stdout}"
    );
    assert!(!stdout.contains(first) && !String::from_utf8_lossy(&out.stderr).contains(first));

    let upstream = TestUpstream::start().await;
    let envs = session.envs();
    let mut process_envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    process_envs.push(("RUST_LOG", "trace"));
    let proxy = ProxyProcess::spawn(&keyring_proxy_config(&upstream, ""), &process_envs);
    let ready = wait_ready_at(&proxy.url("/ready"), "ready", |s, _| s == 200).await;
    assert_eq!(ready["key"]["source"], "keyring");
    let (status, _, _) = get(&proxy.url("/waves/v1/lightning/get_voices")).await;
    assert_eq!(status, 200);
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        format!("Bearer {first}").as_str()
    );

    // Each rotation is a `key set`; the upstream accepts only the new key from that moment, so
    // in-flight requests meet a 401 and the proxy re-reads the keyring and resends.
    rotation::rotate_under_load(&proxy.url(""), &upstream, first, |key| session.key_set_async(key)).await;
    let (_, _, ready) = get(&proxy.url("/ready")).await;
    assert_eq!(json(&ready)["key"]["rotations"], rotation::ROTATIONS);

    let log = proxy.stderr_text();
    assert!(log.contains("TRACE"), "not a trace-level log");
    assert!(
        log.contains("zbus"),
        "the D-Bus client's own trace lines are in the log too"
    );
    assert!(!log.contains(first), "the first key appears in the log");
    assert!(!log.contains("sk-rotated-"), "a rotated key appears in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_the_refresh_interval_reread_the_keyring() {
    let session = KeyringSession::start();
    session.key_set("sk-keyring-before-hup");
    let upstream = TestUpstream::start().await;
    let envs = session.envs();
    let process_envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let proxy = ProxyProcess::spawn(&keyring_proxy_config(&upstream, ""), &process_envs);
    let fp = smallest_proxy::keys::fingerprint;
    wait_ready_at(&proxy.url("/ready"), "the first key", |_, r| {
        r["key"]["fingerprint"] == fp("sk-keyring-before-hup").as_str()
    })
    .await;
    // No request is sent and refresh_interval is 5 minutes: only the SIGHUP can bring it in.
    session.key_set("sk-keyring-after-hup");
    proxy.signal(libc::SIGHUP);
    wait_ready_at(&proxy.url("/ready"), "the key after SIGHUP", |_, r| {
        r["key"]["fingerprint"] == fp("sk-keyring-after-hup").as_str()
    })
    .await;
    drop(proxy);

    // With a short refresh_interval, a new value arrives with no signal and no request.
    let proxy = ProxyProcess::spawn(
        &keyring_proxy_config(&upstream, "refresh_interval = \"1s\"\n"),
        &process_envs,
    );
    session.key_set("sk-keyring-periodic");
    wait_ready_at(&proxy.url("/ready"), "the periodically re-read key", |_, r| {
        r["key"]["fingerprint"] == fp("sk-keyring-periodic").as_str()
    })
    .await;
}

#[test]
fn key_status_prints_the_source_and_the_fingerprint() {
    let session = KeyringSession::start();
    let env = [("SMALLEST_PROXY_KEY_SOURCE", "keyring")];
    // Nothing stored yet: a clear answer naming the entry and the command that fills it.
    let out = session.proxy_cli(&["key", "status"], "", &env);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no entry") && stderr.contains("smallest-proxy key set"),
        "{stderr}"
    );

    session.key_set("sk-keyring-status-Tq9");
    let out = session.proxy_cli(&["key", "status"], "", &env);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        format!(
            "source: keyring (service \"smallest-proxy\", account \"default\")\nfingerprint: {}\n",
            smallest_proxy::keys::fingerprint("sk-keyring-status-Tq9")
        )
    );
    // The desktop's own tools see the same entry.
    let found = session.lookup("smallest-proxy", "default");
    assert_eq!(String::from_utf8_lossy(&found.stdout), "sk-keyring-status-Tq9");

    // Another entry, chosen on the command line for `set` and in the config for the proxy.
    let out = session.proxy_cli(
        &["key", "set", "--service", "work", "--account", "ci"],
        "sk-keyring-other-entry",
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[key]\nsource = \"keyring\"\n[key.keyring]\nservice = \"work\"\naccount = \"ci\"\n",
    )
    .unwrap();
    let out = session.proxy_cli(&["--config", config.to_str().unwrap(), "key", "status"], "", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("service \"work\", account \"ci\"")
            && stdout.contains(&smallest_proxy::keys::fingerprint("sk-keyring-other-entry")),
        "{stdout}"
    );
    // The default entry was left alone.
    assert_eq!(
        String::from_utf8_lossy(&session.lookup("smallest-proxy", "default").stdout),
        "sk-keyring-status-Tq9"
    );
}

#[test]
fn key_set_refuses_a_bad_value_and_takes_no_key_from_the_command_line() {
    let session = KeyringSession::start();
    for bad in ["sk-two words", "", "sk-evil\r\nX-Injected: 1"] {
        let out = session.proxy_cli(&["key", "set"], bad, &[]);
        assert_eq!(out.status.code(), Some(1), "{bad:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("the key was not stored"), "{stderr}");
        assert!(!stderr.contains("sk-"), "the value is echoed: {stderr}");
    }
    assert!(
        !session.lookup("smallest-proxy", "default").status.success(),
        "a refused value was stored"
    );
    // A key on the command line is a usage error: it would sit in shell history and `ps`.
    let out = session.proxy_cli(&["key", "set", "sk-on-argv"], "", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!session.lookup("smallest-proxy", "default").status.success());
}

#[test]
fn without_a_secret_service_the_error_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("unix:path={}", dir.path().join("no-bus").display());
    let out = Command::new(binary())
        .args(["key", "status"])
        .env("SMALLEST_PROXY_KEY_SOURCE", "keyring")
        .env("DBUS_SESSION_BUS_ADDRESS", &nowhere)
        .env_remove("SMALLEST_PROXY_CONFIG")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("keyring reading service \"smallest-proxy\""),
        "{stderr}"
    );
    assert!(stderr.contains("Secret Service"), "{stderr}");
}

/// On a terminal `key set` prompts and reads with echo off: what is typed never appears on the
/// screen. Python's pty module gives the command a real terminal (its controlling tty).
#[test]
fn key_set_on_a_terminal_does_not_echo_the_key() {
    let session = KeyringSession::start();
    let python = python_with("pty, os");
    let script = r#"
import os, pty, sys
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], [sys.argv[1], "key", "set"])
seen = b""
def read_until(marker):
    global seen
    while marker not in seen:
        chunk = os.read(fd, 1024)
        if not chunk:
            break
        seen += chunk
read_until(b"(input hidden)")
os.write(fd, b"sk-typed-on-a-tty-Pz4\n")
try:
    while True:
        chunk = os.read(fd, 1024)
        if not chunk:
            break
        seen += chunk
except OSError:
    pass
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let out = session
        .command(&python)
        .args(["-c", script, binary()])
        .output()
        .expect("python pty");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{screen}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(screen.contains("Smallest API key (input hidden): "), "{screen}");
    assert!(
        screen.contains(&smallest_proxy::keys::fingerprint("sk-typed-on-a-tty-Pz4")),
        "{screen}"
    );
    assert!(!screen.contains("sk-typed"), "the key was echoed: {screen}");
    assert_eq!(
        String::from_utf8_lossy(&session.lookup("smallest-proxy", "default").stdout),
        "sk-typed-on-a-tty-Pz4"
    );
}

/// The container's static musl binary (built by scripts/test.sh) speaks to the Secret Service
/// too: its D-Bus client is pure Rust, with no libdbus to link.
#[test]
fn the_static_musl_binary_stores_and_reads_the_keyring() {
    let path = std::env::var("TEST_STATIC_PROXY_BINARY").unwrap_or_else(|_| {
        panic!("TEST_STATIC_PROXY_BINARY is not set: run ./scripts/test.sh, which builds the static musl binary")
    });
    assert!(
        std::path::Path::new(&path).is_file(),
        "{path} is missing: run ./scripts/test.sh"
    );
    let session = KeyringSession::start();
    let out = session.cli(&path, &["key", "set"], "sk-static-Ub7Nc1\n", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = session.cli(
        &path,
        &["key", "status"],
        "",
        &[("SMALLEST_PROXY_KEY_SOURCE", "keyring")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&smallest_proxy::keys::fingerprint("sk-static-Ub7Nc1")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
