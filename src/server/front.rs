//! The client side of a connection for plain requests, served without hyper.
//!
//! A plain request is what an app's API call is: HTTP/1.1, an origin-form target, no body or a
//! `Content-Length` body of at most 64 KiB (the size the proxy buffers for resends anyway), no
//! `Transfer-Encoding`, `Upgrade` or `Expect`. Those are read, parsed once (httparse, header
//! values kept as slices of the bytes read), handed to the proxy and answered here, in the
//! connection's own task. Between requests the connection holds no buffer at all: it waits for
//! the socket to become readable and only then allocates one. hyper's HTTP/1.1 server keeps an
//! 8 KiB read buffer and an 8 KiB write buffer per connection for its whole life, which put an
//! idle keep-alive connection at ~13 KB; here it is the socket and this task.
//!
//! The first head that is anything else (a WebSocket upgrade, a chunked or large upload,
//! `Expect: 100-continue`, HTTP/1.0, conflicting framing, a head whose last line ends in a bare
//! LF, a head httparse or the limits refuse) hands the connection to hyper for the rest of its
//! life, with the bytes read so far replayed first ([`Rewind`]). hyper, the gate and the upgrade
//! path then answer it exactly as they answer every request on a connection that starts with
//! one.

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::{Body, Frame};
use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::app::App;
use super::caller::ConnInfo;
use super::ConnSettings;
use crate::proxy::body::ClientBody;
use crate::proxy::exchange::ObservedBody;
use crate::proxy::resend::MAX_REPLAYABLE_BODY;
use crate::upstream::wire::{decimal, list_tokens, parse_digits, put_header};

/// Headers a plain request may have; a head with more goes to hyper (which applies the
/// configured bound and answers).
const MAX_PLAIN_HEADERS: usize = 64;
/// What a read asks room for: a typical API request (head and JSON body) arrives in one read.
const READ_CHUNK: usize = 4096;
/// Response data up to this size is copied beside the head (one write); bigger is written
/// from where it is.
const COPY_LIMIT: usize = 4096;

/// A client socket: read readiness can be awaited without reading, so an idle connection
/// waits holding no buffer.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Socket for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl Socket for UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
}

/// How the front end left a connection.
pub enum Outcome<S> {
    /// Closed, or to be closed: nothing more to do.
    Done,
    /// hyper serves the rest, starting with these bytes (already read from the socket).
    HandOff(S, Bytes),
}

/// Serve plain requests on `stream` until it closes, idles out, or sends something that is
/// not plain.
pub async fn serve<S: Socket>(
    mut stream: S,
    app: &Arc<App>,
    conn: ConnInfo,
    shutdown: &CancellationToken,
    settings: &ConnSettings,
) -> Outcome<S> {
    // Bytes read and not yet used: empty (and unallocated) between requests unless the
    // client pipelines.
    let mut buf = BytesMut::new();
    // One idle timer for the connection's life, not one per request: when it fires early (the
    // connection was busy meanwhile) it is moved to the end of the current idle period. With
    // keep-alive traffic that is one timer wake-up per idle_timeout instead of a timer armed
    // and cancelled per request.
    let mut idle_since = Instant::now();
    let mut idle_timer = pin!(tokio::time::sleep_until(idle_since + settings.idle_timeout));
    loop {
        while buf.is_empty() {
            tokio::select! {
                biased;
                ready = poll_fn(|cx| stream.poll_read_ready(cx)) => match ready {
                    Ok(()) => break,
                    Err(_) => return Outcome::Done,
                },
                _ = shutdown.cancelled() => return Outcome::Done,
                _ = idle_timer.as_mut() => {
                    let deadline = idle_since + settings.idle_timeout;
                    if Instant::now() >= deadline {
                        tracing::debug!("client connection idle; closing");
                        return Outcome::Done;
                    }
                    idle_timer.as_mut().reset(deadline);
                }
            }
        }
        let request = match read_request(&mut stream, &mut buf, settings).await {
            Ok(Read::Plain(request)) => request,
            Ok(Read::HandOff(prefix)) => return Outcome::HandOff(stream, prefix),
            Ok(Read::Closed) => return Outcome::Done,
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    tracing::debug!(error = %e, "client too slow; closing");
                }
                return Outcome::Done;
            }
        };
        let PlainRequest {
            request,
            close_requested,
        } = request;
        let head_only = request.method() == Method::HEAD;

        // Served while watching the socket: a client that goes away cancels its request (as
        // hyper does), freeing its place in a queue; bytes that arrive are its next request.
        let mut handling = Box::pin(app.handle(request, conn));
        let mut watching = true;
        let response = loop {
            tokio::select! {
                biased;
                response = &mut handling => break response,
                read = poll_fn(|cx| poll_read_if_ready(&mut stream, &mut buf, cx)), if watching => match read {
                    Ok(0) | Err(_) => {
                        tracing::debug!("client closed its connection during its request");
                        return Outcome::Done;
                    }
                    Ok(_) => watching = false,
                },
            }
        };
        drop(handling);
        let keep_alive = !close_requested && !shutdown.is_cancelled();
        let client = Client {
            stream: &mut stream,
            buf: &mut buf,
            watching,
        };
        match write_response(client, response, head_only, keep_alive).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = stream.shutdown().await;
                return Outcome::Done;
            }
            Err(e) => {
                tracing::debug!(error = %e, "writing the response failed; closing");
                return Outcome::Done;
            }
        }
        if buf.is_empty() {
            // Release the allocation: an idle connection holds no buffer.
            buf = BytesMut::new();
        }
        idle_since = Instant::now();
    }
}

