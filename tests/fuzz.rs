//! Property test of the client connection: arbitrary bytes and structure-aware mutations of
//! valid requests (the smuggling vocabulary: extra framing headers, obs-fold, bare LF, NUL,
//! truncation, pipelining) written to the proxy's TCP listener.
//!
//! Properties: nothing panics (a panic hook counts panics on any thread, including the
//! proxy's connection tasks); every connection answers or closes within a bound past the
//! header read timeout; and the upstream never receives an invalid request: a valid method, a
//! path starting with '/', exactly one Authorization equal to the injected key, and no
//! hop-by-hop headers beyond the chunked framing the proxy's own client may choose.
//!
//! The upstream speaks HTTP/1.1 only, so hop-by-hop headers would reach it as they were sent
//! (an HTTP/2 upstream would have them stripped by the client and hide a bug).

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// How long past the header timeout a connection may take to answer or close.
const ANSWER_BOUND: Duration = Duration::from_secs(10);

/// Valid requests the mutations start from.
const TEMPLATES: &[&str] = &[
    "GET /waves/v1/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n",
    "POST /waves/v1/lightning/get_speech HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"text\":\"hello\"}",
    "POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "PUT /echo?x=1&y=%20 HTTP/1.1\r\nHost: [::1]:8787\r\nAuthorization: Bearer client-key\r\nContent-Length: 2\r\n\r\nok",
    "GET /status/404 HTTP/1.0\r\n\r\n",
    "DELETE /waves/v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nTE: trailers\r\n\r\n",
];

/// Header lines the mutations insert: framing, hop-by-hop and credential confusion.
const HOSTILE_LINES: &[&str] = &[
    "Transfer-Encoding: chunked\r\n",
    "Transfer-Encoding: chunked, identity\r\n",
    "Transfer-Encoding:  chunked\r\n",
    "Transfer-Encoding : chunked\r\n",
    "Transfer-Encoding: xchunked\r\n",
    "Content-Length: 0\r\n",
    "Content-Length: 5\r\n",
    "Content-Length: -1\r\n",
    "Content-Length: 99999999999999999999\r\n",
    " folded: continuation\r\n",
    "\tTransfer-Encoding: chunked\r\n",
    "Authorization: Bearer stolen\r\n",
    "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n",
    "Connection: close, Authorization\r\n",
    "Connection: Upgrade\r\nUpgrade: websocket\r\n",
    "Keep-Alive: timeout=1\r\n",
    "Proxy-Connection: keep-alive\r\n",
    "Trailer: X-T\r\n",
    "Expect: 100-continue\r\n",
    "Host: evil.example\r\n",
    "Origin: https://evil.example\r\n",
    "X-Nul: a\0b\r\n",
    "X-Cr: a\rb\r\n",
    "X-Lf: a\nb\r\n",
];

#[derive(Debug, Clone)]
enum Mutation {
    InsertByte(usize, u8),
    DeleteRange(usize, usize),
    InsertLine(usize, usize),
    DuplicateLine(usize),
    CrlfToLf(usize),
    Truncate(usize),
    AppendCopy,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::InsertByte(at, b)),
        (any::<usize>(), 1usize..8).prop_map(|(at, n)| Mutation::DeleteRange(at, n)),
        (any::<usize>(), 0..HOSTILE_LINES.len()).prop_map(|(line, which)| Mutation::InsertLine(line, which)),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        any::<usize>().prop_map(Mutation::CrlfToLf),
        any::<usize>().prop_map(Mutation::Truncate),
        Just(Mutation::AppendCopy),
    ]
}

/// Byte offsets just after each "\n" of the head (where a header line may start).
fn line_starts(bytes: &[u8]) -> Vec<usize> {
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(bytes.len(), |p| p + 2);
    let mut starts: Vec<usize> = bytes[..head_end]
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    if starts.is_empty() {
        starts.push(bytes.len());
    }
    starts
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match *m {
            Mutation::InsertByte(at, b) => bytes.insert(at % (bytes.len() + 1), b),
            Mutation::DeleteRange(at, n) => {
                let at = at % len;
                let end = (at + n).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Mutation::InsertLine(line, which) => {
                let starts = line_starts(&bytes);
                let at = starts[line % starts.len()];
                let insert = HOSTILE_LINES[which].as_bytes();
                bytes.splice(at..at, insert.iter().copied());
            }
            Mutation::DuplicateLine(line) => {
                let starts = line_starts(&bytes);
                let at = starts[line % starts.len()];
                if let Some(end) = bytes[at..].iter().position(|b| *b == b'\n') {
                    let copy = bytes[at..=at + end].to_vec();
                    bytes.splice(at..at, copy);
                }
            }
            Mutation::CrlfToLf(which) => {
                let crlfs: Vec<usize> = bytes
                    .windows(2)
                    .enumerate()
                    .filter(|(_, w)| *w == b"\r\n")
                    .map(|(i, _)| i)
                    .collect();
                if !crlfs.is_empty() {
                    bytes.remove(crlfs[which % crlfs.len()]);
                }
            }
            Mutation::Truncate(at) => bytes.truncate(at % len),
            Mutation::AppendCopy => {
                let copy = bytes.clone();
                bytes.extend_from_slice(&copy);
            }
        }
    }
    bytes
}

