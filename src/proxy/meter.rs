//! What a request spends, measured on the request path and reported to the usage store
//! (`crate::usage`) once the upstream accepted the work (a 2xx answer).
//!
//! - TTS (the `tts` paths of the `smallest` profile): the Unicode scalar values of `text` in
//!   the JSON body.
//! - STT sent as the body: seconds from the WAV header (the first bytes of the body are kept
//!   to read it), else bytes ÷ the bitrate the query names (`bitrate` in bits per second, or
//!   `sample_rate` with `encoding` linear16/mulaw/alaw and `channels`), else counted as
//!   unmetered.
//! - LLM (`…/chat/completions`, `…/completions`): `usage.prompt_tokens` and
//!   `usage.completion_tokens` of the JSON response, or of the last SSE `data:` event carrying
//!   a `usage` when streamed.
//!
//! Only numbers leave this file: the text, audio and prompts are read in place and dropped.

use std::sync::{Arc, Mutex};

use crate::config::SMALLEST_TTS_PATHS;
use crate::limits::path_matches;
use crate::usage::{Add, Meter, Usage};

/// Pre-recorded and realtime speech-to-text paths.
pub const STT_PATHS: &[&str] = &["/waves/v1/stt", "/waves/v1/*/get_text"];
/// Realtime STT WebSockets.
pub const STT_LIVE_PATHS: &[&str] = &["/waves/v1/stt/live", "/waves/v1/pulse/get_text"];
/// The first body bytes kept to read a WAV header.
const HEAD_BYTES: usize = 4096;
/// A JSON response longer than this is not read for `usage`.
const MAX_JSON_RESPONSE: usize = 1 << 20;
/// A streamed TTS body (past the 64 KiB that are buffered) is kept up to this to count its text.
const MAX_STREAMED_TTS_BODY: usize = 1 << 20;
/// An SSE line longer than this is skipped.
const MAX_SSE_LINE: usize = 1 << 20;

/// Where every speech path (`STT_PATHS`, `SMALLEST_TTS_PATHS`) starts.
const SPEECH_ROOT: &str = "/waves/v1/";

/// What a path's work is counted in.
pub fn meter_for(path: &str) -> Option<Meter> {
    if path.starts_with(SPEECH_ROOT) {
        if STT_PATHS.iter().any(|p| path_matches(p, path)) {
            return Some(Meter::SttSeconds);
        }
        if SMALLEST_TTS_PATHS.iter().any(|p| path_matches(p, path)) {
            return Some(Meter::TtsCharacters);
        }
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.ends_with("/chat/completions") || trimmed.ends_with("/completions") {
        return Some(Meter::LlmTokens);
    }
    None
}

/// Unicode scalar values of `text` in a JSON body (0 when there is none).
pub fn tts_characters(body: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow, default)]
        text: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Body<'_>>(body)
        .ok()
        .and_then(|b| b.text)
        .map_or(0, |t| t.chars().count() as u64)
}

/// Audio bytes per second named by a query: `bitrate` (bits/s), or `sample_rate` ×
/// bytes per sample (`encoding`: linear16 2, mulaw/alaw 1) × `channels` (default 1).
pub fn query_byte_rate(query: Option<&str>) -> Option<f64> {
    let mut bitrate = None;
    let mut sample_rate = None;
    let mut encoding = None;
    let mut channels = 1.0;
    for pair in query.unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "bitrate" | "bit_rate" => bitrate = v.parse::<f64>().ok(),
            "sample_rate" | "sampleRate" => sample_rate = v.parse::<f64>().ok(),
            "encoding" => encoding = Some(v.to_ascii_lowercase()),
            "channels" => channels = v.parse::<f64>().unwrap_or(1.0),
            _ => {}
        }
    }
    if let Some(b) = bitrate.filter(|b| b.is_finite() && *b > 0.0) {
        return Some(b / 8.0);
    }
    let per_sample = match encoding.as_deref()? {
        "linear16" | "pcm_s16le" | "pcm16" => 2.0,
        "mulaw" | "alaw" | "pcm_mulaw" | "pcm_alaw" => 1.0,
        _ => return None,
    };
    let rate = sample_rate.filter(|r| r.is_finite() && *r > 0.0)? * per_sample * channels.max(1.0);
    Some(rate)
}

