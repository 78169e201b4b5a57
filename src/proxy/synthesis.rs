//! Live-TTS WebSocket tunnels that count each synthesis as an in-flight request of the class.
//!
//! Smallest counts one synthesis in flight per account across sync, SSE and WebSocket, so a
//! socket cannot simply hold a `max_websockets` slot: each synthesis on it must take the
//! class's request slot too. This tunnel reads whole frames (the byte tunnel in `tunnel.rs`
//! only skips over them). A client text frame carrying a non-empty `text`, when the socket
//! holds no slot, starts a synthesis: it and every data frame after it are held, in order,
//! until the class admits it (FIFO with the HTTP requests of the class); pings and pongs pass
//! meanwhile. The slot is held until the upstream's text frame whose JSON `status` is
//! `complete` or `error`, or until the socket closes. If `queue_timeout` passes first, the
//! held frames are dropped and the client gets one text frame
//! `{"status":"error","code":"RATE_LIMIT_EXCEEDED","retry_after":N,"request_id":...}`; the
//! socket stays open. An upstream `error` frame that says the account is over its limit is the
//! WebSocket form of a 429: with `max_concurrent = "auto"` it lowers the limit, and the
//! synthesis (its frames are kept, up to 64 KiB) is sent again once re-admitted, so the client
//! never sees it.
//!
//! Frames are forwarded as they came (the client's still masked). The handshake is sent
//! without `permessage-deflate` (see `strip_deflate`), so every frame can be read as it is.
//! The frame header parser is the same few lines as `tunnel::FrameTracker`'s: a crate's codec
//! (tungstenite) would re-frame and re-mask every message and own the socket, where this needs
//! only to find frame ends and read the small text frames' JSON.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::tunnel::{close_frame, CLOSE_REPLY_WAIT, GOING_AWAY, INTERNAL_ERROR, UPSTREAM_LOST};
use super::ws_meter::TtsMeter;
use crate::limits::{self, auto::Throttle, Class, Kind, Permit, Shed};

/// A frame longer than this ends the tunnel with 1009 (a TTS socket carries JSON and audio
/// chunks far smaller).
pub const MAX_FRAME: u64 = 16 << 20;
/// Client bytes held while a synthesis waits; past this the client is not read (TCP pushes
/// back) until the synthesis is admitted or refused. Nothing is dropped.
pub const MAX_HELD: usize = 1 << 20;
/// A synthesis whose frames fit in this is kept for a resend after an over-limit error frame.
pub const MAX_REPLAY: usize = 64 << 10;
/// Resends after error frames answering probes (each lowers the limit, so few can happen).
const MAX_PROBE_RESENDS: u32 = 8;
const READ_CHUNK: usize = 16 * 1024;
/// Close code: a message too big to process.
pub const MESSAGE_TOO_BIG: u16 = 1009;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Remove `permessage-deflate` from a client's `Sec-WebSocket-Extensions` offer, so the
/// upstream sends (and expects) uncompressed frames the tunnel can read. We strip rather than
/// inflate: inflating means a zlib context per direction per socket (32 KiB windows) kept in
/// step with both peers and re-deflating for the client, for payloads that gain little (JSON
/// with base64 audio). Other extensions in the offer are kept.
pub fn strip_deflate(headers: &mut http::HeaderMap) {
    let offers: Vec<String> = headers
        .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|offer| {
            let name = offer.split(';').next().unwrap_or("").trim();
            !name.is_empty() && !name.eq_ignore_ascii_case("permessage-deflate")
        })
        .map(str::to_string)
        .collect();
    headers.remove(http::header::SEC_WEBSOCKET_EXTENSIONS);
    if !offers.is_empty() {
        if let Ok(value) = http::HeaderValue::from_str(&offers.join(", ")) {
            headers.insert(http::header::SEC_WEBSOCKET_EXTENSIONS, value);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Head {
    opcode: u8,
    fin: bool,
    mask: Option<[u8; 4]>,
    payload_start: usize,
    /// Header and payload.
    total: usize,
}

/// The header at the start of `buf`, once all of it is there. `Err` = a frame over [`MAX_FRAME`].
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ()> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (payload_len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(len), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    let mask = if buf[1] & 0x80 != 0 {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(mask)
    } else {
        None
    };
    if payload_len > MAX_FRAME {
        return Err(());
    }
    Ok(Some(Head {
        opcode: buf[0] & 0x0f,
        fin: buf[0] & 0x80 != 0,
        mask,
        payload_start: at,
        total: at + payload_len as usize,
    }))
}

/// One whole frame, as it came.
struct Frame {
    head: Head,
    raw: Bytes,
}

impl Frame {
    /// The payload, unmasked.
    fn payload(&self) -> std::borrow::Cow<'_, [u8]> {
        let payload = &self.raw[self.head.payload_start..];
        match self.head.mask {
            None => std::borrow::Cow::Borrowed(payload),
            Some(mask) => std::borrow::Cow::Owned(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect()),
        }
    }
}

/// Bytes from one side, cut into whole frames.
#[derive(Default)]
struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    /// Read more (cancel-safe: `read_buf` keeps what it read).
    async fn fill<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> std::io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        from.read_buf(&mut self.buf).await
    }

    fn next(&mut self) -> Result<Option<Frame>, ()> {
        match parse_head(&self.buf)? {
            Some(head) if self.buf.len() >= head.total => Ok(Some(Frame {
                head,
                raw: self.buf.split_to(head.total).freeze(),
            })),
            _ => Ok(None),
        }
    }
}

