//! The HTTP/1.1 client for the pooled upstream connections, run in the request's own task.
//!
//! Why not hyper's `client::conn::http1` (which this replaced, and which HTTP/2 and WebSocket
//! handshakes still use): hyper drives each connection from a task of its own, so every request
//! crossed two tasks (a channel to the connection's task, a oneshot back, a wake-up each way)
//! and was parsed into hyper's buffers there. For a sidecar that was ~40% of the proxy's
//! instructions per request (callgrind, benches/PROFILE.md). Here the request's task writes the
//! request, reads the response head, and the response body reads the connection itself as the
//! client is fed; nothing else runs.
//!
//! What it does, and what it refuses:
//! - The request goes out as one write: head and (small) body together. A streamed body is
//!   written as it arrives (`Content-Length` when its size is known, else chunked), while the
//!   response is watched: an upstream that answers before the upload ends (a 413, a 401) is
//!   heard, and the upload stops there.
//! - Interim (1xx) responses are skipped; `101` is refused, since nothing here asks to upgrade.
//! - The response body is delimited by RFC 9112 §6.3: none for HEAD, 1xx, 204 and 304; chunked
//!   when `Transfer-Encoding` ends in chunked; else a close-delimited body for any other
//!   `Transfer-Encoding`; else `Content-Length` (repeated only with one value); else the close.
//!   A head that is not valid HTTP/1.1, or with conflicting lengths, is an error (502): a proxy
//!   that guessed would let an upstream desynchronise the connection.
//! - A connection goes back to the pool only after a complete exchange that both sides meant
//!   to keep alive. A body dropped half-read closes its connection.

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::body::SendBody;
use super::pool::PoolInner;
use super::wire::{decimal, list_tokens, parse_digits, put_header};

/// A response head may be at most this long (hyper's client allows about the same).
const MAX_HEAD: usize = 64 * 1024;
/// Headers a response may have.
const MAX_HEADERS: usize = 100;
/// A chunk-size line (with extensions) or the trailer section may be at most this long.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// What a read asks room for: a TLS record's worth.
const READ_CHUNK: usize = 16 * 1024;

/// The socket under an upstream connection: plain TCP (an `http://` upstream) or TLS.
pub type UpstreamIo = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// One HTTP/1.1 connection to the upstream. Boxed: it moves in and out of the pool per
/// request, and the TLS state is over a kilobyte.
pub struct H1Conn(Box<ConnState>);

struct ConnState {
    io: UpstreamIo,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// When it was last put back (for `upstream.pool_idle_timeout`).
    idle_since: Instant,
}

impl H1Conn {
    pub fn new(io: UpstreamIo) -> H1Conn {
        H1Conn(Box::new(ConnState {
            io,
            buf: BytesMut::new(),
            idle_since: Instant::now(),
        }))
    }

    pub fn idle_since(&self) -> Instant {
        self.0.idle_since
    }

    pub fn mark_idle(&mut self) {
        self.0.idle_since = Instant::now();
        // An idle connection holds no read buffer.
        if self.0.buf.is_empty() {
            self.0.buf = BytesMut::new();
        }
    }

    /// Whether an idle connection can carry a request: the upstream has not closed it and has
    /// sent nothing unasked. Looks without waiting (and without a syscall when the socket has
    /// not become readable since it was last read).
    pub fn is_usable(&mut self) -> bool {
        if !self.0.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        // Pending: nothing to read, the connection is open. Anything else (end of stream, an
        // error, or bytes nobody asked for) makes it unusable.
        Pin::new(&mut self.0.io).poll_read(&mut cx, &mut probe).is_pending()
    }
}

/// Why an exchange failed.
pub enum ExchangeError {
    /// Not a byte of the request reached the connection: it can be sent on another one.
    NotSent(io::Error, Box<Request<SendBody>>),
    Failed(io::Error),
}

