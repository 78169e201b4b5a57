//! What the proxy refuses before anything is forwarded: it is a credential injector for one
//! upstream, not an open proxy, and a browser page must not be able to spend the key.
//!
//! - `CONNECT` → 405: no tunnels to arbitrary hosts.
//! - `TRACE` (and IIS's `TRACK`) → 405: a server or intermediary that implements it echoes the
//!   request it received, and the request it receives carries the injected key (RFC 9110
//!   §9.3.8: a TRACE must not carry sensitive fields; this proxy would add one).
//!
//!   Methods are case-sensitive (RFC 9110 §9.1), but servers and frameworks that upper-case them
//!   exist, so these three are refused in any letter case.
//! - absolute-form request targets (`GET http://evil/ HTTP/1.1`) naming anything but this
//!   loopback proxy → 400. One that names it is then rewritten to the origin form it stands for
//!   ([`to_origin_form`]), before anything else reads the target.
//! - a `Host` that is not loopback on a loopback TCP listener → 421 (DNS rebinding: a page on
//!   `evil.example` resolving to 127.0.0.1 still sends `Host: evil.example`).
//! - a browser `Origin` not explicitly allowed → 403.

use http::uri::PathAndQuery;
use http::{header, Method, Request, Uri};

use crate::config::host_is_loopback;
use crate::error::ProxyError;

/// The guard's settings, derived from `[listen]`.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Host checking is for loopback TCP listeners; with `allow_remote` the operator has chosen
    /// to serve other names (a pod IP, a service name).
    pub check_host: bool,
    pub allowed_origins: Vec<String>,
}

/// How the client reached us; Unix-socket callers cannot be browsers, so Host is not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
}

impl Guard {
    pub fn check<B>(&self, req: &Request<B>, transport: Transport) -> Result<(), ProxyError> {
        match refused_method(req.method()) {
            Some(Refused::Connect) => {
                return Err(ProxyError::MethodNotAllowed(
                    "CONNECT is not supported: this is not a forward proxy".into(),
                ))
            }
            Some(Refused::Trace) => {
                return Err(ProxyError::MethodNotAllowed(format!(
                    "{} is not supported: the request would be echoed back with the proxy's key in it",
                    req.method()
                )))
            }
            None => {}
        }
        if let Some(authority) = req.uri().authority() {
            if !host_is_loopback(authority.host()) {
                return Err(ProxyError::BadRequest(format!(
                    "absolute-form request for {:?}: this proxy forwards only to its configured upstream; send the path alone",
                    authority.host()
                )));
            }
        }
        if self.check_host && transport == Transport::Tcp {
            if let Some(host) = req.headers().get(header::HOST) {
                let host = host.to_str().unwrap_or("");
                if !host_is_loopback(host_without_port(host)) {
                    return Err(ProxyError::ForbiddenHost(format!(
                        "Host {host:?} is not a loopback name; call the proxy as 127.0.0.1, localhost or [::1]"
                    )));
                }
            }
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !self.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
                return Err(ProxyError::ForbiddenOrigin(format!(
                    "requests from browser pages (Origin {origin:?}) are refused; list the origin in listen.allowed_origins to allow it"
                )));
            }
        }
        Ok(())
    }
}

/// An absolute-form target the guard accepted, as the origin form it
/// stands for: `http://127.0.0.1:8787/v1/x?y=1` → `/v1/x?y=1`, and an empty path is `/`
/// (RFC 9112 §3.2.1, §3.2.2), so `http://127.0.0.1?x=1` → `/?x=1`, not `?x=1`. Run once, after
/// the guard and before the policy, so the policy, the access line and the upstream see one
/// target. An origin-form target (every plain request) is left as it is, without a copy.
pub fn to_origin_form(uri: &mut Uri) -> Result<(), ProxyError> {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return Ok(());
    }
    if uri.scheme().is_none() {
        // Authority form (`host:port`) belongs to CONNECT alone (RFC 9112 §3.2.3), which the
        // guard has refused already; on any other method it names no path to forward.
        return Err(ProxyError::BadRequest(
            "an authority-form target (host:port) is only for CONNECT; send the path".into(),
        ));
    }
    let origin = match uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        Some(pq) => PathAndQuery::try_from(format!("/{}", pq.as_str()))
            .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded".into()))?,
        None => PathAndQuery::from_static("/"),
    };
    *uri = Uri::from(origin);
    Ok(())
}

enum Refused {
    Connect,
    Trace,
}

