//! `source = "file"`: rotation under load, the Kubernetes `..data` symlink swap, editors that
//! replace the file, a file that appears after start, and a bad value rejected.

mod support;

use std::path::Path;
use support::*;

/// Replace `path` atomically, the way secret managers and careful tools do.
fn write_atomically(path: &Path, value: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{value}\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn fingerprint(key: &str) -> String {
    smallest_proxy::keys::fingerprint(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_no_request() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let key_file = proxy.key_file.clone();
    rotation::rotate_under_load(&proxy.url(""), &upstream, TEST_KEY, |key| {
        let key_file = key_file.clone();
        async move { write_atomically(&key_file, &key) }
    })
    .await;
    let (_, ready) = proxy.ready().await;
    assert_eq!(ready["key"]["rotations"], rotation::ROTATIONS);
    proxy.stop().await;
}

#[tokio::test]
async fn kubernetes_data_symlink_swap_is_picked_up() {
    let upstream = TestUpstream::start().await;
    // The layout kubelet makes for a secret volume:
    //   api-key -> ..data/api-key, ..data -> ..2026_11_22_v1/, ..2026_11_22_v1/api-key
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("..2026_11_22_v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("api-key"), "sk-k8s-one\n").unwrap();
    std::os::unix::fs::symlink("..2026_11_22_v1", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/api-key", dir.path().join("api-key")).unwrap();
    let proxy = TestProxy::start(
        &upstream,
        &format!("[key]\nfile = \"{}\"\n", dir.path().join("api-key").display()),
    )
    .await;
    let (_, ready) = proxy.ready().await;
    assert_eq!(ready["key"]["fingerprint"], fingerprint("sk-k8s-one"));

    // kubelet's update: a new timestamped dir, a temporary link, renamed over ..data.
    let v2 = dir.path().join("..2026_11_22_v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("api-key"), "sk-k8s-two\n").unwrap();
    std::os::unix::fs::symlink("..2026_11_22_v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    let want = fingerprint("sk-k8s-two");
    proxy
        .wait_ready("the swapped key", |_, r| r["key"]["fingerprint"] == want.as_str())
        .await;
    get(&proxy.url("/x")).await;
    assert_eq!(
        upstream.records().last().unwrap().headers["authorization"],
        "Bearer sk-k8s-two"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_editor_replacing_the_file_is_picked_up() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    // vim-style save: write a new file, rename it over the old one.
    write_atomically(&proxy.key_file, "sk-edited");
    let want = fingerprint("sk-edited");
    proxy
        .wait_ready("the edited key", |_, r| r["key"]["fingerprint"] == want.as_str())
        .await;
    // And an in-place rewrite (echo > file).
    std::fs::write(&proxy.key_file, "sk-rewritten\n").unwrap();
    let want = fingerprint("sk-rewritten");
    proxy
        .wait_ready("the rewritten key", |_, r| r["key"]["fingerprint"] == want.as_str())
        .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_file_that_appears_after_start_makes_the_proxy_ready() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-key");
    let proxy = TestProxy::start(&upstream, &format!("[key]\nfile = \"{}\"\n", path.display())).await;
    let (status, body) = proxy.ready().await;
    assert_eq!(status, 503);
    assert!(
        body["key"]["last_error"].as_str().unwrap().contains("api-key"),
        "{body}"
    );
    let (status, _, body) = get(&proxy.url("/x")).await;
    assert_eq!(status, 503);
    assert_eq!(json(&body)["code"], "KEY_UNAVAILABLE");
    write_atomically(&path, "sk-late");
    proxy.wait_ready("the late key", |s, _| s == 200).await;
    let (status, _, _) = get(&proxy.url("/x")).await;
    assert_eq!(status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_value_with_cr_lf_is_rejected_and_the_last_key_kept() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    write_atomically(&proxy.key_file, "sk-evil\r\nX-Injected: yes");
    let body = proxy
        .wait_ready("the rejection", |_, r| r["key"]["refresh_errors"].as_u64() >= Some(1))
        .await;
    assert!(
        body["key"]["last_error"].as_str().unwrap().contains("line break"),
        "{body}"
    );
    assert_eq!(body["key"]["fingerprint"], fingerprint(TEST_KEY), "{body}");
    get(&proxy.url("/x")).await;
    let record = upstream.records().pop().unwrap();
    assert_eq!(record.headers["authorization"], format!("Bearer {TEST_KEY}").as_str());
    assert!(!record.headers.contains_key("x-injected"));
    proxy.stop().await;
}

#[tokio::test]
async fn an_open_websocket_keeps_its_key_and_new_requests_get_the_new_one() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/waves/v1/tts/live", proxy.addr))
        .await
        .unwrap();
    write_atomically(&proxy.key_file, "sk-after-rotation");
    let want = fingerprint("sk-after-rotation");
    proxy
        .wait_ready("the rotated key", |_, r| r["key"]["fingerprint"] == want.as_str())
        .await;
    // The tunnel opened with the old key goes on working.
    ws.send(Message::Text("still here".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("still here".into()));
    let (mut second, _) = tokio_tungstenite::connect_async(format!("ws://{}/waves/v1/tts/live", proxy.addr))
        .await
        .unwrap();
    second.send(Message::Text("new".into())).await.unwrap();
    second.next().await.unwrap().unwrap();
    let handshakes = upstream.state.websocket_handshakes.lock().unwrap().clone();
    assert_eq!(handshakes[0]["authorization"], format!("Bearer {TEST_KEY}").as_str());
    assert_eq!(handshakes[1]["authorization"], "Bearer sk-after-rotation");
    // Hang up first: the drain waits for open tunnels (up to drain_timeout).
    drop((ws, second));
    proxy.stop().await;
}

/// The key is taken when a request is sent, not when it arrives: one that waited in the queue
/// across a rotation goes out once, with the new key (no 401 and resend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_across_a_rotation_goes_out_with_the_new_key() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(
        &upstream,
        "[[limits.class]]\nname = \"held\"\npaths = [\"/hang\", \"/waves/v1/lightning\"]\nmax_concurrent = 1\n",
    )
    .await;
    *upstream.state.accepted_key.lock().await = Some(TEST_KEY.to_string());
    let held = tokio::spawn(get_owned(proxy.url("/hang")));
    upstream.state.wait_arrivals(1).await;
    let queued = {
        let url = proxy.url("/waves/v1/lightning-v2/get_speech?queued=1");
        tokio::spawn(async move {
            let request = http::Request::post(url)
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"{\"text\":\"hi\"}",
                )))
                .unwrap();
            send(request).await
        })
    };
    wait_metric(
        &proxy.url(""),
        "smallest_proxy_limit_queue_depth{class=\"held\"}",
        |d| d == 1.0,
    )
    .await;
    {
        let mut accepted = upstream.state.accepted_key.lock().await;
        write_atomically(&proxy.key_file, "sk-rotated-while-queued");
        *accepted = Some("sk-rotated-while-queued".into());
    }
    let want = fingerprint("sk-rotated-while-queued");
    proxy
        .wait_ready("the rotated key", |_, r| r["key"]["fingerprint"] == want.as_str())
        .await;
    upstream.state.hold.0.add_permits(1);
    assert_eq!(held.await.unwrap().0, 200);
    assert_eq!(queued.await.unwrap().0, 200);
    let sent: Vec<_> = upstream
        .records()
        .into_iter()
        .filter(|r| r.uri.query() == Some("queued=1"))
        .collect();
    assert_eq!(sent.len(), 1, "sent with the old key first, then resent");
    assert_eq!(sent[0].headers["authorization"], "Bearer sk-rotated-while-queued");
    proxy.stop().await;
}

async fn get_owned(url: String) -> (http::StatusCode, http::HeaderMap, bytes::Bytes) {
    get(&url).await
}