/// A WAV header's byte rate, where its `data` chunk starts, and the chunk's declared length.
pub fn wav_header(head: &[u8]) -> Option<(u32, usize, u32)> {
    if head.len() < 12 || &head[0..4] != b"RIFF" || &head[8..12] != b"WAVE" {
        return None;
    }
    let le32 = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut at = 12;
    let mut byte_rate = None;
    while at + 8 <= head.len() {
        let id = &head[at..at + 4];
        let size = le32(at + 4)?;
        if id == b"fmt " {
            byte_rate = le32(at + 16).filter(|r| *r > 0);
        } else if id == b"data" {
            return Some((byte_rate?, at + 8, size));
        }
        at = at.checked_add(8 + size as usize + (size as usize & 1))?;
    }
    None
}

/// Seconds of audio in a body of `total` bytes starting with `head`, and how they were found.
pub fn stt_seconds(head: &[u8], total: u64, query: Option<&str>) -> Option<(f64, &'static str)> {
    if let Some((byte_rate, data_at, declared)) = wav_header(head) {
        let present = total.saturating_sub(data_at as u64);
        // A streaming writer leaves the length 0 or 0xFFFFFFFF: count what was sent.
        let data = if declared == 0 || declared == u32::MAX || u64::from(declared) > present {
            present
        } else {
            u64::from(declared)
        };
        return Some((data as f64 / f64::from(byte_rate), "wav_header"));
    }
    query_byte_rate(query).map(|rate| (total as f64 / rate, "bitrate"))
}

/// Token counts from an LLM response's `usage`.
fn llm_usage(json: &[u8]) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let usage = v.get("usage")?;
    let n = |k: &str| usage.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Some((n("prompt_tokens"), n("completion_tokens")))
}

#[derive(Debug, Default)]
struct Scan {
    /// The whole body while it fits (a JSON answer).
    body: Vec<u8>,
    body_too_long: bool,
    /// The SSE line being read.
    line: Vec<u8>,
    line_too_long: bool,
    /// The last `usage` found in an SSE event.
    sse_usage: Option<(u64, u64)>,
}

impl Scan {
    fn feed(&mut self, data: &[u8]) {
        if !self.body_too_long {
            if self.body.len() + data.len() <= MAX_JSON_RESPONSE {
                self.body.extend_from_slice(data);
            } else {
                self.body_too_long = true;
                self.body = Vec::new();
            }
        }
        let mut rest = data;
        while let Some(end) = memchr::memchr(b'\n', rest) {
            self.push_line(&rest[..end]);
            self.end_line();
            rest = &rest[end + 1..];
        }
        self.push_line(rest);
    }

    fn push_line(&mut self, part: &[u8]) {
        if self.line_too_long || self.line.len() + part.len() > MAX_SSE_LINE {
            self.line_too_long = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if !std::mem::take(&mut self.line_too_long) {
            if let Some(data) = line.strip_prefix(b"data:") {
                if memchr::memmem::find(data, b"\"usage\"").is_some() {
                    if let Some(found) = llm_usage(data.trim_ascii()) {
                        self.sse_usage = Some(found);
                    }
                }
            }
        }
    }

    fn usage(&mut self) -> Option<(u64, u64)> {
        if !self.line.is_empty() {
            self.end_line();
        }
        self.sse_usage
            .or_else(|| (!self.body_too_long).then(|| llm_usage(&self.body)).flatten())
    }
}

/// What this request will have spent, once the upstream accepts it.
#[derive(Debug)]
enum Measure {
    Tts(u64),
    /// A TTS body that streamed through: its bytes as they passed, up to a bound.
    TtsStreamed(Mutex<Vec<u8>>),
    Stt {
        query: Option<String>,
        head: Mutex<Vec<u8>>,
    },
    Llm(Mutex<Scan>),
}

/// One request's metering, kept in its `Exchange`.
#[derive(Debug)]
pub struct Metering {
    usage: Arc<Usage>,
    measure: Measure,
}

impl Metering {
    /// A TTS request whose JSON body is `body` (`None`: it streams through, and is read as it
    /// passes).
    pub fn tts(usage: Arc<Usage>, body: Option<&[u8]>) -> Metering {
        let measure = match body {
            Some(body) => Measure::Tts(tts_characters(body)),
            None => Measure::TtsStreamed(Mutex::new(Vec::new())),
        };
        Metering { usage, measure }
    }

