//! The binary's contract: no-config start, exit codes, `check`, config errors.

mod support;

use std::process::Command;
use support::binary;

fn run(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("SMALLEST_API_KEY")
        .env_remove("SMALLEST_PROXY_CONFIG")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        command.env(k, v);
    }
    command.output().expect("run smallest-proxy")
}

#[test]
fn missing_key_without_config_exits_2_naming_the_variable_and_config() {
    let out = run(&[], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("SMALLEST_API_KEY") && stderr.contains("--config"),
        "{stderr}"
    );
}

#[test]
fn check_prints_the_effective_config_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "[auth]\nscheme = \"Token\"\n").unwrap();
    let out = run(
        &["check", "--config", path.to_str().unwrap()],
        &[("SMALLEST_API_KEY", "sk-never-printed")],
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("scheme = \"Token\""), "{stdout}");
    assert!(stdout.contains("url = \"https://api.smallest.ai\""), "{stdout}");
    assert!(!stdout.contains("sk-never-printed"));
}

#[test]
fn bad_config_names_file_line_column_and_key_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[listen]\naddress = \"127.0.0.1:8787\"\n\n[upstream]\nurll = \"https://x\"\n",
    )
    .unwrap();
    let out = run(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:5:1", path.display())), "{stderr}");
    assert!(stderr.contains("upstream.urll"), "{stderr}");
}

#[test]
fn non_loopback_listen_is_refused_without_allow_remote() {
    let out = run(&["check"], &[("SMALLEST_PROXY_LISTEN_ADDRESS", "0.0.0.0:8787")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("allow_remote") && stderr.contains("SMALLEST_PROXY_LISTEN_ADDRESS"),
        "{stderr}"
    );
}

#[test]
fn config_path_from_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "[auth]\nscheme = \"Tokn\"\n").unwrap();
    let out = run(&["check"], &[("SMALLEST_PROXY_CONFIG", path.to_str().unwrap())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.scheme"));
}

#[test]
fn check_refuses_a_missing_key_exactly_as_run_does() {
    let checked = run(&["check"], &[]);
    let ran = run(&["run"], &[]);
    assert_eq!(checked.status.code(), Some(2));
    assert_eq!(checked.status.code(), ran.status.code());
    assert_eq!(checked.stderr, ran.stderr, "same message");
    assert!(checked.stdout.is_empty());
}

#[test]
fn check_prints_every_value_the_classes_and_the_preset_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[limits]\nmax_concurrent = 4\n[[limits.class]]\nname = \"tts\"\npaths = [\"/waves/v1/tts\"]\nmax_concurrent = 1\n[policy]\npreset = \"smallest\"\ndeny = [\"/waves/v1/chat/**\"]\n",
    )
    .unwrap();
    let out = run(
        &["check", "--config", path.to_str().unwrap()],
        &[("SMALLEST_API_KEY", "sk-never-printed")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "header_read_timeout = \"10s\"",
        "max_queue = 1000",
        "refresh_interval = \"5m\"",
        "allow_logs = false",
        "#   listen: http://127.0.0.1:8787",
        "#   key: from the environment variable SMALLEST_API_KEY",
        "#   default: every other caller; no budget",
        "#   default: every path no other class claims: max_concurrent 4",
        "#   tts: /waves/v1/tts: max_concurrent 1, max_websockets 5, rate 0/1s, max_queue 1000, queue_timeout 30s",
        "#   deny  /waves/v1/chat/**",
        "#   allow POST /waves/v1/voice-cloning   (preset)",
        "#   allow GET /waves/v1/analytics/**/timeseries   (preset)",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
    assert!(!stdout.contains("analytics/*/logs"), "logs are off by default");
    assert!(!stdout.contains("sk-never-printed"));
}

#[test]
fn kubernetes_service_link_variables_do_not_stop_the_proxy() {
    let links = [
        ("SMALLEST_API_KEY", "sk-x"),
        ("SMALLEST_PROXY_SERVICE_HOST", "10.96.0.12"),
        ("SMALLEST_PROXY_SERVICE_PORT", "8787"),
        ("SMALLEST_PROXY_SERVICE_PORT_HTTP", "8787"),
        ("SMALLEST_PROXY_PORT", "tcp://10.96.0.12:8787"),
        ("SMALLEST_PROXY_PORT_8787_TCP", "tcp://10.96.0.12:8787"),
        ("SMALLEST_PROXY_PORT_8787_TCP_PROTO", "tcp"),
        ("SMALLEST_PROXY_PORT_8787_TCP_PORT", "8787"),
        ("SMALLEST_PROXY_PORT_8787_TCP_ADDR", "10.96.0.12"),
    ];
    let out = run(&["check"], &links);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let mut with_unknown = links.to_vec();
    with_unknown.push(("SMALLEST_PROXY_LISTEN_ADRESS", "127.0.0.1:1"));
    let out = run(&["check"], &with_unknown);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("environment variable SMALLEST_PROXY_LISTEN_ADRESS: does not name a config key"));
}

#[test]
fn service_link_variables_are_logged_at_debug_when_the_proxy_runs() {
    let (_dir, key) = support::key_dir();
    let config = support::proxy_config_text("https://127.0.0.1:9", std::path::Path::new("/dev/null"), &key, "")
        .replace("ca_file = \"/dev/null\"\n", "");
    let proxy = support::ProxyProcess::spawn(
        &config,
        &[
            ("RUST_LOG", "smallest_proxy=debug"),
            ("SMALLEST_PROXY_SERVICE_HOST", "10.96.0.12"),
            ("SMALLEST_PROXY_PORT_8787_TCP_ADDR", "10.96.0.12"),
        ],
    );
    proxy.wait_for_log("SMALLEST_PROXY_SERVICE_HOST", 1, std::time::Duration::from_secs(10));
    proxy.wait_for_log(
        "SMALLEST_PROXY_PORT_8787_TCP_ADDR",
        1,
        std::time::Duration::from_secs(10),
    );
    assert!(proxy
        .stderr_text()
        .contains("ignoring a Kubernetes service-link variable"));
}
