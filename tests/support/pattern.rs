//! A deterministic byte pattern for big-body tests: byte `i` of a stream is `i % 251` (a prime,
//! so chunk boundaries never line up with it). Generating and checking use slices of one
//! precomputed block, so they cost a memcpy/memcmp even in debug builds.

use bytes::Bytes;
use std::sync::OnceLock;

const PERIOD: usize = 251;
const MAX_CHUNK: usize = 256 * 1024;

fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| (0..PERIOD + MAX_CHUNK).map(|i| (i % PERIOD) as u8).collect())
}

/// `len` bytes of the pattern starting at stream offset `offset` (`len` ≤ 256 KiB).
pub fn chunk(offset: u64, len: usize) -> Bytes {
    let start = (offset % PERIOD as u64) as usize;
    Bytes::copy_from_slice(&block()[start..start + len.min(MAX_CHUNK)])
}

/// Checks a stream against the pattern as it arrives.
pub struct Checker {
    pub len: u64,
    pub ok: bool,
}

impl Default for Checker {
    fn default() -> Self {
        Checker { len: 0, ok: true }
    }
}

impl Checker {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = data.len().min(MAX_CHUNK);
            let start = (self.len % PERIOD as u64) as usize;
            if data[..n] != block()[start..start + n] {
                self.ok = false;
            }
            self.len += n as u64;
            data = &data[n..];
        }
    }
}
