//! `GET /usage`: today's usage totals and budgets per app, as JSON (see `crate::usage`). Like
//! `/metrics` it is served on the `[admin] address` when one is set, and only there, so apps on
//! the main port cannot read each other's spend.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::proxy::body::ProxyBody;
use crate::usage::Usage;

pub const USAGE_PATH: &str = "/usage";

pub fn respond<B>(req: &Request<B>, usage: &Usage) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let body = serde_json::json!({"error": "/usage answers GET and HEAD only", "code": "METHOD_NOT_ALLOWED"});
        return json(StatusCode::METHOD_NOT_ALLOWED, &body);
    }
    json(StatusCode::OK, &usage.report())
}

/// `/usage` on the main listener when the admin address serves it.
pub fn elsewhere() -> Response<ProxyBody> {
    let body = serde_json::json!({"error": "usage is served on the [admin] address", "code": "NOT_FOUND"});
    json(StatusCode::NOT_FOUND, &body)
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
