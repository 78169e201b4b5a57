//! `[[route]]`s on the request path: which route a path takes, and the one fallback.
//!
//! Each [`Route`] is a whole request path of its own (a [`Proxy`] with its own upstream pool
//! and TLS, key store and limiter); the default route (`[upstream]` + `[key]`) is the run's
//! main `Proxy` and takes every path no route claims. The [`Router`] picks a route by the
//! longest prefix on a segment boundary before the request reaches it.
//!
//! Fallback: when a route's upstream refuses the connection, times out before answering, or
//! answers 503 or 429, a request whose body is in memory ([`super::resend`]) is handed back
//! here at once (before the route resends anything) and sent, once, through the fallback
//! route, which injects its own key and scheme into the client's original headers. The
//! failing route's key never reaches the fallback's upstream: the handed-back request is the
//! client's, never the headers rewritten for the failing route. A streamed body cannot be sent
//! twice, so it gets the first route's answer; so does a request whose fallback has no key.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use std::sync::Arc;

use super::body::{ClientBody, ProxyBody};
use super::exchange::Exchange;
use super::{answer, Proxy};
use crate::config::{RouteConfig, DEFAULT_ROUTE_NAME};
use crate::error::ProxyError;
use crate::keys::{KeyRuntime, KeyStatus};
use crate::limits::redis::SharedStore;
use crate::limits::Limiter;
use crate::metrics::{FallbackLabels, Metrics};
use crate::upstream::body::UpstreamBody;

/// The part one `forward` plays in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// No fallback: whatever happens is the answer.
    Only,
    /// A route with a fallback that has a key: a replayable request it cannot get answered
    /// is handed back ([`Stop::FallBack`]).
    First,
    /// The fallback route, after the first one handed the request back.
    Fallback,
}

/// Why `forward` returned without a response for the client.
pub(crate) enum Stop {
    Error(ProxyError),
    /// The route gave the request up: send it through its fallback.
    FallBack(Box<FallingBack>),
}

impl From<ProxyError> for Stop {
    fn from(err: ProxyError) -> Stop {
        Stop::Error(err)
    }
}

impl Stop {
    pub(crate) fn into_error(self) -> ProxyError {
        match self {
            Stop::Error(err) => err,
            // Only a `Hop::First` forward hands a request back, and the router catches it.
            Stop::FallBack(_) => ProxyError::UpstreamUnavailable("the request could not be sent to a fallback".into()),
        }
    }
}

/// The client's request as it arrived (method, target, headers), kept by a route that may fall
/// back, before its own rewriting.
pub(crate) struct Handover {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Handover {
    pub(crate) fn keep<B>(req: &Request<B>) -> Handover {
        Handover {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        }
    }

