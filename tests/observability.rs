//! What operators read: `/metrics` parsed by the reference Prometheus parser (Python
//! `prometheus_client`, strict OpenMetrics), the JSON access line, and the `[admin] address`.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

fn python_with_prometheus_client() -> String {
    python_with("prometheus_client.openmetrics.parser")
}

/// `/metrics` at `base`, through the strict OpenMetrics parser: every sample.
async fn parsed_metrics(base: &str) -> Vec<serde_json::Value> {
    let (status, headers, body) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(headers[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/parse_metrics.py");
    let mut child = tokio::process::Command::new(python_with_prometheus_client())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&body).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser rejected /metrics:\n{}\n--- /metrics ---\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice::<serde_json::Value>(&output.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The value of the sample `name` whose labels include all of `labels`; `None` when absent.
fn sample(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

const TTS_CLASS: &str = r#"
[[limits.class]]
name = "tts"
paths = ["/waves/v1/lightning"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_openmetrics_and_count_requests_bytes_and_latency_by_class() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key_file(&dir), TTS_CLASS);
    let proxy = ProxyProcess::spawn(&config, &[]);
    let body = vec![b'a'; 1000];
    for _ in 0..3 {
        let request = Request::post(proxy.url("/echo"))
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let (status, _, echoed) = send(request).await;
        assert_eq!((status.as_u16(), echoed.len()), (200, 1000));
    }
    assert_eq!(get(&proxy.url("/status/404")).await.0, 404);
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/waves/v1/lightning/get_voices?q=1")).await.0, 200);
    }
    // Admin endpoints are not API traffic: not counted.
    assert_eq!(get(&proxy.url("/health")).await.0, 200);
    // A request is counted when its response body has ended, which can be a moment after the
    // client has read it: wait for the last one, then read everything at once.
    let base = proxy.url("");
    wait_metric(
        &base,
        "smallest_proxy_requests_total{class=\"tts\",app=\"default\",status=\"200\"}",
        |v| v >= 2.0,
    )
    .await;
    wait_metric(
        &base,
        "smallest_proxy_requests_total{class=\"default\",app=\"default\",status=\"404\"}",
        |v| v >= 1.0,
    )
    .await;
    wait_metric(
        &base,
        "smallest_proxy_requests_total{class=\"default\",app=\"default\",status=\"200\"}",
        |v| v >= 3.0,
    )
    .await;
    let samples = parsed_metrics(&base).await;
    let requests = |class, status| {
        sample(
            &samples,
            "smallest_proxy_requests_total",
            &[("class", class), ("status", status)],
        )
    };
    assert_eq!(requests("default", "200"), Some(3.0));
    assert_eq!(requests("default", "404"), Some(1.0));
    assert_eq!(requests("tts", "200"), Some(2.0));
    let total: f64 = samples
        .iter()
        .filter(|s| s["name"] == "smallest_proxy_requests_total")
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    assert_eq!(total, 6.0, "only the six API requests are counted");
    let by_class = |name, class| sample(&samples, name, &[("class", class)]);
    assert_eq!(by_class("smallest_proxy_request_bytes_total", "default"), Some(3000.0));
    // Three echoes of 1000 bytes and the 404's JSON body.
    let not_found_body = r#"{"upstream_status":404}"#.len() as f64;
    assert_eq!(
        by_class("smallest_proxy_response_bytes_total", "default"),
        Some(3000.0 + not_found_body)
    );
    assert_eq!(
        by_class("smallest_proxy_request_duration_seconds_count", "default"),
        Some(4.0)
    );
    assert_eq!(
        by_class("smallest_proxy_upstream_latency_seconds_count", "default"),
        Some(4.0)
    );
    assert_eq!(
        by_class("smallest_proxy_upstream_latency_seconds_count", "tts"),
        Some(2.0)
    );
    let duration_sum = by_class("smallest_proxy_request_duration_seconds_sum", "default").unwrap();
    let upstream_sum = by_class("smallest_proxy_upstream_latency_seconds_sum", "default").unwrap();
    assert!(
        duration_sum >= upstream_sum && upstream_sum > 0.0,
        "the whole request includes the upstream's part: {duration_sum} vs {upstream_sum}"
    );
    assert_eq!(sample(&samples, "smallest_proxy_key_rotations_total", &[]), Some(0.0));
    assert_eq!(
        sample(&samples, "smallest_proxy_key_refresh_errors_total", &[]),
        Some(0.0)
    );
    let age = sample(&samples, "smallest_proxy_key_age_seconds", &[]).expect("key age");
    assert!((0.0..600.0).contains(&age), "{age}");
    for result in ["success", "failure"] {
        assert_eq!(
            sample(&samples, "smallest_proxy_config_reloads_total", &[("result", result)]),
            Some(0.0)
        );
    }
    // The limit families are still there.
    assert_eq!(
        sample(&samples, "smallest_proxy_limit_admitted_total", &[("class", "tts")]),
        Some(2.0)
    );
    // No label value is a path, a query or the key.
    for s in &samples {
        let labels = s["labels"].to_string();
        assert!(!labels.contains('/') && !labels.contains(TEST_KEY), "{labels}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_is_counted() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(&dir);
    let proxy = ProxyProcess::spawn(
        &proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key, ""),
        &[],
    );
    std::fs::write(&key, "sk-test-rotated-Key-0002").unwrap();
    // The file watcher (or SIGHUP's forced refresh) picks the new key up.
    proxy.signal(libc::SIGHUP);
    wait_metric(&proxy.url(""), "smallest_proxy_key_rotations_total", |v| v == 1.0).await;
    let samples = parsed_metrics(&proxy.url("")).await;
    assert_eq!(sample(&samples, "smallest_proxy_key_rotations_total", &[]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_are_json_with_every_field_and_never_the_query_a_header_or_the_key() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        &key_file(&dir),
        &format!("{TTS_CLASS}\n[log]\nformat = \"json\"\n"),
    );
    let mut proxy = ProxyProcess::spawn(&config, &[]);
    let request = Request::post(proxy.url("/waves/v1/lightning/get_speech?token=QUERYSECRET"))
        .header("x-request-id", "access-test-1")
        .header("x-custom", "HEADERSECRET")
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    let (status, _, body) = send(request).await;
    assert_eq!((status.as_u16(), body.len()), (200, 10));
    // A proxy-made answer is logged too.
    let request = Request::get(proxy.url("/x"))
        .header("host", "evil.example")
        .header("x-request-id", "access-test-2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(request).await.0, 421);
    proxy.wait_for_log("access-test-1", 1, std::time::Duration::from_secs(10));
    proxy.wait_for_log("access-test-2", 1, std::time::Duration::from_secs(10));

    let access: Vec<serde_json::Value> = proxy
        .stderr_text()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|l| l["target"] == "smallest_proxy::access")
        .collect();
    assert_eq!(access.len(), 2, "one line per API request, none for probes: {access:?}");
    let line = access
        .iter()
        .find(|l| l["fields"]["request_id"] == "access-test-1")
        .unwrap();
    let fields = &line["fields"];
    assert_eq!(line["level"], "INFO");
    assert_eq!(fields["message"], "access");
    assert_eq!(fields["method"], "POST");
    assert_eq!(fields["path"], "/waves/v1/lightning/get_speech");
    assert_eq!(fields["status"], 200);
    assert_eq!(fields["class"], "tts");
    assert_eq!(fields["bytes_in"], 10);
    assert_eq!(fields["bytes_out"], 10);
    assert_eq!(fields["outcome"], "complete");
    assert_eq!(fields["app"], "default");
    for timing in ["duration_ms", "queue_wait_ms", "upstream_ms"] {
        let ms = fields[timing]
            .as_f64()
            .unwrap_or_else(|| panic!("{timing} missing: {line}"));
        assert!((0.0..60_000.0).contains(&ms), "{timing} = {ms}");
    }
    assert!(fields["duration_ms"].as_f64() >= fields["upstream_ms"].as_f64());
    let refused = access
        .iter()
        .find(|l| l["fields"]["request_id"] == "access-test-2")
        .unwrap();
    assert_eq!(refused["fields"]["status"], 421);
    assert_eq!(refused["fields"]["class"], "default");
    assert!(
        refused["fields"].get("upstream_ms").is_none(),
        "never reached the upstream: {refused}"
    );

    // `[log] access = false`, applied by a reload: the next request has no line.
    let quiet = config.replace("format = \"json\"", "format = \"json\"\naccess = false");
    std::fs::write(proxy.config_path(), quiet).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("config reloaded", 1, std::time::Duration::from_secs(10));
    let request = Request::get(proxy.url("/echo"))
        .header("x-request-id", "access-test-3")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(request).await.0, 200);
    // Stop and read the whole log: any line for the request was written before "stopped".
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.child.wait().unwrap().code(), Some(0));
    proxy.wait_for_log("smallest-proxy stopped", 1, std::time::Duration::from_secs(10));
    let log = proxy.stderr_text();
    assert!(!log.contains("access-test-3"), "access = false still logged:\n{log}");
    for secret in ["QUERYSECRET", "HEADERSECRET", TEST_KEY] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_address_serves_metrics_health_and_ready_and_the_main_port_no_metrics() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin_port = support::servers::free_port();
    let config = proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        &key_file(&dir),
        &format!("[admin]\naddress = \"127.0.0.1:{admin_port}\"\n"),
    );
    let proxy = ProxyProcess::spawn(&config, &[]);
    let admin = format!("http://127.0.0.1:{admin_port}");
    assert_eq!(get(&proxy.url("/echo")).await.0, 200);
    wait_metric(
        &admin,
        "smallest_proxy_requests_total{class=\"default\",app=\"default\",status=\"200\"}",
        |v| v == 1.0,
    )
    .await;
    let samples = parsed_metrics(&admin).await;
    assert_eq!(
        sample(
            &samples,
            "smallest_proxy_requests_total",
            &[("class", "default"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(get(&format!("{admin}/health")).await.0, 200);
    let (status, _, body) = get(&format!("{admin}/ready")).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["status"], "ready");
    // Nothing is forwarded from the admin address.
    let (status, _, body) = get(&format!("{admin}/waves/v1/lightning/get_voices")).await;
    assert_eq!(status, 404);
    assert_eq!(json(&body)["code"], "NOT_FOUND");
    // The main port: probes yes, metrics no (and never forwarded upstream).
    assert_eq!(get(&proxy.url("/health")).await.0, 200);
    assert_eq!(get(&proxy.url("/ready")).await.0, 200);
    let (status, _, body) = get(&proxy.url("/metrics")).await;
    assert_eq!(status, 404);
    assert_eq!(json(&body)["code"], "NOT_FOUND");
    assert!(upstream.records().iter().all(|r| r.uri.path() == "/echo"));
}

/// The caller's uid on the Unix socket (SO_PEERCRED) shows in its access line and in
/// `unix_caller_requests_total`; a TCP caller has no uid. The client is the real curl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_callers_uid_is_in_its_access_line_and_the_metrics() {
    let curl = servers::tool("curl", "apt-get install curl (./scripts/test.sh does)");
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let config = proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        &key_file(&dir),
        &format!(
            "[listen]\nunix_socket = \"{}\"\n[log]\nformat = \"json\"\n",
            socket.display()
        ),
    );
    let proxy = ProxyProcess::spawn(&config, &[]);
    let output = std::process::Command::new(curl)
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket"])
        .arg(&socket)
        .args(["-H", "x-request-id: uid-test-unix", "http://localhost/echo"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200", "{output:?}");
    let request = Request::get(proxy.url("/echo"))
        .header("x-request-id", "uid-test-tcp")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(request).await.0, 200);
    proxy.wait_for_log("uid-test-unix", 1, std::time::Duration::from_secs(10));
    proxy.wait_for_log("uid-test-tcp", 1, std::time::Duration::from_secs(10));

    let uid = unsafe { libc::getuid() };
    let access: Vec<serde_json::Value> = proxy
        .stderr_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "smallest_proxy::access")
        .collect();
    let line = |id: &str| {
        access
            .iter()
            .find(|l| l["fields"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}: {access:?}"))
            .clone()
    };
    assert_eq!(line("uid-test-unix")["fields"]["uid"], uid);
    assert!(line("uid-test-tcp")["fields"].get("uid").is_none());
    let samples = parsed_metrics(&proxy.url("")).await;
    assert_eq!(
        sample(
            &samples,
            "smallest_proxy_unix_caller_requests_total",
            &[("uid", &uid.to_string())]
        ),
        Some(1.0)
    );
}
