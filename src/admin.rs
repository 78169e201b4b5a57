//! Endpoints the proxy answers itself and never forwards or limits: `/health` (the process is
//! up), `/ready` (a key is loaded, so requests can be served) and `/metrics` (Prometheus).
//!
//! `/ready` reports the key's source, fingerprint, age and last error: enough for an operator
//! to see which key is live and why it is not, never the key.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::proxy::body::ProxyBody;

pub const HEALTH_PATH: &str = "/health";
pub const READY_PATH: &str = "/ready";
pub const METRICS_PATH: &str = "/metrics";

/// Whether this request is for an admin endpoint (any method; only GET/HEAD are served).
pub fn is_admin_request<B>(req: &Request<B>) -> bool {
    matches!(req.uri().path(), HEALTH_PATH | READY_PATH | METRICS_PATH)
}

pub fn respond<B>(req: &Request<B>, keys: &KeyStore, metrics: &Metrics) -> Response<ProxyBody> {
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
            if status.ready {
                json(StatusCode::OK, &serde_json::json!({"status": "ready", "key": status}))
            } else {
                let body = serde_json::json!({
                    "status": "not_ready",
                    "error": "no API key is loaded yet",
                    "code": "KEY_UNAVAILABLE",
                    "key": status,
                });
                json(StatusCode::SERVICE_UNAVAILABLE, &body)
            }
        }
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
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
