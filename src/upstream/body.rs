//! The bodies that cross the upstream side: what is sent ([`SendBody`]) and what comes back
//! ([`UpstreamBody`]).
//!
//! A body already in memory stays a plain `Bytes` all the way to the socket (the HTTP/1.1
//! client writes it with the head, in one write); only a streamed upload is boxed, once per
//! request, so this side needs to know nothing of the request path's body types.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::BodyError;

/// A request body on its way upstream.
pub enum SendBody {
    /// In memory (or empty); taken by the first poll.
    Full(Option<Bytes>),
    /// Streaming from the client as it is sent.
    Streaming(Pin<Box<dyn Body<Data = Bytes, Error = BodyError> + Send>>),
}

impl SendBody {
    pub fn full(bytes: Bytes) -> SendBody {
        SendBody::Full((!bytes.is_empty()).then_some(bytes))
    }

    pub fn streaming(body: impl Body<Data = Bytes, Error = BodyError> + Send + 'static) -> SendBody {
        SendBody::Streaming(Box::pin(body))
    }

    /// The whole body, when it is in memory.
    pub fn whole(&self) -> Option<Bytes> {
        match self {
            SendBody::Full(bytes) => Some(bytes.clone().unwrap_or_default()),
            SendBody::Streaming(_) => None,
        }
    }
}

impl Body for SendBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            SendBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            SendBody::Streaming(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            SendBody::Full(bytes) => bytes.is_none(),
            SendBody::Streaming(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SendBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            SendBody::Streaming(body) => body.size_hint(),
        }
    }
}

/// An upstream response body: read straight from a pooled HTTP/1.1 connection by the request's
/// task ([`super::h1`]), or streamed by hyper (HTTP/2, WebSocket handshakes).
pub enum UpstreamBody {
    H1(super::h1::ResponseBody),
    Hyper(Incoming),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::H1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.is_end_stream(),
            UpstreamBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(body) => body.size_hint(),
            UpstreamBody::Hyper(body) => body.size_hint(),
        }
    }
}
