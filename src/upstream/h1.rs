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
//!   response is watched: an upstream that answers before the upload ends is heard at once,
//!   and the upload goes on while its response body is read (full duplex), until it ends, the
//!   upstream stops taking it, or the response ends (`ResponseBody::poll_upload` has the rule).
//! - Interim (1xx) responses are skipped; `101` is refused, since nothing here asks to upgrade.
//!   A response's heads, interim ones included, share one 64 KiB bound.
//! - The response body is delimited by RFC 9112 §6.3, in its order, as hyper delimits it: none
//!   for HEAD, 1xx, 204 and 304 (whatever the head says; bytes after such a head are not a body,
//!   and the connection is not reused); chunked when `Transfer-Encoding` ends in chunked (a
//!   `Content-Length` beside it is not read, and the connection is not reused); else a
//!   close-delimited body for any other `Transfer-Encoding`; else `Content-Length` (repeated
//!   lines and comma-separated lists only of one value); else the close. A head that is not
//!   valid HTTP/1.1, with conflicting lengths, or with `Transfer-Encoding` in HTTP/1.0, is an
//!   error (502): a proxy that guessed would let an upstream desynchronise the connection.
//! - The chunked coding is read byte for byte as hyper reads it (RFC 9112 §7.1): a size is hex
//!   digits only (leading zeros allowed, 64 bits at most), then optional spaces or tabs, then
//!   extensions (skipped, 16 KiB per body) up to CRLF; a bare LF or CR, or anything else, is
//!   refused. A malformed first size line that came with the head is a 502; one found later
//!   fails the body.
//! - A connection goes back to the pool only after a complete exchange (the whole request sent,
//!   the whole response read, nothing after it) that both sides meant to keep alive. A body
//!   dropped half-read closes its connection.

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
/// Bounds on what a chunked body may carry besides data, as hyper sets them: chunk extensions
/// (all of a body's together; they are skipped), the trailer section's bytes and its lines
/// (trailers are dropped: an HTTP/1.1 client did not ask for them).
const MAX_CHUNK_EXTENSIONS: u16 = 16 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
const MAX_TRAILER_LINES: usize = 100;
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
        body_done,
        finished: false,
        client_failed: false,
        written: 0,
    };
    let mut progress = HeadProgress {
        head_request: parts.method == Method::HEAD,
        ..HeadProgress::default()
    };
    // Set when the upstream stopped taking the request (it closed or reset the connection).
    let mut write_failed: Option<io::Error> = None;
    // Written and read in one poll: the request (and a streamed body as it comes), and the
    // response head, which may come before the upload ends; the rest of the upload then goes
    // on under the response body.
    let outcome = poll_fn(|cx| {
        if !upload.finished && write_failed.is_none() {
            match upload.poll_send(&mut conn.0.io, cx) {
                Poll::Ready(Ok(())) | Poll::Pending => {}
                Poll::Ready(Err(e)) if upload.client_failed || upload.written == 0 => return Poll::Ready(Err(e)),
                // An upstream may answer and close without reading the whole request (RFC 9112
                // §9.5): what it answered is still read.
                Poll::Ready(Err(e)) => write_failed = Some(e),
            }
        }
        if upload.written == 0 {
            return Poll::Pending;
        }
        let polled = poll_response_head(&mut conn.0, &mut progress, cx);
        if let Poll::Ready(Err(e)) = &polled {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                if let Some(cause) = write_failed.take() {
                    // It closed without answering: the failed write says why.
                    return Poll::Ready(Err(cause));
                }
            }
        }
        polled
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
    let stopped = write_failed.is_some();
    let upload = if upload.finished || stopped {
        None
    } else {
        Some(Box::new(upload))
    };
    let ResponseHead {
        status,
        version,
        headers,
        mut framing,
        keep_alive,
    } = head;
    if let Decoder::Chunked(chunked) = &mut framing {
        // The first size line, when it came with the head, is read now: a malformed one is
        // then refused as a bad head is (502), before anything reaches the client.
        match chunked.read_lines(&mut conn.0.buf) {
            Err(e) => return Err(ExchangeError::Failed(e)),
            Ok(LineStep::End) => framing = Decoder::Done,
            Ok(LineStep::Data | LineStep::NeedMore) => {}
        }
    }
    // A body delimited by the close leaves nothing to reuse; neither does a request the
    // upstream stopped taking. Whether an upload still going ends is known when the body ends.
    let reusable = keep_alive && !stopped && !matches!(framing, Decoder::UntilClose);
    let mut body = ResponseBody {
        conn: Some(conn),
        decoder: framing,
        reusable,
        pool: pool.clone(),
        upload,
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
    /// The body has no more frames.
    body_done: bool,
    /// Everything is written and flushed.
    finished: bool,
    /// The client's body failed (it went away, or passed a limit): the request can never be
    /// complete.
    client_failed: bool,
    /// Bytes accepted by the connection so far.
    written: u64,
}

impl Upload {
    /// Write what there is to write, taking the client's body frames as they come, until all is
    /// written and flushed (`Ready(Ok)`), or the connection or the client has to be waited on.
    /// An error is the connection's (the upstream closed or reset it), unless `client_failed`
    /// is set.
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
                Some(Err(e)) => {
                    self.client_failed = true;
                    return Poll::Ready(Err(io::Error::other(e)));
                }
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

/// How far the reading of a response head has come, across reads.
#[derive(Default)]
struct HeadProgress {
    /// The request was HEAD: the response has no body.
    head_request: bool,
    /// Bytes of interim heads skipped so far.
    interim: usize,
    /// Length of the buffer when it last held only part of a head (0: nothing looked at yet).
    looked: usize,
}

/// Read until a final (non-1xx) response head is in, and parse it.
///
/// The bytes are frozen in place and parsed once: header values become slices of them. Interim
/// heads are skipped by moving an offset past them (never by copying what follows), and what
/// is left after the final head (the body's start) goes back into the buffer, in the room left
/// after it, so usually without allocating. A head that is not complete yet goes back the same
/// way, and is parsed again only once a later read has ended a line: so an upstream that
/// trickles a head costs a parse per line, not per read.
///
/// Everything a response sends before its body (interim heads and the final head together)
/// must stay under 64 KiB, as Go's client counts interim heads against its head size limit.
/// hyper sets no bound of its own on interim heads (only the response timeout ends a flood of
/// them); here a flood ends after a few thousand.
fn poll_response_head(
    conn: &mut ConnState,
    progress: &mut HeadProgress,
    cx: &mut Context<'_>,
) -> Poll<io::Result<ResponseHead>> {
    loop {
        let line_ended = progress.looked == 0
            || conn
                .buf
                .get(progress.looked..)
                .is_none_or(|new| memchr::memchr(b'\n', new).is_some());
        if !conn.buf.is_empty() && line_ended {
            let bytes = conn.buf.split().freeze();
            let mut at = 0;
            loop {
                match parse_response_head(&bytes, at, progress) {
                    Ok(Some((len, Some(head)))) => {
                        conn.buf.extend_from_slice(&bytes[at + len..]);
                        return Poll::Ready(Ok(head));
                    }
                    Ok(Some((len, None))) => {
                        at += len;
                        if at < bytes.len() {
                            continue;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                conn.buf.extend_from_slice(&bytes[at..]);
                break;
            }
        }
        progress.looked = conn.buf.len();
        if progress.interim + conn.buf.len() >= MAX_HEAD {
            return Poll::Ready(Err(bad_response("response heads of 64 KiB or more")));
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

/// A complete head at `bytes[at..]`: its length, and the head when it is final (`None` for a
/// 1xx other than 101, which is skipped, its length added to `progress.interim`). `Ok(None)`
/// until the head is complete. A response to a HEAD request has no body, whatever its head
/// says.
fn parse_response_head(
    bytes: &Bytes,
    at: usize,
    progress: &mut HeadProgress,
) -> io::Result<Option<(usize, Option<ResponseHead>)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(&bytes[at..]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(bad_response("a response head with more than 100 headers")),
        Err(e) => return Err(bad_response(&format!("a malformed response head ({e})"))),
    };
    if progress.interim + len >= MAX_HEAD {
        return Err(bad_response("response heads of 64 KiB or more"));
    }
    let code = response.code.unwrap_or(0);
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(bad_response(
                "101 Switching Protocols to a request that did not ask to upgrade",
            ));
        }
        progress.interim += len;
        return Ok(Some((len, None)));
    }
    Ok(Some((len, Some(build_head(&response, bytes, progress.head_request)?))))
}

/// One `Content-Length` line into the length so far. As hyper reads it: a comma-separated list
/// of numbers, all the same; most often one number (which httparse has already trimmed).
fn add_length(length: &mut Option<u64>, value: &[u8]) -> Result<(), &'static str> {
    let mut add = |n: Option<u64>| match n {
        Some(n) if length.is_none_or(|seen| seen == n) => {
            *length = Some(n);
            Ok(())
        }
        Some(_) => Err("two different Content-Length values"),
        None => Err("an invalid Content-Length"),
    };
    match parse_digits(value) {
        Some(n) => add(Some(n)),
        None => list_tokens(value).try_for_each(|element| add(parse_digits(element))),
    }
}

/// Status, headers (values are slices of `bytes`) and framing of a final head.
fn build_head(response: &httparse::Response<'_, '_>, bytes: &Bytes, head_request: bool) -> io::Result<ResponseHead> {
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
    // `Content-Length`, only looked at when the length is the body's (see `framing` below).
    let mut has_length = false;
    let mut content_length: Option<u64> = None;
    let mut length_error: Option<&str> = None;
    let mut transfer_encoding = false;
    let mut chunked_last = false;
    // HTTP/1.1 stays open unless told otherwise; HTTP/1.0 closes unless told otherwise.
    let mut keep_alive = version == Version::HTTP_11;
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad_response("an invalid header name"))?;
        if name == header::CONTENT_LENGTH {
            has_length = true;
            if let Err(what) = add_length(&mut content_length, h.value) {
                length_error = Some(what);
            }
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
    // RFC 9112 §6.3, in its order (hyper's `Client::decoder` too).
    let framing = if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        // Never a body, whatever the headers say; what follows the head is not read as one.
        Decoder::Done
    } else if transfer_encoding {
        if version == Version::HTTP_10 {
            // Transfer codings are HTTP/1.1's: an HTTP/1.0 message that names one has faulty
            // framing (RFC 9112 §6.1), and hyper refuses it.
            return Err(bad_response("Transfer-Encoding in an HTTP/1.0 response"));
        }
        // A message with both is a smuggling attempt or a broken server: the length is the
        // chunked coding's (the length is not even read), and the connection is not reused.
        if has_length {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        if chunked_last {
            Decoder::Chunked(Chunked::new())
        } else {
            Decoder::UntilClose
        }
    } else if let Some(what) = length_error {
        return Err(bad_response(what));
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

/// The chunked coding's reader. It rides in every chunked response body, so it is kept to 16
/// bytes: a trailer section is not copied out but left at the front of the buffer until it
/// ends, to be checked as a whole.
struct Chunked {
    /// The size being read on a size line, then what is left of that chunk's data.
    size: u64,
    state: ChunkState,
    /// Extension bytes this body has had (bounded below 16 KiB).
    extension_bytes: u16,
    /// Bytes of the trailer section read so far (bounded below 16 KiB): the first ones in the
    /// buffer.
    trailer_bytes: u16,
    trailer_lines: u8,
}

/// hyper's states for the chunked coding (`proto/h1/decode.rs`, `ChunkedState`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// A chunk-size line starts: a hex digit must come.
    Start,
    Size,
    /// Whitespace after the size.
    SizeLws,
    /// In chunk extensions, until CR.
    Extension,
    /// After the size line's CR.
    SizeLf,
    /// Inside a chunk's data.
    Data,
    /// After a chunk's data: its CR, then its LF.
    DataCr,
    DataLf,
    /// After the last chunk's size line, and after each trailer line: CR of the final CRLF, or
    /// a trailer line's first byte.
    EndCr,
    EndLf,
    /// Inside a trailer line, until CR.
    Trailer,
    TrailerLf,
    End,
}

/// A response body read straight from its connection.
pub struct ResponseBody {
    conn: Option<H1Conn>,
    decoder: Decoder,
    /// The connection may carry another request once this body ends (if the request is all
    /// sent by then).
    reusable: bool,
    pool: Arc<PoolInner>,
    /// The rest of the request, when the response head came before all of it was sent: it goes
    /// on being sent as the response body is read.
    upload: Option<Box<Upload>>,
}

impl ResponseBody {
    /// The body ended: the connection goes back to the pool, or is closed. It goes back only
    /// when both sides meant to keep it, the request was all sent, and nothing came after the
    /// response. An upload still going is given up here (see `poll_upload`).
    fn release(&mut self) {
        let upload_done = self.upload.take().is_none();
        if let Some(conn) = self.conn.take() {
            if self.reusable && upload_done && conn.0.buf.is_empty() {
                self.pool.put_back_http1(conn);
            }
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.decoder = Decoder::Done;
        self.conn = None;
        self.upload = None;
        Poll::Ready(Some(Err(e)))
    }

    /// Move the rest of the request along, as far as the client's body and the connection let
    /// it without waiting: each poll of the response body does this first, so both directions
    /// progress in this one task (a full-duplex upstream answers while it still reads).
    ///
    /// When it stops follows hyper's client (`proto/h1/dispatch.rs`, `conn.rs`): the response
    /// head goes to the caller as soon as it is in, whatever its status, and the request body
    /// goes on being written after it; writing stops only when the body ends, when a write
    /// fails (the upstream closed or reset the connection: it will not read more, RFC 9112
    /// §9.5), or when the client's body fails. So an early 413 or 401 is not in itself a reason
    /// to stop: an upstream that closes is heard through the failed write; one that stops
    /// reading only backs the upload up, and its answer is still read in full. A failed client
    /// body fails the response too, as in hyper: the upstream can never get a complete request,
    /// and only closing the connection tells it so.
    ///
    /// Two differences from hyper. A failed write ends the upload but not the response: what the
    /// upstream answered before it closed is read to its end (hyper fails a response body still
    /// being read with a connection error). And nothing runs here once the response body has
    /// ended: an upload still going then is given up and the connection closed, where hyper's
    /// connection task goes on writing it until it ends or the upstream closes (the upstream
    /// has answered in full either way).
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let (Some(upload), Some(conn)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return Ok(());
        };
        match upload.poll_send(&mut conn.0.io, cx) {
            Poll::Pending => return Ok(()),
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) if upload.client_failed => return Err(e),
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "the upstream stopped taking the request body; reading its answer");
                self.reusable = false;
            }
        }
        self.upload = None;
        Ok(())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.upload.is_some() {
            if let Err(e) = this.poll_upload(cx) {
                return this.fail(e);
            }
        }
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
                Decoder::Chunked(chunked) => match decode_chunked(chunked, &mut conn.buf) {
                    Err(e) => return this.fail(e),
                    Ok(ChunkStep::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
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
    End,
    NeedMore,
}

/// One step of the chunked coding over the bytes in `buf`: the next piece of data, the end of
/// the body, or a need for more bytes. The size lines, chunk ends and trailers between pieces
/// of data are consumed on the way.
fn decode_chunked(chunked: &mut Chunked, buf: &mut BytesMut) -> io::Result<ChunkStep> {
    loop {
        if chunked.state == ChunkState::Data {
            if buf.is_empty() {
                return Ok(ChunkStep::NeedMore);
            }
            let n = chunked.size.min(buf.len() as u64) as usize;
            chunked.size -= n as u64;
            if chunked.size == 0 {
                chunked.state = ChunkState::DataCr;
            }
            return Ok(ChunkStep::Data(buf.split_to(n).freeze()));
        }
        match chunked.read_lines(buf)? {
            LineStep::Data => continue,
            LineStep::End => return Ok(ChunkStep::End),
            LineStep::NeedMore => return Ok(ChunkStep::NeedMore),
        }
    }
}

enum LineStep {
    /// At a chunk's data.
    Data,
    End,
    NeedMore,
}

impl Chunked {
    fn new() -> Chunked {
        Chunked {
            size: 0,
            state: ChunkState::Start,
            extension_bytes: 0,
            trailer_bytes: 0,
            trailer_lines: 0,
        }
    }

    /// Consume the bytes between two pieces of data (a chunk's CRLF, the next size line, the
    /// trailer section), byte by byte, until data starts, the body ends or `buf` runs out. The
    /// bytes read are dropped from `buf` at once (but for a trailer section not yet ended), so
    /// none is looked at twice.
    fn read_lines(&mut self, buf: &mut BytesMut) -> io::Result<LineStep> {
        // Where reading resumes: after the trailer section kept so far.
        let mut at = usize::from(self.trailer_bytes);
        // What can go: everything before a trailer section.
        let mut done = 0;
        let step = loop {
            match self.state {
                ChunkState::Data => break LineStep::Data,
                ChunkState::End => break LineStep::End,
                _ => {}
            }
            let Some(&byte) = buf.get(at) else {
                break LineStep::NeedMore;
            };
            self.step(byte)?;
            at += 1;
            if self.trailer_bytes == 0 {
                done = at;
            }
        };
        if self.state == ChunkState::End && self.trailer_bytes > 0 {
            check_trailers(&buf[done..at], self.trailer_lines)?;
            done = at;
        }
        buf.advance(done);
        Ok(step)
    }

    /// hyper's transitions (`ChunkedState::step`), one byte at a time.
    fn step(&mut self, byte: u8) -> io::Result<()> {
        use ChunkState::*;
        self.state = match (self.state, byte) {
            // `chunk-size = 1*HEXDIG`: nothing before the first digit; any number of digits
            // (leading zeros included) as long as the value fits 64 bits.
            (Start, _) => {
                self.size = add_hex_digit(0, byte).ok_or_else(|| bad_chunk("a chunk size that is not hex"))?;
                Size
            }
            (Size, b'\t' | b' ') => SizeLws,
            (Size, b';') => Extension,
            (Size, b'\r') => SizeLf,
            (Size, _) => {
                self.size = add_hex_digit(self.size, byte).ok_or_else(|| {
                    if byte.is_ascii_hexdigit() {
                        bad_chunk("a chunk size past 64 bits")
                    } else {
                        bad_chunk("a chunk size followed by something else than whitespace, `;` or CRLF")
                    }
                })?;
                Size
            }
            // Spaces and tabs may follow the size; no more digits then.
            (SizeLws, b'\t' | b' ') => SizeLws,
            (SizeLws, b';') => Extension,
            (SizeLws, b'\r') => SizeLf,
            (SizeLws, _) => return Err(bad_chunk("something else than `;` or CRLF after a chunk size")),
            // Extensions are skipped, whatever they hold (a quoted string is not looked into):
            // they end at the first CR. A bare LF in one is refused, for the sake of readers
            // that end lines there. Their bytes are bounded over the whole body.
            (Extension, b'\r') => SizeLf,
            (Extension, b'\n') => return Err(bad_chunk("a chunk extension with a bare LF")),
            (Extension, _) => {
                self.extension_bytes += 1;
                if self.extension_bytes >= MAX_CHUNK_EXTENSIONS {
                    return Err(bad_chunk("chunk extensions past 16 KiB"));
                }
                Extension
            }
            (SizeLf, b'\n') if self.size == 0 => EndCr,
            (SizeLf, b'\n') => Data,
            (SizeLf, _) => return Err(bad_chunk("a chunk-size line with CR but no LF")),
            (DataCr, b'\r') => DataLf,
            (DataCr, _) => return Err(bad_chunk("a chunk longer than its size")),
            (DataLf, b'\n') => Start,
            (DataLf, _) => return Err(bad_chunk("a chunk whose data ends with CR but no LF")),
            // After the last chunk: the final CRLF, or trailer lines before it. A trailer line
            // ends at CRLF (a bare LF inside one is kept as part of it, as hyper does). The
            // section is counted as hyper counts it: every byte from its first one (CRLFs and
            // the final CRLF included).
            (EndCr, b'\r') => {
                if self.trailer_bytes > 0 {
                    self.count_trailer_byte()?;
                }
                EndLf
            }
            (Trailer, b'\r') => {
                self.count_trailer_byte()?;
                TrailerLf
            }
            (EndCr | Trailer, _) => {
                self.count_trailer_byte()?;
                Trailer
            }
            (TrailerLf, b'\n') => {
                if usize::from(self.trailer_lines) >= MAX_TRAILER_LINES {
                    return Err(bad_chunk("more than 100 trailer lines"));
                }
                self.trailer_lines += 1;
                self.count_trailer_byte()?;
                EndCr
            }
            (TrailerLf, _) => return Err(bad_chunk("a trailer line with CR but no LF")),
            (EndLf, b'\n') => {
                if self.trailer_bytes > 0 {
                    self.count_trailer_byte()?;
                }
                End
            }
            (EndLf, _) => return Err(bad_chunk("a chunked body whose last line has CR but no LF")),
            (Data | End, _) => unreachable!("data and the end are not read byte by byte"),
        };
        Ok(())
    }

    /// A trailer section reaching 16 KiB is refused (hyper's bound).
    fn count_trailer_byte(&mut self) -> io::Result<()> {
        self.trailer_bytes += 1;
        if usize::from(self.trailer_bytes) >= MAX_TRAILERS {
            return Err(bad_chunk("trailers of 16 KiB or more"));
        }
        Ok(())
    }
}

/// A trailer section must parse as header fields (hyper parses it the same way, to hand the
/// trailers on; here they are only checked, then dropped).
#[cold]
fn check_trailers(section: &[u8], lines: u8) -> io::Result<()> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_LINES];
    match httparse::parse_headers(section, &mut fields[..usize::from(lines).min(MAX_TRAILER_LINES)]) {
        Ok(httparse::Status::Complete((_, fields))) => {
            for field in fields.iter() {
                HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| bad_chunk("an invalid trailer name"))?;
                HeaderValue::from_bytes(field.value).map_err(|_| bad_chunk("an invalid trailer value"))?;
            }
            Ok(())
        }
        Ok(httparse::Status::Partial) => Err(bad_chunk("an incomplete trailer section")),
        Err(e) => Err(bad_chunk(&format!("a malformed trailer section ({e})"))),
    }
}

/// `size * 16 + digit`, or `None` when `byte` is not a hex digit or the value passes 64 bits.
fn add_hex_digit(size: u64, byte: u8) -> Option<u64> {
    let digit = (byte as char).to_digit(16)?;
    size.checked_mul(16)?.checked_add(u64::from(digit))
}

fn bad_chunk(what: &str) -> io::Error {
    bad_response(&format!("a malformed chunked body: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode a chunked body fed in `pieces`: its data and how many bytes were left after it,
    /// or the error (`UnexpectedEof` when the pieces end before the body does).
    fn decode_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> io::Result<(Vec<u8>, usize)> {
        let mut chunked = Chunked::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            loop {
                match decode_chunked(&mut chunked, &mut buf)? {
                    ChunkStep::Data(d) => out.extend_from_slice(&d),
                    ChunkStep::End => return Ok((out, buf.len())),
                    ChunkStep::NeedMore => break,
                }
            }
        }
        Err(io::ErrorKind::UnexpectedEof.into())
    }

    fn decode_all(wire: &[u8]) -> io::Result<(Vec<u8>, usize)> {
        decode_pieces([wire])
    }

    /// Chunked bodies as hyper's decoder (`proto/h1/decode.rs`) reads them, one named case per
    /// edge: `Ok(data)` is what it yields, `Err(())` that it refuses the body.
    const CHUNKED_CASES: &[(&str, &[u8], Result<&str, ()>)] = &[
        ("one digit", b"5\r\nhello\r\n0\r\n\r\n", Ok("hello")),
        (
            "lower and upper hex",
            b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n",
            Ok("01234567890123456789"),
        ),
        ("a leading zero", b"05\r\nhello\r\n0\r\n\r\n", Ok("hello")),
        (
            "leading zeros past 16 digits",
            b"000000000000000000005\r\nhello\r\n0\r\n\r\n",
            Ok("hello"),
        ),
        (
            "a last chunk of several zeros",
            b"5\r\nhello\r\n0000000000000000000\r\n\r\n",
            Ok("hello"),
        ),
        ("the largest size (16 digits)", b"ffffffffffffffff\r\nhello", Err(())),
        (
            "a size past 64 bits",
            b"10000000000000005\r\nhello\r\n0\r\n\r\n",
            Err(()),
        ),
        ("no size", b"\r\nhello\r\n0\r\n\r\n", Err(())),
        ("an empty line", b"\r\n", Err(())),
        ("not hex", b"x\r\nhello\r\n0\r\n\r\n", Err(())),
        ("hex then not hex", b"5x\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a sign", b"+5\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a 0x prefix", b"0x5\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a space before the size", b" 5\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a tab before the size", b"\t5\r\nhello\r\n0\r\n\r\n", Err(())),
        (
            "spaces and tabs after the size",
            b"5 \t \r\nhello\r\n0\r\n\r\n",
            Ok("hello"),
        ),
        ("a digit after whitespace", b"5 5\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a form feed after the size", b"5\x0c\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a vertical tab after the size", b"5\x0b\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a form feed after whitespace", b"5 \x0c\r\nhello\r\n0\r\n\r\n", Err(())),
        ("NUL after the size", b"5\0\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a bare LF ending the size line", b"5\nhello\r\n0\r\n\r\n", Err(())),
        ("a bare LF before an extension", b"5\n;x\r\nhello\r\n0\r\n\r\n", Err(())),
        ("a bare LF after whitespace", b"5 \nhello\r\n0\r\n\r\n", Err(())),
        (
            "a bare LF inside an extension",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            Err(()),
        ),
        ("a bare LF ending an extension", b"5;a\nhello\r\n0\r\n\r\n", Err(())),
        ("CR without LF after the size", b"5\rhello\r\n0\r\n\r\n", Err(())),
        ("CR CR LF after the size", b"5\r\r\nhello\r\n0\r\n\r\n", Err(())),
        ("an extension", b"5;ext\r\nhello\r\n0\r\n\r\n", Ok("hello")),
        (
            "an extension with a value",
            b"5;name=value\r\nhello\r\n0\r\n\r\n",
            Ok("hello"),
        ),
        (
            "extensions on every chunk",
            b"5;a=1;b\r\nhello\r\n0;last\r\n\r\n",
            Ok("hello"),
        ),
        ("empty extensions", b"5;;;  ;\r\nhello\r\n0\r\n\r\n", Ok("hello")),
        (
            "whitespace around an extension",
            b"5 \t; ext = 1 \r\nhello\r\n0\r\n\r\n",
            Ok("hello"),
        ),
        (
            "a quoted extension value with ; and \\\"",
            b"5;n=\"a;b \\\" c\"\r\nhello\r\n0\r\n\r\n",
            Ok("hello"),
        ),
        (
            "a quoted string does not hide its CR",
            b"5;n=\"a\r\nhello\"\r\n",
            Err(()),
        ),
        (
            "control bytes in an extension (skipped)",
            b"5;\0\x0c\x7f\r\nhello\r\n0\r\n\r\n",
            Ok("hello"),
        ),
        ("data longer than its size", b"5\r\nhelloXX\r\n0\r\n\r\n", Err(())),
        ("data ending with a bare LF", b"5\r\nhello\n0\r\n\r\n", Err(())),
        ("data ending with CR only", b"5\r\nhello\r0\r\n\r\n", Err(())),
        ("trailers", b"5\r\nhello\r\n0\r\nx-t: 1\r\ny: 2\r\n\r\n", Ok("hello")),
        ("a trailer without a colon", b"0\r\nnot a field\r\n\r\n", Err(())),
        ("a trailer with a bare LF inside", b"0\r\nx: a\nb\r\n\r\n", Err(())),
        ("a trailer line with CR but no LF", b"0\r\nx: 1\rz\r\n\r\n", Err(())),
        ("a last line with CR but no LF", b"0\r\n\rz", Err(())),
        (
            "a last line that is a bare LF (starts a trailer section)",
            b"0\r\n\n\r\n\r\n",
            Ok(""),
        ),
        ("an incomplete size line", b"5", Err(())),
        ("an incomplete chunk", b"5\r\nhel", Err(())),
        ("no final CRLF", b"5\r\nhello\r\n0\r\n", Err(())),
    ];

    #[test]
    fn chunked_bodies_are_read_as_hyper_reads_them() {
        for (name, wire, expected) in CHUNKED_CASES {
            let got = decode_all(wire);
            match expected {
                Ok(data) => {
                    let (out, left) = got.unwrap_or_else(|e| panic!("{name}: refused ({e})"));
                    assert_eq!(String::from_utf8_lossy(&out), *data, "{name}");
                    assert_eq!(left, 0, "{name}: bytes left after the body");
                }
                Err(()) => assert!(got.is_err(), "{name}: accepted as {got:?}"),
            }
        }
    }

    /// What hyper's HTTP/1.1 client (the one this module replaced) makes of `response`, all of
    /// what an upstream sends before it closes: the status and body, or `Err` when it refuses
    /// the head or fails the body.
    async fn hyper_reads(method: Method, response: &[u8]) -> Result<(u16, Vec<u8>), ()> {
        use http_body_util::{BodyExt, Empty};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client_io, mut server_io) = tokio::io::duplex(1 << 20);
        let response = response.to_vec();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match server_io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = server_io.write_all(&response).await;
        });
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client_io))
            .await
            .map_err(|_| ())?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri("/")
            .header(header::HOST, "upstream")
            .body(Empty::<Bytes>::new())
            .map_err(|_| ())?;
        let response = sender.send_request(req).await.map_err(|_| ())?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|_| ())?.to_bytes();
        Ok((status, body.to_vec()))
    }

    #[tokio::test]
    async fn the_chunked_cases_are_what_hyper_does() {
        for (name, wire, expected) in CHUNKED_CASES {
            let mut response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            response.extend_from_slice(wire);
            let hyper = hyper_reads(Method::GET, &response).await.map(|(_, body)| body);
            let expected = expected.map(|data| data.as_bytes().to_vec());
            assert_eq!(hyper, expected, "{name}: hyper differs from the table");
        }
        for (name, wire, accepted) in bound_cases() {
            let mut response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            response.extend_from_slice(&wire);
            assert_eq!(
                hyper_reads(Method::GET, &response).await.is_ok(),
                accepted,
                "{name}: hyper differs"
            );
        }
    }

    #[test]
    fn chunked_bodies_read_the_same_in_any_pieces() {
        for (name, wire, _) in CHUNKED_CASES {
            let whole = decode_all(wire).map_err(|e| e.kind());
            for at in 0..=wire.len() {
                let split = decode_pieces([&wire[..at], &wire[at..]]).map_err(|e| e.kind());
                assert_eq!(split, whole, "{name}, split at {at}");
            }
            let bytes = decode_pieces(wire.chunks(1)).map_err(|e| e.kind());
            assert_eq!(bytes, whole, "{name}, byte by byte");
        }
    }

    /// Bodies at and past the bounds on extensions and trailers: (name, wire, accepted).
    fn bound_cases() -> Vec<(&'static str, Vec<u8>, bool)> {
        let extensions = |per_chunk: usize, chunks: usize| {
            let mut wire = Vec::new();
            for _ in 0..chunks {
                wire.extend_from_slice(b"1;");
                wire.extend_from_slice(&vec![b'x'; per_chunk]);
                wire.extend_from_slice(b"\r\nA\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            wire
        };
        let trailers = |lines: usize, value: usize| {
            let mut wire = b"0\r\n".to_vec();
            for _ in 0..lines {
                wire.extend_from_slice(b"x: ");
                wire.extend_from_slice(&vec![b'v'; value]);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            wire
        };
        vec![
            // Extensions count over the whole body, each line alone being fine.
            ("16 383 extension bytes after the `;`", extensions(16_383, 1), true),
            ("16 384 extension bytes after the `;`", extensions(16_384, 1), false),
            (
                "20 000 bytes of extensions over two lines",
                extensions(10_000, 2),
                false,
            ),
            ("100 trailer lines", trailers(100, 1), true),
            ("101 trailer lines", trailers(101, 1), false),
            // 3 + 16 376 + 2 bytes of one line and the final CRLF: 16 383 bytes.
            ("a trailer section of 16 383 bytes", trailers(1, 16_376), true),
            ("a trailer section of 16 384 bytes", trailers(1, 16_377), false),
        ]
    }

    #[test]
    fn chunked_bodies_stop_at_their_end_and_bound_extensions_and_trailers() {
        let (data, left) = decode_all(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT").unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(left, 4, "bytes after the body stay for the next response");
        for (name, wire, accepted) in bound_cases() {
            assert_eq!(decode_all(&wire).is_ok(), accepted, "{name}");
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let head = |s: &str| match parse_response_head(&Bytes::from(s.to_string()), 0, &mut HeadProgress::default()) {
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

    /// What this module makes of `response`, all of what an upstream sends before it closes:
    /// the status and body, or `Err` when it refuses the head or the body.
    fn ours_reads(method: Method, response: &[u8]) -> Result<(u16, Vec<u8>), ()> {
        let bytes = Bytes::copy_from_slice(response);
        let mut progress = HeadProgress {
            head_request: method == Method::HEAD,
            ..HeadProgress::default()
        };
        let Ok(HeadScan::Final(end, head)) = scan_heads(&bytes, &mut progress) else {
            return Err(());
        };
        let mut rest = BytesMut::from(&bytes[end..]);
        let body = match head.framing {
            Decoder::Done => Vec::new(),
            Decoder::Length(n) => rest.get(..n as usize).ok_or(())?.to_vec(),
            Decoder::UntilClose => rest.to_vec(),
            Decoder::Chunked(mut chunked) => {
                let mut body = Vec::new();
                loop {
                    match decode_chunked(&mut chunked, &mut rest).map_err(|_| ())? {
                        ChunkStep::Data(data) => body.extend_from_slice(&data),
                        ChunkStep::End => break body,
                        ChunkStep::NeedMore => return Err(()),
                    }
                }
            }
        };
        Ok((head.status.as_u16(), body))
    }

    /// Responses whose framing is decided by their head: (name, method, whole response, body
    /// expected, `None` if refused). hyper agrees on each; where this module differs on purpose
    /// (an unasked `101` is refused rather than handed over as an upgrade) it is not here.
    const FRAMING_CASES: &[(&str, Method, &[u8], Option<&str>)] = &[
        ("a length", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloXX", Some("hello")),
        ("a length with whitespace around it", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: \t 5 \t\r\n\r\nhelloXX", Some("hello")),
        ("a list with whitespace", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5 ,\t5 \r\n\r\nhello", Some("hello")),
        ("two equal lengths", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello", Some("hello")),
        ("a list of equal lengths", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello", Some("hello")),
        ("a list and a line, equal", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5,5\r\ncontent-length: 5\r\n\r\nhello", Some("hello")),
        ("two different lengths", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!", None),
        ("a list of different lengths", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello!", None),
        ("a list with an empty element", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5,\r\n\r\nhello", None),
        ("a signed length", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello", None),
        ("a length past 64 bits", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551616\r\n\r\nhello", None),
        ("chunked and a length", Method::GET, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Some("hello")),
        ("chunked and an invalid length", Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Some("hello")),
        ("chunked last of two codings", Method::GET, b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Some("hello")),
        ("chunked not last", Method::GET, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n5\r\nhello", Some("5\r\nhello")),
        ("chunked in an earlier line", Method::GET, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\nhello", Some("hello")),
        ("another coding alone", Method::GET, b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 2\r\n\r\nhello", Some("hello")),
        ("a coding in HTTP/1.0", Method::GET, b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", None),
        ("a length in HTTP/1.0", Method::GET, b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhelloXX", Some("hello")),
        ("no length", Method::GET, b"HTTP/1.1 200 OK\r\n\r\nall of it", Some("all of it")),
        ("HEAD with a length", Method::HEAD, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Some("")),
        ("HEAD with an invalid length", Method::HEAD, b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", Some("")),
        ("HEAD with chunked", Method::HEAD, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", Some("")),
        ("204 with a tail", Method::GET, b"HTTP/1.1 204 No Content\r\n\r\nhello", Some("")),
        ("204 with a length and a tail", Method::GET, b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello", Some("")),
        ("304 with a length and a tail", Method::GET, b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\nhello", Some("")),
        ("304 with an invalid length", Method::GET, b"HTTP/1.1 304 Not Modified\r\ncontent-length: x\r\n\r\n", Some("")),
        ("interim heads first", Method::GET, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", Some("ok")),
    ];

    #[tokio::test]
    async fn response_framing_is_what_hyper_does() {
        for (name, method, response, expected) in FRAMING_CASES {
            let ours = ours_reads(method.clone(), response).map(|(_, body)| body);
            let hyper = hyper_reads(method.clone(), response).await.map(|(_, body)| body);
            let expected = expected.map(|body| body.as_bytes().to_vec()).ok_or(());
            assert_eq!(ours, expected, "{name}: ours");
            assert_eq!(hyper, expected, "{name}: hyper");
        }
    }

    #[test]
    fn interim_heads_are_skipped_and_101_is_refused() {
        let parse = |s: &'static [u8]| parse_response_head(&Bytes::from_static(s), 0, &mut HeadProgress::default());
        assert!(matches!(
            parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
            Ok(Some((25, None)))
        ));
        assert!(parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\n"), Ok(None)));
        assert!(parse(b"HTTP/1.1 200 OK\nx\0: y\r\n\r\n").is_err());
    }

    /// What the bytes in hand hold toward a final head, read the way `poll_response_head`
    /// reads them.
    enum HeadScan {
        /// The final head, and where it ends.
        Final(usize, ResponseHead),
        /// No final head yet: what is kept from here on.
        Partial(usize),
    }

    fn scan_heads(bytes: &Bytes, progress: &mut HeadProgress) -> io::Result<HeadScan> {
        let mut at = 0;
        while at < bytes.len() {
            match parse_response_head(bytes, at, progress)? {
                Some((len, Some(head))) => return Ok(HeadScan::Final(at + len, head)),
                Some((len, None)) => at += len,
                None => break,
            }
        }
        Ok(HeadScan::Partial(at))
    }

    #[test]
    fn interim_heads_are_skipped_by_offset_within_the_head_budget() {
        const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        let flood = |n: usize, rest: &[u8]| {
            let mut bytes = CONTINUE.repeat(n);
            bytes.extend_from_slice(rest);
            Bytes::from(bytes)
        };
        // 2000 interim heads and a final one, in one buffer: one pass over it.
        let bytes = flood(2000, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        let mut progress = HeadProgress::default();
        match scan_heads(&bytes, &mut progress) {
            Ok(HeadScan::Final(end, head)) => {
                assert_eq!(head.status, StatusCode::OK);
                assert_eq!(&bytes[end..], b"ok", "only the body's start is left to keep");
            }
            _ => panic!("the final head was not found"),
        }
        assert_eq!(progress.interim, 2000 * CONTINUE.len());

        // Interim heads then part of the next: what is kept (and copied back) is that part
        // alone, whatever number of interim heads came before it.
        for n in [1, 10, 1000] {
            let bytes = flood(n, b"HTTP/1.1 200 O");
            match scan_heads(&bytes, &mut HeadProgress::default()) {
                Ok(HeadScan::Partial(at)) => assert_eq!(&bytes[at..], b"HTTP/1.1 200 O"),
                _ => panic!("{n} interim heads and an incomplete one"),
            }
        }

        // The budget holds across reads, and a flood past it is refused.
        let mut progress = HeadProgress::default();
        let part = flood(1400, b"");
        assert!(matches!(scan_heads(&part, &mut progress), Ok(HeadScan::Partial(_))));
        assert!(
            scan_heads(&part, &mut progress).is_err(),
            "2 × 1400 interim heads (70 000 bytes)"
        );
        assert!(scan_heads(&flood(3000, b""), &mut HeadProgress::default()).is_err());
        // The final head counts too.
        let big = format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "a".repeat(40_000));
        assert!(scan_heads(&flood(500, big.as_bytes()), &mut HeadProgress::default()).is_ok());
        assert!(scan_heads(&flood(1100, big.as_bytes()), &mut HeadProgress::default()).is_err());
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