/// Whether a client text message starts a synthesis: JSON with a non-empty string `text`.
pub fn carries_text(payload: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Message<'a> {
        #[serde(borrow, default)]
        text: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Message<'_>>(payload).is_ok_and(|m| m.text.is_some_and(|t| !t.is_empty()))
}

/// What an upstream text frame says about the synthesis in flight.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// Not the end of a synthesis (audio chunks, anything that is not JSON with a status).
    Other,
    Complete,
    /// `status: error`; `over_limit` when it is the account's concurrency limit (a 429).
    Error {
        over_limit: bool,
        retry_after: Option<Duration>,
    },
}

/// Read an upstream text frame's `status` (and, for an error, whether it is a rate limit).
/// Fields other than these (the base64 audio) are skipped without being copied.
pub fn upstream_status(payload: &[u8]) -> Upstream {
    #[derive(Deserialize)]
    struct Status<'a> {
        #[serde(borrow, default)]
        status: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        code: Option<serde_json::Value>,
        #[serde(default)]
        error: Option<serde_json::Value>,
        #[serde(default)]
        message: Option<serde_json::Value>,
        #[serde(default)]
        retry_after: Option<f64>,
    }
    // Most frames are audio chunks: skip the JSON parse (a scan of the whole base64 string)
    // unless some `"status"` in the frame is `"complete"` or `"error"`; the parse then decides
    // from the top-level field.
    let may_end = memchr::memmem::find_iter(payload, b"\"status\"").any(|at| {
        let rest = payload[at + 8..].trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":") else {
            return false;
        };
        let rest = rest.trim_ascii_start();
        rest.starts_with(b"\"complete\"") || rest.starts_with(b"\"error\"")
    });
    if !may_end {
        return Upstream::Other;
    }
    let Ok(status) = serde_json::from_slice::<Status<'_>>(payload) else {
        return Upstream::Other;
    };
    match status.status.as_deref() {
        Some("complete") => Upstream::Complete,
        Some("error") => {
            let says_limit = |v: &Option<serde_json::Value>| {
                v.as_ref().is_some_and(|v| {
                    let text = match v {
                        serde_json::Value::String(s) => s.to_ascii_lowercase(),
                        other => other.to_string(),
                    };
                    text.contains("429")
                        || text.contains("rate_limit")
                        || text.contains("rate limit")
                        || text.contains("too many")
                        || text.contains("concurren")
                })
            };
            Upstream::Error {
                over_limit: says_limit(&status.code) || says_limit(&status.error) || says_limit(&status.message),
                retry_after: status
                    .retry_after
                    .filter(|s| s.is_finite() && *s >= 0.0 && *s < 3600.0)
                    .map(Duration::from_secs_f64),
            }
        }
        _ => Upstream::Other,
    }
}