/// Send `req` (`Host` set) on `conn` and read the response head; the response body reads the
/// rest, and hands the connection back to `pool` when it ends cleanly. The request's headers
/// come back beside the response, for a resend (they were only read).
pub async fn exchange(
    mut conn: H1Conn,
    req: Request<SendBody>,
    pool: &Arc<PoolInner>,
) -> Result<(Response<ResponseBody>, HeaderMap), ExchangeError> {
    let (parts, body) = req.into_parts();
    let known_length = body.size_hint().exact();
    let chunked = known_length.is_none();
    let head = encode_request_head(&parts.method, &parts.uri, &parts.headers, known_length);
    // A body already in memory goes out with the head, in one write (one TLS record).
    let (data, body_done) = match body.whole() {
        Some(bytes) => (bytes, true),
        None => (Bytes::new(), false),
    };
    let mut upload = Upload {
        head: Bytes::from(head),
        data,
        suffix: &[],
        body,
        chunked,
        streamed: !body_done,
        body_done,
        finished: false,
        written: 0,
    };
    let head_only = parts.method == Method::HEAD;
    // Written and read in one poll: the request (and a streamed body as it comes), and the
    // response head, which may arrive before a long upload ends.
    let outcome = poll_fn(|cx| {
        if upload.finished || (upload.streamed && upload.written > 0) {
            if let Poll::Ready(head) = poll_response_head(&mut conn.0, cx) {
                return Poll::Ready(head);
            }
        }
        if !upload.finished {
            match upload.poll_send(&mut conn.0.io, cx) {
                Poll::Ready(Ok(())) => {
                    // The whole request is out: now wait for the answer.
                    if let Poll::Ready(head) = poll_response_head(&mut conn.0, cx) {
                        return Poll::Ready(head);
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await;
    let head = match outcome {
        Ok(head) => head,
        Err(e) if upload.written == 0 => {
            let Upload { body, .. } = upload;
            return Err(ExchangeError::NotSent(e, Box::new(Request::from_parts(parts, body))));
        }
        Err(e) => return Err(ExchangeError::Failed(e)),
    };
    let upload_complete = upload.finished;
    drop(upload);
    let ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    } = head;
    let framing = if head_only { Decoder::Done } else { framing };
    // A body delimited by the close leaves nothing to reuse.
    let reusable = keep_alive && upload_complete && !matches!(framing, Decoder::UntilClose);
    let mut body = ResponseBody {
        conn: Some(conn),
        decoder: framing,
        reusable,
        pool: pool.clone(),
    };
    if matches!(body.decoder, Decoder::Done | Decoder::Length(0)) {
        body.decoder = Decoder::Done;
        body.release();
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok((response, parts.headers))
}

/// The request line and headers. Framing is ours to set: `Content-Length` from the body's known
/// size (left out for an empty body of a method that carries none, as hyper does), else chunked.
fn encode_request_head(method: &Method, uri: &http::Uri, headers: &HeaderMap, known_length: Option<u64>) -> Vec<u8> {
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut out = Vec::with_capacity(256 + headers.len() * 32);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        put_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    match known_length {
        Some(0) if !carries_body(method) && !headers.contains_key(header::CONTENT_LENGTH) => {}
        Some(n) => put_header(&mut out, b"content-length", decimal(n, &mut [0; 20])),
        None => put_header(&mut out, b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Methods whose requests carry a body, so an empty one is sent as `Content-Length: 0`.
fn carries_body(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE | Method::CONNECT
    )
}

/// The request going out: its head, then its body frame by frame.
struct Upload {
    /// Not yet written of the head (and of a chunk-size line).
    head: Bytes,
    /// Not yet written of the current body frame.
    data: Bytes,
    /// Not yet written after the frame (a chunk's CRLF).
    suffix: &'static [u8],
    body: SendBody,
    chunked: bool,
    /// The body arrives from the client while the request is sent (it was not in memory).
    streamed: bool,
    /// The body has no more frames.
    body_done: bool,
    /// Everything is written and flushed.
    finished: bool,
    /// Bytes accepted by the connection so far.
    written: u64,
}

impl Upload {
    fn poll_send(&mut self, io: &mut UpstreamIo, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.head.is_empty() || !self.data.is_empty() || !self.suffix.is_empty() {
                let slices = [
                    IoSlice::new(&self.head),
                    IoSlice::new(&self.data),
                    IoSlice::new(self.suffix),
                ];
                let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n as u64;
                let mut left = n;
                let from_head = left.min(self.head.len());
                self.head.advance(from_head);
                left -= from_head;
                let from_data = left.min(self.data.len());
                self.data.advance(from_data);
                left -= from_data;
                self.suffix = &self.suffix[left.min(self.suffix.len())..];
                continue;
            }
            if self.body_done {
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => {
                    // Send what is written before waiting on the client for more.
                    if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(frame) => frame,
            };
            match frame {
                None => {
                    self.body_done = true;
                    if self.chunked {
                        self.head = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        self.head = Bytes::from(format!("{:X}\r\n", data.len()));
                        self.suffix = b"\r\n";
                    }
                    self.data = data;
                }
            }
        }
    }
}

/// A parsed response head.
struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Decoder,
    /// Both sides may keep the connection open after this exchange (the upstream's side).
    keep_alive: bool,
}

fn bad_response(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("the upstream sent {what}"))
}

/// Read until a final (non-1xx) response head is in, and parse it.
fn poll_response_head(conn: &mut ConnState, cx: &mut Context<'_>) -> Poll<io::Result<ResponseHead>> {
    loop {
        if !conn.buf.is_empty() {
            // Parsed once, on the bytes frozen in place: header values become slices of them.
            // What follows the head (the body's start) goes back into the buffer, in the room
            // left after it, so usually without allocating.
            let bytes = conn.buf.split().freeze();
            match parse_response_head(&bytes) {
                Ok(Some((len, head))) => {
                    conn.buf.extend_from_slice(&bytes[len..]);
                    match head {
                        Some(head) => return Poll::Ready(Ok(head)),
                        None => continue,
                    }
                }
                Ok(None) => conn.buf.extend_from_slice(&bytes),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if conn.buf.len() >= MAX_HEAD {
                return Poll::Ready(Err(bad_response("a response head longer than 64 KiB")));
            }
        }
        conn.buf.reserve(READ_CHUNK);
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf))?;
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the upstream closed the connection before it answered",
            )));
        }
    }
}

/// A complete head at the start of `bytes`: its length, and the head when it is final (`None`
/// for a 1xx other than 101, which is skipped). `Ok(None)` until the head is complete.
fn parse_response_head(bytes: &Bytes) -> io::Result<Option<(usize, Option<ResponseHead>)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(bad_response("a response head with more than 100 headers")),
        Err(e) => return Err(bad_response(&format!("a malformed response head ({e})"))),
    };
    let code = response.code.unwrap_or(0);
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(bad_response(
                "101 Switching Protocols to a request that did not ask to upgrade",
            ));
        }
        return Ok(Some((len, None)));
    }
    Ok(Some((len, Some(build_head(&response, bytes)?))))
}

