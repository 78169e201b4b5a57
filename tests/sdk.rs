//! README.md's client examples run as written: the quickstart's curl calls, the Python SDK
//! (`smallestai` 5.x from PyPI, in `.venv`) and the Node example (Node + `ws` from
//! `tests/clients/node`), each through the real proxy to a stand-in for the Smallest API,
//! with `preset = "smallest"` on and no key in the app's environment. The stand-in answers 401
//! to anything but the proxy's key, so a pass proves the key was injected. The preset table
//! in README.md is checked against the policy and against the installed SDK's routes.

mod support;

use http::Method;
use smallest_proxy::config::PolicyConfig;
use smallest_proxy::server::policy::PathPolicy;
use std::path::Path;
use std::process::Command;
use support::smallest::{SmallestStandIn, AUDIO};
use support::*;

const README: &str = include_str!("../README.md");

/// The fenced block after `<!-- tested: NAME -->` in README.md.
fn readme_block(name: &str) -> String {
    let marker = format!("<!-- tested: {name} -->");
    let after = README
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let body = after.trim_start().split_once('\n').expect("a fenced block").1;
    body.split_once("\n```").expect("the block ends").0.to_string() + "\n"
}

async fn proxy_in_front_of(stand_in: &SmallestStandIn) -> TestProxy {
    TestProxy::start_for(
        &stand_in.url(),
        &stand_in.pki.ca_file,
        "[policy]\npreset = \"smallest\"\n",
    )
    .await
}

/// Run `program` on the README block saved as `file` in a fresh directory, with no key in the
/// environment and `SMALLEST_PROXY_URL` pointing at the proxy.
async fn run_block(
    program: &str,
    args: &[&str],
    file: &str,
    block: &str,
    proxy: &TestProxy,
) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file), block).unwrap();
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .arg(file)
        .current_dir(dir.path())
        .env_remove("SMALLEST_API_KEY")
        .env("SMALLEST_PROXY_URL", proxy.url(""))
        .env(
            "NODE_PATH",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/node/node_modules"),
        );
    let output = command.output().await.unwrap_or_else(|e| panic!("run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{file} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (stdout, dir)
}

fn assert_every_call_carried_the_proxys_key(stand_in: &SmallestStandIn) {
    let seen = stand_in.seen();
    assert!(!seen.is_empty());
    for request in &seen {
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {TEST_KEY}").as_str()),
            "{request:?}"
        );
    }
}

