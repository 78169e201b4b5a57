//! Header and URI rewriting between the client's request and the upstream's.
//!
//! Order matters and is the security property here: everything the client could use to smuggle
//! its own credentials or framing is removed first (its `Authorization`, `Proxy-*`, hop-by-hop
//! headers and every header its `Connection` names), and only then is the key inserted, so no
//! client header can ever displace, duplicate or follow the injected one.
//!
//! On the way back, a response head loses its hop-by-hop headers and its `Content-Length` is
//! made one the client can rely on ([`normalise_content_length`]), whichever writer (the front
//! end's or hyper's) then frames it.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use crate::error::ProxyError;
use crate::upstream::wire::parse_digits;
use crate::upstream::UpstreamBase;

/// Remove hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Remove only what is there, without allocating in the usual cases: most messages carry
    // no hop-by-hop header, or only `Connection: keep-alive` (callgrind, benches/RESULTS.md).
    let (mut found, mut connection) = (0, false);
    for name in headers.keys().filter(|name| is_hop_by_hop(name)) {
        found += 1;
        connection |= name == header::CONNECTION;
    }
    if found == 0 {
        return;
    }
    // Headers `Connection` names beyond the standard hop-by-hop set (removed below anyway).
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
            if token.is_empty() || token.eq_ignore_ascii_case("close") || is_hop_by_hop_token(token) {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
    if found == usize::from(connection) {
        return;
    }
    let rest: Vec<HeaderName> = headers.keys().filter(|name| is_hop_by_hop(name)).cloned().collect();
    for name in rest {
        headers.remove(name);
    }
}

/// Headers that describe one hop, never the message (RFC 9110 §7.6.1), plus the proxy-auth
/// pair. `Upgrade` and `Connection` are re-added for a WebSocket handshake by the caller.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A match on the (always lowercase) name: comparing against an array of `HeaderName`s built
/// and dropped that array on every call, about 1000 instructions per message (callgrind).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// A `Connection` token naming a hop-by-hop header, in any case.
fn is_hop_by_hop_token(token: &str) -> bool {
    HOP_BY_HOP.iter().any(|name| name.eq_ignore_ascii_case(token))
}

/// A response's `Content-Length` as the client may see it (RFC 9110 §8.6, RFC 9112 §6.3):
/// none on a 1xx or 204, and at most one otherwise. An upstream may repeat the header, or list
/// one value several times in it (`5, 5`), which RFC 9110 §8.6 lets a recipient fold; a client
/// may refuse either (aiohttp: "Duplicate Content-Length"), so they become one. Values that
/// differ, or are not numbers, leave the body's length unknown: the response is refused
/// (502), except on a 304, which has no body for them to delimit and simply loses them.
pub fn normalise_content_length(status: StatusCode, headers: &mut HeaderMap) -> Result<(), ProxyError> {
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        headers.remove(header::CONTENT_LENGTH);
        return Ok(());
    }
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    // The usual case, one header holding one number, costs this lookup and one parse.
    if values.next().is_none() && parse_digits(first.as_bytes()).is_some() {
        return Ok(());
    }
    let mut length = None;
    let mut agree = true;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            match (parse_digits(item.trim_ascii()), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(seen)) if n == seen => {}
                _ => agree = false,
            }
        }
    }
    match length {
        Some(n) if agree => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            Ok(())
        }
        _ if status == StatusCode::NOT_MODIFIED => {
            headers.remove(header::CONTENT_LENGTH);
            Ok(())
        }
        _ => Err(ProxyError::UpstreamUnavailable(
            "the upstream's response has a Content-Length that is not one number, so its length is unknown".into(),
        )),
    }
}

/// Step one for a client request: remove everything the client could use to bring its own
/// credentials or framing. Done once per request, before any send.
pub fn strip_client_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    // Replaced by the upstream's own Host ([`UpstreamBase::host`]); HTTP/2 takes :authority
    // from the upstream URI.
    headers.remove(header::HOST);
}

/// The upstream's `Host` (HTTP/1.1 needs one; hyper-util is told not to build it).
pub fn set_upstream_host(headers: &mut HeaderMap, base: &UpstreamBase) {
    headers.insert(header::HOST, base.host.clone());
}