/// Status, headers (values are slices of `bytes`) and framing of a final head.
fn build_head(response: &httparse::Response<'_, '_>, bytes: &Bytes) -> io::Result<ResponseHead> {
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(bad_response("a response of an unknown HTTP version")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| bad_response("an invalid status code"))?;
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked_last = false;
    // HTTP/1.1 stays open unless told otherwise; HTTP/1.0 closes unless told otherwise.
    let mut keep_alive = version == Version::HTTP_11;
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad_response("an invalid header name"))?;
        if name == header::CONTENT_LENGTH {
            let n = parse_digits(h.value).ok_or_else(|| bad_response("an invalid Content-Length"))?;
            if content_length.is_some_and(|seen| seen != n) {
                return Err(bad_response("two different Content-Length values"));
            }
            content_length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Only the last coding counts: chunked must be the final one to delimit the body.
            if let Some(last) = list_tokens(h.value).next_back() {
                chunked_last = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if name == header::CONNECTION {
            for token in list_tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    keep_alive = true;
                }
            }
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(h.value))
            .map_err(|_| bad_response("an invalid header value"))?;
        headers.append(name, value);
    }
    let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        // Never a body, whatever the headers say (RFC 9112 §6.3).
        Decoder::Done
    } else if transfer_encoding {
        // A message with both is a smuggling attempt or a broken server: the length is the
        // chunked coding's (RFC 9112 §6.3), and the connection is not reused after it.
        if content_length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        if chunked_last && version == Version::HTTP_11 {
            Decoder::Chunked(Chunked::Size)
        } else {
            Decoder::UntilClose
        }
    } else if let Some(n) = content_length {
        Decoder::Length(n)
    } else {
        Decoder::UntilClose
    };
    Ok(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    })
}

