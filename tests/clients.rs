//! The proxy as apps see it through the Python clients they use (httpx, websockets), installed
//! by `scripts/test.sh` into `.venv`.

mod support;

use support::*;

fn python() -> String {
    python_with("httpx, websockets")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpx_and_websockets_clients_work_without_credentials() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/python_clients.py");
    let output = tokio::process::Command::new(python())
        .arg(script)
        .arg(proxy.url(""))
        .output()
        .await
        .expect("run python");
    assert!(
        output.status.success(),
        "python client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen = json(&output.stdout);
    assert_eq!(seen["post_status"], 200);
    assert_eq!(
        seen["post_body"],
        serde_json::json!({"text": "hi", "voice_id": "emily"})
    );
    assert_eq!(seen["connect_status"], 405);
    assert_eq!(seen["connect_code"], "METHOD_NOT_ALLOWED");
    assert_eq!(seen["ws_echo"], "hello");
    assert_eq!(seen["ws_binary"], serde_json::json!([0, 1, 2]));
    assert_eq!(seen["ws_close_code"], 4002);
    let records = upstream.records();
    assert!(records
        .iter()
        .all(|r| r.headers["authorization"] == format!("Bearer {TEST_KEY}").as_str()));
    proxy.stop().await;
}
