//! The request path: guard → key → rewrite → forward → respond (DESIGN.md, "One request").
//!
//! [`Proxy::handle`] is the whole per-request behaviour; each step lives in its own file:
//! `guard` (what is refused), `rewrite` (headers and URI), `forward` (the upstream clients),
//! `upgrade` (WebSocket tunnels), `body` (the streamed body type), and the hardening checks:
//! `caller` (uid and local token), `request_limits` (sizes), `policy` (method and path rules).
//! Errors anywhere become one
//! JSON answer from [`crate::error`]; upstream answers, errors included, pass through as they are.

pub mod body;
pub mod caller;
pub mod forward;
pub mod framing;
pub mod guard;
pub mod h1;
pub mod policy;
pub mod pool;
pub mod request_limits;
pub mod retry;
pub mod rewrite;
pub mod tunnel;
pub mod upgrade;
pub mod wire;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::error::ProxyError;
use crate::exchange::Exchange;
use crate::keys::KeyStore;
use crate::limits::{self, Limiter};
use crate::timeouts::IdleTimer;
use body::{ClientBody, ProxyBody};
use forward::Upstream;
use guard::{Guard, Transport};
use retry::OutgoingBody;

/// Correlates a client's request, our log line and the upstream's request.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

pub struct Proxy {
    upstream: Upstream,
    keys: Arc<KeyStore>,
    guard: Guard,
    limiter: Arc<Limiter>,
    pub(crate) hardening: Hardening,
    tunnels: tunnel::Tunnels,
}

/// The issue-6 checks and bounds on the request path, from `[listen]`, `[upstream]` and
/// `[policy]`.
#[derive(Debug, Clone)]
pub struct Hardening {
    pub callers: caller::CallerControl,
    pub limits: request_limits::RequestLimits,
    pub paths: policy::PathPolicy,
    pub stream_idle_timeout: Duration,
}

impl Hardening {
    pub fn from_config(config: &Config) -> Result<Hardening, String> {
        Ok(Hardening {
            callers: caller::CallerControl::from_config(&config.listen)
                .map_err(|e| format!("listen.token_file: {e}"))?,
            limits: request_limits::RequestLimits::from_config(&config.listen),
            paths: policy::PathPolicy::from_config(&config.policy),
            stream_idle_timeout: config.upstream.stream_idle_timeout,
        })
    }
}

impl Default for Hardening {
    fn default() -> Self {
        Hardening {
            callers: caller::CallerControl::default(),
            limits: request_limits::RequestLimits::from_config(&crate::config::ListenConfig::default()),
            paths: policy::PathPolicy::default(),
            stream_idle_timeout: crate::config::DEFAULT_STREAM_IDLE_TIMEOUT,
        }
    }
}

impl Proxy {
    pub fn new(upstream: Upstream, keys: Arc<KeyStore>, guard: Guard, limiter: Arc<Limiter>) -> Proxy {
        Proxy {
            upstream,
            keys,
            guard,
            limiter,
            hardening: Hardening::default(),
            tunnels: tunnel::Tunnels::default(),
        }
    }

    pub fn with_hardening(mut self, hardening: Hardening) -> Proxy {
        self.hardening = hardening;
        self
    }

