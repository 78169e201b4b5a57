//! A key the upstream refuses is obvious: one WARN per fingerprint naming the source and what
//! to do, `/ready` 503 `key_rejected` with the count, `upstream_auth_failures_total{status}`;
//! a self-hosted server's `403 LICENSE_EXPIRED` (and quota answers) WARNed with `expires_at`
//! and shown in `/ready`; the state ends when a different key arrives or the key is accepted.

mod support;

use std::time::Duration;
use support::*;

async fn post(url: &str) -> (http::StatusCode, bytes::Bytes) {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"{\"text\":\"hi\"}",
        )))
        .unwrap();
    let (status, _, body) = send(req).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_turns_ready_red_counts_and_clears_when_a_new_key_arrives() {
    let upstream = TestUpstream::start().await;
    *upstream.state.accepted_key.lock().await = Some("sk-the-right-one".into());
    let proxy = TestProxy::start(&upstream, "").await;
    let (status, ready) = proxy.ready().await;
    assert_eq!((status.as_u16(), ready["status"].as_str()), (200, Some("ready")));

    for _ in 0..3 {
        let (status, body) = post(&proxy.url("/waves/v1/tts")).await;
        assert_eq!(status, 401, "the upstream's own answer reaches the app");
        assert!(String::from_utf8_lossy(&body).contains("Invalid API key"));
    }
    let (status, ready) = proxy.ready().await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "key_rejected");
    assert_eq!(ready["rejections"], 3);
    assert_eq!(
        ready["key"]["rejected"]["fingerprint"],
        smallest_proxy::keys::fingerprint(TEST_KEY)
    );
    assert!(ready["error"].as_str().unwrap().contains("file source"), "{ready}");
    assert_eq!(
        metric(
            &proxy.url(""),
            "smallest_proxy_upstream_auth_failures_total{status=\"401\"}"
        )
        .await,
        3.0
    );
    // Each 401 made the proxy re-read the source, which still held the same key: nothing to
    // resend with, so one attempt each.
    assert_eq!(upstream.records().len(), 3);

    // A valid key in the source ends the state.
    std::fs::write(&proxy.key_file, "sk-the-right-one\n").unwrap();
    proxy
        .wait_ready("ready after the new key", |s, b| s == 200 && b["status"] == "ready")
        .await;
    let (status, _) = post(&proxy.url("/waves/v1/tts")).await;
    assert_eq!(status, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_accepted_again_clears_the_state() {
    let upstream = TestUpstream::start().await;
    *upstream.state.accepted_key.lock().await = Some("sk-other".into());
    let proxy = TestProxy::start(&upstream, "").await;
    assert_eq!(post(&proxy.url("/waves/v1/tts")).await.0, 401);
    assert_eq!(proxy.ready().await.1["status"], "key_rejected");
    // The account re-enables the same key (say, after a billing fix): its next success ends it.
    *upstream.state.accepted_key.lock().await = Some(TEST_KEY.into());
    assert_eq!(post(&proxy.url("/waves/v1/tts")).await.0, 200);
    let (status, ready) = proxy.ready().await;
    assert_eq!(
        (status.as_u16(), ready["status"].as_str()),
        (200, Some("ready")),
        "{ready}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_hosted_license_or_quota_refusal_shows_in_ready() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[auth]\nscheme = \"Bearer\"\n").await;
    let (status, body) = post(&proxy.url("/license-expired")).await;
    assert_eq!(status, 403);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["code"],
        "LICENSE_EXPIRED",
        "the body reaches the app unchanged"
    );
    let (status, ready) = proxy.ready().await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "license_expired");
    assert_eq!(ready["key"]["rejected"]["expires_at"], "2026-01-31T00:00:00Z");
    assert!(ready["error"].as_str().unwrap().contains("2026-01-31T00:00:00Z"));

    assert_eq!(post(&proxy.url("/quota-exceeded")).await.0, 403);
    assert_eq!(proxy.ready().await.1["status"], "quota_exceeded");
    // A 403 about one endpoint is counted but is not about the account.
    assert_eq!(post(&proxy.url("/status/403")).await.0, 403);
    assert_eq!(
        metric(
            &proxy.url(""),
            "smallest_proxy_upstream_auth_failures_total{status=\"403\"}"
        )
        .await,
        3.0
    );
    // A success ends it.
    assert_eq!(post(&proxy.url("/waves/v1/tts")).await.0, 200);
    assert_eq!(proxy.ready().await.0, 200);
    proxy.stop().await;
}

/// The binary: one WARN per fingerprint, naming the source and the file to fix, never the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_warning_per_fingerprint_naming_source_and_remedy() {
    let upstream = TestUpstream::start().await;
    *upstream.state.accepted_key.lock().await = Some("sk-other".into());
    let (dir, key) = key_dir();
    let config = proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key, "");
    let proxy = ProxyProcess::spawn(&config, &[]);
    for _ in 0..4 {
        assert_eq!(post(&proxy.url("/waves/v1/tts")).await.0, 401);
    }
    let fingerprint = smallest_proxy::keys::fingerprint(TEST_KEY);
    proxy.wait_for_log("the upstream rejects the API key", 1, Duration::from_secs(10));
    let log = proxy.stderr_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the upstream rejects the API key"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    let line = warnings[0];
    assert!(line.contains("WARN") && line.contains(&fingerprint), "{line}");
    assert!(
        line.contains("source=\"file\"") || line.contains("source=file"),
        "{line}"
    );
    assert!(
        line.contains(&key.display().to_string()),
        "names the file to fix: {line}"
    );
    assert!(!log.contains(TEST_KEY), "the key never reaches the log");
    drop(dir);
}

/// Start-up with an unusable key says which rule it broke and that nothing is served until a
/// valid key arrives, without claiming a "last good key" it does not have.
#[test]
fn an_unusable_key_at_start_names_the_rule_and_claims_no_last_good_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sk-with\ta-tab\n").unwrap();
    let config = proxy_config_text("https://127.0.0.1:9", std::path::Path::new("/dev/null"), &key, "");
    let config = config.replace("ca_file = \"/dev/null\"\n", "");
    let proxy = ProxyProcess::spawn(&config, &[]);
    proxy.wait_for_log("the value contains a tab", 1, Duration::from_secs(10));
    let log = proxy.stderr_text();
    assert!(log.contains("nothing is served"), "{log}");
    assert!(!log.contains("last good key"), "{log}");
    assert!(!log.contains("sk-with"), "the key never reaches the log");
}

#[test]
fn a_missing_key_file_says_not_found_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("absent-key");
    let config = proxy_config_text("https://127.0.0.1:9", std::path::Path::new("/dev/null"), &key, "");
    let config = config.replace("ca_file = \"/dev/null\"\n", "");
    let proxy = ProxyProcess::spawn(&config, &[]);
    proxy.wait_for_log(&format!("not found: {}", key.display()), 1, Duration::from_secs(10));
    assert!(!proxy.stderr_text().contains("has not answered"));
}

/// The binary: a self-hosted licence refusal is one WARN with the code and `expires_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_license_refusal_is_warned_once_with_expires_at() {
    let upstream = TestUpstream::start().await;
    let (_dir, key) = key_dir();
    let config = proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key, "");
    let proxy = ProxyProcess::spawn(&config, &[]);
    for _ in 0..3 {
        assert_eq!(post(&proxy.url("/license-expired")).await.0, 403);
    }
    proxy.wait_for_log("LICENSE_EXPIRED", 1, Duration::from_secs(10));
    let log = proxy.stderr_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("LICENSE_EXPIRED")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("2026-01-31T00:00:00Z"),
        "{}",
        warnings[0]
    );
}