/// An unmasked (server-to-client) text frame.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | OP_TEXT];
    match payload.len() {
        n @ 0..=125 => frame.push(n as u8),
        n @ 126..=65535 => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

type Admission = Pin<Box<dyn Future<Output = Result<Permit, Shed>> + Send>>;

fn admit(class: &Arc<Class>) -> Admission {
    let class = class.clone();
    Box::pin(async move { class.admit(Kind::Request).await })
}

/// The synthesis state of one socket.
struct Synthesis {
    class: Arc<Class>,
    /// The class's request slot, while a synthesis runs.
    slot: Option<Permit>,
    /// Waiting for the slot.
    admitting: Option<Admission>,
    /// Client frames held while waiting, in order.
    held: VecDeque<Bytes>,
    held_bytes: usize,
    /// The running synthesis's frames, kept for a resend while they fit in [`MAX_REPLAY`].
    sent: Vec<Bytes>,
    sent_bytes: usize,
    replayable: bool,
    resends: u32,
    probe_resends: u32,
    /// A fragmented text message being put together: its frames and payload.
    partial: Option<(Vec<Bytes>, Vec<u8>)>,
    /// Usage per app: the running synthesis's characters, counted at its `complete`.
    meter: Option<TtsMeter>,
    characters: u64,
}

impl Synthesis {
    fn hold(&mut self, frame: Bytes) {
        self.held_bytes += frame.len();
        self.held.push_back(frame);
    }

    fn record(&mut self, frame: &Bytes) {
        if self.slot.is_none() {
            return;
        }
        if self.replayable && self.sent_bytes + frame.len() <= MAX_REPLAY {
            self.sent_bytes += frame.len();
            self.sent.push(frame.clone());
        } else {
            self.replayable = false;
            self.sent.clear();
        }
    }

    fn start(&mut self) {
        self.sent.clear();
        self.sent_bytes = 0;
        self.replayable = true;
        self.resends = 0;
        self.probe_resends = 0;
        self.admitting = Some(admit(&self.class));
    }

    fn end(&mut self) {
        self.characters = 0;
        self.slot = None;
        self.sent.clear();
        self.sent_bytes = 0;
    }
}

/// Run a counting tunnel until either side ends it or the drain deadline (`close`). Returns
/// how it ended, for the log.
pub async fn run<C, U>(
    client: C,
    upstream: U,
    close: CancellationToken,
    class: Arc<Class>,
    request_id: String,
) -> std::io::Result<&'static str>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    run_metered(client, upstream, close, class, request_id, None).await
}

/// [`run`], with each synthesis's characters metered per app (`ws_meter`), and a synthesis
/// refused with an error frame once the app's budget is spent.
pub async fn run_metered<C, U>(
    client: C,
    upstream: U,
    close: CancellationToken,
    class: Arc<Class>,
    request_id: String,
    meter: Option<TtsMeter>,
) -> std::io::Result<&'static str>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let ran = pump(
        &mut client_read,
        &mut client_write,
        &mut upstream_read,
        &mut upstream_write,
        close,
        class,
        &request_id,
        meter,
    )
    .await;
    match ran {
        // Writing to the upstream failed: it is gone, and the client is told so.
        Err(e) if e.get_ref().is_some_and(|inner| inner.is::<UpstreamLost>()) => {
            let _ = client_write
                .write_all(&close_frame(INTERNAL_ERROR, UPSTREAM_LOST, None))
                .await;
            let _ = client_write.shutdown().await;
            Ok("the upstream connection failed")
        }
        other => other,
    }
}