    /// Spawn WebSocket tunnels on `tunnels` (the run's drain tracks and closes them).
    pub fn with_tunnels(mut self, tunnels: tunnel::Tunnels) -> Proxy {
        self.tunnels = tunnels;
        self
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Forward one client request; never fails (errors are answered as JSON).
    /// `exchange` is this request's record (access log, metrics): the steps note in it what
    /// only they know.
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        transport: Transport,
        exchange: &Arc<Exchange>,
    ) -> Response<ProxyBody> {
        let request_id = request_id(&req);
        exchange.set_request_id(&request_id);
        // Boxed, like the admission and body steps inside it: rustc lays an awaited future out
        // beside its caller's state rather than over it, so inline the request's future was
        // ~13 KiB, allocated and copied per request (and cold at low request rates). Boxed,
        // each part is only as big as itself.
        let mut response = match Box::pin(self.forward(req, transport, &request_id, exchange)).await {
            Ok(response) => response,
            Err(err) => {
                tracing::debug!(request_id = %request_id, code = err.status_and_code().1, "answered locally");
                err.into_response(&request_id)
            }
        };
        if !response.headers().contains_key(REQUEST_ID_HEADER) {
            if let Ok(id) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID_HEADER, id);
            }
        }
        response
    }

    async fn forward(
        &self,
        mut req: Request<ClientBody>,
        transport: Transport,
        request_id: &str,
        exchange: &Arc<Exchange>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.guard.check(&req, transport)?;
        self.hardening.limits.check(&req)?;
        self.hardening.callers.take_token(req.headers_mut())?;
        self.hardening.paths.check(req.method(), req.uri().path())?;
        // One load: this request (and its tunnel, if any) keeps this key even if it rotates
        // now; only a 401 resend switches it, explicitly.
        let mut key = self.keys.current().ok_or(ProxyError::KeyUnavailable)?;
        let websocket = upgrade::is_websocket_upgrade(&req);
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));

        let (parts, body) = req.into_parts();
        let uri = self.upstream.base.uri_for(parts.uri.path_and_query())?;
        let class = self.limiter.class_for(parts.uri.path()).clone();
        let method = parts.method;
        let mut headers = parts.headers;
        rewrite::strip_client_headers(&mut headers);
        rewrite::set_upstream_host(&mut headers, &self.upstream.base);
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(REQUEST_ID_HEADER, id);
        }
        let body = if websocket {
            upgrade::restore_upgrade_headers(&mut headers);
            // A handshake is sent without a body; a client's Content-Length left in place made
            // the upstream wait for bytes that never come (found by tests/fuzz.rs).
            headers.remove(http::header::CONTENT_LENGTH);
            OutgoingBody::Replayable(Bytes::new())
        } else {
            Box::pin(retry::prepare(&headers, body)).await?
        };
        let (replayable, mut streaming) = match body {
            OutgoingBody::Replayable(bytes) => {
                exchange.add_request_bytes(bytes.len() as u64);
                (Some(bytes), None)
            }
            OutgoingBody::Streaming(incoming) => (None, Some(incoming)),
        };

        // Admission after the (small) body is in, so a slot is never held waiting on a slow
        // client's upload of a replayable body.
        let kind = if websocket {
            limits::Kind::WebSocket
        } else {
            limits::Kind::Request
        };
        let admitting = std::time::Instant::now();
        let permit = Box::pin(class.admit(kind))
            .await
            .map_err(|shed| ProxyError::RateLimited {
                message: shed.message(),
                retry_after: shed.retry_after,
            })?;
        exchange.set_queue_wait(admitting.elapsed());

        // Set by a capped streaming body that passed listen.max_body_size.
        let body_too_large = Arc::new(AtomicBool::new(false));
        let mut resent_after_401 = false;
        let mut resends_after_throttle = 0;
        let response = loop {
            // The headers travel with the attempt and come back with its response (a resend
            // needs them again): not copied per request.
            let mut attempt_headers = std::mem::take(&mut headers);
            let body = match (&replayable, streaming.take()) {
                (Some(bytes), _) => ProxyBody::full(bytes.clone()),
                (None, Some(incoming)) => match self.hardening.limits.max_body_size {
                    Some(limit) => ProxyBody::Capped {
                        body: incoming,
                        remaining: limit,
                        limit,
                        exceeded: body_too_large.clone(),
                        exchange: exchange.clone(),
                    },
                    None => ProxyBody::Counted(incoming, exchange.clone()),
                },
                (None, None) => {
                    return Err(ProxyError::UpstreamUnavailable(
                        "the request body was already sent".into(),
                    ))
                }
            };
            rewrite::inject_key(&mut attempt_headers, key.authorization());
            let mut upstream_request = Request::new(body);
            *upstream_request.method_mut() = method.clone();
            *upstream_request.uri_mut() = uri.clone();
            *upstream_request.version_mut() = Version::HTTP_11;
            *upstream_request.headers_mut() = attempt_headers;

            let sent_at = std::time::Instant::now();
            let sent = self.upstream.send(upstream_request, websocket).await;
            if body_too_large.load(Ordering::SeqCst) {
                return Err(ProxyError::PayloadTooLarge(format!(
                    "the request body grew past {} bytes (listen.max_body_size); it was not forwarded whole",
                    self.hardening.limits.max_body_size.unwrap_or_default()
                )));
            }
            let (response, sent_headers) = sent?;
            headers = sent_headers;
            exchange.set_upstream_latency(sent_at.elapsed());
            if response.status() == StatusCode::UNAUTHORIZED && replayable.is_some() && !resent_after_401 {
                // The key may have rotated under us: one coalesced refresh, one resend with
                // the new key if there is one. Never a loop.
                if let Some(newer) = self.keys.replacement_for(&key).await {
                    tracing::info!(
                        request_id,
                        old = key.fingerprint(),
                        new = newer.fingerprint(),
                        "upstream refused the key; resending with the refreshed key"
                    );
                    key = newer;
                    resent_after_401 = true;
                    continue;
                }
            }
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
                // The account's own limit: pause the class for everyone, and resend this one
                // if it can be resent, after the pause or a jittered backoff.
                let wait = limits::parse_retry_after(response.headers().get(http::header::RETRY_AFTER))
                    .unwrap_or(limits::DEFAULT_UPSTREAM_PAUSE);
                class.pause(status.as_u16(), wait);
                if replayable.is_some() && resends_after_throttle < class.limits.upstream_retries {
                    resends_after_throttle += 1;
                    let delay = class.resend_delay(resends_after_throttle);
                    tracing::debug!(
                        request_id,
                        status = status.as_u16(),
                        delay_ms = delay.as_millis() as u64,
                        "upstream throttled; resending"
                    );
                    drop(response);
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            break response;
        };

        if let Some(client_upgrade) = client_upgrade {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                return Ok(upgrade::open_tunnel(
                    client_upgrade,
                    response,
                    request_id.to_string(),
                    permit,
                    self.hardening.stream_idle_timeout,
                    &self.tunnels,
                ));
            }
        }
        let (mut parts, body) = response.into_parts();
        rewrite::strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        let idle = IdleTimer::new(self.hardening.stream_idle_timeout);
        Ok(Response::from_parts(
            parts,
            ProxyBody::Limited(body, Some(permit), idle),
        ))
    }
}

