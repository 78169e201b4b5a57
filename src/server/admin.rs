//! Endpoints the proxy answers itself and never forwards or limits: `/health` (the process is
//! up), `/ready` (a key is loaded, so requests can be served) and `/metrics` (Prometheus).
//!
//! `/ready` reports the key's source, fingerprint, age and last error: enough for an operator
//! to see which key is live and why it is not, never the key; and under `routes`, each route
//! (the default, then every `[[route]]`) with its upstream, scheme, fallback, state and key.
//! It answers 503 `key_rejected` (or `license_expired` / `quota_exceeded` for a self-hosted
//! server) while the upstream refuses the default route's key.
//! Under `limits`, each limit class of the default route in force with its current concurrency
//! (learned or fixed).
//!
//! With `[admin] address` set, the three are also served on that separate listener, and
//! `/metrics` only there: the scrape port can be opened to the cluster without opening the
//! proxy, and apps on the main port cannot read the metrics. `/health` and `/ready` stay on the
//! main port too, so probes and `smallest-proxy health` work either way.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyStore;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::proxy::body::ProxyBody;
use crate::proxy::route::Router;

pub const HEALTH_PATH: &str = "/health";
pub const READY_PATH: &str = "/ready";
pub const METRICS_PATH: &str = "/metrics";

/// Whether this request is for an admin endpoint (any method; only GET/HEAD are served).
pub fn is_admin_request<B>(req: &Request<B>) -> bool {
    matches!(req.uri().path(), HEALTH_PATH | READY_PATH | METRICS_PATH)
}

pub fn respond<B>(
    req: &Request<B>,
    keys: &KeyStore,
    routes: &Router,
    limiter: &Limiter,
    metrics: &Metrics,
) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let body =
            serde_json::json!({"error": "admin endpoints answer GET and HEAD only", "code": "METHOD_NOT_ALLOWED"});
        return json(StatusCode::METHOD_NOT_ALLOWED, &body);
    }
    match req.uri().path() {
        HEALTH_PATH => json(StatusCode::OK, &serde_json::json!({"status": "healthy"})),
        METRICS_PATH => {
            let mut response = Response::new(ProxyBody::full(Bytes::from(metrics.encode())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        _ => {
            let status = keys.status();
            // Every route, the default first; only the default route's key decides readiness
            // (a `[[route]]` without a key answers 503 KEY_UNAVAILABLE on its own paths).
            let routes = routes.status(&status);
            if let Some(rejected) = status.rejected.clone() {
                let what = match rejected.ready_status() {
                    "key_rejected" => format!(
                        "the upstream rejected the API key (fingerprint {}) {} time(s), also after a refresh and a resend; put a valid key in the {} source",
                        rejected.fingerprint, rejected.count, status.source
                    ),
                    _ => format!(
                        "the upstream refuses to serve this account: {} (expires_at {})",
                        rejected.code.as_deref().unwrap_or("refused"),
                        rejected.expires_at.as_deref().unwrap_or("unknown")
                    ),
                };
                let body = serde_json::json!({
                    "status": rejected.ready_status(),
                    "error": what,
                    "code": rejected.ready_status().to_ascii_uppercase(),
                    "rejections": rejected.count,
                    "key": status,
                    "routes": routes,
                    "limits": limiter.status(),
                });
                json(StatusCode::SERVICE_UNAVAILABLE, &body)
            } else if status.ready {
                json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ready", "key": status, "routes": routes, "limits": limiter.status()}),
                )
            } else {
                let body = serde_json::json!({
                    "status": "not_ready",
                    "error": "no API key is loaded yet",
                    "code": "KEY_UNAVAILABLE",
                    "key": status,
                    "routes": routes,
                    "limits": limiter.status(),
                });
                json(StatusCode::SERVICE_UNAVAILABLE, &body)
            }
        }
    }
}

/// `/metrics` on the main listener when it is served on the admin address instead.
pub fn metrics_elsewhere() -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": "metrics are served on the [admin] address",
        "code": "NOT_FOUND",
    });
    json(StatusCode::NOT_FOUND, &body)
}

/// Anything else on the admin listener.
pub fn not_found() -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": "the admin address serves /health, /ready and /metrics only",
        "code": "NOT_FOUND",
    });
    json(StatusCode::NOT_FOUND, &body)
}

/// Answers one admin request (the running state's key store and the run's metrics).
pub type AdminResponder = Arc<dyn Fn(&Request<Incoming>) -> Response<ProxyBody> + Send + Sync>;

/// Serve `respond` on the admin listener until `shutdown`. Plain HTTP/1.1; nothing is
/// forwarded, so no drain: open scrapes end with the process.
pub async fn serve(listener: TcpListener, respond: AdminResponder, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let respond = respond.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// Scrapers and probes send their head at once; a slow one is not worth a connection.
const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A JSON answer that no cache keeps (the admin endpoints' and `/usage`'s).
pub(super) fn json(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