// The plain request is the common case and is moved once; boxing it would cost an allocation
// per request to save a copy of ~270 bytes.
#[allow(clippy::large_enum_variant)]
enum Read {
    /// End of stream before a byte of a new request.
    Closed,
    Plain(PlainRequest),
    /// Not plain: these bytes (the head and whatever followed it) go to hyper.
    HandOff(Bytes),
}

struct PlainRequest {
    request: Request<ClientBody>,
    /// The client sent `Connection: close`.
    close_requested: bool,
}

/// Read one request: its head (within `listen.header_read_timeout` of its first byte), then its
/// small body (each read within `listen.idle_timeout`, as a streamed body would be).
async fn read_request<S: Socket>(stream: &mut S, buf: &mut BytesMut, settings: &ConnSettings) -> io::Result<Read> {
    let head_deadline = Instant::now() + settings.header_read_timeout;
    let max_head = settings.limits.parser_max_head_bytes();
    let mut scanned = 0;
    let head_len = loop {
        match find_head_end(buf, scanned) {
            Some(HeadEnd::Crlf(end)) => break end,
            // A head whose last line ends in a bare LF (httparse and hyper accept them): hyper's.
            Some(HeadEnd::BareLf) => return Ok(Read::HandOff(std::mem::take(buf).freeze())),
            None => {}
        }
        // Past hyper's bound (it answers 431): hyper's.
        if buf.len() >= max_head {
            return Ok(Read::HandOff(std::mem::take(buf).freeze()));
        }
        // A line feed in the last two bytes may still begin the empty line.
        scanned = buf.len().saturating_sub(2);
        if read_more(stream, buf, READ_CHUNK, head_deadline, "its request head").await? == 0 {
            // hyper drops a connection that ends inside a head the same way.
            return Ok(Read::Closed);
        }
    };
    let head = buf.split_to(head_len).freeze();
    let Some((parts, body_len, close_requested)) = parse_plain(&head) else {
        let mut prefix = BytesMut::with_capacity(head.len() + buf.len());
        prefix.extend_from_slice(&head);
        prefix.extend_from_slice(buf);
        *buf = BytesMut::new();
        return Ok(Read::HandOff(prefix.freeze()));
    };
    while buf.len() < body_len {
        let deadline = Instant::now() + settings.idle_timeout;
        if read_more(stream, buf, body_len - buf.len(), deadline, "its request body").await? == 0 {
            return Ok(Read::Closed);
        }
    }
    let body = buf.split_to(body_len).freeze();
    Ok(Read::Plain(PlainRequest {
        request: Request::from_parts(parts, ClientBody::Whole(body)),
        close_requested,
    }))
}

