//! An upstream 403 read before it is passed on: a self-hosted server that says its licence
//! expired (`{"code": "LICENSE_EXPIRED", "expires_at": ...}`) or its quota is spent cannot
//! serve anyone, so the key store records it (WARN, `/ready`). The body is small JSON, so it
//! is read whole (at most [`MAX_INSPECTED_BODY`] bytes, within the stream idle timeout) and
//! handed to the client unchanged; a bigger or slower one passes through unread, holding its
//! limit slot until it ends like any other response body.

use bytes::Bytes;
use http::{header, Response};
use http_body_util::BodyExt;
use std::time::Duration;

use super::body::ProxyBody;
use super::rewrite;
use crate::error::ProxyError;
use crate::keys::{ApiKey, KeyStore, Refusal};
use crate::limits::Permit;
use crate::timeouts::IdleTimer;
use crate::upstream::body::UpstreamBody;

/// The largest 403 body read to look for a licence or quota code.
pub const MAX_INSPECTED_BODY: u64 = 16 * 1024;

/// Read `response` (a 403) when it is small, note a licence or quota refusal of `key`, and
/// return the response for the client with the same status, headers and body, framed as every
/// response is (one `Content-Length`; differing ones are a 502).
pub async fn inspect(
    response: Response<UpstreamBody>,
    keys: &KeyStore,
    key: &ApiKey,
    idle: Duration,
    permit: Permit,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = response.into_parts();
    rewrite::strip_hop_by_hop(&mut parts.headers);
    rewrite::normalise_content_length(parts.status, &mut parts.headers)?;
    parts.version = http::Version::HTTP_11;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let readable = declared.is_some_and(|len| len <= MAX_INSPECTED_BODY);
    if !readable {
        return Ok(Response::from_parts(
            parts,
            ProxyBody::Limited(body, Some(permit), IdleTimer::new(idle)),
        ));
    }
    let bytes: Bytes = match tokio::time::timeout(idle, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        // The upstream broke off its own error answer: the client gets what came, empty.
        _ => Bytes::new(),
    };
    if let Some(refusal) = Refusal::from_body(&bytes) {
        keys.note_rejected(key, Some(&refusal));
    }
    parts
        .headers
        .insert(header::CONTENT_LENGTH, http::HeaderValue::from(bytes.len()));
    // The whole answer is read: the slot is free now.
    drop(permit);
    Ok(Response::from_parts(parts, ProxyBody::full(bytes)))
}