/// A write to the upstream failed.
#[derive(Debug)]
struct UpstreamLost;

impl std::fmt::Display for UpstreamLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(UPSTREAM_LOST)
    }
}

impl std::error::Error for UpstreamLost {}

fn lost(_: std::io::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, UpstreamLost)
}

// The four halves of the two sockets are four of the arguments.
#[allow(clippy::too_many_arguments)]
async fn pump<CR, CW, UR, UW>(
    client_read: &mut CR,
    client_write: &mut CW,
    upstream_read: &mut UR,
    upstream_write: &mut UW,
    close: CancellationToken,
    class: Arc<Class>,
    request_id: &str,
    meter: Option<TtsMeter>,
) -> std::io::Result<&'static str>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let mut from_client = FrameReader::default();
    let mut from_upstream = FrameReader::default();
    let mut synthesis = Synthesis {
        class,
        slot: None,
        admitting: None,
        held: VecDeque::new(),
        held_bytes: 0,
        sent: Vec::new(),
        sent_bytes: 0,
        replayable: true,
        resends: 0,
        probe_resends: 0,
        partial: None,
        meter,
        characters: 0,
    };
    let mut client_open = true;
    let mut upstream_closed = false;
    loop {
        let admitting = synthesis.admitting.is_some();
        let read_client = client_open && synthesis.held_bytes < MAX_HELD;
        tokio::select! {
            _ = close.cancelled() => {
                return drain(client_read, client_write, upstream_read, upstream_write).await;
            }
            admitted = async { match synthesis.admitting.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if admitting => {
                synthesis.admitting = None;
                match admitted {
                    Ok(permit) => {
                        synthesis.slot = Some(permit);
                        while let Some(frame) = synthesis.held.pop_front() {
                            synthesis.held_bytes -= frame.len();
                            upstream_write.write_all(&frame).await.map_err(lost)?;
                            synthesis.record(&frame);
                        }
                    }
                    Err(shed) => {
                        synthesis.held.clear();
                        synthesis.held_bytes = 0;
                        synthesis.end();
                        let refusal = serde_json::json!({
                            "status": "error",
                            "code": "RATE_LIMIT_EXCEEDED",
                            "error": shed.message(),
                            "retry_after": shed.retry_after.as_secs().max(1),
                            "request_id": request_id,
                        });
                        client_write.write_all(&text_frame(refusal.to_string().as_bytes())).await?;
                    }
                }
            }
            read = from_upstream.fill(upstream_read) => {
                if read? == 0 {
                    // The upstream is gone: the client gets a Close saying so (whole frames
                    // only are ever written, so this lands on a frame boundary).
                    if !upstream_closed && client_open {
                        let _ = client_write
                            .write_all(&close_frame(INTERNAL_ERROR, UPSTREAM_LOST, None))
                            .await;
                    }
                    let _ = client_write.shutdown().await;
                    return Ok("closed by the upstream");
                }
                loop {
                    let frame = match from_upstream.next() {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(()) => return too_big(client_write, upstream_write).await,
                    };
                    match frame.head.opcode {
                        OP_TEXT if frame.head.fin => match upstream_status(&frame.payload()) {
                            Upstream::Other => client_write.write_all(&frame.raw).await?,
                            Upstream::Complete => {
                                client_write.write_all(&frame.raw).await?;
                                if let Some(meter) = &synthesis.meter {
                                    meter.complete(synthesis.characters);
                                }
                                synthesis.end();
                            }
                            Upstream::Error { over_limit, retry_after } => {
                                if over_limit && resend(&mut synthesis, retry_after) {
                                    tracing::debug!(request_id, "over-limit error frame; synthesis resent");
                                } else {
                                    client_write.write_all(&frame.raw).await?;
                                    synthesis.end();
                                }
                            }
                        },
                        OP_CLOSE => {
                            upstream_closed = true;
                            synthesis.admitting = None;
                            synthesis.held.clear();
                            synthesis.held_bytes = 0;
                            synthesis.end();
                            client_write.write_all(&frame.raw).await?;
                        }
                        _ => client_write.write_all(&frame.raw).await?,
                    }
                }
                client_write.flush().await?;
            }
            read = from_client.fill(client_read), if read_client => {
                if read? == 0 {
                    // The client is gone: a synthesis still waiting is abandoned.
                    client_open = false;
                    synthesis.admitting = None;
                    synthesis.held.clear();
                    synthesis.held_bytes = 0;
                    let _ = upstream_write.shutdown().await;
                    continue;
                }
                loop {
                    let frame = match from_client.next() {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(()) => return too_big(client_write, upstream_write).await,
                    };
                    let budget = starts_synthesis(&frame, &synthesis).then(|| synthesis.meter.clone()).flatten();
                    let refused = match budget {
                        Some(meter) => meter.refusal(request_id).await,
                        None => None,
                    };
                    if let Some(refusal) = refused {
                        client_write.write_all(&text_frame(refusal.to_string().as_bytes())).await?;
                        client_write.flush().await?;
                        continue;
                    }
                    from_client_frame(frame, &mut synthesis, upstream_write).await?;
                }
                upstream_write.flush().await.map_err(lost)?;
            }
        }
    }
}

