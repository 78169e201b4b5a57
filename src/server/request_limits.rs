//! Size limits on what a client sends, answered with the proxy's JSON errors: header count and
//! bytes → 431 `HEADERS_TOO_LARGE`, request target → 414 `URI_TOO_LONG`, body →
//! 413 `PAYLOAD_TOO_LARGE`.
//!
//! Two layers. hyper's parser has hard bounds (`max_headers`, `max_header_size`) set at
//! `PARSER_BOUND_FACTOR` times these limits; a head past them never becomes a request (hyper
//! answers a bare 431 and closes). Heads between the configured limit and that bound are
//! parsed and refused here, with a JSON body saying which limit and how to change it.
//!
//! The body cap is decided from `Content-Length` before a byte of the body is read (and the
//! answer closes the connection); a chunked body has no declared length, so it streams
//! through a counting wrapper (`ProxyBody::Capped`) that fails the upload the moment it
//! passes the cap.

use http::{header, Request};

use crate::config::{ListenConfig, PARSER_BOUND_FACTOR};
use crate::error::ProxyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_body_size: Option<u64>,
}

impl RequestLimits {
    pub fn from_config(config: &ListenConfig) -> RequestLimits {
        RequestLimits {
            max_header_bytes: config.max_header_bytes,
            max_headers: config.max_headers,
            max_uri_bytes: config.max_uri_bytes,
            max_body_size: config.max_body_size,
        }
    }

    /// hyper's header-count bound.
    pub fn parser_max_headers(&self) -> usize {
        self.max_headers.saturating_mul(PARSER_BOUND_FACTOR)
    }

    /// hyper's bound on the whole head (request line and headers) in bytes.
    pub fn parser_max_head_bytes(&self) -> usize {
        (self.max_header_bytes.saturating_add(self.max_uri_bytes)).saturating_mul(PARSER_BOUND_FACTOR)
    }

    /// Check the head: URI length, header count and bytes, declared body length.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        let uri = req.uri();
        let uri_len = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.scheme_str().map_or(0, |s| s.len() + 3);
        if uri_len > self.max_uri_bytes {
            return Err(ProxyError::UriTooLong(format!(
                "the request target is {uri_len} bytes; this proxy accepts up to {} (listen.max_uri_bytes)",
                self.max_uri_bytes
            )));
        }
        let headers = req.headers();
        if headers.len() > self.max_headers {
            return Err(ProxyError::HeadersTooLarge(format!(
                "{} request headers; this proxy accepts up to {} (listen.max_headers)",
                headers.len(),
                self.max_headers
            )));
        }
        // As on the wire: `name: value` and CRLF.
        let header_bytes: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
        if header_bytes > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge(format!(
                "the request headers are {header_bytes} bytes; this proxy accepts up to {} (listen.max_header_bytes)",
                self.max_header_bytes
            )));
        }
        if let Some(max) = self.max_body_size {
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(len) = declared.filter(|len| *len > max) {
                return Err(ProxyError::PayloadTooLarge(format!(
                    "the request body is {len} bytes; this proxy accepts up to {max} (listen.max_body_size)"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            max_header_bytes: 200,
            max_headers: 3,
            max_uri_bytes: 20,
            max_body_size: Some(10),
        }
    }

    fn code(result: Result<(), ProxyError>) -> &'static str {
        result.map_or_else(|e| e.status_and_code().1, |_| "OK")
    }

    #[test]
    fn each_limit_has_its_answer() {
        let ok = Request::get("/short").header("a", "1").body(()).unwrap();
        assert_eq!(code(limits().check(&ok)), "OK");
        let long = Request::get(format!("/{}", "x".repeat(20))).body(()).unwrap();
        assert_eq!(code(limits().check(&long)), "URI_TOO_LONG");
        let many = Request::get("/")
            .header("a", "1")
            .header("b", "2")
            .header("c", "3")
            .header("d", "4");
        assert_eq!(code(limits().check(&many.body(()).unwrap())), "HEADERS_TOO_LARGE");
        let big = Request::get("/").header("a", "v".repeat(200)).body(()).unwrap();
        assert_eq!(code(limits().check(&big)), "HEADERS_TOO_LARGE");
        let body = Request::post("/").header("content-length", "11").body(()).unwrap();
        assert_eq!(code(limits().check(&body)), "PAYLOAD_TOO_LARGE");
        let body = Request::post("/").header("content-length", "10").body(()).unwrap();
        assert_eq!(code(limits().check(&body)), "OK");
        let no_cap = RequestLimits {
            max_body_size: None,
            ..limits()
        };
        let body = Request::post("/").header("content-length", "99999").body(()).unwrap();
        assert_eq!(code(no_cap.check(&body)), "OK");
    }

    #[test]
    fn hypers_bounds_sit_above_the_configured_limits() {
        let l = limits();
        assert!(l.parser_max_headers() > l.max_headers);
        assert!(l.parser_max_head_bytes() > l.max_header_bytes + l.max_uri_bytes);
    }
}
