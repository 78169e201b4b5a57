//! The request path, between the client side (`server`) and the upstream side (`upstream`):
//! key → rewrite → admit → send → resend → respond (DESIGN.md, "One request").
//!
//! [`Proxy::handle`] is the whole per-request behaviour once the client side has accepted the
//! request (caller, guard, size limits and path policy run before it, in `server::app`). Each
//! step lives in its own file: `rewrite` (headers and URI), `resend` (which bodies can be sent
//! again), `body` (the streamed body types), `upgrade` and `tunnel` (WebSocket), `exchange`
//! (the access line and request metrics), `route` (`[[route]]`s and their fallback). Errors
//! anywhere become one JSON answer from [`crate::error`]; upstream answers, errors included,
//! pass through as they are.

pub mod body;
pub mod exchange;
pub mod meter;
pub mod path;
pub mod refusal;
pub mod resend;
pub mod rewrite;
pub mod route;
pub mod synthesis;
pub mod tunnel;
pub mod upgrade;
pub mod ws_meter;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Version};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::ProxyError;
use crate::keys::KeyStore;
use crate::limits::{self, Limiter};
use crate::timeouts::IdleTimer;
use crate::upstream::body::SendBody;
use crate::upstream::Upstream;
use body::{ClientBody, ProxyBody};
use exchange::Exchange;
use resend::OutgoingBody;
use route::{Handover, Hop, Stop};

pub use crate::error::REQUEST_ID_HEADER;

pub struct Proxy {
    upstream: Upstream,
    keys: Arc<KeyStore>,
    limiter: Arc<Limiter>,
    bounds: Bounds,
    tunnels: tunnel::Tunnels,
    /// Usage per app and its budgets (`meter`, `crate::usage`).
    usage: Option<Arc<crate::usage::Usage>>,
}

/// The request path's own bounds, from `[listen]` and `[upstream]`.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// A streamed upload fails past this many bytes (`listen.max_body_size`).
    pub max_body_size: Option<u64>,
    /// A response body or tunnel silent this long is cut (`upstream.stream_idle_timeout`).
    pub stream_idle_timeout: Duration,
}

impl Bounds {
    pub fn from_config(config: &crate::config::Config) -> Bounds {
        Bounds {
            max_body_size: config.listen.max_body_size,
            stream_idle_timeout: config.upstream.stream_idle_timeout,
        }
    }
}

impl Proxy {
    pub fn new(upstream: Upstream, keys: Arc<KeyStore>, limiter: Arc<Limiter>, bounds: Bounds) -> Proxy {
        Proxy {
            upstream,
            keys,
            limiter,
            bounds,
            tunnels: tunnel::Tunnels::default(),
            usage: None,
        }
    }

    /// Meter requests per app into `usage`, and refuse those of an app past its budget.
    pub fn with_usage(mut self, usage: Arc<crate::usage::Usage>) -> Proxy {
        self.usage = Some(usage);
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

    /// Whether a request starting now would have a key to send.
    pub fn has_key(&self) -> bool {
        self.keys.current().is_some()
    }

    /// Forward one client request; never fails (errors are answered as JSON).
    /// `exchange` is this request's record (access log, metrics): the steps note in it what
    /// only they know.
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        request_id: &str,
        exchange: &Arc<Exchange>,
    ) -> Response<ProxyBody> {
        // Boxed, like the admission and body steps inside it: rustc lays an awaited future out
        // beside its caller's state rather than over it, so inline the request's future was
        // ~13 KiB, allocated and copied per request (and cold at low request rates). Boxed,
        // each part is only as big as itself.
        answer(
            Box::pin(self.forward(req, request_id, exchange, Hop::Only)).await,
            request_id,
        )
    }

