//! The WebSocket tunnel's byte pump, and how a drain closes it.
//!
//! The tunnel copies bytes, not messages: payloads (audio) are never read or unmasked. To close
//! a tunnel cleanly at the drain deadline the proxy must still inject a Close frame, and a frame
//! written into the middle of another frame's payload would corrupt the stream. So each
//! direction runs a [`FrameTracker`] that parses only frame *headers* (2 to 14 bytes) and skips
//! each payload by its declared length: it always knows whether the byte stream is at a frame
//! boundary. At the deadline each direction forwards up to the next boundary and stops; then
//! the client gets `Close(1001 Going Away)` (unmasked, as a server sends it) and the upstream a
//! masked `Close(1001)` (as a client must send it, RFC 6455 §5.3). The proxy then reads, for a
//! bounded time, until each side answers with its own Close or hangs up, so the connection ends
//! with a FIN rather than a reset that could destroy the Close before the client reads it.
//!
//! Tunnels are spawned on one [`Tunnels`] tracker per run, which the shutdown path waits on.

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Per direction: bytes read from one side before they are written to the other.
const PUMP_BUFFER: usize = 16 * 1024;
/// After the drain deadline, how long a direction may take to reach a frame boundary (a peer
/// stalled mid-frame) before the tunnel is cut without a Close frame.
pub const BOUNDARY_GRACE: Duration = Duration::from_secs(2);
/// After sending the Close frames, how long to wait for each side's Close reply.
pub const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);
/// WebSocket close code 1001: the endpoint is going away (server shutdown).
pub const GOING_AWAY: u16 = 1001;
/// WebSocket close code 1011: the server hit a condition it could not handle; the client gets
/// it when the upstream drops the connection without a Close of its own.
pub const INTERNAL_ERROR: u16 = 1011;
pub const UPSTREAM_LOST: &str = "upstream connection lost";

/// Every open tunnel of this run, and the signal that the drain deadline has passed.
#[derive(Clone, Debug, Default)]
pub struct Tunnels {
    pub tracker: TaskTracker,
    /// Cancelled at the drain deadline: every tunnel closes with 1001.
    pub close: CancellationToken,
}

/// Where a byte stream of WebSocket frames stands: inside a header, or inside a payload.
#[derive(Debug, Clone, Default)]
pub struct FrameTracker {
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
    /// The opcode of the last complete header (0x8 = Close).
    last_opcode: u8,
    closes_seen: u32,
}

const OPCODE_CLOSE: u8 = 0x8;

impl FrameTracker {
    /// Between frames: a Close frame can be written here.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    /// Close frames whose header has passed.
    pub fn closes_seen(&self) -> u32 {
        self.closes_seen
    }

    /// Bytes a header needs in total, once its first two bytes are known.
    fn header_size(&self) -> usize {
        let len7 = self.header[1] & 0x7f;
        let extended = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn payload_size(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(bytes)
            }
            n => u64::from(n),
        }
    }

    /// Account for `data`. With `stop_at_boundary`, stop at the first frame boundary reached
    /// (after at least one byte, or at once when already at one). Returns how many bytes of
    /// `data` were consumed: forward exactly those.
    pub fn advance(&mut self, data: &[u8], stop_at_boundary: bool) -> usize {
        let mut pos = 0;
        if stop_at_boundary && self.at_boundary() {
            return 0;
        }
        while pos < data.len() {
            if self.payload_left > 0 {
                let take = (data.len() - pos).min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                pos += take;
                self.payload_left -= take as u64;
            } else {
                self.header[self.header_len] = data[pos];
                self.header_len += 1;
                pos += 1;
                if self.header_len >= 2 && self.header_len == self.header_size() {
                    self.last_opcode = self.header[0] & 0x0f;
                    if self.last_opcode == OPCODE_CLOSE {
                        self.closes_seen += 1;
                    }
                    self.payload_left = self.payload_size();
                    self.header_len = 0;
                }
            }
            if stop_at_boundary && self.at_boundary() {
                break;
            }
        }
        pos
    }
}

/// A Close frame with `code`: masked (client to server) with `mask`, or not (server to client).
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    // Control frame payloads are at most 125 bytes.
    payload.extend(reason.as_bytes().iter().take(123));
    let mut frame = vec![0x80 | OPCODE_CLOSE];
    match mask {
        Some(mask) => {
            frame.push(0x80 | payload.len() as u8);
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => {
            frame.push(payload.len() as u8);
            frame.extend_from_slice(&payload);
        }
    }
    frame
}

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    /// The reading side hung up (normal end of a tunnel); the write side was shut down.
    Eof,
    /// Stopped for the drain, at a frame boundary.
    Boundary,
    /// Stopped for the drain in the middle of a frame (the peer stalled past the grace).
    MidFrame,
}