/// One client frame: pass, hold, or start a synthesis with it.
async fn from_client_frame<W: AsyncWrite + Unpin>(
    frame: Frame,
    synthesis: &mut Synthesis,
    upstream: &mut W,
) -> std::io::Result<()> {
    let message = match frame.head.opcode {
        OP_PING | OP_PONG => return upstream.write_all(&frame.raw).await.map_err(lost),
        OP_CLOSE => {
            // The client is leaving: a synthesis still waiting is abandoned.
            synthesis.admitting = None;
            synthesis.held.clear();
            synthesis.held_bytes = 0;
            return upstream.write_all(&frame.raw).await.map_err(lost);
        }
        OP_TEXT if !frame.head.fin => {
            let payload = frame.payload().into_owned();
            synthesis.partial = Some((vec![frame.raw], payload));
            return Ok(());
        }
        OP_CONTINUATION if synthesis.partial.is_some() => {
            let payload = frame.payload();
            if let Some((frames, text)) = synthesis.partial.as_mut() {
                if text.len() + payload.len() <= MAX_REPLAY {
                    text.extend_from_slice(&payload);
                }
                frames.push(frame.raw.clone());
            }
            if !frame.head.fin {
                return Ok(());
            }
            synthesis.partial.take()
        }
        OP_TEXT => {
            let payload = frame.payload().into_owned();
            Some((vec![frame.raw], payload))
        }
        _ => Some((vec![frame.raw], Vec::new())),
    };
    let Some((frames, text)) = message else {
        return Ok(());
    };
    if synthesis.meter.is_some() {
        synthesis.characters += TtsMeter::characters(&text);
    }
    if synthesis.admitting.is_some() {
        frames.into_iter().for_each(|f| synthesis.hold(f));
    } else if synthesis.slot.is_none() && carries_text(&text) {
        frames.into_iter().for_each(|f| synthesis.hold(f));
        synthesis.start();
    } else {
        for frame in frames {
            upstream.write_all(&frame).await.map_err(lost)?;
            synthesis.record(&frame);
        }
    }
    Ok(())
}

/// Whether a whole text frame would start a synthesis on a metered socket: with the app's
/// budget spent, it is answered with an error frame instead of being sent (the socket stays
/// open).
fn starts_synthesis(frame: &Frame, synthesis: &Synthesis) -> bool {
    synthesis.meter.is_some()
        && frame.head.opcode == OP_TEXT
        && frame.head.fin
        && synthesis.slot.is_none()
        && synthesis.admitting.is_none()
        && carries_text(&frame.payload())
}