/// Where the response body is.
enum Decoder {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Everything until the upstream closes.
    UntilClose,
    /// Ended.
    Done,
}

enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one (this many bytes seen so far).
    Trailers(usize),
}

/// A response body read straight from its connection.
pub struct ResponseBody {
    conn: Option<H1Conn>,
    decoder: Decoder,
    /// The connection may carry another request once this body ends.
    reusable: bool,
    pool: Arc<PoolInner>,
}

impl ResponseBody {
    /// The body ended: the connection goes back to the pool, or is closed.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reusable {
                self.pool.put_back_http1(conn);
            }
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.decoder = Decoder::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let conn = &mut *conn.0;
            // What the decoder can take from the bytes in hand; falling through means read more.
            match &mut this.decoder {
                Decoder::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                Decoder::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = (*left).min(conn.buf.len() as u64) as usize;
                        *left -= n as u64;
                        let data = conn.buf.split_to(n).freeze();
                        if *left == 0 {
                            this.decoder = Decoder::Done;
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decoder::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decoder::Chunked(state) => match decode_chunked(state, &mut conn.buf) {
                    Err(e) => return this.fail(e),
                    Ok(ChunkStep::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(ChunkStep::Progress) => continue,
                    Ok(ChunkStep::End) => {
                        this.decoder = Decoder::Done;
                        continue;
                    }
                    Ok(ChunkStep::NeedMore) => {}
                },
            }
            conn.buf.reserve(READ_CHUNK);
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Ready(Ok(n)) => n,
            };
            if n == 0 {
                if matches!(this.decoder, Decoder::UntilClose) {
                    // The end of this body (never reusable: see `exchange`).
                    this.decoder = Decoder::Done;
                    continue;
                }
                return this.fail(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before the response body ended",
                ));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoder, Decoder::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

enum ChunkStep {
    Data(Bytes),
    /// Moved on without data (a size line, a CRLF, a trailer line).
    Progress,
    End,
    NeedMore,
}

/// One step of the chunked coding over the bytes in `buf`.
fn decode_chunked(state: &mut Chunked, buf: &mut BytesMut) -> io::Result<ChunkStep> {
    match state {
        Chunked::Size => {
            let Some(end) = memchr::memmem::find(buf, b"\r\n") else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(bad_response("a chunk-size line that does not end"));
                }
                return Ok(ChunkStep::NeedMore);
            };
            let size = parse_chunk_size(&buf[..end])?;
            buf.advance(end + 2);
            *state = if size == 0 {
                Chunked::Trailers(0)
            } else {
                Chunked::Data(size)
            };
            Ok(ChunkStep::Progress)
        }
        Chunked::Data(left) => {
            if buf.is_empty() {
                return Ok(ChunkStep::NeedMore);
            }
            let n = (*left).min(buf.len() as u64) as usize;
            *left -= n as u64;
            let data = buf.split_to(n).freeze();
            if *left == 0 {
                *state = Chunked::DataEnd;
            }
            Ok(ChunkStep::Data(data))
        }
        Chunked::DataEnd => {
            if buf.len() < 2 {
                return Ok(ChunkStep::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err(bad_response("a chunk longer than its size"));
            }
            buf.advance(2);
            *state = Chunked::Size;
            Ok(ChunkStep::Progress)
        }
        Chunked::Trailers(seen) => {
            let Some(end) = memchr::memmem::find(buf, b"\r\n") else {
                if *seen + buf.len() > MAX_TRAILERS {
                    return Err(bad_response("trailers longer than 16 KiB"));
                }
                return Ok(ChunkStep::NeedMore);
            };
            buf.advance(end + 2);
            if end == 0 {
                return Ok(ChunkStep::End);
            }
            *seen += end + 2;
            if *seen > MAX_TRAILERS {
                return Err(bad_response("trailers longer than 16 KiB"));
            }
            Ok(ChunkStep::Progress)
        }
    }
}