/// Copy `from` to `to`, tracking frames, until EOF, or after `close` until a frame boundary.
/// With `close_on_eof`, an EOF that comes at a frame boundary with no Close frame before it
/// (the peer dropped the connection) sends `to` a Close(1011) first.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    tracker: &mut FrameTracker,
    close: &CancellationToken,
    close_on_eof: bool,
) -> std::io::Result<PumpEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; PUMP_BUFFER];
    let mut grace_ends: Option<tokio::time::Instant> = None;
    loop {
        let closing = grace_ends.is_some();
        if closing && tracker.at_boundary() {
            return Ok(PumpEnd::Boundary);
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            _ = close.cancelled(), if !closing => {
                grace_ends = Some(tokio::time::Instant::now() + BOUNDARY_GRACE);
                continue;
            }
            _ = sleep_until_opt(grace_ends), if closing => return Ok(PumpEnd::MidFrame),
        };
        if n == 0 {
            if close_on_eof && tracker.closes_seen() == 0 && tracker.at_boundary() {
                let _ = to.write_all(&close_frame(INTERNAL_ERROR, UPSTREAM_LOST, None)).await;
            }
            let _ = to.shutdown().await;
            return Ok(PumpEnd::Eof);
        }
        // The deadline may have passed while this read completed (select! picks either ready
        // branch): these bytes already count as read after it.
        if grace_ends.is_none() && close.is_cancelled() {
            grace_ends = Some(tokio::time::Instant::now() + BOUNDARY_GRACE);
        }
        let forward = tracker.advance(&buf[..n], grace_ends.is_some());
        to.write_all(&buf[..forward]).await?;
        // Anything after the boundary belongs to frames the other side will not get: the tunnel
        // is closing.
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Read (and discard) from `from` until a Close frame arrives or it hangs up, bounded.
async fn await_close_reply<R: AsyncRead + Unpin>(from: &mut R, tracker: &mut FrameTracker) {
    let closes_before = tracker.closes_seen();
    let mut buf = vec![0u8; PUMP_BUFFER];
    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    tracker.advance(&buf[..n], false);
                    if tracker.closes_seen() > closes_before {
                        return;
                    }
                }
            }
        }
    })
    .await;
}