/// Step two, per send (a resend may carry a newer key): the key, as the only Authorization.
pub fn inject_key(headers: &mut HeaderMap, authorization: &HeaderValue) {
    headers.insert(header::AUTHORIZATION, authorization.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> HeaderValue {
        let mut v = HeaderValue::from_static("Bearer sk-proxy");
        v.set_sensitive(true);
        v
    }

    #[test]
    fn connection_named_headers_are_removed_before_injection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, Authorization, X-Secret"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer client-key"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8787"));
        strip_client_headers(&mut h);
        inject_key(&mut h, &key());
        assert_eq!(h.get_all(header::AUTHORIZATION).iter().count(), 1);
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-proxy");
        for gone in [
            "connection",
            "x-secret",
            "proxy-authorization",
            "transfer-encoding",
            "host",
        ] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn hop_by_hop_headers_go_even_when_connection_is_absent() {
        let mut h = HeaderMap::new();
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "left: {h:?}");
        assert_eq!(h["x-kept"], "yes");
        let mut clean = HeaderMap::new();
        clean.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean.len(), 1);
    }

    #[test]
    fn the_name_match_and_the_token_list_agree() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
            assert!(is_hop_by_hop_token(&name.to_ascii_uppercase()), "{name}");
        }
        assert!(!is_hop_by_hop(&header::CONTENT_TYPE));
        assert!(!is_hop_by_hop_token("x-kept"));
    }

    #[test]
    fn connection_tokens_in_any_case_and_with_close_remove_what_they_name() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive, close, X-Hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "left: {h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn several_client_authorizations_all_go() {
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        strip_client_headers(&mut h);
        inject_key(&mut h, &key());
        let all: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(all, vec![&key()]);
    }

    #[test]
    fn a_response_keeps_one_content_length_and_none_on_1xx_or_204() {
        fn lengths(status: u16, values: &[&'static str]) -> Result<Vec<String>, ProxyError> {
            let mut h = HeaderMap::new();
            h.insert("x-kept", HeaderValue::from_static("yes"));
            for v in values {
                h.append(header::CONTENT_LENGTH, HeaderValue::from_static(v));
            }
            normalise_content_length(StatusCode::from_u16(status).unwrap(), &mut h)?;
            assert_eq!(h["x-kept"], "yes");
            Ok(h.get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect())
        }
        assert_eq!(lengths(200, &[]).unwrap(), Vec::<String>::new());
        assert_eq!(lengths(200, &["5"]).unwrap(), ["5"]);
        assert_eq!(lengths(200, &["5", "5"]).unwrap(), ["5"]);
        assert_eq!(lengths(200, &["5", "05", "5"]).unwrap(), ["5"]);
        assert_eq!(lengths(404, &["0", "0"]).unwrap(), ["0"]);
        assert_eq!(lengths(200, &["5, 5"]).unwrap(), ["5"]);
        assert_eq!(lengths(200, &["5 ,5", "5"]).unwrap(), ["5"]);
        for status in [100, 101, 103, 204] {
            assert_eq!(lengths(status, &["7"]).unwrap(), Vec::<String>::new(), "{status}");
            assert_eq!(lengths(status, &["7", "7"]).unwrap(), Vec::<String>::new(), "{status}");
        }
        assert_eq!(lengths(304, &["9", "9"]).unwrap(), ["9"]);
        assert_eq!(lengths(304, &["9"]).unwrap(), ["9"]);
        assert_eq!(lengths(304, &["9", "8"]).unwrap(), Vec::<String>::new());
        for bad in [&["5", "6"][..], &["5", "x"], &["5", "-5"], &["5, 6"], &["x"], &["5,"]] {
            let e = lengths(200, bad).unwrap_err();
            assert_eq!(e.status_and_code().0, StatusCode::BAD_GATEWAY, "{bad:?}");
        }
    }

    #[test]
    fn the_upstream_host_omits_only_the_default_port() {
        for (url, host) in [
            ("https://api.smallest.ai", "api.smallest.ai"),
            ("https://api.smallest.ai:443/v1", "api.smallest.ai"),
            ("https://localhost:8443", "localhost:8443"),
            ("http://127.0.0.1:80", "127.0.0.1"),
            ("http://127.0.0.1:443", "127.0.0.1:443"),
            ("https://[::1]:9000", "[::1]:9000"),
        ] {
            let base = UpstreamBase::parse(url).unwrap();
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8787"));
            set_upstream_host(&mut h, &base);
            assert_eq!(h.get_all(header::HOST).iter().count(), 1);
            assert_eq!(h[header::HOST], host, "{url}");
        }
    }
}
