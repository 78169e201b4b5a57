//! What a WebSocket spends, for the usage store (`crate::usage`), once the upstream accepted it
//! (answered 101).
//!
//! - Live TTS sockets (run by `synthesis`): the characters of `text` in each client message of
//!   a synthesis, counted when the upstream reports the synthesis `complete`. A synthesis that
//!   would start with the app's budget spent is answered with an error frame
//!   `{"status":"error","code":"BUDGET_EXCEEDED",...}` and not sent; the socket stays open.
//! - Realtime STT sockets (`meter::STT_LIVE_PATHS`): the payload bytes of the client's binary
//!   messages ÷ (sample_rate × bytes per sample) from the handshake's query, counted when the
//!   socket closes; with no usable encoding in the query, the seconds the socket was open,
//!   labelled `connection_seconds`. [`CountingIo`] counts the bytes as the client sends them:
//!   it reads frame headers only (payloads, the audio, are skipped by length, never read).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::meter::{query_byte_rate, spawn_add, tts_characters};
use crate::usage::{Add, Meter, Usage};

/// The meter of one socket.
#[derive(Debug, Clone)]
pub enum SocketMeter {
    LiveTts(TtsMeter),
    Stt {
        usage: Arc<Usage>,
        app: String,
        /// Audio bytes per second, from the query.
        byte_rate: Option<f64>,
    },
}

impl SocketMeter {
    /// The meter for a socket on `path` (none for paths that are not metered).
    pub fn for_socket(usage: &Arc<Usage>, app: &str, path: &str, query: Option<&str>) -> Option<SocketMeter> {
        match super::meter::meter_for(path)? {
            Meter::TtsCharacters => Some(SocketMeter::LiveTts(TtsMeter {
                usage: usage.clone(),
                app: app.to_string(),
            })),
            Meter::SttSeconds => Some(SocketMeter::Stt {
                usage: usage.clone(),
                app: app.to_string(),
                byte_rate: query_byte_rate(query),
            }),
            Meter::LlmTokens => None,
        }
    }
}

/// Characters on a live-TTS socket.
#[derive(Debug, Clone)]
pub struct TtsMeter {
    usage: Arc<Usage>,
    app: String,
}

impl TtsMeter {
    /// Characters of `text` in a client message.
    pub fn characters(message: &[u8]) -> u64 {
        tts_characters(message)
    }

    /// The error frame's JSON when the app's budget is spent, else `None`.
    pub async fn refusal(&self, request_id: &str) -> Option<serde_json::Value> {
        let spent = self.usage.check(&self.app, Meter::TtsCharacters).await.err()?;
        let retry_after = spent.retry_after.as_secs().max(1);
        let error = crate::error::ProxyError::from(spent);
        let mut body = error.to_json(request_id);
        body["status"] = serde_json::json!("error");
        body["retry_after"] = serde_json::json!(retry_after);
        Some(body)
    }

    /// A synthesis completed: count its characters.
    pub fn complete(&self, characters: u64) {
        if characters > 0 {
            spawn_add(self.usage.clone(), self.app.clone(), Add::Tts(characters));
        }
    }
}

/// Count a realtime STT socket once it closed: `binary_bytes` the client sent, open for
/// `open_for`.
pub fn stt_closed(meter: &SocketMeter, binary_bytes: u64, open_for: std::time::Duration) {
    let SocketMeter::Stt { usage, app, byte_rate } = meter else {
        return;
    };
    let add = match byte_rate {
        Some(rate) => Add::Stt {
            seconds: binary_bytes as f64 / rate,
            how: "pcm_bytes",
        },
        None => Add::Stt {
            seconds: open_for.as_secs_f64(),
            how: "connection_seconds",
        },
    };
    spawn_add(usage.clone(), app.clone(), add);
}

/// Payload bytes of binary messages in a stream of WebSocket frames, headers parsed and
/// payloads skipped by length.
#[derive(Debug, Default)]
pub struct BinaryCounter {
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
    /// The frame being skipped is part of a binary message.
    counting: bool,
    /// The data message in progress (continuations inherit it) is binary.
    message_binary: bool,
    pub bytes: u64,
}

impl BinaryCounter {
    fn header_size(&self) -> usize {
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + extended + if self.header[1] & 0x80 != 0 { 4 } else { 0 }
    }

    fn payload_size(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        let mut pos = 0;
        while pos < data.len() {
            if self.payload_left > 0 {
                let take = (data.len() - pos).min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                pos += take;
                self.payload_left -= take as u64;
                if self.counting {
                    self.bytes += take as u64;
                }
                continue;
            }
            self.header[self.header_len] = data[pos];
            self.header_len += 1;
            pos += 1;
            if self.header_len >= 2 && self.header_len == self.header_size() {
                let opcode = self.header[0] & 0x0f;
                match opcode {
                    0x1 => self.message_binary = false,
                    0x2 => self.message_binary = true,
                    _ => {}
                }
                // Control frames (0x8 and up) interleave without ending the message.
                self.counting = opcode < 0x8 && self.message_binary;
                self.payload_left = self.payload_size();
                self.header_len = 0;
            }
        }
    }
}

/// The client side of a realtime STT tunnel, counting binary payload bytes as they are read.
pub struct CountingIo<T> {
    inner: T,
    counter: BinaryCounter,
    total: Arc<AtomicU64>,
}

impl<T> CountingIo<T> {
    pub fn new(inner: T, total: Arc<AtomicU64>) -> CountingIo<T> {
        CountingIo {
            inner,
            counter: BinaryCounter::default(),
            total,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let was = this.counter.bytes;
            this.counter.feed(&buf.filled()[before..]);
            this.total.fetch_add(this.counter.bytes - was, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, fin: bool, payload_len: usize) -> Vec<u8> {
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload_len {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0xaa, payload_len));
        f
    }

    #[test]
    fn binary_payload_is_counted_across_fragments_and_splits_and_text_is_not() {
        let mut stream = frame(0x2, true, 3200);
        stream.extend(frame(0x1, true, 40)); // text: not audio
        stream.extend(frame(0x2, false, 100)); // a fragmented binary message
        stream.extend(frame(0x9, true, 4)); // a ping in between
        stream.extend(frame(0x0, true, 70_000));
        stream.extend(frame(0x8, true, 2));
        for chunk in [1, 7, 1000, stream.len()] {
            let mut c = BinaryCounter::default();
            stream.chunks(chunk).for_each(|part| c.feed(part));
            assert_eq!(c.bytes, 3200 + 100 + 70_000, "chunks of {chunk}");
        }
    }
}