/// Run a tunnel between the client and the upstream until either side ends it, or until the
/// drain deadline (`close`), when both sides are sent Close(1001) at frame boundaries. Returns
/// how it ended, for the log.
pub async fn run<C, U>(client: C, upstream: U, close: CancellationToken) -> std::io::Result<&'static str>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let mut from_client = FrameTracker::default();
    let mut from_upstream = FrameTracker::default();
    let (up, down) = {
        let up = pump(&mut client_read, &mut upstream_write, &mut from_client, &close, false);
        let down = pump(&mut upstream_read, &mut client_write, &mut from_upstream, &close, true);
        tokio::pin!(up, down);
        let (mut up_end, mut down_end) = (None, None);
        loop {
            // An error either way (a peer reset) ends both directions at once: the other side
            // must not be left open, holding the WebSocket slot until it notices.
            tokio::select! {
                end = &mut up, if up_end.is_none() => up_end = Some(end?),
                end = &mut down, if down_end.is_none() => match end? {
                    // The upstream hung up: nothing the client sends can be delivered any more
                    // (and the server is the side that closes the TCP connection, RFC 6455
                    // §7.1.1), so the tunnel is over even if the client keeps its socket open.
                    PumpEnd::Eof => return Ok("closed by the upstream"),
                    end => down_end = Some(end),
                },
            }
            if let (Some(up), Some(down)) = (up_end, down_end) {
                break (up, down);
            }
        }
    };
    if up == PumpEnd::MidFrame || down == PumpEnd::MidFrame {
        // A Close frame now would land inside a frame: cut the connections instead.
        return Ok("cut at the drain deadline (a peer stalled mid-frame)");
    }
    // Both directions stand at frame boundaries (or that side has already hung up).
    let reason = "proxy shutting down";
    if down == PumpEnd::Boundary {
        client_write.write_all(&close_frame(GOING_AWAY, reason, None)).await?;
        client_write.flush().await?;
    }
    if up == PumpEnd::Boundary {
        let mask: [u8; 4] = rand::random();
        upstream_write
            .write_all(&close_frame(GOING_AWAY, reason, Some(mask)))
            .await?;
        upstream_write.flush().await?;
    }
    tokio::join!(
        await_close_reply(&mut client_read, &mut from_client),
        await_close_reply(&mut upstream_read, &mut from_upstream),
    );
    let _ = client_write.shutdown().await;
    let _ = upstream_write.shutdown().await;
    Ok("closed with 1001 at the drain deadline")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload_len: usize, masked: bool) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            0..=125 => out.push(mask_bit | payload_len as u8),
            126..=65535 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(0xAB, payload_len));
        out
    }

    #[test]
    fn tracks_boundaries_across_all_length_forms_split_anywhere() {
        let mut stream = Vec::new();
        let mut boundaries = vec![0];
        for (opcode, len, masked) in [
            (1, 5, false),
            (2, 300, true),
            (2, 70_000, false),
            (9, 0, true),
            (8, 2, false),
        ] {
            stream.extend(frame(opcode, len, masked));
            boundaries.push(stream.len());
        }
        // Fed in every chunk size from 1 byte up, the tracker is at a boundary exactly at the
        // frame ends.
        for chunk in [1, 2, 3, 7, 13, 1000, stream.len()] {
            let mut tracker = FrameTracker::default();
            let mut pos = 0;
            for piece in stream.chunks(chunk) {
                assert_eq!(tracker.advance(piece, false), piece.len());
                pos += piece.len();
                if boundaries.contains(&pos) {
                    assert!(tracker.at_boundary(), "chunk {chunk}: not at a boundary at {pos}");
                }
            }
            assert!(tracker.at_boundary());
            assert_eq!(tracker.closes_seen(), 1);
        }
    }

    #[test]
    fn stops_exactly_at_the_next_boundary_when_asked() {
        let first = frame(2, 1000, true);
        let mut stream = first.clone();
        stream.extend(frame(1, 10, true));
        let mut tracker = FrameTracker::default();
        // Mid-frame: 100 bytes in.
        assert_eq!(tracker.advance(&stream[..100], false), 100);
        assert!(!tracker.at_boundary());
        // Asked to stop: consumes up to the end of the first frame only.
        assert_eq!(tracker.advance(&stream[100..], true), first.len() - 100);
        assert!(tracker.at_boundary());
        // Already at a boundary: consumes nothing.
        assert_eq!(tracker.advance(&stream[first.len()..], true), 0);
    }

    #[test]
    fn close_frames_carry_1001_masked_or_not() {
        let plain = close_frame(GOING_AWAY, "bye", None);
        assert_eq!(plain, [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']);
        let mask = [0x11, 0x22, 0x33, 0x44];
        let masked = close_frame(GOING_AWAY, "", Some(mask));
        assert_eq!(masked, [0x88, 0x82, 0x11, 0x22, 0x33, 0x44, 0x03 ^ 0x11, 0xE9 ^ 0x22]);
        let mut tracker = FrameTracker::default();
        tracker.advance(&masked, false);
        assert!(tracker.at_boundary());
        assert_eq!(tracker.closes_seen(), 1);
    }

    /// Read one close frame from `from`: (masked, code).
    async fn read_close<R: AsyncRead + Unpin>(from: &mut R) -> (bool, u16) {
        let mut head = [0u8; 2];
        from.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x88, "not a final Close frame");
        let masked = head[1] & 0x80 != 0;
        let mut mask = [0u8; 4];
        if masked {
            from.read_exact(&mut mask).await.unwrap();
        }
        let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
        from.read_exact(&mut payload).await.unwrap();
        if masked {
            payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= mask[i % 4]);
        }
        (masked, u16::from_be_bytes([payload[0], payload[1]]))
    }

    #[tokio::test]
    async fn at_the_deadline_a_frame_in_progress_is_finished_then_both_sides_get_1001() {
        let (client_side, mut client) = tokio::io::duplex(256 * 1024);
        let (upstream_side, mut upstream) = tokio::io::duplex(256 * 1024);
        let close = CancellationToken::new();
        let tunnel = tokio::spawn(run(client_side, upstream_side, close.clone()));
        let first = frame(2, 1000, true);
        let second = frame(1, 10, true);
        client.write_all(&first[..100]).await.unwrap();
        let mut got = vec![0u8; 100];
        upstream.read_exact(&mut got).await.unwrap();
        // The deadline passes mid-frame; the client goes on sending.
        close.cancel();
        let mut rest = first[100..].to_vec();
        rest.extend_from_slice(&second);
        client.write_all(&rest).await.unwrap();
        // The upstream gets the rest of the frame in progress, then a masked Close(1001), and
        // never the frame after the boundary.
        let mut got = vec![0u8; first.len() - 100];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, first[100..]);
        assert_eq!(read_close(&mut upstream).await, (true, GOING_AWAY));
        // The client gets an unmasked Close(1001).
        assert_eq!(read_close(&mut client).await, (false, GOING_AWAY));
        drop((client, upstream));
        assert_eq!(tunnel.await.unwrap().unwrap(), "closed with 1001 at the drain deadline");
    }

    #[tokio::test]
    async fn the_upstream_hanging_up_ends_the_tunnel_while_the_client_stays_connected() {
        let (client_side, mut client) = tokio::io::duplex(1024);
        let (upstream_side, upstream) = tokio::io::duplex(1024);
        let tunnel = tokio::spawn(run(client_side, upstream_side, CancellationToken::new()));
        drop(upstream);
        assert_eq!(tunnel.await.unwrap().unwrap(), "closed by the upstream");
        // The client gets a Close(1011) saying why, then the end of the stream.
        assert_eq!(read_close(&mut client).await, (false, INTERNAL_ERROR));
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }
}
