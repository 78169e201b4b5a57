//! `GET /usage`: today's usage totals and budgets per app, as JSON (see `crate::usage`). Like
//! `/metrics` it is served on the `[admin] address` when one is set, and only there, so apps on
//! the main port cannot read each other's spend.

use http::{Method, Request, Response, StatusCode};

use super::admin::json;

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
