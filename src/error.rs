//! The one table of errors the proxy itself answers with.
//!
//! Every response the proxy makes on its own (as opposed to passing an upstream answer through)
//! comes from [`ProxyError::into_response`]: JSON in the shape the Smallest API uses,
//! `{"error": "...", "code": "UPPER_SNAKE", "request_id": "..."}`, with the status this table
//! gives. Messages are written for the person reading them and never carry key material: an
//! error is built from what the proxy knows about the request, never from secrets.

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};
use std::time::Duration;

/// Correlates a client's request, our log line and the upstream's request.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Errors of a body in either direction: hyper's, or the proxy's own bounds.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// An error the proxy answers itself. Upstream errors are not this type: they pass through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The request is malformed for a proxy (absolute-form URI naming another host, ...).
    BadRequest(String),
    /// A request body framed in a way the proxy cannot forward faithfully; answered 400 and
    /// the connection closed (its body is not read).
    UnsupportedFraming(String),
    /// `CONNECT` and friends: this is not a forward proxy.
    MethodNotAllowed(String),
    /// The `Host` header names something other than this loopback proxy (DNS rebinding).
    ForbiddenHost(String),
    /// A browser page tried to spend the key.
    ForbiddenOrigin(String),
    /// No usable key: the source has not given a valid one yet, or the last good key is too old.
    KeyUnavailable,
    /// The upstream could not be reached (refused, reset, DNS, ...).
    UpstreamUnavailable(String),
    /// The upstream's certificate did not verify, or the TLS handshake failed.
    UpstreamTls(String),
    /// Connect or response-head deadline passed.
    UpstreamTimeout(String),
    /// A client-side limit shed the request; `retry_after` is the suggested wait.
    RateLimited { message: String, retry_after: Duration },
    /// A Unix socket caller whose uid is not in `listen.allowed_uids`.
    ForbiddenCaller(String),
    /// `listen.token_file` is set and the request's `X-Proxy-Token` is missing or wrong.
    ProxyTokenRequired(String),
    /// The method and path are outside `[policy]`.
    ForbiddenPath(String),
    /// Too many request headers, or too many bytes of them.
    HeadersTooLarge(String),
    /// The request target is longer than `listen.max_uri_bytes`.
    UriTooLong(String),
    /// The body is (or grew) larger than `listen.max_body_size`.
    PayloadTooLarge(String),
    /// `listen.require_app`: the caller matched no `[[app]]`.
    AppRequired(String),
    /// The app has spent its daily budget; the body names it and when the day turns.
    BudgetExceeded {
        app: String,
        message: String,
        resets_at: String,
        retry_after: Duration,
    },
}