    /// The request again, whole, for the fallback route; a WebSocket handshake takes the
    /// client's pending upgrade with it.
    pub(crate) fn into_request(
        self,
        reason: &'static str,
        body: Bytes,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> FallingBack {
        let mut request = Request::new(ClientBody::Whole(body));
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        if let Some(upgrade) = upgrade {
            request.extensions_mut().insert(upgrade);
        }
        FallingBack { reason, request }
    }
}

/// A request on its way to the fallback route, and why.
pub(crate) struct FallingBack {
    reason: &'static str,
    request: Request<ClientBody>,
}

/// Whether an attempt's outcome sends a replayable request to the fallback, and the reason
/// (the metric's `reason` label).
pub(crate) fn fallback_reason(sent: &Result<(Response<UpstreamBody>, HeaderMap), ProxyError>) -> Option<&'static str> {
    match sent {
        Err(ProxyError::UpstreamTimeout(_)) => Some("timeout"),
        Err(err) if crate::upstream::is_connect_failure(err) => Some("connect"),
        Ok((response, _)) if response.status() == StatusCode::SERVICE_UNAVAILABLE => Some("503"),
        Ok((response, _)) if response.status() == StatusCode::TOO_MANY_REQUESTS => Some("429"),
        _ => None,
    }
}

/// One `[[route]]`, built.
pub struct Route {
    pub config: RouteConfig,
    pub proxy: Proxy,
    pub keys: Arc<KeyRuntime>,
    pub limiter: Arc<Limiter>,
    /// Kept so a reload that leaves this route's `[route.limits.shared]` alone reuses it.
    pub shared: Option<Arc<SharedStore>>,
}

/// Where a route falls back to.
#[derive(Debug, Clone, Copy)]
enum Target {
    Default,
    Route(usize),
}

/// The routes of one run state, and the table that picks one.
pub struct Router {
    routes: Vec<Route>,
    /// (prefix, route index), longest prefix first.
    prefixes: Vec<(String, usize)>,
    fallbacks: Vec<Option<Target>>,
    /// The default route's upstream URL and scheme, for `/ready`.
    default_upstream: String,
    default_scheme: &'static str,
    metrics: Arc<Metrics>,
}

impl Router {
    /// `routes` in config order (validation has checked names, prefixes and fallbacks).
    pub fn new(
        routes: Vec<Route>,
        default_upstream: &str,
        default_scheme: &'static str,
        metrics: Arc<Metrics>,
    ) -> Router {
        let mut prefixes: Vec<(String, usize)> = routes
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.config.paths.iter().map(move |p| (p.clone(), i)))
            .collect();
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        let fallbacks = routes
            .iter()
            .map(|r| match r.config.fallback.as_deref() {
                None => None,
                Some(DEFAULT_ROUTE_NAME) => Some(Target::Default),
                Some(name) => routes.iter().position(|o| o.config.name == name).map(Target::Route),
            })
            .collect();
        Router {
            routes,
            prefixes,
            fallbacks,
            default_upstream: default_upstream.to_string(),
            default_scheme,
            metrics,
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route claiming `path` (longest prefix, segment boundary); `None` for the default.
    pub fn route_for(&self, path: &str) -> Option<usize> {
        if self.prefixes.is_empty() {
            return None;
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| RouteConfig::claims(prefix, path))
            .map(|(_, i)| *i)
    }

    pub fn limiter<'a>(&'a self, route: Option<usize>, default: &'a Arc<Limiter>) -> &'a Arc<Limiter> {
        match route.and_then(|i| self.routes.get(i)) {
            Some(route) => &route.limiter,
            None => default,
        }
    }

    /// Forward through route `index`, falling back once if it gives the request up.
    pub async fn handle(
        &self,
        index: usize,
        default: &Proxy,
        req: Request<ClientBody>,
        request_id: &str,
        exchange: &Arc<Exchange>,
    ) -> Response<ProxyBody> {
        let Some(route) = self.routes.get(index) else {
            return default.handle(req, request_id, exchange).await;
        };
        let fallback = self
            .fallbacks
            .get(index)
            .copied()
            .flatten()
            .and_then(|target| match target {
                Target::Default => Some((DEFAULT_ROUTE_NAME, default)),
                Target::Route(i) => self.routes.get(i).map(|r| (r.config.name.as_str(), &r.proxy)),
            });
        // A fallback without a key would only trade the upstream's answer for a 503.
        let hop = match fallback {
            Some((_, proxy)) if proxy.has_key() => Hop::First,
            _ => Hop::Only,
        };
        let first = Box::pin(route.proxy.forward(req, request_id, exchange, hop)).await;
        let forwarded = match (first, fallback) {
            (Err(Stop::FallBack(falling)), Some((to, proxy))) => {
                let FallingBack { reason, request } = *falling;
                let from = route.config.name.as_str();
                tracing::info!(request_id, from, to, reason, "route fell back");
                self.metrics
                    .route_fallbacks
                    .get_or_create(&FallbackLabels {
                        from: from.to_string(),
                        to: to.to_string(),
                        reason,
                    })
                    .inc();
                exchange.note_fallback(from, to, reason);
                Box::pin(proxy.forward(request, request_id, exchange, Hop::Fallback)).await
            }
            (first, _) => first,
        };
        answer(forwarded, request_id)
    }

    /// Every route for `/ready`: the default first (with `default_keys`), then the
    /// `[[route]]`s in config order. `state` is `ready` or `key_unavailable`.
    pub fn status(&self, default_keys: &KeyStatus) -> Vec<serde_json::Value> {
        let entry = |name: &str, paths: serde_json::Value, upstream: &str, scheme: &str, key: &KeyStatus, fallback| {
            serde_json::json!({
                "name": name,
                "paths": paths,
                "upstream": upstream,
                "scheme": scheme,
                "fallback": fallback,
                "state": if key.ready { "ready" } else { "key_unavailable" },
                "key": key,
            })
        };
        let mut out = vec![entry(
            DEFAULT_ROUTE_NAME,
            serde_json::json!(["*"]),
            &self.default_upstream,
            self.default_scheme,
            default_keys,
            None::<&str>,
        )];
        for route in &self.routes {
            let c = &route.config;
            out.push(entry(
                &c.name,
                serde_json::json!(c.paths),
                &c.upstream,
                c.scheme.as_str(),
                &route.keys.store.status(),
                c.fallback.as_deref(),
            ));
        }
        out
    }
}