    /// An STT upload; `body` is the whole body when it was buffered (else its first bytes are
    /// captured as they stream).
    pub fn stt(usage: Arc<Usage>, query: Option<&str>, body: Option<&[u8]>) -> Metering {
        let head = body.map_or_else(Vec::new, |b| b[..b.len().min(HEAD_BYTES)].to_vec());
        Metering {
            usage,
            measure: Measure::Stt {
                query: query.map(str::to_string),
                head: Mutex::new(head),
            },
        }
    }

    pub fn llm(usage: Arc<Usage>) -> Metering {
        Metering {
            usage,
            measure: Measure::Llm(Mutex::new(Scan::default())),
        }
    }

    /// Request body bytes as they stream to the upstream.
    pub fn request_data(&self, data: &[u8]) {
        let (kept, bound) = match &self.measure {
            Measure::Stt { head, .. } => (head, HEAD_BYTES),
            Measure::TtsStreamed(body) => (body, MAX_STREAMED_TTS_BODY),
            _ => return,
        };
        let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
        let room = bound.saturating_sub(kept.len());
        kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Response body bytes as they go to the client.
    pub fn response_data(&self, data: &[u8]) {
        if let Measure::Llm(scan) = &self.measure {
            scan.lock().unwrap_or_else(|p| p.into_inner()).feed(data);
        }
    }

    /// The request is over: count what the upstream accepted.
    pub fn commit(&self, app: &str, status: http::StatusCode, request_bytes: u64) {
        if !status.is_success() {
            return;
        }
        let add = match &self.measure {
            Measure::Tts(0) => return,
            Measure::Tts(n) => Add::Tts(*n),
            Measure::TtsStreamed(body) => match tts_characters(&body.lock().unwrap_or_else(|p| p.into_inner())) {
                0 => return,
                n => Add::Tts(n),
            },
            Measure::Stt { query, head } => {
                let head = head.lock().unwrap_or_else(|p| p.into_inner());
                match stt_seconds(&head, request_bytes, query.as_deref()) {
                    Some((seconds, how)) => Add::Stt { seconds, how },
                    None => Add::SttUnmetered,
                }
            }
            Measure::Llm(scan) => match scan.lock().unwrap_or_else(|p| p.into_inner()).usage() {
                Some((prompt, completion)) => Add::Llm { prompt, completion },
                None => {
                    tracing::debug!(app, "LLM response without usage: no tokens counted");
                    return;
                }
            },
        };
        spawn_add(self.usage.clone(), app.to_string(), add);
    }
}

/// Report to the store (which may talk to Redis) without holding up the response.
pub fn spawn_add(usage: Arc<Usage>, app: String, add: Add) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move { usage.add(&app, add).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(byte_rate: u32, data: &[u8], declared: Option<u32>) -> Vec<u8> {
        let mut w = b"RIFF\0\0\0\0WAVE".to_vec();
        w.extend_from_slice(b"fmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes());
        w.extend_from_slice(&(byte_rate / 2).to_le_bytes());
        w.extend_from_slice(&byte_rate.to_le_bytes());
        w.extend_from_slice(&2u16.to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        w.extend_from_slice(b"LIST");
        w.extend_from_slice(&3u32.to_le_bytes());
        w.extend_from_slice(b"abc\0");
        w.extend_from_slice(b"data");
        w.extend_from_slice(&declared.unwrap_or(data.len() as u32).to_le_bytes());
        w.extend_from_slice(data);
        w
    }

    #[test]
    fn paths_are_metered_by_kind() {
        assert_eq!(meter_for("/waves/v1/tts"), Some(Meter::TtsCharacters));
        assert_eq!(meter_for("/waves/v1/lightning/get_speech"), Some(Meter::TtsCharacters));
        assert_eq!(meter_for("/waves/v1/lightning-v2/stream"), Some(Meter::TtsCharacters));
        assert_eq!(meter_for("/waves/v1/stt/live"), Some(Meter::SttSeconds));
        assert_eq!(meter_for("/waves/v1/pulse/get_text"), Some(Meter::SttSeconds));
        assert_eq!(meter_for("/waves/v1/chat/completions"), Some(Meter::LlmTokens));
        assert_eq!(meter_for("/waves/v1/voice-cloning"), None);
        assert_eq!(meter_for("/"), None);
        // meter_for looks at the speech paths only under their common root.
        for pattern in STT_PATHS.iter().chain(SMALLEST_TTS_PATHS) {
            assert!(pattern.starts_with(SPEECH_ROOT), "{pattern}");
        }
    }

    #[test]
    fn tts_counts_unicode_scalar_values() {
        assert_eq!(
            tts_characters(br#"{"text":"h\u00e9llo \ud83d\udc4b","voice_id":"x"}"#),
            7
        );
        assert_eq!(tts_characters("{\"text\":\"日本語\"}".as_bytes()), 3);
        assert_eq!(tts_characters(b"not json"), 0);
    }

    #[tokio::test]
    async fn a_streamed_tts_body_is_read_as_it_passes() {
        let usage = Arc::new(Usage::new(
            Arc::new(crate::usage::TestClock::at(1_795_734_000)),
            Arc::new(crate::metrics::Metrics::new()),
        ));
        let text = "é".repeat(40_000); // 80 000 bytes: past the buffered 64 KiB
        let body = serde_json::json!({"text": text}).to_string();
        let m = Metering::tts(usage.clone(), None);
        body.as_bytes().chunks(1000).for_each(|c| m.request_data(c));
        m.commit("a", http::StatusCode::OK, body.len() as u64);
        for _ in 0..100 {
            if usage.totals("a").await.tts_characters > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(usage.totals("a").await.tts_characters, 40_000);
    }

    #[test]
    fn stt_seconds_from_the_wav_header_or_the_query() {
        let w = wav(32_000, &[0u8; 48_000], None);
        assert_eq!(stt_seconds(&w, w.len() as u64, None), Some((1.5, "wav_header")));
        // A streaming writer's placeholder length: what was sent counts.
        let w = wav(32_000, &[0u8; 16_000], Some(u32::MAX));
        assert_eq!(stt_seconds(&w[..64], w.len() as u64, None), Some((0.5, "wav_header")));
        assert_eq!(
            stt_seconds(b"raw", 16_000, Some("sample_rate=8000&encoding=linear16")),
            Some((1.0, "bitrate"))
        );
        assert_eq!(
            stt_seconds(b"raw", 8_000, Some("encoding=mulaw&sample_rate=8000")),
            Some((1.0, "bitrate"))
        );
        assert_eq!(
            stt_seconds(b"ID3...", 4_000, Some("bitrate=32000")),
            Some((1.0, "bitrate"))
        );
        assert_eq!(stt_seconds(b"ID3...", 4_000, Some("language=en")), None);
    }

    #[test]
    fn llm_usage_from_json_or_the_last_sse_event_split_anywhere() {
        let json = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        let mut s = Scan::default();
        s.feed(json);
        assert_eq!(s.usage(), Some((12, 30)));
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
        for split in 0..sse.len() {
            let mut s = Scan::default();
            s.feed(&sse[..split]);
            s.feed(&sse[split..]);
            assert_eq!(s.usage(), Some((5, 7)), "split at {split}");
        }
        let mut s = Scan::default();
        s.feed(b"{\"choices\":[]}");
        assert_eq!(s.usage(), None);
    }
}