impl ProxyError {
    /// Status and stable machine-readable code: the table DESIGN.md refers to.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BadRequest(_) | ProxyError::UnsupportedFraming(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            ProxyError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            ProxyError::ForbiddenHost(_) => (StatusCode::MISDIRECTED_REQUEST, "FORBIDDEN_HOST"),
            ProxyError::ForbiddenOrigin(_) => (StatusCode::FORBIDDEN, "FORBIDDEN_ORIGIN"),
            ProxyError::KeyUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "KEY_UNAVAILABLE"),
            ProxyError::UpstreamUnavailable(_) => (StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE"),
            ProxyError::UpstreamTls(_) => (StatusCode::BAD_GATEWAY, "UPSTREAM_TLS"),
            ProxyError::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT"),
            ProxyError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED"),
            ProxyError::ForbiddenCaller(_) => (StatusCode::FORBIDDEN, "FORBIDDEN_CALLER"),
            ProxyError::ProxyTokenRequired(_) => (StatusCode::UNAUTHORIZED, "PROXY_TOKEN_REQUIRED"),
            ProxyError::ForbiddenPath(_) => (StatusCode::FORBIDDEN, "FORBIDDEN_PATH"),
            ProxyError::HeadersTooLarge(_) => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "HEADERS_TOO_LARGE"),
            ProxyError::UriTooLong(_) => (StatusCode::URI_TOO_LONG, "URI_TOO_LONG"),
            ProxyError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            ProxyError::AppRequired(_) => (StatusCode::UNAUTHORIZED, "APP_REQUIRED"),
            ProxyError::BudgetExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "BUDGET_EXCEEDED"),
        }
    }

    fn message(&self) -> String {
        match self {
            ProxyError::BadRequest(m)
            | ProxyError::UnsupportedFraming(m)
            | ProxyError::MethodNotAllowed(m)
            | ProxyError::ForbiddenHost(m)
            | ProxyError::ForbiddenOrigin(m)
            | ProxyError::UpstreamUnavailable(m)
            | ProxyError::UpstreamTls(m)
            | ProxyError::UpstreamTimeout(m)
            | ProxyError::ForbiddenCaller(m)
            | ProxyError::ProxyTokenRequired(m)
            | ProxyError::ForbiddenPath(m)
            | ProxyError::HeadersTooLarge(m)
            | ProxyError::UriTooLong(m)
            | ProxyError::PayloadTooLarge(m)
            | ProxyError::AppRequired(m) => m.clone(),
            ProxyError::BudgetExceeded { message, .. } => message.clone(),
            ProxyError::RateLimited { message, .. } => message.clone(),
            ProxyError::KeyUnavailable => {
                "no usable API key: the key source has not given a valid one (/ready says why); nothing is served until it does".into()
            }
        }
    }

    /// The JSON body, with the request id the client can quote back to us.
    pub fn to_json(&self, request_id: &str) -> serde_json::Value {
        let (_, code) = self.status_and_code();
        let mut body = serde_json::json!({
            "error": self.message(),
            "code": code,
            "request_id": request_id,
        });
        if let ProxyError::RateLimited { retry_after, .. } = self {
            body["retry_after"] = serde_json::json!(retry_after_secs(*retry_after));
        }
        if let ProxyError::BudgetExceeded {
            app,
            resets_at,
            retry_after,
            ..
        } = self
        {
            body["app"] = serde_json::json!(app);
            body["resets_at"] = serde_json::json!(resets_at);
            body["retry_after"] = serde_json::json!(retry_after_secs(*retry_after));
        }
        body
    }

    /// The whole response. `Connection: close` is added for 413 and framing refusals: the body
    /// was not read, so the connection cannot carry another request.
    pub fn into_response<B: From<Bytes>>(self, request_id: &str) -> Response<B> {
        let (status, _) = self.status_and_code();
        let body = self.to_json(request_id).to_string();
        let mut response = Response::new(B::from(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(REQUEST_ID_HEADER, id);
        }
        if let ProxyError::RateLimited { retry_after, .. } | ProxyError::BudgetExceeded { retry_after, .. } = &self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after)));
        }
        if let ProxyError::PayloadTooLarge(_) | ProxyError::UnsupportedFraming(_) = &self {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Whole seconds, rounded up, never 0: `Retry-After: 0` would invite a hot retry loop.
fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_the_documented_status() {
        let cases = [
            (ProxyError::BadRequest("x".into()), 400, "BAD_REQUEST"),
            (ProxyError::MethodNotAllowed("x".into()), 405, "METHOD_NOT_ALLOWED"),
            (ProxyError::ForbiddenHost("x".into()), 421, "FORBIDDEN_HOST"),
            (ProxyError::ForbiddenOrigin("x".into()), 403, "FORBIDDEN_ORIGIN"),
            (ProxyError::KeyUnavailable, 503, "KEY_UNAVAILABLE"),
            (ProxyError::UpstreamUnavailable("x".into()), 502, "UPSTREAM_UNAVAILABLE"),
            (ProxyError::UpstreamTls("x".into()), 502, "UPSTREAM_TLS"),
            (ProxyError::UpstreamTimeout("x".into()), 504, "UPSTREAM_TIMEOUT"),
            (ProxyError::ForbiddenCaller("x".into()), 403, "FORBIDDEN_CALLER"),
            (ProxyError::ProxyTokenRequired("x".into()), 401, "PROXY_TOKEN_REQUIRED"),
            (ProxyError::ForbiddenPath("x".into()), 403, "FORBIDDEN_PATH"),
            (ProxyError::HeadersTooLarge("x".into()), 431, "HEADERS_TOO_LARGE"),
            (ProxyError::UriTooLong("x".into()), 414, "URI_TOO_LONG"),
            (ProxyError::PayloadTooLarge("x".into()), 413, "PAYLOAD_TOO_LARGE"),
            (ProxyError::AppRequired("x".into()), 401, "APP_REQUIRED"),
            (
                ProxyError::BudgetExceeded {
                    app: "a".into(),
                    message: "x".into(),
                    resets_at: "2026-01-02T00:00:00Z".into(),
                    retry_after: Duration::from_secs(5),
                },
                429,
                "BUDGET_EXCEEDED",
            ),
        ];
        for (err, status, code) in cases {
            let (s, c) = err.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code));
            let json = err.to_json("rid");
            assert_eq!(json["code"], code);
            assert_eq!(json["request_id"], "rid");
            assert!(json["error"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn rate_limited_carries_retry_after_in_header_and_body() {
        let err = ProxyError::RateLimited {
            message: "queue full".into(),
            retry_after: Duration::from_millis(1500),
        };
        let response: Response<Bytes> = err.into_response("abc");
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
