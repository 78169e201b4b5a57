//! `source = "vault"` against a real OpenBao dev server: AppRole with a short token TTL (so
//! renewal and re-login happen), KV v1 with JWT auth, token auth from a file, rotation under
//! load, and the source down at start and later.

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::servers::{Bao, BAO_ROOT_TOKEN};
use support::*;

const POLICY: &str = "read-smallest";

async fn allow_reading_the_key(bao: &Bao) {
    let policy = "path \"secret/data/smallest\" { capabilities = [\"read\"] }\npath \"kv1/smallest\" { capabilities = [\"read\"] }";
    bao.api(
        "PUT",
        &format!("sys/policies/acl/{POLICY}"),
        json!({ "policy": policy }),
    )
    .await;
}

/// A token limited to reading the key, written to a file (what a Vault Agent sink looks like).
async fn token_file(bao: &Bao, dir: &std::path::Path) -> std::path::PathBuf {
    allow_reading_the_key(bao).await;
    let created = bao
        .api("POST", "auth/token/create", json!({"policies": [POLICY], "ttl": "1h"}))
        .await;
    let path = dir.join("vault-token");
    std::fs::write(
        &path,
        format!("{}\n", created["auth"]["client_token"].as_str().unwrap()),
    )
    .unwrap();
    path
}

fn token_config(addr: &str, token_file: &std::path::Path, extra: &str) -> String {
    format!(
        "[key]\nsource = \"vault\"\nrefresh_interval = \"1h\"\n{extra}\n[key.vault]\naddress = \"{addr}\"\npath = \"smallest\"\n[key.vault.auth]\nmethod = \"token\"\ntoken_file = \"{}\"\n",
        token_file.display()
    )
}

fn fingerprint(key: &str) -> String {
    smallest_proxy::keys::fingerprint(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_kv2_renews_the_token_and_logs_in_again() {
    let bao = Bao::start();
    let upstream = TestUpstream::start().await;
    bao.put_kv2("smallest", "sk-vault-approle-1").await;
    allow_reading_the_key(&bao).await;
    bao.api("POST", "sys/auth/approle", json!({"type": "approle"})).await;
    // A token TTL far shorter than the test: renewal and re-login must both happen.
    bao.api(
        "POST",
        "auth/approle/role/proxy",
        json!({"token_policies": [POLICY], "token_ttl": "2s", "token_max_ttl": "5s"}),
    )
    .await;
    let role_id = bao
        .api("GET", "auth/approle/role/proxy/role-id", serde_json::Value::Null)
        .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id = bao.api("POST", "auth/approle/role/proxy/secret-id", json!({})).await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let secret_id_file = dir.path().join("secret-id");
    std::fs::write(&secret_id_file, &secret_id).unwrap();
    let config = proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        std::path::Path::new("/unused"),
        &format!(
            "[key]\nsource = \"vault\"\nrefresh_interval = \"1h\"\n[key.vault]\naddress = \"{}\"\npath = \"smallest\"\n[key.vault.auth]\nmethod = \"approle\"\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"\n",
            bao.addr,
            secret_id_file.display()
        ),
    );
    let proxy = ProxyProcess::spawn(&config, &[("RUST_LOG", "info")]);
    get(&proxy.url("/x")).await;
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        "Bearer sk-vault-approle-1"
    );

    proxy.wait_for_log("vault: token renewed", 1, Duration::from_secs(20));
    // The secret ID rotates too: the next login must read the file again, because the old
    // secret ID stops working now.
    let new_secret_id = bao.api("POST", "auth/approle/role/proxy/secret-id", json!({})).await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&secret_id_file, &new_secret_id).unwrap();
    bao.api(
        "POST",
        "auth/approle/role/proxy/secret-id/destroy",
        json!({ "secret_id": secret_id }),
    )
    .await;
    proxy.wait_for_log("vault: logged in", 2, Duration::from_secs(30));

    // The token from the fresh login reads the rotated key (SIGHUP forces the fetch).
    bao.put_kv2("smallest", "sk-vault-approle-2").await;
    proxy.signal(libc::SIGHUP);
    let want = fingerprint("sk-vault-approle-2");
    wait_ready_at(&proxy.url("/ready"), "the rotated key", |_, r| {
        r["key"]["fingerprint"] == want.as_str()
    })
    .await;
    get(&proxy.url("/x")).await;
    assert_eq!(
        upstream.records().last().unwrap().headers["authorization"],
        "Bearer sk-vault-approle-2"
    );
    let log = proxy.stderr_text();
    assert!(
        !log.contains(&secret_id) && !log.contains(&new_secret_id),
        "an AppRole secret ID was logged"
    );
    assert!(!log.contains("login failed") && !log.contains("WARN"), "{log}");
    assert!(!log.contains("sk-vault-approle"), "the key was logged");
}