/// The client's `X-Request-Id` when it is a sane token, else a fresh random one.
pub(crate) fn request_id<B>(req: &Request<B>) -> String {
    if let Some(given) = req.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()) {
        if !given.is_empty() && given.len() <= 128 && given.bytes().all(|b| b.is_ascii_graphic()) {
            return given.to_string();
        }
    }
    // 16 lowercase hex digits, written directly: `format!` costs ~570 instructions a request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = rand::random::<u64>();
    let mut digits = [0u8; 16];
    for digit in digits.iter_mut().rev() {
        *digit = HEX[(id & 0xf) as usize];
        id >>= 4;
    }
    // ASCII by construction: one copy, no per-char UTF-8 encoding.
    String::from_utf8_lossy(&digits).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_request_id_is_16_lowercase_hex_digits_and_a_sane_one_is_kept() {
        let bare = Request::new(());
        let a = request_id(&bare);
        let b = request_id(&bare);
        assert_eq!(a.len(), 16, "{a}");
        assert!(
            a.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
            "{a}"
        );
        assert_ne!(a, b);
        let given = Request::builder()
            .header(REQUEST_ID_HEADER, "abc-123")
            .body(())
            .unwrap();
        assert_eq!(request_id(&given), "abc-123");
        let bad = Request::builder()
            .header(REQUEST_ID_HEADER, "has space")
            .body(())
            .unwrap();
        assert_eq!(request_id(&bad).len(), 16);
    }
}
