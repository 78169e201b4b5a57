//! What makes a request safe to send twice, and the body it is sent with.
//!
//! A resend (after an upstream 401 with a key that has since rotated, or an upstream 429/503)
//! needs the whole body again, so small bodies are buffered before the first send: a declared
//! `Content-Length` of at most 64 KiB, or no body at all. Bigger or chunked bodies stream
//! straight through (memory stays flat for audio uploads) and are never resent. A response is
//! only ever retried before any byte of it reached the client, because the retry decision is
//! made on the response head, before it is returned.

use bytes::Bytes;
use http::{header, HeaderMap};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::ClientBody;

use crate::error::ProxyError;

/// Bodies up to this size are buffered so the request can be resent.
pub const MAX_REPLAYABLE_BODY: u64 = 64 * 1024;

/// The client's body, prepared for one or more sends.
pub enum OutgoingBody {
    /// Whole in memory: can be sent again.
    Replayable(Bytes),
    /// Streams through once.
    Streaming(Incoming),
}

/// Buffer `body` when it is small enough to be replayable, else pass it through.
pub async fn prepare(headers: &HeaderMap, body: ClientBody) -> Result<OutgoingBody, ProxyError> {
    let body = match body {
        ClientBody::Whole(bytes) => return Ok(OutgoingBody::Replayable(bytes)),
        ClientBody::Streaming(incoming) => incoming,
    };
    if body.is_end_stream() {
        return Ok(OutgoingBody::Replayable(Bytes::new()));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        // hyper enforces the declared length, so collecting is bounded by it.
        Some(len) if len <= MAX_REPLAYABLE_BODY => match body.collect().await {
            Ok(collected) => Ok(OutgoingBody::Replayable(collected.to_bytes())),
            Err(e) => Err(ProxyError::BadRequest(format!(
                "the request body could not be read: {e}"
            ))),
        },
        _ => Ok(OutgoingBody::Streaming(body)),
    }
}
