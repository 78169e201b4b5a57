//! The one body type the proxy hands to hyper, in both directions.
//!
//! An enum rather than a boxed trait object: the request path stays allocation-free for the
//! common cases (a streamed `Incoming` passed straight through, or a small buffered body) and
//! each frame is forwarded as soon as it arrives, which is what keeps SSE unbuffered and a
//! 256 MiB transfer at a few buffers of memory.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::exchange::Exchange;
use crate::limits::Permit;
use std::sync::Arc;

pub enum ProxyBody {
    /// Nothing (or already sent).
    Empty,
    /// A body the proxy made or buffered; sent as one frame.
    Full(Option<Bytes>),
    /// A body streaming from the other side, passed through frame by frame.
    Incoming(Incoming),
    /// A client's streamed request body, its bytes counted into the request's record.
    Counted(Incoming, Arc<Exchange>),
    /// An upstream response holding its class's slot: the permit is released the moment the
    /// body ends or fails (or, if the client goes away, when hyper drops the body).
    Limited(Incoming, Option<Permit>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        if bytes.is_empty() {
            ProxyBody::Empty
        } else {
            ProxyBody::Full(Some(bytes))
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Incoming(incoming) => Pin::new(incoming).poll_frame(cx),
            ProxyBody::Counted(incoming, exchange) => {
                let polled = Pin::new(incoming).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        exchange.add_request_bytes(data.len() as u64);
                    }
                }
                polled
            }
            ProxyBody::Limited(incoming, permit) => {
                let polled = Pin::new(incoming).poll_frame(cx);
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                    permit.take();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Incoming(incoming) | ProxyBody::Limited(incoming, _) | ProxyBody::Counted(incoming, _) => {
                incoming.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Incoming(incoming) | ProxyBody::Limited(incoming, _) | ProxyBody::Counted(incoming, _) => {
                incoming.size_hint()
            }
        }
    }
}
