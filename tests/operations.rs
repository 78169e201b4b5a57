//! Running under systemd: readiness and watchdog notifications on a NOTIFY_SOCKET the test
//! binds, socket activation through the real `systemd-socket-activate`, SIGTERM exit status,
//! and the contrib unit files through `systemd-analyze verify`.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;
use support::*;

/// Read datagrams until one contains `needle` (bounded); returns it.
fn await_datagram(socket: &UnixDatagram, needle: &str) -> String {
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {needle:?} notification: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.contains(needle) {
            return text;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_status_watchdog_and_stopping_then_exits_0() {
    let upstream = TestUpstream::start().await;
    let (_dir, key) = key_dir();
    let sockets = tempfile::tempdir().unwrap();
    let notify_path = sockets.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let config = proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key, "");
    let mut proxy = ProxyProcess::spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let ready = await_datagram(&notify, "READY=1");
    assert!(ready.contains("STATUS=serving on http://127.0.0.1:"), "{ready}");
    assert!(
        ready.contains(&format!(
            "key from file loaded ({})",
            smallest_proxy::keys::fingerprint(TEST_KEY)
        )),
        "{ready}"
    );
    await_datagram(&notify, "WATCHDOG=1");
    assert_eq!(get(&proxy.url("/health")).await.0, 200);
    proxy.signal(libc::SIGTERM);
    await_datagram(&notify, "STOPPING=1");
    let status = proxy.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_socket_passed_by_systemd_socket_activate() {
    let upstream = TestUpstream::start().await;
    let (_dir, key) = key_dir();
    let port = support::servers::free_port();
    // The configured address is not used: the inherited socket replaces [listen].
    let config_dir = tempfile::tempdir().unwrap();
    let config_path = config_dir.path().join("proxy.toml");
    std::fs::write(
        &config_path,
        proxy_config_text(
            &upstream.url(),
            &upstream.pki.ca_file,
            &key,
            "[listen]\naddress = \"127.0.0.1:1\"\n",
        ),
    )
    .unwrap();
    let mut activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg(binary())
        .arg("--config")
        .arg(&config_path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) is installed");
    // systemd-socket-activate binds before anything runs; wait for the port (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&format!("{base}/health")).await.0, 200);
    let (status, _, _) = get(&format!("{base}/waves/v1/lightning/get_voices")).await;
    assert_eq!(status, 200);
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        format!("Bearer {TEST_KEY}").as_str()
    );
    let _ = activator.kill();
    let _ = activator.wait();
}

#[test]
fn contrib_unit_files_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    // verify checks that ExecStart exists: point it at the binary under test.
    let service = std::fs::read_to_string(format!("{root}/contrib/systemd/smallest-proxy.service"))
        .unwrap()
        .replace("/usr/local/bin/smallest-proxy", binary());
    std::fs::write(dir.path().join("smallest-proxy.service"), service).unwrap();
    std::fs::copy(
        format!("{root}/contrib/systemd/smallest-proxy.socket"),
        dir.path().join("smallest-proxy.socket"),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("smallest-proxy.socket"))
        .arg(dir.path().join("smallest-proxy.service"))
        .output()
        .expect("systemd-analyze (Debian package systemd) is installed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("smallest-proxy")).collect();
    assert!(
        output.status.success() && complaints.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_sse_stream_finish_refuses_new_connections_and_exits_0() {
    use http_body_util::BodyExt;
    let upstream = TestUpstream::start().await;
    let (_dir, key) = key_dir();
    let mut proxy = ProxyProcess::spawn(
        &proxy_config_text(&upstream.url(), &upstream.pki.ca_file, &key, ""),
        &[],
    );
    let response = support::client().get(proxy.url("/sse").parse().unwrap()).await.unwrap();
    let mut stream = response.into_body();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"event: audio\ndata: first\n\n");

    proxy.signal(libc::SIGTERM);
    proxy.wait_for_log("shutdown requested", 1, Duration::from_secs(10));
    // Listeners close at once: a new connection is refused (bounded wait for the accept loop
    // to drop its socket).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(proxy.addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting connections after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The stream already open runs to its end.
    upstream.state.sse_release.notify_one();
    let rest = stream.collect().await.unwrap().to_bytes();
    assert_eq!(
        &rest[..],
        b"event: audio\ndata: event-2\n\nevent: audio\ndata: event-3\n\n"
    );
    assert_eq!(proxy.child.wait().unwrap().code(), Some(0));
}