#[tokio::test]
async fn kv1_with_jwt_auth() {
    let bao = Bao::start();
    let upstream = TestUpstream::start().await;
    allow_reading_the_key(&bao).await;
    bao.api(
        "POST",
        "sys/mounts/kv1",
        json!({"type": "kv", "options": {"version": "1"}}),
    )
    .await;
    bao.api("POST", "kv1/smallest", json!({"api_key": "sk-vault-kv1-jwt"}))
        .await;

    // A service-account-style JWT signed by a key whose public half Vault is given.
    let signer = rcgen::KeyPair::generate().unwrap();
    bao.api("POST", "sys/auth/jwt", json!({"type": "jwt"})).await;
    bao.api(
        "POST",
        "auth/jwt/config",
        json!({"jwt_validation_pubkeys": [signer.public_key_pem()], "bound_issuer": "https://kubernetes.default.svc.cluster.local"}),
    )
    .await;
    bao.api(
        "POST",
        "auth/jwt/role/proxy",
        json!({"role_type": "jwt", "user_claim": "sub", "bound_audiences": ["smallest-proxy"], "token_policies": [POLICY], "token_ttl": "1h"}),
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:apps:tts-app",
        "aud": ["smallest-proxy"],
        "iat": now, "nbf": now - 5, "exp": now + 600,
        "kubernetes.io": {"namespace": "apps", "serviceaccount": {"name": "tts-app"}}
    });
    let key = jsonwebtoken::EncodingKey::from_ec_pem(signer.serialize_pem().as_bytes()).unwrap();
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &key,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwt_file = dir.path().join("token");
    std::fs::write(&jwt_file, &jwt).unwrap();

    let proxy = TestProxy::start(
        &upstream,
        &format!(
            "[key]\nsource = \"vault\"\n[key.vault]\naddress = \"{}\"\nmount = \"kv1\"\npath = \"smallest\"\nkv_version = 1\n[key.vault.auth]\nmethod = \"jwt\"\nrole = \"proxy\"\njwt_file = \"{}\"\n",
            bao.addr,
            jwt_file.display()
        ),
    )
    .await;
    let (status, _, _) = get(&proxy.url("/x")).await;
    assert_eq!(status, 200);
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        "Bearer sk-vault-kv1-jwt"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_from_a_file_logs_no_token_or_key_at_trace_level() {
    let bao = Bao::start();
    let upstream = TestUpstream::start().await;
    bao.put_kv2("smallest", "sk-vault-token-file").await;
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(&bao, dir.path()).await;
    let token_value = std::fs::read_to_string(&token).unwrap().trim().to_string();
    let config = proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        std::path::Path::new("/unused"),
        &token_config(&bao.addr, &token, ""),
    );
    let proxy = ProxyProcess::spawn(&config, &[("RUST_LOG", "trace")]);
    let ready = wait_ready_at(&proxy.url("/ready"), "ready", |s, _| s == 200).await;
    assert_eq!(ready["key"]["source"], "vault");
    assert_eq!(ready["key"]["fingerprint"], fingerprint("sk-vault-token-file"));
    get(&proxy.url("/x")).await;
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        "Bearer sk-vault-token-file"
    );
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("reload requested", 1, Duration::from_secs(10));
    wait_ready_at(&proxy.url("/ready"), "a second fetch", |_, r| {
        r["key"]["age_seconds"].is_u64()
    })
    .await;
    let log = proxy.stderr_text();
    assert!(log.contains("TRACE"), "not a trace-level log");
    assert!(!log.contains(&token_value), "the Vault token appears in the log");
    assert!(!log.contains("sk-vault-token-file"), "the key appears in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_no_request() {
    let bao = Bao::start();
    let upstream = TestUpstream::start().await;
    bao.put_kv2("smallest", "sk-vault-rot-0").await;
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(&bao, dir.path()).await;
    let proxy = TestProxy::start(&upstream, &token_config(&bao.addr, &token, "")).await;
    rotation::rotate_under_load(&proxy.url(""), &upstream, "sk-vault-rot-0", |key| {
        let bao = &bao;
        async move { bao.put_kv2("smallest", &key).await }
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn source_down_at_start_answers_key_unavailable_then_becomes_ready() {
    let upstream = TestUpstream::start().await;
    let port = support::servers::free_port();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("vault-token");
    std::fs::write(&token, BAO_ROOT_TOKEN).unwrap();
    let started = Instant::now();
    let proxy = TestProxy::start(
        &upstream,
        &token_config(&format!("http://127.0.0.1:{port}"), &token, ""),
    )
    .await;
    let (status, _, body) = get(&proxy.url("/waves/v1/lightning-v2/get_speech")).await;
    assert_eq!(status, 503);
    assert_eq!(json(&body)["code"], "KEY_UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "KEY_UNAVAILABLE took {:?}",
        started.elapsed()
    );
    let (status, ready) = proxy.ready().await;
    assert_eq!(status, 503);
    assert!(
        ready["key"]["last_error"].as_str().unwrap().contains("unreachable"),
        "{ready}"
    );
    assert!(upstream.records().is_empty(), "nothing is forwarded without a key");

    let bao = Bao::start_on(port);
    bao.put_kv2("smallest", "sk-vault-late").await;
    proxy
        .wait_ready("the source coming up", |status, _| status == 200)
        .await;
    get(&proxy.url("/x")).await;
    assert_eq!(upstream.records()[0].headers["authorization"], "Bearer sk-vault-late");
    proxy.stop().await;
}

#[tokio::test]
async fn source_down_later_keeps_serving_the_last_key() {
    let mut bao = Bao::start();
    let upstream = TestUpstream::start().await;
    bao.put_kv2("smallest", "sk-vault-last-good").await;
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(&bao, dir.path()).await;
    let config = token_config(&bao.addr, &token, "").replace("refresh_interval = \"1h\"", "refresh_interval = \"1s\"");
    let proxy = TestProxy::start(&upstream, &config).await;
    bao.stop();
    let ready = proxy
        .wait_ready("a failed refresh", |status, r| {
            status == 200 && r["key"]["refresh_errors"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(ready["key"]["fingerprint"], fingerprint("sk-vault-last-good"));
    let (status, _, _) = get(&proxy.url("/x")).await;
    assert_eq!(status, 200);
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        "Bearer sk-vault-last-good"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_value_with_cr_lf_is_rejected_and_the_last_key_kept() {
    let bao = Bao::start();
    let upstream = TestUpstream::start().await;
    bao.put_kv2("smallest", "sk-vault-good").await;
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(&bao, dir.path()).await;
    let config = token_config(&bao.addr, &token, "").replace("refresh_interval = \"1h\"", "refresh_interval = \"1s\"");
    let proxy = TestProxy::start(&upstream, &config).await;
    bao.put_kv2("smallest", "sk-evil\r\nX-Injected: yes").await;
    let ready = proxy
        .wait_ready("the rejection", |_, r| r["key"]["refresh_errors"].as_u64() >= Some(1))
        .await;
    assert!(
        ready["key"]["last_error"].as_str().unwrap().contains("line break"),
        "{ready}"
    );
    get(&proxy.url("/x")).await;
    let record = upstream.records().pop().unwrap();
    assert_eq!(record.headers["authorization"], "Bearer sk-vault-good");
    assert!(!record.headers.contains_key("x-injected"));
    proxy.stop().await;
}

#[tokio::test]
async fn namespace_selects_the_secret() {
    let bao = Bao::start();
    let upstream = TestUpstream::start().await;
    bao.put_kv2("smallest", "sk-root-namespace").await;
    bao.api("POST", "sys/namespaces/team-a", json!({})).await;
    bao.api_in(
        Some("team-a"),
        "POST",
        "sys/mounts/secret",
        json!({"type": "kv", "options": {"version": "2"}}),
    )
    .await;
    bao.api_in(
        Some("team-a"),
        "POST",
        "secret/data/smallest",
        json!({"data": {"api_key": "sk-team-a"}}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("vault-token");
    std::fs::write(&token, BAO_ROOT_TOKEN).unwrap();
    let config = token_config(&bao.addr, &token, "")
        .replace("path = \"smallest\"", "path = \"smallest\"\nnamespace = \"team-a\"");
    let proxy = TestProxy::start(&upstream, &config).await;
    get(&proxy.url("/x")).await;
    assert_eq!(upstream.records()[0].headers["authorization"], "Bearer sk-team-a");
    proxy.stop().await;
}
