//! The framing rules the proxy adds to hyper's: a request body's transfer coding must be a
//! single `chunked`, or there must be none; and a WebSocket handshake carries no body.
//!
//! Every request is framed anew toward the upstream (a `Content-Length` or our own chunked
//! coding over HTTP/1.1, DATA frames over HTTP/2), so the upstream never parses the client's
//! bytes and cannot disagree with hyper about where a request ends: framing the two sides read
//! differently can only confuse the client's own connection. hyper already refuses what cannot
//! be read one way only (a `Transfer-Encoding` not ending in `chunked`, differing
//! `Content-Length`s, bad chunk sizes), reads `Content-Length` with `Transfer-Encoding` as
//! chunked and closes the connection after it (RFC 9112 §6.1), and merges equal
//! `Content-Length`s (RFC 9110 §8.6). What it would pass on is a coding applied before
//! `chunked` (`gzip, chunked`, or `chunked` twice, or split over two headers): re-framing would
//! drop that coding and hand the upstream a body it was never told is encoded, so those are
//! refused here with 400 and `Connection: close` (RFC 9112 §6.1 suggests 501 for a coding the
//! server does not understand; the error table keeps 400 `BAD_REQUEST` for every framing
//! refusal). The reasoning, and why the byte-level tap this replaced went, is in
//! `docs/design-notes.md`.
//!
//! A WebSocket handshake is forwarded without a body (the upstream would wait for bytes that
//! never come, and after the 101 the connection carries frames, not the rest of a body), so a
//! handshake that declares one is refused the same way rather than forwarded as a different
//! request.

use http::{header, HeaderMap, Request};

use crate::error::ProxyError;
use crate::proxy::upgrade::is_websocket_upgrade;
use crate::upstream::wire::parse_digits;

/// `Err` when the request's body is framed in a way the proxy cannot forward as it is.
pub fn check<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let headers = req.headers();
    check_transfer_coding(headers)?;
    if has_body(headers) && is_websocket_upgrade(req) {
        return Err(ProxyError::UnsupportedFraming(
            "a WebSocket handshake carries no body; send it without Content-Length or Transfer-Encoding".into(),
        ));
    }
    Ok(())
}

/// `Err` when the transfer codings are anything but one `chunked` (or absent).
fn check_transfer_coding(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = codings.next() else {
        return Ok(());
    };
    if codings.next().is_none() && first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
        return Ok(());
    }
    Err(ProxyError::UnsupportedFraming(
        "only Transfer-Encoding: chunked is supported; send the body chunked or with Content-Length".into(),
    ))
}

/// A chunked body, or a `Content-Length` other than 0.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| parse_digits(v.as_bytes()) != Some(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn one_chunked_or_none_passes_and_every_other_coding_is_refused() {
        for ok in [&[][..], &["chunked"], &["Chunked"], &[" chunked\t"]] {
            assert!(check_transfer_coding(&with(ok)).is_ok(), "{ok:?}");
        }
        for refused in [
            &["gzip, chunked"][..],
            &["chunked, chunked"],
            &["identity", "chunked"],
            &["chunked", "chunked"],
            &["deflate,chunked"],
        ] {
            let err = check_transfer_coding(&with(refused)).expect_err("refused");
            assert_eq!(err.status_and_code().1, "BAD_REQUEST", "{refused:?}");
        }
    }

    #[test]
    fn a_websocket_handshake_with_a_body_is_refused_and_one_without_passes() {
        let handshake = |extra: &[(&'static str, &'static str)]| {
            let mut req = Request::get("/ws")
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket");
            for (name, value) in extra {
                req = req.header(*name, *value);
            }
            req.body(()).expect("request")
        };
        assert!(check(&handshake(&[])).is_ok());
        assert!(check(&handshake(&[("content-length", "0")])).is_ok());
        assert!(check(&handshake(&[("content-length", "5")])).is_err());
        assert!(check(&handshake(&[("transfer-encoding", "chunked")])).is_err());
        let plain_post = Request::post("/x")
            .header("content-length", "5")
            .body(())
            .expect("request");
        assert!(check(&plain_post).is_ok());
    }
}
