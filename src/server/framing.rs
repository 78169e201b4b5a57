//! Request framing the proxy refuses although hyper would accept it: both `Content-Length` and
//! `Transfer-Encoding`, more than one `Content-Length` (even with equal values), and any
//! `Transfer-Encoding` other than one plain `chunked`.
//!
//! hyper already refuses most smuggling shapes itself (obs-fold, space before the colon, NUL or
//! CR in a value, a `Transfer-Encoding` that does not end in `chunked`, differing
//! `Content-Length`s, malformed chunk sizes) with a bare 400 and a closed connection. The shapes
//! above it resolves silently instead (`Transfer-Encoding` wins and the `Content-Length` is
//! dropped, equal duplicates are merged), so by the time our service sees the request the
//! evidence is gone. [`FramingTap`] therefore watches the raw bytes on their way into hyper:
//! it parses each request head with the same parser (httparse) and follows each body's framing
//! exactly as hyper's decoder does, so it knows where the next head starts, and queues one
//! [`Verdict`] per head. The service takes the verdicts in order ([`Verdicts::take`]); a refused
//! request is answered `400` with `Connection: close`, so hyper closes without reading on and
//! nothing after the bad head can become a second request.
//!
//! When the tap meets anything it does not follow (an upgrade, a head or chunk hyper will reject,
//! a very deep pipeline) it stops watching that connection. Verdicts already queued stay aligned
//! with their requests, later requests get none and are served as hyper parsed them, which is
//! still safe: hyper closes a connection after any message whose framing it had to resolve.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ProxyError;
use crate::proxy::body::ProxyBody;
use crate::upstream::wire::parse_digits;

/// Largest request head the tap buffers; hyper refuses bigger ones itself (its read buffer).
const MAX_WATCHED_HEAD: usize = 512 * 1024;
/// Headers the tap parses per head (hyper allows 100); a head with more is left to hyper.
const MAX_WATCHED_HEADERS: usize = 128;
/// Verdicts queued ahead of the service (a deep pipeline); past this the tap stops watching.
const MAX_QUEUED_VERDICTS: usize = 1024;

/// What the tap decided about one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refused, with the reason the client is told.
    Refuse(&'static str),
}

/// The verdict queue of one connection, shared by its tap (producer) and its service
/// (consumer). hyper serves HTTP/1.1 requests one at a time, in order, and every head reaches
/// the tap before hyper can hand the request to the service, so the front is always the verdict
/// of the request being served.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<Verdict>>>);

impl Verdicts {
    /// The reason to refuse the next request, if it must be refused.
    pub fn take(&self) -> Option<&'static str> {
        let mut queue = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match queue.pop_front() {
            Some(Verdict::Refuse(reason)) => Some(reason),
            Some(Verdict::Accept) | None => None,
        }
    }

    /// Returns false when the queue is full (the tap then stops watching).
    fn push(&self, verdict: Verdict) -> bool {
        let mut queue = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if queue.len() >= MAX_QUEUED_VERDICTS {
            return false;
        }
        queue.push_back(verdict);
        true
    }
}

/// Where the tap is in the byte stream, mirroring hyper's h1 decoder (`proto/h1/decode.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Inside a `Content-Length` body: bytes left.
    Fixed(u64),
    Chunked(Chunk),
    /// Not following this connection any more.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

/// The byte-level follower: head parsing, framing rules, body skipping.
#[derive(Debug)]
struct Follower {
    state: State,
    head: Vec<u8>,
    verdicts: Verdicts,
}

impl Follower {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Stopped => return,
                State::Head => {
                    let buffered = self.head.len();
                    // Parse only once a line has ended: a dribbling client costs one scan per
                    // read, not one parse per byte.
                    if !data.contains(&b'\n') {
                        self.head.extend_from_slice(data);
                        if self.head.len() > MAX_WATCHED_HEAD {
                            self.stop();
                        }
                        return;
                    }
                    let parsed = if buffered == 0 {
                        self.parse_head(data)
                    } else {
                        self.head.extend_from_slice(data);
                        let head = std::mem::take(&mut self.head);
                        let parsed = self.parse_head(&head);
                        self.head = head;
                        parsed
                    };
                    match parsed {
                        // The earlier bytes were an incomplete head, so this one ends in `data`;
                        // what follows it is body or the next request.
                        Some(consumed) => {
                            data = &data[consumed - buffered..];
                            self.head.clear();
                        }
                        None if self.state == State::Stopped => {
                            self.head = Vec::new();
                            return;
                        }
                        None => {
                            if buffered == 0 {
                                self.head.extend_from_slice(data);
                            }
                            if self.head.len() > MAX_WATCHED_HEAD {
                                self.stop();
                            }
                            return;
                        }
                    }
                }
                State::Fixed(left) => {
                    let n = usize::try_from(left).map_or(data.len(), |left| left.min(data.len()));
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 { State::Head } else { State::Fixed(left) };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let n = usize::try_from(left).map_or(data.len(), |left| left.min(data.len()));
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = State::Chunked(if left == 0 { Chunk::DataCr } else { Chunk::Data(left) });
                }
                State::Chunked(chunk) => {
                    self.state = match next_chunk_state(chunk, data[0]) {
                        Some(Chunk::EndLf) if chunk == Chunk::EndLf => State::Head,
                        Some(next) => State::Chunked(next),
                        None => State::Stopped,
                    };
                    data = &data[1..];
                }
            }
        }
    }

    fn stop(&mut self) {
        self.state = State::Stopped;
        self.head = Vec::new();
    }

    /// Parse the buffered head; `Some(head length)` once complete (state and verdict updated),
    /// `None` while partial. A head httparse refuses stops the tap: hyper refuses it too.
    fn parse_head(&mut self, head: &[u8]) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_WATCHED_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let consumed = match request.parse(head) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                self.stop();
                return None;
            }
        };
        let (verdict, next) = judge(&request);
        let queued = self.verdicts.push(verdict);
        if !queued || next == State::Stopped {
            self.stop();
            return None;
        }
        self.state = next;
        Some(consumed)
    }
}

