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
