//! The one body type the proxy hands to hyper, in both directions.
//!
//! An enum rather than a boxed trait object: the request path stays allocation-free for the
//! common cases (a streamed `Incoming` passed straight through, or a small buffered body) and
//! each frame is forwarded as soon as it arrives, which is what keeps SSE unbuffered and a
//! 256 MiB transfer at a few buffers of memory.
//!
//! Two variants carry a bound: `Limited` (an upstream response) is cut when the upstream stays
//! silent past `upstream.stream_idle_timeout`, and `Capped` (a streamed client upload) fails
//! once it passes `listen.max_body_size`, so the upstream never receives it as complete.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use super::exchange::Exchange;
pub use crate::error::BodyError;
use crate::limits::Permit;
use crate::timeouts::IdleTimer;
use crate::upstream::body::UpstreamBody;

/// A streamed request body that passed `listen.max_body_size`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than listen.max_body_size ({0} bytes)")]
pub struct BodyTooLarge(pub u64);

/// A client's request body as a listener hands it to the proxy: streamed by hyper, or already
/// whole (a plain request the front end read together with its head, see `server::front`).
pub enum ClientBody {
    Streaming(Incoming),
    Whole(Bytes),
}

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
    /// body ends or fails (or, if the client goes away, when hyper drops the body). The timer
    /// cuts it when the upstream sends nothing for `stream_idle_timeout`.
    Limited(UpstreamBody, Option<Permit>, IdleTimer),
    /// A streamed client body with this many bytes still allowed; past it the body fails and
    /// the flag tells the request path to answer 413.
    Capped {
        body: Incoming,
        remaining: u64,
        limit: u64,
        exceeded: Arc<AtomicBool>,
        /// Its bytes are counted into the request's record, as `Counted` does.
        exchange: Arc<Exchange>,
    },
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

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> ProxyBody {
        ProxyBody::full(bytes)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Incoming(incoming) => Pin::new(incoming).poll_frame(cx).map_err(Into::into),
            ProxyBody::Counted(incoming, exchange) => {
                let polled = Pin::new(incoming).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        exchange.note_request_data(data);
                    }
                }
                polled.map_err(Into::into)
            }
            ProxyBody::Limited(upstream, permit, idle) => match Pin::new(upstream).poll_frame(cx) {
                Poll::Pending => {
                    if idle.poll_expired(cx) {
                        permit.take();
                        return Poll::Ready(Some(Err(idle.error().into())));
                    }
                    Poll::Pending
                }
                Poll::Ready(Some(Ok(frame))) => {
                    idle.reset();
                    Poll::Ready(Some(Ok(frame)))
                }
                ended => {
                    permit.take();
                    ended
                }
            },
            ProxyBody::Capped {
                body,
                remaining,
                limit,
                exceeded,
                exchange,
            } => {
                let polled = Pin::new(body).poll_frame(cx).map_err(BodyError::from);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if let Some(data) = frame.data_ref() {
                        exchange.note_request_data(data);
                    }
                    match remaining.checked_sub(len) {
                        Some(left) => *remaining = left,
                        None => {
                            exceeded.store(true, Ordering::SeqCst);
                            return Poll::Ready(Some(Err(BodyTooLarge(*limit).into())));
                        }
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Incoming(incoming)
            | ProxyBody::Counted(incoming, _)
            | ProxyBody::Capped { body: incoming, .. } => incoming.is_end_stream(),
            ProxyBody::Limited(upstream, ..) => upstream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Incoming(incoming)
            | ProxyBody::Counted(incoming, _)
            | ProxyBody::Capped { body: incoming, .. } => incoming.size_hint(),
            ProxyBody::Limited(upstream, ..) => upstream.size_hint(),
        }
    }
}
