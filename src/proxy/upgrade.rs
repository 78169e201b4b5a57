//! WebSocket pass-through: the handshake is forwarded like any request (with the key), and
//! only when the upstream answers `101 Switching Protocols` are the two upgraded connections
//! joined. Any other answer (401, 429, a 200 from a misconfigured server) goes back to the
//! client as a plain response and no tunnel is opened.
//!
//! The tunnel copies bytes, not messages: frames, masking, close codes and negotiated
//! extensions pass through unchanged in both directions, and the proxy spends no CPU parsing
//! audio frames it has no business reading (it reads frame headers only, to know where a Close
//! frame may go at the drain deadline: see `tunnel`). A tunnel with no byte in either direction
//! for `upstream.stream_idle_timeout` is closed (a dead peer must not hold a WebSocket slot).
//!
//! A socket of a class with `websocket_messages` (the `smallest` profile's `tts`) runs the
//! counting tunnel in `synthesis` instead, which reads whole frames to give each synthesis a
//! request slot of the class.

use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::time::Duration;

use super::body::ProxyBody;
use super::rewrite::strip_hop_by_hop;
use super::tunnel::{self, Tunnels};
use crate::limits::{Class, Permit};
use crate::timeouts::{until_idle, Activity, ActivityIo};
use crate::upstream::body::UpstreamBody;
use std::sync::Arc;

/// `Connection: upgrade` with `Upgrade: websocket` (tokens matched case-insensitively).
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// Add back the two hop-by-hop headers a handshake needs, after the generic strip removed them.
pub fn restore_upgrade_headers(headers: &mut http::HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// Answer the client's handshake with the upstream's 101 and join the two connections once
/// both sides have switched. The copy task ends when either side closes.
// Each is a different part the tunnel task takes over; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn open_tunnel(
    client: OnUpgrade,
    mut upstream_response: Response<UpstreamBody>,
    request_id: String,
    permit: Permit,
    idle_timeout: Duration,
    tunnels: &Tunnels,
    count_syntheses: Option<Arc<Class>>,
    meter: Option<super::ws_meter::SocketMeter>,
) -> Response<ProxyBody> {
    // The handshake went out without permessage-deflate; an upstream that negotiates it
    // anyway sends compressed frames, which only the byte tunnel can carry.
    let count_syntheses = count_syntheses.filter(|_| {
        let negotiated = upstream_response
            .headers()
            .contains_key(header::SEC_WEBSOCKET_EXTENSIONS);
        if negotiated {
            tracing::warn!(
                request_id,
                "the upstream negotiated a WebSocket extension: syntheses on this socket are not counted"
            );
        }
        !negotiated
    });
    let upstream = hyper::upgrade::on(&mut upstream_response);
    let (mut parts, _empty) = upstream_response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    restore_upgrade_headers(&mut parts.headers);
    let close = tunnels.close.clone();
    // On the run's tunnel tracker, so the drain waits for it (and closes it at the deadline).
    tunnels.tracker.spawn(async move {
        // The WebSocket slot is held for exactly the tunnel's life.
        let _permit = permit;
        let (client, upstream) = tokio::join!(client, upstream);
        match (client, upstream) {
            (Ok(client), Ok(upstream)) => {
                let activity = Activity::new();
                let client = ActivityIo::new(TokioIo::new(client), activity.clone());
                // Usage: characters per synthesis on a live-TTS socket; audio bytes (or seconds
                // open) on a realtime STT socket, counted when it closes.
                let tts_meter = match &meter {
                    Some(super::ws_meter::SocketMeter::LiveTts(m)) => Some(m.clone()),
                    _ => None,
                };
                let stt_meter = meter.filter(|m| matches!(m, super::ws_meter::SocketMeter::Stt { .. }));
                let opened = std::time::Instant::now();
                let binary_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let ran = async {
                    match (count_syntheses, &stt_meter) {
                        (Some(class), _) => {
                            super::synthesis::run_metered(
                                client,
                                TokioIo::new(upstream),
                                close,
                                class,
                                request_id.clone(),
                                tts_meter,
                            )
                            .await
                        }
                        (None, Some(_)) => {
                            let client = super::ws_meter::CountingIo::new(client, binary_bytes.clone());
                            tunnel::run(client, TokioIo::new(upstream), close).await
                        }
                        (None, None) => tunnel::run(client, TokioIo::new(upstream), close).await,
                    }
                };
                tokio::select! {
                    ran = ran => match ran {
                        Ok(how) => tracing::debug!(request_id, how, "websocket tunnel closed"),
                        Err(e) => tracing::debug!(request_id, error = %e, "websocket tunnel ended with an error"),
                    },
                    _ = until_idle(&activity, idle_timeout) => {
                        tracing::debug!(request_id, idle = %humantime::format_duration(idle_timeout), "websocket tunnel idle; closed");
                    }
                }
                if let Some(meter) = &stt_meter {
                    let bytes = binary_bytes.load(std::sync::atomic::Ordering::Relaxed);
                    super::ws_meter::stt_closed(meter, bytes, opened.elapsed());
                }
            }
            (Err(e), _) | (_, Err(e)) => tracing::debug!(request_id, error = %e, "websocket upgrade did not complete"),
        }
    });
    Response::from_parts(parts, ProxyBody::Empty)
}