/// One case: the bytes, and whether to half-close after writing them (else the connection is
/// left open, so only the proxy's own timeouts can end it).
fn case() -> impl Strategy<Value = (Vec<u8>, bool)> {
    let arbitrary = proptest::collection::vec(any::<u8>(), 0..512);
    let structured = (0..TEMPLATES.len(), proptest::collection::vec(mutation(), 0..5))
        .prop_map(|(t, ms)| apply(TEMPLATES[t].as_bytes().to_vec(), &ms));
    // An incomplete head left open: only the header read timeout can end it.
    let stalled_head = (0..TEMPLATES.len(), any::<usize>()).prop_map(|(t, cut)| {
        let template = TEMPLATES[t].as_bytes();
        let head_len = template
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(template.len());
        template[..1 + cut % head_len].to_vec()
    });
    prop_oneof![
        3 => arbitrary.prop_map(|b| (b, true)),
        6 => structured.prop_map(|b| (b, true)),
        1 => stalled_head.prop_map(|b| (b, false)),
    ]
}

/// Write, optionally half-close, then read until the proxy closes or (when left open) answers.
async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    // The proxy may close before taking everything (a refused head): that is an answer.
    if stream.write_all(bytes).await.is_err() {
        return Ok(());
    }
    if half_close {
        let _ = stream.shutdown().await;
    }
    let bound = HEADER_READ_TIMEOUT + ANSWER_BOUND;
    let mut buf = [0u8; 8192];
    let outcome = tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // Left open, an answer is enough: a keep-alive connection may rightly stay.
                Ok(_) if !half_close => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    outcome.map_err(|_| format!("no answer and no close within {bound:?}"))
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

fn check_recorded(record: &support::upstream::Recorded) -> Result<(), String> {
    let describe = || format!("{} {} {:?}", record.method, record.uri, record.headers);
    if !record.uri.path().starts_with('/') {
        return Err(format!("path does not start with '/': {}", describe()));
    }
    // A method is an RFC 9110 token: extension methods such as `POS~T` are valid HTTP (the
    // path policy is where methods are narrowed).
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if record.method.as_str().is_empty() || !record.method.as_str().bytes().all(tchar) {
        return Err(format!("odd method: {}", describe()));
    }
    let authorizations: Vec<_> = record.headers.get_all("authorization").iter().collect();
    let expected = format!("Bearer {TEST_KEY}");
    if authorizations.len() != 1 || authorizations[0] != expected.as_str() {
        return Err(format!("Authorization is not exactly the key: {}", describe()));
    }
    let websocket = record
        .headers
        .get("upgrade")
        .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
    for name in HOP_BY_HOP {
        // A WebSocket handshake carries Connection/Upgrade to the upstream on purpose.
        if websocket && (*name == "connection" || *name == "upgrade") {
            continue;
        }
        if record.headers.contains_key(*name) {
            return Err(format!("hop-by-hop header {name} reached the upstream: {}", describe()));
        }
    }
    // The one framing header allowed: the proxy's own client streaming a body chunked.
    let te: Vec<_> = record.headers.get_all("transfer-encoding").iter().collect();
    if !(te.is_empty() || (te.len() == 1 && te[0] == "chunked" && !record.headers.contains_key("content-length"))) {
        return Err(format!("framing headers the proxy did not choose: {}", describe()));
    }
    Ok(())
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn arbitrary_and_mutated_requests_never_panic_hang_or_reach_the_upstream_invalid() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
    let (upstream, proxy) = runtime.block_on(async {
        let upstream = TestUpstream::start_with(UpstreamOptions { http2: false }).await;
        let proxy = TestProxy::start(
            &upstream,
            &format!(
                "[listen]\nheader_read_timeout = \"{}ms\"\n",
                HEADER_READ_TIMEOUT.as_millis()
            ),
        )
        .await;
        (upstream, proxy)
    });
    let addr = proxy.addr;
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 600,
        failure_persistence: None,
        // Each shrink step replays a connection; keep a failing run short and its report small.
        max_shrink_iters: 64,
        max_shrink_time: 20_000,
        // CI runs one fixed seed, so a submission's verdict is reproducible; elsewhere every
        // run explores new inputs (PROPTEST_RNG_SEED=N replays a given seed).
        rng_seed: match (std::env::var_os("CI"), std::env::var_os("PROPTEST_RNG_SEED")) {
            (Some(_), None) => RngSeed::Fixed(0x5EED_2026),
            _ => ProptestConfig::default().rng_seed,
        },
        ..ProptestConfig::default()
    });
    let result = runner.run(&case(), |(bytes, half_close)| {
        let outcome = runtime.block_on(exchange(addr, &bytes, half_close));
        prop_assert!(
            outcome.is_ok(),
            "{:?} for {:?}",
            outcome,
            String::from_utf8_lossy(&bytes)
        );
        prop_assert_eq!(
            PANICS.load(Ordering::SeqCst),
            0,
            "a panic on {:?}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Every request the upstream ever saw, from all cases.
    let records = upstream.records();
    for record in &records {
        if let Err(e) = check_recorded(record) {
            panic!("{e}");
        }
    }
    // The structured cases must actually have reached the upstream sometimes, or the upstream
    // property above says nothing.
    assert!(
        records.len() >= 20,
        "only {} requests reached the upstream",
        records.len()
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    runtime.block_on(proxy.stop());
}