/// An over-limit error frame answered the running synthesis: lower the learned limit, and
/// send the synthesis again once re-admitted. False when it cannot be resent (too big, no
/// slot, or out of resends): the client then gets the error.
fn resend(synthesis: &mut Synthesis, retry_after: Option<Duration>) -> bool {
    let Some(mut permit) = synthesis.slot.take() else {
        return false;
    };
    let class = synthesis.class.clone();
    let learned = class.throttled(&mut permit);
    if learned != Some(Throttle::Probe) {
        class.pause(429, retry_after.unwrap_or(limits::DEFAULT_UPSTREAM_PAUSE));
    }
    let allowed = match learned {
        Some(Throttle::Probe) => synthesis.probe_resends < MAX_PROBE_RESENDS,
        _ => synthesis.resends < class.limits.upstream_retries,
    };
    drop(permit);
    if !synthesis.replayable || synthesis.sent.is_empty() || !allowed {
        synthesis.end();
        return false;
    }
    match learned {
        Some(Throttle::Probe) => synthesis.probe_resends += 1,
        _ => synthesis.resends += 1,
    }
    class.count_resend();
    // The synthesis's frames go first, before anything the client sent after them.
    let sent = std::mem::take(&mut synthesis.sent);
    synthesis.sent_bytes = 0;
    for frame in sent.into_iter().rev() {
        synthesis.held_bytes += frame.len();
        synthesis.held.push_front(frame);
    }
    synthesis.admitting = Some(admit(&class));
    true
}

async fn too_big<C: AsyncWrite + Unpin, U: AsyncWrite + Unpin>(
    client: &mut C,
    upstream: &mut U,
) -> std::io::Result<&'static str> {
    let reason = "frame too big for the proxy";
    let _ = client.write_all(&close_frame(MESSAGE_TOO_BIG, reason, None)).await;
    let _ = upstream
        .write_all(&close_frame(MESSAGE_TOO_BIG, reason, Some(rand::random())))
        .await;
    let _ = client.shutdown().await;
    let _ = upstream.shutdown().await;
    Ok("closed with 1009 (a frame over the proxy's limit)")
}

/// The drain deadline: both sides get Close(1001) (whole frames only are ever written, so
/// each side is at a frame boundary), then a bounded wait for their replies.
async fn drain<CR, CW, UR, UW>(
    client_read: &mut CR,
    client_write: &mut CW,
    upstream_read: &mut UR,
    upstream_write: &mut UW,
) -> std::io::Result<&'static str>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let reason = "proxy shutting down";
    client_write.write_all(&close_frame(GOING_AWAY, reason, None)).await?;
    client_write.flush().await?;
    upstream_write
        .write_all(&close_frame(GOING_AWAY, reason, Some(rand::random())))
        .await?;
    upstream_write.flush().await?;
    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
        tokio::join!(await_close(client_read), await_close(upstream_read))
    })
    .await;
    let _ = client_write.shutdown().await;
    let _ = upstream_write.shutdown().await;
    Ok("closed with 1001 at the drain deadline")
}