/// Where a request head ends, as httparse (and so hyper) sees it.
#[derive(Debug, PartialEq, Eq)]
enum HeadEnd {
    /// At this offset, after `\r\n\r\n`.
    Crlf(usize),
    /// After an empty line that follows a line ended by a bare LF (`\n\r\n` or `\n\n`).
    BareLf,
}

/// The end of the head in `buf`, looking from `from` on: its first empty line. Lines may end
/// in CRLF or a bare LF, so the empty line is `\r\n` or `\n` right after a `\n` (a search for
/// `\r\n\r\n` alone would miss a head ending in `\n\r\n` and wait for bytes that never come).
/// One `memchr` pass over the line feeds; no allocation.
fn find_head_end(buf: &[u8], from: usize) -> Option<HeadEnd> {
    for offset in memchr::memchr_iter(b'\n', &buf[from..]) {
        let lf = from + offset;
        match buf.get(lf + 1..lf + 3) {
            Some([b'\r', b'\n']) if lf > 0 && buf[lf - 1] == b'\r' => return Some(HeadEnd::Crlf(lf + 3)),
            Some([b'\r', b'\n']) => return Some(HeadEnd::BareLf),
            _ if buf.get(lf + 1) == Some(&b'\n') => return Some(HeadEnd::BareLf),
            _ => {}
        }
    }
    None
}

/// One read of up to `room` more bytes into `buf`, by `deadline`; `0` is end of stream.
async fn read_more<S: Socket>(
    stream: &mut S,
    buf: &mut BytesMut,
    room: usize,
    deadline: Instant,
    what: &str,
) -> io::Result<usize> {
    buf.reserve(room);
    let mut read = pin!(poll_fn(|cx| tokio_util::io::poll_read_buf(
        Pin::new(&mut *stream),
        cx,
        buf
    )));
    // Usually the bytes are there already (the socket was readable): no timer for that read.
    if let Poll::Ready(read) = poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
        return read;
    }
    match tokio::time::timeout_at(deadline, read).await {
        Ok(read) => read,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client did not send {what} in time"),
        )),
    }
}

/// The request's parts, its body length and whether it asked to close, if the head is plain.
fn parse_plain(head: &Bytes) -> Option<(http::request::Parts, usize, bool)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_PLAIN_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return None,
    }
    if parsed.version != Some(1) {
        return None;
    }
    let method = parsed.method?;
    let path = parsed.path?;
    if method == "CONNECT" || !path.starts_with('/') {
        return None;
    }
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    let mut content_length = None;
    let mut close_requested = false;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return None;
        }
        if name == header::CONTENT_LENGTH {
            // One, digits only: anything else is hyper's to read or refuse.
            if content_length.is_some() {
                return None;
            }
            content_length = Some(parse_digits(h.value)?);
        } else if name == header::CONNECTION {
            for token in list_tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close_requested = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return None;
                }
            }
        }
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value)).ok()?;
        map.append(name, value);
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_REPLAYABLE_BODY {
        return None;
    }
    let mut request = Request::new(());
    *request.method_mut() = Method::from_bytes(method.as_bytes()).ok()?;
    *request.uri_mut() = Uri::from_maybe_shared(head.slice_ref(path.as_bytes())).ok()?;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    let (parts, ()) = request.into_parts();
    Some((parts, usize::try_from(body_len).ok()?, close_requested))
}

