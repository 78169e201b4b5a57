//! WebSocket through the proxy: the key rides on the handshake, the tunnel opens only after
//! the upstream's 101, and text, binary and close codes pass both ways.

mod support;

use futures_util::{SinkExt, StreamExt};
use http::header;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

fn ws_url(proxy: &TestProxy, path: &str) -> String {
    format!("ws://{}{}", proxy.addr, path)
}

#[tokio::test]
async fn messages_pass_both_ways_with_the_key_on_the_handshake() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let mut request = ws_url(&proxy, "/waves/v1/tts/live?voice_id=emily")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer app-should-not-need-this".parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("handshake through proxy");
    assert_eq!(response.status(), 101);

    ws.send(Message::Text("{\"text\":\"hello\"}".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("{\"text\":\"hello\"}".into())
    );
    let audio: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    ws.send(Message::Binary(audio.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(audio));

    let handshakes = upstream.state.websocket_handshakes.lock().unwrap().clone();
    assert_eq!(handshakes.len(), 1);
    let auth: Vec<_> = handshakes[0].get_all(header::AUTHORIZATION).iter().collect();
    assert_eq!(auth, vec![format!("Bearer {TEST_KEY}").as_str()]);
    let record = &upstream.records()[0];
    assert_eq!(
        record.uri.path_and_query().unwrap().as_str(),
        "/waves/v1/tts/live?voice_id=emily"
    );
    assert_eq!(
        record.version,
        http::Version::HTTP_11,
        "websocket handshakes use HTTP/1.1"
    );
    ws.close(None).await.unwrap();
    proxy.stop().await;
}

#[tokio::test]
async fn client_close_code_reaches_the_upstream_and_comes_back() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&proxy, "/ws/echo"))
        .await
        .expect("handshake");
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    // The echo server answers a close with the same code (RFC 6455 §5.5.1).
    let reply = ws.next().await.expect("close reply").expect("frame");
    match reply {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4000),
        other => panic!("expected a close frame, got {other:?}"),
    }
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_close_code_reaches_the_client() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&proxy, "/waves/v1/tts/live"))
        .await
        .expect("handshake");
    ws.send(Message::Text("close:4001".into())).await.unwrap();
    match ws.next().await.expect("frame").expect("frame ok") {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 4001);
            assert_eq!(frame.reason, "server closing");
        }
        other => panic!("expected close 4001, got {other:?}"),
    }
    // Finish the close handshake (the client's reply): until then the tunnel is open, and the
    // proxy's drain would rightly wait for it.
    while ws.next().await.is_some() {}
    proxy.stop().await;
}

#[tokio::test]
async fn a_non_101_answer_opens_no_tunnel() {
    let upstream = TestUpstream::start().await;
    let proxy = TestProxy::start(&upstream, "").await;
    match tokio_tungstenite::connect_async(ws_url(&proxy, "/ws/reject")).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body = response.body().clone().unwrap_or_default();
            assert_eq!(json(&body)["error"], "no websockets here");
        }
        other => panic!("expected the upstream's 403, got {other:?}"),
    }
    assert!(upstream.state.websocket_handshakes.lock().unwrap().is_empty());
    proxy.stop().await;
}