/// Read (and discard) until a Close frame or the end of the stream.
async fn await_close<R: AsyncRead + Unpin>(from: &mut R) {
    let mut reader = FrameReader::default();
    loop {
        match reader.fill(from).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while let Ok(Some(frame)) = reader.next() {
            if frame.head.opcode == OP_CLOSE {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limiter;
    use crate::metrics::Metrics;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};
    use tokio_tungstenite::WebSocketStream;

    type Ws = WebSocketStream<DuplexStream>;

    fn tts(toml: &str) -> Arc<Class> {
        let config = crate::config::load_text(None, toml, &[]).expect("config");
        let limiter = Limiter::new(&config.limits, &Metrics::new(), None);
        limiter.class_for("/waves/v1/tts/live").clone()
    }

    /// A client and an upstream (real WebSocket endpoints) joined by the counting tunnel.
    async fn tunnel(class: &Arc<Class>) -> (Ws, Ws, tokio::task::JoinHandle<std::io::Result<&'static str>>) {
        let (client_side, client) = tokio::io::duplex(1 << 20);
        let (upstream_side, upstream) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(run(
            client_side,
            upstream_side,
            CancellationToken::new(),
            class.clone(),
            "req-1".into(),
        ));
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let upstream = WebSocketStream::from_raw_socket(upstream, Role::Server, None).await;
        (client, upstream, task)
    }

    async fn next_text(ws: &mut Ws) -> serde_json::Value {
        loop {
            match ws.next().await.expect("a message").expect("a frame") {
                Message::Text(text) => return serde_json::from_str(&text).expect("json"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    async fn until_queued(class: &Class, n: usize) {
        while class.queue_depth() != n {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn the_deflate_offer_is_removed_and_other_extensions_kept() {
        let mut headers = http::HeaderMap::new();
        headers.append(
            http::header::SEC_WEBSOCKET_EXTENSIONS,
            "permessage-deflate; client_max_window_bits, x-other".parse().unwrap(),
        );
        strip_deflate(&mut headers);
        assert_eq!(headers[http::header::SEC_WEBSOCKET_EXTENSIONS], "x-other");
        let mut only = http::HeaderMap::new();
        only.append(
            http::header::SEC_WEBSOCKET_EXTENSIONS,
            "Permessage-Deflate".parse().unwrap(),
        );
        strip_deflate(&mut only);
        assert!(only.is_empty());
    }

    #[test]
    fn synthesis_starts_and_ends_are_read_from_the_json() {
        assert!(carries_text(br#"{"voice_id":"emily","text":"hello"}"#));
        assert!(!carries_text(br#"{"text":""}"#));
        assert!(!carries_text(br#"{"flush":true}"#));
        assert!(!carries_text(b"not json"));
        assert_eq!(
            upstream_status(br#"{"status":"chunk","data":{"audio":"AAAA"}}"#),
            Upstream::Other
        );
        assert_eq!(
            upstream_status(br#"{"data":{},"status":"complete"}"#),
            Upstream::Complete
        );
        assert_eq!(
            upstream_status(br#"{"status":"error","message":"Invalid voice"}"#),
            Upstream::Error {
                over_limit: false,
                retry_after: None
            }
        );
        for limited in [
            r#"{"status":"error","code":"RATE_LIMIT_EXCEEDED","retry_after":2}"#,
            r#"{"status":"error","code":429}"#,
            r#"{"status":"error","error":"Too many concurrent requests"}"#,
        ] {
            match upstream_status(limited.as_bytes()) {
                Upstream::Error { over_limit: true, .. } => {}
                other => panic!("{limited}: {other:?}"),
            }
        }
        assert_eq!(
            upstream_status(br#"{"status":"error","code":"RATE_LIMIT_EXCEEDED","retry_after":2}"#),
            Upstream::Error {
                over_limit: true,
                retry_after: Some(Duration::from_secs(2))
            }
        );
    }

    #[tokio::test]
    async fn a_synthesis_waits_for_the_slot_with_its_frames_held_and_pings_passing() {
        let class = tts("[[limits.class]]\nname = \"tts\"\nmax_concurrent = 1\n");
        let (mut client, mut upstream, _task) = tunnel(&class).await;
        // An HTTP request of the class holds the one slot.
        let http = class.admit(Kind::Request).await.expect("slot");
        client.send(Message::Text(r#"{"text":"one"}"#.into())).await.unwrap();
        client.send(Message::Text(r#"{"flush":true}"#.into())).await.unwrap();
        until_queued(&class, 1).await;
        client.send(Message::Ping(b"p".to_vec())).await.unwrap();
        assert_eq!(
            upstream.next().await.unwrap().unwrap(),
            Message::Ping(b"p".to_vec()),
            "the ping passes; the held text does not"
        );
        drop(http);
        assert_eq!(next_text(&mut upstream).await["text"], "one");
        assert_eq!(
            next_text(&mut upstream).await["flush"],
            true,
            "held frames keep their order"
        );
        assert_eq!(class.status()["in_flight"], 1, "the synthesis holds the slot");
        // Audio chunks do not end it; `complete` does.
        upstream
            .send(Message::Text(r#"{"status":"chunk","data":{"audio":"AAAA"}}"#.into()))
            .await
            .unwrap();
        assert_eq!(next_text(&mut client).await["status"], "chunk");
        assert_eq!(class.status()["in_flight"], 1);
        upstream
            .send(Message::Text(r#"{"status":"complete"}"#.into()))
            .await
            .unwrap();
        assert_eq!(next_text(&mut client).await["status"], "complete");
        let again = tokio::time::timeout(Duration::from_secs(10), class.admit(Kind::Request)).await;
        assert!(again.expect("the slot came back").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_synthesis_past_queue_timeout_is_refused_with_a_frame_and_the_socket_stays_open() {
        let class = tts("[[limits.class]]\nname = \"tts\"\nmax_concurrent = 1\nqueue_timeout = \"2s\"\n");
        let (mut client, mut upstream, _task) = tunnel(&class).await;
        let http = class.admit(Kind::Request).await.expect("slot");
        client.send(Message::Text(r#"{"text":"late"}"#.into())).await.unwrap();
        let refusal = next_text(&mut client).await;
        assert_eq!(refusal["status"], "error");
        assert_eq!(refusal["code"], "RATE_LIMIT_EXCEEDED");
        assert_eq!(refusal["request_id"], "req-1");
        assert!(refusal["retry_after"].as_u64().is_some_and(|s| s >= 1), "{refusal}");
        drop(http);
        client.send(Message::Text(r#"{"text":"next"}"#.into())).await.unwrap();
        assert_eq!(
            next_text(&mut upstream).await["text"],
            "next",
            "the refused synthesis's frames were dropped, the socket kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_over_limit_error_frame_is_not_shown_and_the_synthesis_is_resent() {
        let class = tts("");
        assert!(class.learns());
        let (mut client, mut upstream, _task) = tunnel(&class).await;
        client.send(Message::Text(r#"{"text":"hello"}"#.into())).await.unwrap();
        assert_eq!(next_text(&mut upstream).await["text"], "hello");
        // Another app on the account holds its only slot.
        upstream
            .send(Message::Text(
                r#"{"status":"error","code":"RATE_LIMIT_EXCEEDED","retry_after":1}"#.into(),
            ))
            .await
            .unwrap();
        assert_eq!(
            next_text(&mut upstream).await["text"],
            "hello",
            "sent again after the pause"
        );
        upstream
            .send(Message::Text(r#"{"status":"complete"}"#.into()))
            .await
            .unwrap();
        assert_eq!(
            next_text(&mut client).await["status"],
            "complete",
            "the error never reached the client"
        );
    }

    #[tokio::test]
    async fn the_upstream_dropping_the_connection_closes_the_client_with_1011() {
        let class = tts("");
        let (mut client, upstream, task) = tunnel(&class).await;
        client.send(Message::Text(r#"{"text":"hello"}"#.into())).await.unwrap();
        drop(upstream);
        match client.next().await.expect("a frame").expect("a close") {
            Message::Close(Some(frame)) => {
                assert_eq!(frame.code, CloseCode::from(INTERNAL_ERROR));
                assert_eq!(frame.reason, UPSTREAM_LOST);
            }
            other => panic!("expected Close(1011), got {other:?}"),
        }
        // Seen as the end of its stream, or as a failed write of the held text: either way the
        // client got its 1011.
        let how = task.await.unwrap().unwrap();
        assert!(
            ["closed by the upstream", "the upstream connection failed"].contains(&how),
            "{how}"
        );
        assert_eq!(class.status()["in_flight"], 0, "the slot went with the socket");
    }
}
