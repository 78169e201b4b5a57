//! The core request path against a real TLS upstream: what the upstream receives, what the
//! client gets back, and what is refused.

mod support;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Version};
use http_body_util::Full;
use support::*;

#[tokio::test]
async fn key_is_injected_after_connection_named_headers_are_stripped() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    // Raw bytes so the client's headers are exactly these: its own Authorization, named again
    // in Connection, plus Proxy-Authorization and a custom header Connection names.
    let request = format!(
        "POST /waves/v1/lightning/get_speech HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close, Authorization, X-Hop\r\nAuthorization: Bearer client-supplied\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Hop: gone\r\nX-Keep: kept\r\nContent-Length: 5\r\n\r\nhello",
        proxy.addr.port()
    );
    let response = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.records();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    let auth: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
    assert_eq!(auth, vec![format!("Bearer {TEST_KEY}").as_str()]);
    assert!(!headers.contains_key("x-hop"));
    assert!(!headers.contains_key(header::PROXY_AUTHORIZATION));
    assert!(!headers.contains_key(header::CONNECTION));
    assert_eq!(headers["x-keep"], "kept");
    assert_eq!(&seen[0].body[..], b"hello");
    proxy.stop().await;
}

#[tokio::test]
async fn method_path_query_headers_and_body_arrive_byte_for_byte() {
    for http2 in [true, false] {
        let upstream = TestUpstream::start_with(UpstreamOptions { http2 }).await;
        let proxy = TestProxy::start(&upstream, "").await;
        let body: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let path = "/waves/v1/lightning-v2/get_speech?voice_id=emily&text=a%20b%2Fc&flag&x=%E2%9C%93";
        let req = Request::builder()
            .method(Method::PATCH)
            .uri(proxy.url(path))
            .header("x-custom", "Value  With  Spaces")
            .header("x-multi", "one")
            .header("content-type", "application/json; charset=utf-8")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let (status, headers, echoed) = send(req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&echoed[..], &body[..], "response body echoed whole");
        assert_eq!(headers["x-upstream"], "test");
        assert!(
            !headers.contains_key("keep-alive"),
            "hop-by-hop response header passed back"
        );
        assert!(headers.contains_key("x-request-id"));

        let seen = upstream.records();
        let r = &seen[0];
        assert_eq!(r.method, Method::PATCH);
        assert_eq!(r.uri.path_and_query().unwrap().as_str(), path);
        assert_eq!(r.headers["x-custom"], "Value  With  Spaces");
        assert_eq!(r.headers["content-type"], "application/json; charset=utf-8");
        assert_eq!(&r.body[..], &body[..]);
        let authority = if http2 {
            assert_eq!(r.version, Version::HTTP_2, "h2 offered by ALPN must be used");
            r.uri.authority().map(|a| a.to_string())
        } else {
            assert_eq!(r.version, Version::HTTP_11);
            r.headers.get(header::HOST).map(|h| h.to_str().unwrap().to_string())
        };
        assert_eq!(
            authority,
            Some(format!("localhost:{}", upstream.addr.port())),
            "Host rewritten to the upstream"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    for http2 in [true, false] {
        let upstream = TestUpstream::start_with(UpstreamOptions { http2 }).await;
        let proxy = TestProxy::start(&upstream, "").await;
        for _ in 0..10 {
            let (status, _, _) = get(&proxy.url("/api/v1/voices")).await;
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(
            upstream.connections(),
            1,
            "sequential requests reuse one connection (h2={http2})"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let (status, headers, _) = get(&proxy.url("/redirect")).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers[header::LOCATION], "https://elsewhere.example/steal");
    assert_eq!(upstream.records().len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_errors_pass_through_untouched() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let (status, _, body) = get(&proxy.url("/status/429")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json(&body)["upstream_status"], 429);
    proxy.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502_upstream_unavailable() {
    let pki = upstream::TestPki::new();
    // A port nobody listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = TestProxy::start_for(&format!("https://localhost:{port}"), &pki.ca_file, "").await;
    let (status, headers, body) = get(&proxy.url("/api/v1/voices")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let body = json(&body);
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(body["error"].as_str().unwrap().contains(&port.to_string()));
    proxy.stop().await;
}

#[tokio::test]
async fn untrusted_certificate_is_502_upstream_tls_and_nothing_is_sent() {
    let upstream = TestUpstream::start().await;
    let other_ca = upstream::TestPki::new();
    let proxy = TestProxy::start_for(&upstream.url(), &other_ca.ca_file, "").await;
    let (status, _, body) = get(&proxy.url("/api/v1/voices")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body = json(&body);
    assert_eq!(body["code"], "UPSTREAM_TLS", "{body}");
    assert!(
        upstream.records().is_empty(),
        "no request may reach an unverified server"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn wrong_hostname_is_502_upstream_tls() {
    let upstream = TestUpstream::start().await;
    // The certificate names localhost and 127.0.0.1, not 127.0.0.2.
    let proxy = TestProxy::start_for(
        &format!("https://127.0.0.2:{}", upstream.addr.port()),
        &upstream.pki.ca_file,
        "",
    )
    .await;
    let (status, _, body) = get(&proxy.url("/x")).await;
    // 127.0.0.2 may not be reachable where the upstream binds 127.0.0.1 only: either way the
    // key must not be sent, and the answer names the reason.
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let code = json(&body)["code"].as_str().unwrap().to_string();
    assert!(code == "UPSTREAM_TLS" || code == "UPSTREAM_UNAVAILABLE", "{code}");
    assert!(upstream.records().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn slow_upstream_is_504_upstream_timeout() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[upstream]\nresponse_timeout = \"200ms\"\n").await;
    let (status, _, body) = get(&proxy.url("/hang")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(&body)["code"], "UPSTREAM_TIMEOUT");
    proxy.stop().await;
}

#[tokio::test]
async fn connect_is_405_and_nothing_is_forwarded() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let response = raw_exchange(
        proxy.addr,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(response.contains("METHOD_NOT_ALLOWED"), "{response}");
    assert!(upstream.records().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn absolute_form_for_another_host_is_400_and_nothing_is_forwarded() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let response = raw_exchange(
        proxy.addr,
        b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("BAD_REQUEST"), "{response}");
    assert!(upstream.records().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn non_loopback_host_header_is_421() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let response = raw_exchange(
        proxy.addr,
        b"GET /api/v1/voices HTTP/1.1\r\nHost: rebind.evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 421"), "{response}");
    assert!(response.contains("FORBIDDEN_HOST"));
    assert!(upstream.records().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn health_and_ready_are_answered_locally() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let (status, _, body) = get(&proxy.url("/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body), serde_json::json!({"status": "healthy"}));
    let (status, _, body) = get(&proxy.url("/ready")).await;
    assert_eq!(status, StatusCode::OK);
    let body = json(&body);
    assert_eq!(body["status"], "ready");
    assert_eq!(body["key"]["source"], "file");
    assert_eq!(body["key"]["fingerprint"].as_str().unwrap().len(), 8);
    assert!(!body.to_string().contains(TEST_KEY));
    assert!(upstream.records().is_empty(), "admin endpoints are never forwarded");
    proxy.stop().await;
}

#[tokio::test]
async fn ready_is_503_and_requests_get_key_unavailable_without_a_key() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[key]\nfile = \"/nonexistent/smallest-key\"\n").await;
    let (status, _, body) = get(&proxy.url("/ready")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["code"], "KEY_UNAVAILABLE");
    let (status, _, body) = get(&proxy.url("/api/v1/voices")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["code"], "KEY_UNAVAILABLE");
    assert!(upstream.records().is_empty(), "never forward without a key");
    proxy.stop().await;
}

#[tokio::test]
async fn token_scheme_for_self_hosted_servers() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "[auth]\nscheme = \"Token\"\n").await;
    get(&proxy.url("/x")).await;
    assert_eq!(
        upstream.records()[0].headers[header::AUTHORIZATION],
        format!("Token {TEST_KEY}").as_str()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn request_id_is_propagated_both_ways() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let req = Request::get(proxy.url("/x"))
        .header("x-request-id", "my-trace-42")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, headers, _) = send(req).await;
    assert_eq!(headers["x-request-id"], "my-trace-42");
    assert_eq!(upstream.records()[0].headers["x-request-id"], "my-trace-42");
    proxy.stop().await;
}

#[tokio::test]
async fn unix_socket_listener_serves_with_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let proxy = TestProxy::start(
        &upstream,
        &format!(
            "[listen]\nunix_socket = \"{}\"\nunix_socket_mode = \"0600\"\n",
            socket.display()
        ),
    )
    .await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(&socket)
        .arg("http://localhost/api/v1/voices")
        .output()
        .await
        .expect("curl is installed");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        upstream.records()[0].headers[header::AUTHORIZATION],
        format!("Bearer {TEST_KEY}").as_str()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn curl_quickstart_example_works() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    // The README's example, verbatim apart from the address.
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"text":"Hello from the proxy","voice_id":"emily"}"#,
        ])
        .arg(proxy.url("/waves/v1/lightning-v2/get_speech"))
        .output()
        .await
        .expect("curl is installed");
    assert!(output.status.success());
    let seen = upstream.records();
    assert_eq!(
        seen[0].headers[header::AUTHORIZATION],
        format!("Bearer {TEST_KEY}").as_str()
    );
    assert_eq!(
        &seen[0].body[..],
        br#"{"text":"Hello from the proxy","voice_id":"emily"}"#
    );
    proxy.stop().await;
}
