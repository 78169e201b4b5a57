//! `source = "aws"` against a real moto server (AWS Secrets Manager): a JSON secret read with
//! `json_key`, a plain string secret, and rotation by `put_secret_value` under load. The proxy
//! runs as its own process so the standard credential chain reads its own environment.

mod support;

use support::servers::Moto;
use support::*;

/// A distinctive fake secret access key, so the log sweep can look for it.
const AWS_SECRET: &str = "aws-secret-Hn3kQ9vXw2LpTz7R";

fn aws_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", AWS_SECRET),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials"),
    ]
}

fn aws_config(upstream: &TestUpstream, moto: &Moto, aws_section: &str) -> String {
    proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        std::path::Path::new("/unused"),
        &format!(
            "[key]\nsource = \"aws\"\nrefresh_interval = \"1h\"\n[key.aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n{aws_section}\n[log]\nlevel = \"trace\"\n",
            moto.url
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_plain_secrets_are_read_and_nothing_secret_is_logged() {
    let moto = Moto::start();
    let upstream = TestUpstream::start().await;
    let sm = moto.client();
    sm.create_secret()
        .name("smallest/api-key")
        .secret_string(r#"{"api_key":"sk-aws-json","note":"not this one"}"#)
        .send()
        .await
        .unwrap();
    sm.create_secret()
        .name("smallest/plain")
        .secret_string("sk-aws-plain")
        .send()
        .await
        .unwrap();

    let proxy = ProxyProcess::spawn(
        &aws_config(
            &upstream,
            &moto,
            "secret_id = \"smallest/api-key\"\njson_key = \"api_key\"",
        ),
        &aws_env(),
    );
    let (status, _, _) = get(&proxy.url("/x")).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.records()[0].headers["authorization"], "Bearer sk-aws-json");
    let ready = wait_ready_at(&proxy.url("/ready"), "ready", |s, _| s == 200).await;
    assert_eq!(ready["key"]["source"], "aws");

    let plain = ProxyProcess::spawn(
        &aws_config(&upstream, &moto, "secret_id = \"smallest/plain\""),
        &aws_env(),
    );
    get(&plain.url("/x")).await;
    assert_eq!(upstream.records()[1].headers["authorization"], "Bearer sk-aws-plain");

    // Both ran at trace level, SDK internals included.
    for log in [proxy.stderr_text(), plain.stderr_text()] {
        assert!(log.contains("TRACE"), "not a trace-level log");
        for secret in ["sk-aws-json", "sk-aws-plain", AWS_SECRET] {
            assert!(!log.contains(secret), "{secret} appears in the log");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_put_secret_value_under_load_loses_no_request() {
    let moto = Moto::start();
    let upstream = TestUpstream::start().await;
    let sm = moto.client();
    sm.create_secret()
        .name("smallest/rotating")
        .secret_string(r#"{"api_key":"sk-aws-rot-0"}"#)
        .send()
        .await
        .unwrap();
    let config = aws_config(
        &upstream,
        &moto,
        "secret_id = \"smallest/rotating\"\njson_key = \"api_key\"",
    )
    .replace("level = \"trace\"", "level = \"info\"");
    let proxy = ProxyProcess::spawn(&config, &aws_env());
    rotation::rotate_under_load(&proxy.url(""), &upstream, "sk-aws-rot-0", |key| {
        let sm = sm.clone();
        async move {
            sm.put_secret_value()
                .secret_id("smallest/rotating")
                .secret_string(format!(r#"{{"api_key":"{key}"}}"#))
                .send()
                .await
                .unwrap();
        }
    })
    .await;
    proxy.wait_for_log(
        "API key rotated",
        rotation::ROTATIONS,
        std::time::Duration::from_secs(5),
    );
}