/// `CONNECT`, `TRACE` or `TRACK` in any letter case: a length test, then at most two byte
/// comparisons (no allocation; this runs for every request).
fn refused_method(method: &Method) -> Option<Refused> {
    let name = method.as_str().as_bytes();
    match name.len() {
        5 if name.eq_ignore_ascii_case(b"TRACE") || name.eq_ignore_ascii_case(b"TRACK") => Some(Refused::Trace),
        7 if name.eq_ignore_ascii_case(b"CONNECT") => Some(Refused::Connect),
        _ => None,
    }
}

fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, host: Option<&str>, origin: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(()).unwrap()
    }

    fn guard() -> Guard {
        Guard {
            check_host: true,
            allowed_origins: vec!["http://localhost:3000".into()],
        }
    }

    #[test]
    fn connect_is_405() {
        let e = guard()
            .check(&req("CONNECT", "evil.example:443", None, None), Transport::Tcp)
            .unwrap_err();
        assert_eq!(e.status_and_code().0, 405);
    }

    #[test]
    fn trace_track_and_connect_are_405_in_any_case() {
        for method in [
            "CONNECT", "connect", "Connect", "TRACE", "trace", "Trace", "tRACE", "TRACK", "track", "Track",
        ] {
            let e = guard()
                .check(&req(method, "/anything", Some("localhost"), None), Transport::Tcp)
                .unwrap_err();
            assert_eq!(
                e.status_and_code(),
                (http::StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
                "{method}"
            );
        }
        for method in ["GET", "get", "TRACES", "TRAC", "CONNECTS", "PATCH", "DELETE", "OPTIONS"] {
            guard()
                .check(&req(method, "/anything", Some("localhost"), None), Transport::Tcp)
                .unwrap_or_else(|e| panic!("{method}: {e:?}"));
        }
    }

    #[test]
    fn absolute_form_for_other_hosts_is_400_but_loopback_is_fine() {
        let e = guard()
            .check(&req("GET", "http://evil.example/x", None, None), Transport::Tcp)
            .unwrap_err();
        assert_eq!(e.status_and_code().1, "BAD_REQUEST");
        guard()
            .check(
                &req("GET", "http://127.0.0.1:8787/x", Some("127.0.0.1:8787"), None),
                Transport::Tcp,
            )
            .unwrap();
    }

    #[test]
    fn accepted_absolute_form_targets_become_origin_form() {
        for (target, origin) in [
            ("http://127.0.0.1?x=1", "/?x=1"),
            ("http://127.0.0.1:8787?x=1&y=2", "/?x=1&y=2"),
            ("http://localhost", "/"),
            ("http://[::1]:8787/", "/"),
            ("http://127.0.0.1/v1/voices?x=1", "/v1/voices?x=1"),
            ("https://localhost/a/b", "/a/b"),
            ("/already?x=1", "/already?x=1"),
            ("/", "/"),
            ("*", "*"),
        ] {
            let mut uri: Uri = target.parse().unwrap();
            to_origin_form(&mut uri).unwrap();
            assert_eq!(uri.to_string(), origin, "{target}");
            assert!(uri.scheme().is_none() && uri.authority().is_none(), "{target}");
            assert_eq!(uri.path_and_query().map(|pq| pq.as_str()), Some(origin), "{target}");
        }
        let mut authority_form: Uri = "127.0.0.1:443".parse().unwrap();
        let refused = to_origin_form(&mut authority_form).expect_err("authority form");
        assert_eq!(refused.status_and_code().1, "BAD_REQUEST");
    }

    #[test]
    fn loopback_hosts_pass_others_are_421() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8787",
            "localhost:1",
            "LOCALHOST",
            "[::1]:8787",
            "[::1]",
        ] {
            guard()
                .check(&req("GET", "/", Some(ok), None), Transport::Tcp)
                .unwrap_or_else(|e| panic!("{ok}: {e:?}"));
        }
        for bad in [
            "evil.example",
            "evil.example:8787",
            "10.0.0.1:8787",
            "localhost.evil.example",
        ] {
            let e = guard()
                .check(&req("GET", "/", Some(bad), None), Transport::Tcp)
                .unwrap_err();
            assert_eq!(e.status_and_code().0, 421, "{bad}");
        }
        guard()
            .check(&req("GET", "/", Some("anything"), None), Transport::Unix)
            .unwrap();
    }

    #[test]
    fn browser_origins_are_refused_unless_listed() {
        let e = guard()
            .check(
                &req("POST", "/", Some("localhost"), Some("https://evil.example")),
                Transport::Tcp,
            )
            .unwrap_err();
        assert_eq!(e.status_and_code(), (http::StatusCode::FORBIDDEN, "FORBIDDEN_ORIGIN"));
        guard()
            .check(
                &req("POST", "/", Some("localhost"), Some("http://localhost:3000")),
                Transport::Tcp,
            )
            .unwrap();
    }
}