fn saw(stand_in: &SmallestStandIn, method: &str, path: &str, websocket: bool) -> bool {
    stand_in
        .seen()
        .iter()
        .any(|s| s.method == method && s.path == path && s.websocket == websocket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_example_runs_through_the_proxy_with_no_key() {
    let python = python_with("smallestai");
    let stand_in = SmallestStandIn::start(TEST_KEY).await;
    let proxy = proxy_in_front_of(&stand_in).await;
    let (stdout, dir) = run_block(&python, &[], "example.py", &readme_block("python-sdk"), &proxy).await;
    assert_eq!(
        std::fs::read(dir.path().join("hello.wav")).unwrap(),
        AUDIO,
        "synthesize_tts wrote the audio"
    );
    for expected in [
        "sse event: {\"status\":\"chunk\"",
        "live frame:",
        "complete",
        "transcript:",
        "hello from the stand-in",
        "clone:",
        "voice_standin",
        "llm: Hello!",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
    for (method, path, websocket) in [
        ("POST", "/waves/v1/tts", false),
        ("POST", "/waves/v1/tts/live", false),
        ("GET", "/waves/v1/tts/live", true),
        ("POST", "/waves/v1/stt/", false),
        ("POST", "/waves/v1/voice-cloning", false),
        ("POST", "/waves/v1/chat/completions", false),
    ] {
        assert!(
            saw(&stand_in, method, path, websocket),
            "{method} {path}: {:?}",
            stand_in.seen()
        );
    }
    assert_every_call_carried_the_proxys_key(&stand_in);
    proxy.stop().await;
}

/// `synthesize_sse_tts` itself (the README reads the stream with httpx because this SDK
/// version drops JSON-object events): the call goes through the proxy with the key and ends
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdks_own_sse_call_goes_through_the_proxy() {
    let python = python_with("smallestai");
    let stand_in = SmallestStandIn::start(TEST_KEY).await;
    let proxy = proxy_in_front_of(&stand_in).await;
    let script = r#"
import os
from smallestai import SmallestAI, SmallestAIEnvironment
proxy = os.environ["SMALLEST_PROXY_URL"]
env = SmallestAIEnvironment(waves=proxy, waves_ws=proxy.replace("http", "ws", 1), atoms=proxy, payment=proxy)
client = SmallestAI(api_key="via-proxy", environment=env)
events = list(client.waves.synthesize_sse_tts(text="Streaming hello", voice_id="emily", model="lightning_v3.1"))
print("sse call done", len(events))
"#;
    let (stdout, _dir) = run_block(&python, &[], "sse.py", script, &proxy).await;
    assert!(stdout.contains("sse call done"), "{stdout}");
    assert!(saw(&stand_in, "POST", "/waves/v1/tts/live", false));
    assert_every_call_carried_the_proxys_key(&stand_in);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_curl_calls_work_and_fail_loudly_on_an_error() {
    let stand_in = SmallestStandIn::start(TEST_KEY).await;
    let proxy = proxy_in_front_of(&stand_in).await;
    let block = readme_block("quickstart-curl").replace("http://127.0.0.1:8787", &proxy.url(""));
    let (stdout, dir) = run_block("bash", &["-euo", "pipefail"], "quickstart.sh", &block, &proxy).await;
    assert_eq!(std::fs::read(dir.path().join("hello.wav")).unwrap(), AUDIO);
    assert!(stdout.contains("hello from the stand-in"), "{stdout}");
    assert!(stdout.contains("\"status\":\"ready\""), "{stdout}");
    assert!(saw(&stand_in, "POST", "/waves/v1/pulse/get_text", false));
    assert_every_call_carried_the_proxys_key(&stand_in);
    proxy.stop().await;

    // The same commands when the key is wrong: curl exits non-zero instead of saving the error.
    let refusing = SmallestStandIn::start("sk-some-other-key").await;
    let proxy = proxy_in_front_of(&refusing).await;
    let block = readme_block("quickstart-curl").replace("http://127.0.0.1:8787", &proxy.url(""));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quickstart.sh"), block).unwrap();
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "quickstart.sh"])
        .current_dir(dir.path())
        .output()
        .expect("bash");
    assert_eq!(
        output.status.code(),
        Some(22),
        "curl --fail-with-body exits 22 on a 401"
    );
    let saved = std::fs::read_to_string(dir.path().join("hello.wav")).unwrap_or_default();
    assert!(
        saved.contains("Invalid API key"),
        "the error body is kept for reading: {saved}"
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).is_empty(),
        "the script stopped at the failing call"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_example_runs_through_the_proxy_with_no_key() {
    let modules = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/node/node_modules/ws"
    ));
    assert!(
        modules.exists(),
        "tests/clients/node/node_modules is missing: run ./scripts/test.sh (it runs npm ci there; needs node and npm)"
    );
    let stand_in = SmallestStandIn::start(TEST_KEY).await;
    let proxy = proxy_in_front_of(&stand_in).await;
    let (stdout, _dir) = run_block("node", &[], "example.js", &readme_block("node"), &proxy).await;
    for expected in [
        "sse: data:",
        "live frame: complete",
        "hello from the stand-in",
        "llm: Hello!",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
    assert!(saw(&stand_in, "GET", "/waves/v1/tts/live", true));
    assert_every_call_carried_the_proxys_key(&stand_in);
    proxy.stop().await;
}

/// The preset table's rows: (method, path, switch or None, allowed).
fn preset_table() -> Vec<(String, String, Option<String>, bool)> {
    let section = README
        .split_once("#### What the `smallest` preset allows")
        .expect("the preset table")
        .1;
    section
        .lines()
        .skip_while(|l| !l.starts_with("| SDK method"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            let path = cells[2].trim_matches('`').to_string();
            let allowed = cells[3];
            let switch = allowed
                .strip_prefix("switch `")
                .map(|s| s.trim_end_matches('`').to_string());
            (cells[1].to_string(), path, switch, allowed == "yes")
        })
        .collect()
}

#[test]
fn the_readme_preset_table_is_what_the_policy_does() {
    let rows = preset_table();
    assert!(rows.len() > 30, "{rows:?}");
    let preset = PathPolicy::from_config(&toml::from_str::<PolicyConfig>("preset = \"smallest\"").unwrap());
    for (method, path, switch, allowed) in rows {
        let concrete = path
            .replace("{request_id}", "r1")
            .replace("{voice_id}", "v1")
            .replace("...", "agent");
        let method = if method == "any" { "POST".to_string() } else { method };
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        assert_eq!(preset.check(&m, &concrete).is_ok(), allowed, "{method} {concrete}");
        if let Some(switch) = switch {
            let on = PathPolicy::from_config(
                &toml::from_str::<PolicyConfig>(&format!("preset = \"smallest\"\n{switch} = true")).unwrap(),
            );
            assert!(on.check(&m, &concrete).is_ok(), "{method} {concrete} with {switch}");
        }
    }
}

#[test]
fn every_route_of_the_installed_python_sdk_is_in_the_readme_table() {
    let python = python_with("smallestai");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/sdk_routes.py");
    let output = Command::new(python).arg(script).output().expect("run sdk_routes.py");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows = preset_table();
    let routes: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(routes.len() > 25, "{routes:?}");
    for route in routes {
        let (method, path) = (route["method"].as_str().unwrap(), route["path"].as_str().unwrap());
        let segments: Vec<&str> = path.split('/').collect();
        let listed = rows.iter().any(|(m, p, _, _)| {
            let row: Vec<&str> = p.split('/').collect();
            m == method
                && row.len() == segments.len()
                && row.iter().zip(&segments).all(|(r, s)| r == s || s.starts_with('{'))
        });
        assert!(
            listed,
            "the SDK calls {method} {path}, which README.md's preset table does not list"
        );
    }
}