/// The framing rules for one parsed head, and where its body ends.
fn judge(request: &httparse::Request<'_, '_>) -> (Verdict, State) {
    let mut content_lengths = Vec::new();
    let mut transfer_encodings = Vec::new();
    let mut upgrade = request.method == Some("CONNECT");
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            content_lengths.push(header.value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encodings.push(header.value);
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if !content_lengths.is_empty() && !transfer_encodings.is_empty() {
        return (
            Verdict::Refuse("the request has both Content-Length and Transfer-Encoding; send one"),
            State::Stopped,
        );
    }
    if content_lengths.len() > 1 {
        return (
            Verdict::Refuse("the request has more than one Content-Length header; send one"),
            State::Stopped,
        );
    }
    let plain_chunked = matches!(transfer_encodings[..], [only] if is_plain_chunked(only));
    if !transfer_encodings.is_empty() && !plain_chunked {
        return (
            Verdict::Refuse("Transfer-Encoding must be exactly \"chunked\" (one header, one coding)"),
            State::Stopped,
        );
    }
    // Past an upgrade (or CONNECT) the bytes may be a tunnel: stop following.
    let next = if upgrade {
        State::Stopped
    } else if !transfer_encodings.is_empty() {
        State::Chunked(Chunk::Start)
    } else if let Some(value) = content_lengths.first() {
        match parse_digits(value) {
            Some(0) => State::Head,
            Some(n) => State::Fixed(n),
            // hyper refuses it and closes.
            None => State::Stopped,
        }
    } else {
        State::Head
    };
    (Verdict::Accept, next)
}

fn is_plain_chunked(value: &[u8]) -> bool {
    value.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// One byte of chunk framing, exactly as hyper's decoder takes it; `None` where hyper fails
/// the body (and so closes the connection). `EndLf` followed by `\n` ends the message: the
/// caller sees `Some(EndLf)` from `EndLf`.
fn next_chunk_state(chunk: Chunk, byte: u8) -> Option<Chunk> {
    let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
    Some(match (chunk, byte) {
        (Chunk::Start, b) => Chunk::Size(hex(b)?),
        (Chunk::Size(size), b'\t' | b' ') => Chunk::SizeLws(size),
        (Chunk::Size(size) | Chunk::SizeLws(size), b';') => Chunk::Extension(size),
        (Chunk::Size(size) | Chunk::SizeLws(size) | Chunk::Extension(size), b'\r') => Chunk::SizeLf(size),
        (Chunk::Size(size), b) => Chunk::Size(size.checked_mul(16)?.checked_add(hex(b)?)?),
        (Chunk::SizeLws(size), b'\t' | b' ') => Chunk::SizeLws(size),
        (Chunk::SizeLws(_), _) => return None,
        (Chunk::Extension(_), b'\n') => return None,
        (Chunk::Extension(size), _) => Chunk::Extension(size),
        (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
        (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
        (Chunk::DataCr, b'\r') => Chunk::DataLf,
        (Chunk::DataLf, b'\n') => Chunk::Start,
        (Chunk::EndCr, b'\r') => Chunk::EndLf,
        (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
        (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
        (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
        (Chunk::EndLf, b'\n') => Chunk::EndLf,
        _ => return None,
    })
}

/// The answer to a refused request: `400 BAD_REQUEST` JSON with `Connection: close`, so hyper
/// neither reads its body nor parses anything after it.
pub fn refuse<B>(reason: &'static str, req: &http::Request<B>) -> http::Response<ProxyBody> {
    let request_id = crate::proxy::request_id(req);
    tracing::debug!(request_id = %request_id, reason, "conflicting request framing refused");
    let mut response = ProxyError::BadRequest(reason.into()).into_response(&request_id);
    response
        .headers_mut()
        .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    response
}

/// A connection's byte stream, watched on its way into hyper. Writes pass through untouched.
pub struct FramingTap<S> {
    inner: S,
    follower: Follower,
}

impl<S> FramingTap<S> {
    pub fn new(inner: S) -> (FramingTap<S>, Verdicts) {
        let verdicts = Verdicts::default();
        let follower = Follower {
            state: State::Head,
            head: Vec::new(),
            verdicts: verdicts.clone(),
        };
        (FramingTap { inner, follower }, verdicts)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingTap<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if this.follower.state != State::Stopped {
                this.follower.feed(&buf.filled()[before..]);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingTap<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_for(stream: &[&[u8]]) -> (Vec<Verdict>, State) {
        let verdicts = Verdicts::default();
        let mut follower = Follower {
            state: State::Head,
            head: Vec::new(),
            verdicts: verdicts.clone(),
        };
        for piece in stream {
            follower.feed(piece);
        }
        let queued = verdicts.0.lock().unwrap().iter().copied().collect();
        (queued, follower.state)
    }

    #[test]
    fn keep_alive_requests_are_followed_across_bodies_and_reads() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nGET /\r\n0\r\nX-Trailer: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        // Whole, and dribbled a byte at a time: the same verdicts, in order.
        let whole = verdicts_for(&[stream]);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let dribbled = verdicts_for(&bytes);
        for (verdicts, state) in [whole, dribbled] {
            assert_eq!(verdicts.len(), 3, "{verdicts:?}");
            assert_eq!(verdicts[0], Verdict::Accept);
            assert_eq!(verdicts[1], Verdict::Accept);
            assert!(matches!(verdicts[2], Verdict::Refuse(_)));
            assert_eq!(state, State::Stopped);
        }
    }

    #[test]
    fn the_chunk_body_is_not_mistaken_for_a_head() {
        let (verdicts, state) = verdicts_for(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1a\r\nGET /smuggled HTTP/1.1\r\n\r\n\r\n0\r\n\r\n",
        ]);
        assert_eq!(verdicts, vec![Verdict::Accept]);
        assert_eq!(state, State::Head);
    }

    #[test]
    fn framing_conflicts_are_refused() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let (verdicts, _) = verdicts_for(&[head]);
            assert!(
                matches!(verdicts[..], [Verdict::Refuse(_)]),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn upgrades_and_unparseable_heads_stop_the_tap() {
        let (verdicts, state) =
            verdicts_for(&[b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\n\r\n"]);
        assert_eq!((verdicts, state), (vec![Verdict::Accept], State::Stopped));
        let (verdicts, state) = verdicts_for(&[b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"]);
        assert_eq!((verdicts, state), (vec![], State::Stopped));
        let (verdicts, state) = verdicts_for(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]);
        assert_eq!((verdicts, state), (vec![Verdict::Accept], State::Stopped));
    }

    #[test]
    fn chunk_sizes_follow_hyper() {
        let mut state = Chunk::Start;
        for &b in b"1A ; name=value\r" {
            state = next_chunk_state(state, b).unwrap();
        }
        assert_eq!(state, Chunk::SizeLf(26));
        assert_eq!(next_chunk_state(Chunk::Start, b'-'), None);
        assert_eq!(next_chunk_state(Chunk::SizeLws(1), b'1'), None);
        assert_eq!(next_chunk_state(Chunk::SizeLf(1), b'x'), None);
        assert_eq!(next_chunk_state(Chunk::Size(u64::MAX), b'f'), None);
    }

    use proptest::prelude::*;

    /// One valid request with a body framed by `Content-Length` (when `chunks` is `None`) or
    /// chunked in the given chunk sizes; bodies may contain anything, heads included.
    fn request(body: &[u8], chunks: Option<Vec<usize>>) -> Vec<u8> {
        let mut out = Vec::new();
        match chunks {
            None => {
                out.extend_from_slice(format!("POST /p HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
                out.extend_from_slice(body);
            }
            Some(sizes) => {
                out.extend_from_slice(b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
                let mut rest = body;
                for size in sizes {
                    let n = size.min(rest.len());
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(format!("{n:X};x=y\r\n").as_bytes());
                    out.extend_from_slice(&rest[..n]);
                    out.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                if !rest.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", rest.len()).as_bytes());
                    out.extend_from_slice(rest);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\nX-T: 1\r\n\r\n");
            }
        }
        out
    }

    proptest! {
        /// However a keep-alive stream of valid requests is split into reads, the tap finds
        /// every head, accepts each, and ends between messages.
        #[test]
        fn valid_pipelines_stay_aligned_across_any_read_split(
            requests in proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 0..200),
                    proptest::option::of(proptest::collection::vec(1usize..40, 0..6)),
                ),
                1..6,
            ),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let stream: Vec<u8> = requests.iter().flat_map(|(body, chunks)| request(body, chunks.clone())).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            let (verdicts, state) = verdicts_for(&pieces);
            prop_assert_eq!(verdicts, vec![Verdict::Accept; requests.len()]);
            prop_assert_eq!(state, State::Head);
        }
    }
}