/// Read what the client sent while its request is served, without allocating until it sends
/// something: `0` is end of stream.
fn poll_read_if_ready<S: Socket>(stream: &mut S, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    ready!(stream.poll_read_ready(cx))?;
    buf.reserve(READ_CHUNK);
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body on the wire (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// The client's side of the connection while a response is written.
struct Client<'a, S> {
    stream: &'a mut S,
    /// Where bytes the client sends meanwhile (its next request) go.
    buf: &'a mut BytesMut,
    /// Still watching for the client to leave (nothing of its next request has arrived yet).
    watching: bool,
}

/// Write the response; `Ok(true)` when the connection stays open for another request.
async fn write_response<S: Socket>(
    client: Client<'_, S>,
    response: Response<ObservedBody>,
    head_only: bool,
    keep_alive: bool,
) -> io::Result<bool> {
    let Client {
        stream,
        buf,
        mut watching,
    } = client;
    let (parts, body) = response.into_parts();
    let mut body = pin!(body);
    let status = parts.status;
    let mut keep_alive = keep_alive && !asks_to_close(&parts.headers);
    // Content-Length is this writer's to write, once, whatever the headers hold: never on a
    // 1xx or 204 (RFC 9110 §8.6), and repeats of one value folded into one.
    let no_content = status.is_informational() || status == http::StatusCode::NO_CONTENT;
    let declared = if no_content {
        Some(None)
    } else {
        declared_length(&parts.headers)
    };
    let framing = if head_only || no_content || status == http::StatusCode::NOT_MODIFIED {
        Framing::None
    } else {
        match declared {
            Some(Some(n)) => Framing::Length(n),
            Some(None) => match body.size_hint().exact() {
                Some(n) => Framing::Length(n),
                None => Framing::Chunked,
            },
            // The request path never hands one over; if it did, the body could not be
            // delimited.
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad or conflicting Content-Length in a response",
                ))
            }
        }
    };

    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // Framing is this connection's to decide.
        if name == header::TRANSFER_ENCODING
            || name == header::CONTENT_LENGTH
            || (name == header::CONNECTION && !keep_alive)
        {
            continue;
        }
        put_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        with_http_date(|date| put_header(&mut out, b"date", date));
    }
    match (framing, declared) {
        (Framing::Length(n), _) | (Framing::None, Some(Some(n))) => {
            // Without a body, a HEAD or 304 answer keeps the length it declares (that of the
            // body a GET would get); a 1xx or 204 declares none (`declared` is empty).
            put_header(&mut out, b"content-length", decimal(n, &mut [0; 20]));
        }
        (Framing::Chunked, _) => put_header(&mut out, b"transfer-encoding", b"chunked"),
        (Framing::None, _) => {}
    }
    if !keep_alive {
        put_header(&mut out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");

    if framing == Framing::None {
        stream.write_all(&out).await?;
        return Ok(keep_alive);
    }
    let mut sent: u64 = 0;
    loop {
        // While bytes are queued, look at the body without waiting; once it has nothing ready,
        // send what is queued (an SSE event goes out the moment it arrives).
        let polled = if out.is_empty() {
            // Waiting on the upstream (an SSE stream may be quiet for minutes): a client that
            // leaves meanwhile ends the stream, freeing its slot, as hyper does.
            tokio::select! {
                biased;
                frame = poll_fn(|cx| body.as_mut().poll_frame(cx)) => Poll::Ready(frame),
                read = poll_fn(|cx| poll_read_if_ready(&mut *stream, &mut *buf, cx)), if watching => match read {
                    Ok(0) | Err(_) => {
                        tracing::debug!("client closed its connection during the response");
                        return Ok(false);
                    }
                    Ok(_) => {
                        watching = false;
                        continue;
                    }
                },
            }
        } else {
            poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await
        };
        let frame = match polled {
            Poll::Pending => {
                stream.write_all(&out).await?;
                out.clear();
                continue;
            }
            Poll::Ready(frame) => frame,
        };
        match frame {
            None => {
                match framing {
                    Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    // Shorter than declared: the client must not wait for the rest.
                    Framing::Length(declared) if declared != sent => keep_alive = false,
                    _ => {}
                }
                stream.write_all(&out).await?;
                return Ok(keep_alive);
            }
            Some(Err(e)) => {
                // The upstream failed mid-body: what was sent is all there is, and only a
                // closed connection tells the client it is incomplete.
                tracing::debug!(error = %e, "response body failed; closing the client connection");
                stream.write_all(&out).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data().map_err(Frame::into_trailers) else {
                    // Trailers: HTTP/1.1 clients did not ask for them (hyper drops them too).
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if let Framing::Length(n) = framing {
                    if sent > n {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "response body longer than its Content-Length",
                        ));
                    }
                }
                if framing == Framing::Chunked {
                    out.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                }
                if data.len() <= COPY_LIMIT {
                    out.extend_from_slice(&data);
                } else {
                    write_all_two(stream, &out, &data).await?;
                    out.clear();
                }
                if framing == Framing::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
    }
}

/// The body length the `Content-Length` headers declare: `Some(None)` when there are none,
/// `None` when a value is not a length or two values differ.
fn declared_length(headers: &HeaderMap) -> Option<Option<u64>> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let n = parse_digits(value.as_bytes())?;
        if length.is_some_and(|seen| seen != n) {
            return None;
        }
        length = Some(n);
    }
    Some(length)
}