    /// `hop` says whether this is a route that may hand the request to its fallback
    /// (`route.rs` decides, and sends it there).
    pub(crate) async fn forward(
        &self,
        mut req: Request<ClientBody>,
        request_id: &str,
        exchange: &Arc<Exchange>,
        hop: Hop,
    ) -> Result<Response<ProxyBody>, Stop> {
        // Refused before it queues when no key is loaded at all; the key it is sent with is
        // loaded after admission (below).
        if self.keys.current().is_none() {
            return Err(ProxyError::KeyUnavailable.into());
        }
        // What the fallback route needs to send the request as the client sent it: never the
        // headers rewritten for this route (its Host, its key).
        let mut handover = (hop == Hop::First).then(|| Handover::keep(&req));
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
        // An app past its daily budget starts no more work (a WebSocket handshake included).
        let canonical = path::is_canonical(parts.uri.path());
        // What the path is metered in matters only to a budget and to the rule below.
        let metered = (self.usage.is_some() || !canonical)
            .then(|| meter::meter_for(parts.uri.path()))
            .flatten();
        // A path an upstream would normalise into another class or meter (`/x/../waves/v1/tts`)
        // would slip past that class's limit and the app's budget: refused, not guessed at.
        if !canonical {
            let plain = path::normalise(parts.uri.path());
            if !Arc::ptr_eq(self.limiter.class_for(&plain), &class) || meter::meter_for(&plain) != metered {
                return Err(ProxyError::ForbiddenPath(format!(
                    "{:?} is not in canonical form and names {plain:?}, which is limited or metered differently; send the plain path",
                    parts.uri.path()
                ))
                .into());
            }
        }
        if let (Some(usage), Some(kind)) = (&self.usage, metered) {
            usage.check(exchange.app(), kind).await.map_err(ProxyError::from)?;
        }
        let count_syntheses = websocket && class.limits.websocket_messages;
        let body = if websocket {
            upgrade::restore_upgrade_headers(&mut headers);
            if count_syntheses {
                // The counting tunnel reads frames: they must not be compressed.
                synthesis::strip_deflate(&mut headers);
            }
            // A handshake is sent without a body; a client's Content-Length left in place made
            // the upstream wait for bytes that never come (found by tests/fuzz.rs).
            headers.remove(http::header::CONTENT_LENGTH);
            OutgoingBody::Replayable(Bytes::new())
        } else {
            Box::pin(resend::prepare(&headers, body)).await?
        };
        if let (Some(usage), Some(kind), false) = (&self.usage, metered, websocket) {
            let whole = match &body {
                OutgoingBody::Replayable(bytes) => Some(&bytes[..]),
                OutgoingBody::Streaming(_) => None,
            };
            exchange.set_metering(match kind {
                crate::usage::Meter::TtsCharacters => meter::Metering::tts(usage.clone(), whole),
                crate::usage::Meter::SttSeconds => meter::Metering::stt(usage.clone(), parts.uri.query(), whole),
                crate::usage::Meter::LlmTokens => meter::Metering::llm(usage.clone()),
            });
        }
        let (replayable, mut streaming) = match body {
            OutgoingBody::Replayable(bytes) => {
                if hop != Hop::Fallback {
                    exchange.add_request_bytes(bytes.len() as u64);
                }
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
        let mut permit = Box::pin(class.admit(kind)).await.map_err(shed_error)?;
        exchange.set_queue_wait(admitting.elapsed());
        // The key is loaded when the request is sent, not when it arrived: one that waited in
        // the queue across a rotation goes out with the new key, not the old one and a 401
        // resend. One load: this request (and its tunnel, if any) keeps this key even if it
        // rotates now; only a 401 resend switches it, explicitly.
        let mut key = self.keys.current().ok_or(ProxyError::KeyUnavailable)?;

        // Set by a capped streaming body that passed listen.max_body_size.
        let body_too_large = Arc::new(AtomicBool::new(false));
        let mut resent_after_401 = false;
        let mut resends_after_throttle = 0;
        let mut resends_after_probe = 0;
        let response = loop {
            // The headers travel with the attempt and come back with its response (a resend
            // needs them again): not copied per request.
            let mut attempt_headers = std::mem::take(&mut headers);
            let body = match (&replayable, streaming.take()) {
                (Some(bytes), _) => SendBody::full(bytes.clone()),
                (None, Some(incoming)) => SendBody::streaming(match self.bounds.max_body_size {
                    Some(limit) => ProxyBody::Capped {
                        body: incoming,
                        remaining: limit,
                        limit,
                        exceeded: body_too_large.clone(),
                        exchange: exchange.clone(),
                    },
                    None => ProxyBody::Counted(incoming, exchange.clone()),
                }),
                (None, None) => {
                    return Err(Stop::Error(ProxyError::UpstreamUnavailable(
                        "the request body was already sent".into(),
                    )))
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
                return Err(Stop::Error(ProxyError::PayloadTooLarge(format!(
                    "the request body grew past {} bytes (listen.max_body_size); it was not forwarded whole",
                    self.bounds.max_body_size.unwrap_or_default()
                ))));
            }
            // Refused, timed out, 503 or 429: a replayable request goes to the fallback route
            // at once, before any resend here (route.rs).
            if let (Some(reason), Some(bytes)) = (route::fallback_reason(&sent), &replayable) {
                if let Some(kept) = handover.take() {
                    return Err(Stop::FallBack(Box::new(kept.into_request(
                        reason,
                        bytes.clone(),
                        client_upgrade,
                    ))));
                }
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
                // A learning class (`max_concurrent = "auto"`) lowers its limit to the level
                // the upstream accepted. A 429 to a probe above that level is the answer the
                // probe asked for: resend at once, back in the queue under the lower limit.
                let learned = if status == StatusCode::TOO_MANY_REQUESTS && !websocket {
                    class.throttled(&mut permit)
                } else {
                    None
                };
                if learned == Some(limits::auto::Throttle::Probe)
                    && replayable.is_some()
                    && resends_after_probe < MAX_PROBE_RESENDS
                {
                    resends_after_probe += 1;
                    class.count_resend();
                    tracing::debug!(request_id, limit = class.concurrency(), "probe throttled; resending");
                    drop(response);
                    permit = readmit(&class, permit).await?;
                    continue;
                }
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
                    if learned.is_some() {
                        // Back in the queue: admission waits out the pause, then for a slot
                        // under the lowered limit, so the resend does not add to the overload.
                        permit = readmit(&class, permit).await?;
                    } else {
                        tokio::time::sleep(delay).await;
                    }
                    continue;
                }
            }
            break response;
        };

        // A rejected key is made obvious (WARN, /ready, metric); see `keys::Rejection`.
        let status = response.status();
        if status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS {
            self.keys.note_accepted(&key);
        } else if status == StatusCode::UNAUTHORIZED {
            self.keys.count_auth_failure(401);
            self.count_app_auth_failure(exchange, 401);
            // A replayable request already asked for a replacement; ask now for the others.
            if resent_after_401 || replayable.is_some() || self.keys.replacement_for(&key).await.is_none() {
                self.keys.note_rejected(&key, None);
            }
        } else if status == StatusCode::FORBIDDEN {
            self.keys.count_auth_failure(403);
            self.count_app_auth_failure(exchange, 403);
            let idle = self.bounds.stream_idle_timeout;
            return Ok(refusal::inspect(response, &self.keys, &key, idle, permit).await?);
        }

        if let Some(client_upgrade) = client_upgrade {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let socket_meter = self.usage.as_ref().and_then(|usage| {
                    ws_meter::SocketMeter::for_socket(usage, exchange.app(), uri.path(), uri.query())
                });
                return Ok(upgrade::open_tunnel(
                    client_upgrade,
                    response,
                    request_id.to_string(),
                    permit,
                    self.bounds.stream_idle_timeout,
                    &self.tunnels,
                    count_syntheses.then(|| class.clone()),
                    socket_meter,
                ));
            }
        }
        let (mut parts, body) = response.into_parts();
        rewrite::strip_hop_by_hop(&mut parts.headers);
        rewrite::normalise_content_length(parts.status, &mut parts.headers)?;
        parts.version = Version::HTTP_11;
        let idle = IdleTimer::new(self.bounds.stream_idle_timeout);
        Ok(Response::from_parts(
            parts,
            ProxyBody::Limited(body, Some(permit), idle),
        ))
    }
}

/// The client's answer: the response, or the error as JSON; with the request id either way.
pub(crate) fn answer(forwarded: Result<Response<ProxyBody>, Stop>, request_id: &str) -> Response<ProxyBody> {
    let mut response = match forwarded {
        Ok(response) => response,
        Err(stop) => {
            let err = stop.into_error();
            tracing::debug!(request_id = %request_id, code = err.status_and_code().1, "answered locally");
            err.into_response(request_id)
        }
    };
    if !response.headers().contains_key(REQUEST_ID_HEADER) {
        if let Ok(id) = HeaderValue::from_str(request_id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, id);
        }
    }
    response
}

impl Proxy {
    fn count_app_auth_failure(&self, exchange: &Exchange, status: u16) {
        if let Some(usage) = &self.usage {
            meter::spawn_add(
                usage.clone(),
                exchange.app().to_string(),
                crate::usage::Add::AuthFailure(status),
            );
        }
    }
}

/// Resends after 429s to probes, per request: each lowers the limit, so few can happen.
const MAX_PROBE_RESENDS: u32 = 8;

fn shed_error(shed: limits::Shed) -> ProxyError {
    ProxyError::RateLimited {
        message: shed.message(),
        retry_after: shed.retry_after,
    }
}

/// Give the slot back and wait for a new one (FIFO, behind those already waiting).
async fn readmit(class: &Arc<limits::Class>, permit: limits::Permit) -> Result<limits::Permit, ProxyError> {
    drop(permit);
    Box::pin(class.admit(limits::Kind::Request)).await.map_err(shed_error)
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