/// `1*HEXDIG [ BWS ";" extensions ]`: the size; extensions are ignored.
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits_end = line.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(line.len());
    if digits_end == 0 || digits_end > 16 {
        return Err(bad_response("an invalid chunk size"));
    }
    let rest = &line[digits_end..];
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(bad_response("an invalid chunk size"));
    }
    if rest.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(bad_response("an invalid chunk extension"));
    }
    let mut size: u64 = 0;
    for &b in &line[..digits_end] {
        let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
        size = (size << 4) | digit;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(wire: &[u8]) -> io::Result<(Vec<u8>, usize)> {
        let mut buf = BytesMut::from(wire);
        let mut state = Chunked::Size;
        let mut out = Vec::new();
        loop {
            match decode_chunked(&mut state, &mut buf)? {
                ChunkStep::Data(d) => out.extend_from_slice(&d),
                ChunkStep::Progress => {}
                ChunkStep::End => return Ok((out, buf.len())),
                ChunkStep::NeedMore => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers_and_stop_at_their_end() {
        let (data, left) = decode_all(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT").unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(left, 4, "bytes after the body stay for the next response");
        assert!(
            decode_all(b"5\r\nhelloXX0\r\n\r\n").is_err(),
            "data longer than its size"
        );
        assert!(decode_all(b"zz\r\n").is_err());
        assert!(decode_all(b"\r\n").is_err(), "an empty size");
        assert!(decode_all(b"11111111111111111\r\n").is_err(), "past 64 bits");
        assert!(decode_all(b"5\r\nhel").is_err(), "incomplete");
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let head = |s: &str| match parse_response_head(&Bytes::from(s.to_string())) {
            Ok(Some((_, Some(head)))) => Ok(head),
            Ok(_) => panic!("not a complete final head: {s:?}"),
            Err(e) => Err(e),
        };
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n").unwrap();
        assert!(matches!(h.framing, Decoder::Length(5)) && h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n").unwrap();
        assert!(matches!(h.framing, Decoder::Length(5)));
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n").is_err());
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n").unwrap();
        assert!(matches!(h.framing, Decoder::Chunked(_)) && !h.keep_alive);
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH));
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n").unwrap();
        assert!(matches!(h.framing, Decoder::UntilClose));
        let h = head("HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(matches!(h.framing, Decoder::UntilClose));
        let h = head("HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert!(
            matches!(h.framing, Decoder::Done) && h.keep_alive,
            "a 204 has no body to wait for"
        );
        let h = head("HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n").unwrap();
        assert!(matches!(h.framing, Decoder::Done) && h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(h.keep_alive);
    }

    #[test]
    fn interim_heads_are_skipped_and_101_is_refused() {
        let parse = |s: &'static [u8]| parse_response_head(&Bytes::from_static(s));
        assert!(matches!(
            parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
            Ok(Some((25, None)))
        ));
        assert!(parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\n"), Ok(None)));
        assert!(parse(b"HTTP/1.1 200 OK\nx\0: y\r\n\r\n").is_err());
    }

    #[test]
    fn request_heads_carry_the_framing_the_body_has() {
        let uri: http::Uri = "/v1/x?a=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("api"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let text = |m: &Method, headers: &HeaderMap, len| {
            String::from_utf8(encode_request_head(m, &uri, headers, len)).unwrap()
        };
        assert_eq!(
            text(&Method::POST, &headers, Some(3)),
            "POST /v1/x?a=1 HTTP/1.1\r\nhost: api\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(
            text(&Method::POST, &headers, None),
            "POST /v1/x?a=1 HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        headers.remove(header::CONTENT_LENGTH);
        assert_eq!(
            text(&Method::GET, &headers, Some(0)),
            "GET /v1/x?a=1 HTTP/1.1\r\nhost: api\r\n\r\n"
        );
        assert_eq!(
            text(&Method::POST, &headers, Some(0)),
            "POST /v1/x?a=1 HTTP/1.1\r\nhost: api\r\ncontent-length: 0\r\n\r\n"
        );
    }
}