fn asks_to_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| list_tokens(v.as_bytes()).any(|token| token.eq_ignore_ascii_case(b"close")))
}

/// `a` then `b`, in as few writes as the socket takes.
async fn write_all_two<S: AsyncWrite + Unpin>(stream: &mut S, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = stream.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// The `Date` value (as hyper adds one), formatted once per second per thread.
fn with_http_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        f(cached.1.as_bytes())
    })
}

pin_project_lite::pin_project! {
    /// A socket whose first bytes were already read: they are read again, then the socket.
    pub struct Rewind<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
    }
}

impl<S> Rewind<S> {
    pub fn new(inner: S, prefix: Bytes) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead> AsyncRead for Rewind<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Rewind<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The target, body length and close flag of a plain head; `None` for a hand-off.
    fn plain(head: &str) -> Option<(String, usize, bool)> {
        parse_plain(&Bytes::copy_from_slice(head.as_bytes()))
            .map(|(parts, len, close)| (parts.uri.to_string(), len, close))
    }

    #[test]
    fn api_calls_are_plain() {
        assert_eq!(
            plain("POST /v1/tts?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 12\r\n\r\n"),
            Some(("/v1/tts?x=1".to_string(), 12, false))
        );
        assert_eq!(
            plain("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").map(|p| p.2),
            Some(true)
        );
        let largest = format!("POST / HTTP/1.1\r\nContent-Length: {MAX_REPLAYABLE_BODY}\r\n\r\n");
        assert_eq!(plain(&largest).map(|p| p.1 as u64), Some(MAX_REPLAYABLE_BODY));
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        let too_big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_REPLAYABLE_BODY + 1);
        let many_headers = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(MAX_PLAIN_HEADERS + 1));
        for head in [
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT localhost:443 HTTP/1.1\r\n\r\n",
            "GET http://localhost/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET /ws HTTP/1.1\r\nConnection: keep-alive, upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nFolded: x\r\n y\r\n\r\n",
            &too_big,
            &many_headers,
        ] {
            assert_eq!(plain(head), None, "{head:?}");
        }
    }

    #[test]
    fn the_head_ends_at_its_first_empty_line() {
        let crlf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut pipelined = crlf.to_vec();
        pipelined.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        assert_eq!(find_head_end(crlf, 0), Some(HeadEnd::Crlf(crlf.len())));
        assert_eq!(find_head_end(&pipelined, 0), Some(HeadEnd::Crlf(crlf.len())));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\n", 0), Some(HeadEnd::Crlf(18)));
        // Leading empty lines (RFC 9112 §2.2) end nothing but themselves; httparse skips them.
        assert_eq!(find_head_end(b"\r\nGET / HTTP/1.1\r\n\r\n", 0), Some(HeadEnd::Crlf(20)));
        for bare in [
            &b"GET / HTTP/1.1\r\nHost: a\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"GET / HTTP/1.1\r\nHost: a\n\n",
            b"GET / HTTP/1.1\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"\n\r\n",
        ] {
            assert_eq!(find_head_end(bare, 0), Some(HeadEnd::BareLf), "{bare:?}");
        }
        for unfinished in [
            &b""[..],
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r",
            b"GET / HTTP/1.1\r\nHost: a\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r",
            b"GET / HTTP/1.1\r\nX: a\n\rb\r\n",
        ] {
            assert_eq!(find_head_end(unfinished, 0), None, "{unfinished:?}");
        }
    }

    #[test]
    fn a_head_end_is_found_however_the_reads_split_it() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"GET / HTTP/1.1\r\nHost: a\n\n",
        ] {
            let whole = find_head_end(head, 0);
            assert!(whole.is_some());
            // Reads of every size, resuming where read_request resumes.
            for step in 1..head.len() {
                let (mut len, mut scanned) = (0, 0);
                let found = loop {
                    len = (len + step).min(head.len());
                    if let Some(end) = find_head_end(&head[..len], scanned) {
                        break Some(end);
                    }
                    if len == head.len() {
                        break None;
                    }
                    scanned = len.saturating_sub(2);
                };
                assert_eq!(found, whole, "{head:?} read {step} bytes at a time");
            }
        }
    }

    /// What the response writer sends for `status`, `headers` and `body` (the connection
    /// then closes), or its error.
    async fn written(
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: &'static str,
        head_only: bool,
    ) -> io::Result<String> {
        use crate::proxy::body::ProxyBody;
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut client = TcpStream::connect(listener.local_addr()?).await?;
        let (mut server, _) = listener.accept().await?;
        let status = http::StatusCode::from_u16(status).expect("status");
        let mut response = Response::new(ObservedBody::new(
            ProxyBody::full(Bytes::from_static(body.as_bytes())),
            status,
            None,
        ));
        *response.status_mut() = status;
        for (name, value) in headers {
            response.headers_mut().append(*name, HeaderValue::from_static(value));
        }
        let mut buf = BytesMut::new();
        let to = Client {
            stream: &mut server,
            buf: &mut buf,
            watching: false,
        };
        write_response(to, response, head_only, false).await?;
        drop(server);
        let mut out = String::new();
        client.read_to_string(&mut out).await?;
        Ok(out)
    }

    fn lengths(response: &str) -> Vec<&str> {
        response
            .split("\r\n")
            .filter_map(|line| line.strip_prefix("content-length: "))
            .collect()
    }

    #[tokio::test]
    async fn the_writer_sends_one_content_length_and_none_on_1xx_or_204() {
        let twice = [("content-length", "5"), ("x-a", "1"), ("content-length", "5")];
        let sent = written(200, &twice, "hello", false).await.unwrap();
        assert_eq!(lengths(&sent), ["5"], "{sent}");
        assert!(sent.ends_with("\r\n\r\nhello"), "{sent}");
        let sent = written(200, &twice, "", true).await.unwrap();
        assert_eq!(lengths(&sent), ["5"], "HEAD: {sent}");
        assert!(sent.ends_with("\r\n\r\n"), "{sent}");
        let sent = written(304, &[("content-length", "9"), ("content-length", "9")], "", false)
            .await
            .unwrap();
        assert_eq!(lengths(&sent), ["9"], "{sent}");
        let sent = written(304, &[("content-length", "9"), ("content-length", "8")], "", false)
            .await
            .unwrap();
        assert_eq!(lengths(&sent), Vec::<&str>::new(), "{sent}");
        for status in [204, 103, 100] {
            for head_only in [false, true] {
                let sent = written(
                    status,
                    &[("content-length", "7"), ("content-length", "0")],
                    "",
                    head_only,
                )
                .await
                .unwrap();
                assert_eq!(lengths(&sent), Vec::<&str>::new(), "{status}: {sent}");
                assert!(!sent.contains("transfer-encoding"), "{sent}");
            }
        }
        // No header: the body's own length, once.
        let sent = written(200, &[], "hello", false).await.unwrap();
        assert_eq!(lengths(&sent), ["5"], "{sent}");
        let sent = written(200, &[("content-length", "5"), ("content-length", "6")], "hello", false).await;
        assert_eq!(sent.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_reads_on() {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut rewound = Rewind::new(server, Bytes::from_static(b"hello"));
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
