//! The differential harness: the proxy's hand-written HTTP/1.1 paths (the plain-request front
//! end, and the upstream HTTP/1.1 client) against hyper, on the same bytes.
//!
//! - Request side ([`RequestHarness`]): client bytes go (a) through the proxy, whose upstream is
//!   a hyper server recording each message it parses, and (b) straight into a hyper server
//!   connection. The messages the proxy forwards must be the messages hyper parsed (method,
//!   path and query, end-to-end headers, body), save the refusals on [`allowed_refusal`]'s list.
//! - Response side ([`ResponseHarness`]): an upstream writes scripted response bytes; (a) a
//!   hyper client reads the proxy's answer to a request for them, (b) a hyper client reads them
//!   straight from the upstream. Status, end-to-end headers and body must agree, save
//!   [`allowed_upstream_refusal`]'s list.
//!
//! Cases are built from a string of choice bytes ([`Choices`]): the proptest in
//! `tests/differential.rs` draws those bytes, and the cargo-fuzz targets in `fuzz/` take them
//! from libFuzzer, so both explore the same vocabulary through this one file. Byte 0 is always
//! the plainest choice, so shrinking a failure toward zeros makes it simpler.
//!
//! This file stands alone (it is included by `#[path]` from the fuzz crate too): it uses the
//! crate's public API only (`config::load_text`, `Listeners`, `run`) and no other test support.
#![allow(dead_code)] // the proptest, the named cases and each fuzz target use their own subset

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The proxy's `listen.header_read_timeout` here: a head the proxy never sees the end of is
/// closed after this, which turns "never answered" into a prompt failure instead of a hang.
pub const PROXY_HEADER_READ_TIMEOUT: &str = "1s";
/// A backstop, never expected to be reached: how long to wait for an answer or a close.
const BACKSTOP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Choices: the case vocabulary is indexed by bytes.

/// Reads choices from bytes; past the end every choice is 0 (the plainest).
pub struct Choices<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Choices<'a> {
    pub fn new(bytes: &'a [u8]) -> Choices<'a> {
        Choices { bytes, at: 0 }
    }

    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// `0..n` (n ≤ 256).
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// True for `weight` of 256 byte values (never for 0).
    fn rare(&mut self, weight: u8) -> bool {
        self.byte() > 255 - weight
    }
}

/// Split points: up to three cuts into `len` bytes, ascending.
fn splits(c: &mut Choices<'_>, len: usize) -> Vec<usize> {
    let n = c.below(4);
    let mut cuts: Vec<usize> = (0..n).map(|_| usize::from(c.byte()) * len / 256).collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.retain(|&cut| cut > 0 && cut < len);
    cuts
}

/// `bytes` cut at `splits`.
fn pieces<'b>(bytes: &'b [u8], splits: &[usize]) -> Vec<&'b [u8]> {
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in splits {
        out.push(&bytes[from..cut]);
        from = cut;
    }
    out.push(&bytes[from..]);
    out
}

/// Write the pieces one by one, each flushed, letting the reader run between them. Stops
/// quietly if the peer has gone (a refusal may close before everything is written).
async fn write_pieces<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8], splits: &[usize]) {
    for piece in pieces(bytes, splits) {
        if io.write_all(piece).await.is_err() || io.flush().await.is_err() {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Bytes as a Rust string literal would show them (for failure reports).
pub fn show(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Messages as a server parsed them, and what is compared of them.

/// Headers that describe one hop, never the message (RFC 9110 §7.6.1), plus the proxy-auth
/// pair: a proxy removes them (and every header `Connection` names) by design.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the proxy replaces or sets by design, and the framing, which is each hop's
/// own: `Host` (the upstream's), `Authorization` (the injected key), `Content-Length` (the
/// forwarded body's own framing), `X-Request-Id` (generated when the client sent none).
const REQUEST_HEADERS_NOT_COMPARED: &[&str] = &["host", "authorization", "content-length", "x-request-id"];

/// Response headers each hop sets itself: framing, `Date` (added by the front end when the
/// upstream sent none) and `X-Request-Id` (added by the proxy).
const RESPONSE_HEADERS_NOT_COMPARED: &[&str] = &["content-length", "date", "x-request-id"];

/// End-to-end headers: name → values in order, without hop-by-hop headers, the headers the
/// message's own `Connection` names, and `skip`.
fn end_to_end(headers: &HeaderMap, connection_named: &[String], skip: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        let name = name.as_str();
        if HOP_BY_HOP.contains(&name) || skip.contains(&name) || connection_named.iter().any(|n| n == name) {
            continue;
        }
        out.entry(name.to_string()).or_default().push(show(value.as_bytes()));
    }
    out
}

/// The header names a message's `Connection` header lists (lowercase).
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The request target as compared: path, then `?query` if there is one. (An absolute-form
/// target without a path has the path `/`, as RFC 9112 §3.2.2 says.)
fn target_of(uri: &Uri) -> String {
    match uri.query() {
        Some(q) => format!("{}?{q}", uri.path()),
        None => uri.path().to_string(),
    }
}

/// One request as a hyper server parsed it.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub method: String,
    pub target: String,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// `None` while (or if never) the body is complete.
    pub body: Option<Bytes>,
}

impl Parsed {
    fn from_parts(parts: &http::request::Parts) -> Parsed {
        Parsed {
            method: parts.method.as_str().to_string(),
            target: target_of(&parts.uri),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body: None,
        }
    }

    /// The `x-diff-case` tag: which generated message this is.
    fn tag(&self) -> Option<String> {
        self.headers
            .get(TAG_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// What is compared, given the header names the client's own `Connection` listed.
    fn compared(&self, connection_named: &[String]) -> Compared {
        Compared {
            method: self.method.clone(),
            target: self.target.clone(),
            headers: end_to_end(&self.headers, connection_named, REQUEST_HEADERS_NOT_COMPARED),
            body: show(self.body.as_deref().unwrap_or_default()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Compared {
    method: String,
    target: String,
    headers: BTreeMap<String, Vec<String>>,
    body: String,
}

/// Parsed requests, shared with the service that records them.
type Log = Arc<Mutex<Vec<(u64, Parsed)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A recording service: notes the head when hyper hands it over, the body once it is whole,
/// and answers `200` with `x-diff-upstream: <seq>` and a short body, which hyper leaves out for
/// HEAD (`405` to CONNECT, so that hyper does not turn the connection into a tunnel and keeps
/// parsing what follows).
async fn record(req: Request<Incoming>, log: Log, seq: Arc<AtomicU64>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let n = seq.fetch_add(1, Ordering::SeqCst);
    let index = {
        let mut log = lock(&log);
        log.push((n, Parsed::from_parts(&parts)));
        log.len() - 1
    };
    let status = match body.collect().await {
        Ok(collected) => {
            lock(&log)[index].1.body = Some(collected.to_bytes());
            if parts.method == http::Method::CONNECT {
                405
            } else {
                200
            }
        }
        Err(_) => 400,
    };
    let response = Response::builder()
        .status(status)
        .header("x-diff-upstream", n)
        .body(Full::new(Bytes::from(format!("answer {n}"))))
        .expect("a valid response");
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// The proxy, in this process.

/// The proxy under test, run through `smallest_proxy::run` as `main.rs` does.
pub struct Proxy {
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(upstream_url: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let key_file = dir.path().join("api-key");
        std::fs::write(&key_file, "sk-differential-Q7x2\n").expect("the key file");
        let text = format!(
            "[listen]\naddress = \"127.0.0.1:0\"\nheader_read_timeout = \"{PROXY_HEADER_READ_TIMEOUT}\"\n\
             [upstream]\nurl = \"{upstream_url}\"\n[key]\nsource = \"file\"\nfile = \"{}\"\n",
            key_file.display()
        );
        let config = smallest_proxy::config::load_text(None, &text, &[]).expect("the harness config is valid");
        let listeners = smallest_proxy::Listeners::bind(&config.listen)
            .await
            .expect("bind the proxy");
        let addr = listeners.tcp_addresses()[0];
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            smallest_proxy::run(config, listeners, async move {
                let _ = rx.await;
            })
            .await
            .expect("the proxy runs");
        });
        let proxy = Proxy {
            addr,
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
        };
        // The listener is bound already; an answered /health says the accept loop runs.
        let answer = exchange_until_close(
            addr,
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "the proxy is not healthy: {}",
            show(&answer)
        );
        proxy
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Write `bytes`, read until the peer closes (bounded).
pub async fn exchange_until_close(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(BACKSTOP, stream.read_to_end(&mut out)).await;
    out
}

// ---------------------------------------------------------------------------------------------
// Request side: generation.

/// The header every generated request carries first: `<case>.<message index>`. It tells which
/// generated message a parsed one is, and which case a forwarded request belongs to.
pub const TAG_HEADER: &str = "x-diff-case";

/// One generated request message.
#[derive(Debug, Clone)]
pub struct GenMessage {
    pub method: &'static str,
    /// The head as written (for the framing predicates of the allow-list).
    pub head: Vec<u8>,
}

/// A client byte stream: a pipeline of requests, and where it is cut into writes.
#[derive(Debug, Clone)]
pub struct RequestCase {
    pub id: u64,
    pub bytes: Vec<u8>,
    pub splits: Vec<usize>,
    pub messages: Vec<GenMessage>,
}

impl RequestCase {
    /// A case from raw bytes (the named tests): no generated messages to look up.
    pub fn raw(bytes: &[u8]) -> RequestCase {
        RequestCase {
            id: 0,
            bytes: bytes.to_vec(),
            splits: Vec::new(),
            messages: Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "client bytes {} written in pieces cut at {:?}",
            show(&self.bytes),
            self.splits
        )
    }

    /// The generated message a parsed one is, by its tag.
    fn generated(&self, parsed: &Parsed) -> Option<&GenMessage> {
        let tag = parsed.tag()?;
        let (case, index) = tag.split_once('.')?;
        if case != self.id.to_string() {
            return None;
        }
        self.messages.get(index.parse::<usize>().ok()?)
    }

    /// Build a case of 1–4 requests from choice bytes.
    pub fn from_choices(id: u64, choices: &[u8]) -> RequestCase {
        let mut c = Choices::new(choices);
        let count = 1 + c.below(4);
        let mut bytes = Vec::new();
        let mut messages = Vec::new();
        for index in 0..count {
            let (head, body, method) = request_message(&mut c, id, index, index + 1 == count);
            bytes.extend_from_slice(&head);
            bytes.extend_from_slice(&body);
            messages.push(GenMessage { method, head });
        }
        if c.rare(12) {
            // The stream stops inside the last message: hyper waits for the rest.
            let keep = bytes.len() - 1 - c.below(bytes.len().min(24));
            bytes.truncate(keep);
        }
        let splits = splits(&mut c, bytes.len());
        RequestCase {
            id,
            bytes,
            splits,
            messages,
        }
    }
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
/// Lowercase and mixed-case methods are other methods (RFC 9110 §9.1: case-sensitive);
/// TRACE echoes the request back; CONNECT asks for a tunnel.
const ODD_METHODS: &[&str] = &[
    "get",
    "post",
    "Post",
    "head",
    "delete",
    "TRACE",
    "PURGE",
    "M-SEARCH",
    "X!#$%&'*+-.^_`|~Y",
    "CONNECT",
    "connect",
];
const TARGETS: &[&str] = &[
    "/",
    "/v1/tts",
    "/waves/v1/lightning/get_speech?x=1&y=%20",
    "/a/b/../c",
    "/p;q?",
];
const ODD_TARGETS: &[&str] = &[
    "http://127.0.0.1/abs?q=1",
    "http://localhost:8787/p",
    "http://127.0.0.1?x=1",
    "http://127.0.0.1",
    "http://[::1]:8787/v6",
    "http://evil.example/x",
    "*",
    "//double//slash",
    "/q#frag",
    "/sp ace",
    "/%00",
    "HTTP://127.0.0.1/upper",
];
const HOSTS: &[Option<&str>] = &[Some("127.0.0.1"), Some("localhost:8787"), None, Some("[::1]:8787")];
/// Header lines beyond the tag and Host: ordinary ones, hop-by-hop ones, credentials.
const EXTRA_HEADERS: &[&str] = &[
    "Accept: */*",
    "X-Mixed-Case: Value",
    "x-empty:",
    "x-pad:   padded\t ",
    "Cookie: a=1",
    "x-dup: 1",
    "x-dup: 2",
    "User-Agent: diff/1",
    "Connection: keep-alive",
    "Connection: close",
    "Connection: x-drop",
    "x-drop: gone",
    "TE: trailers",
    "Keep-Alive: timeout=5",
    "Proxy-Connection: keep-alive",
    "Authorization: Bearer client-key",
    "Proxy-Authorization: Basic eA==",
    "X-Request-Id: client-id-1",
    "Expect: 100-continue",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "x-obs: caf\u{e9}",
    "Via: 1.1 other",
    "Host: 127.0.0.1",
];
const BODIES: &[&str] = &[
    "",
    "hello",
    "{\"text\":\"hi\"}",
    "line1\r\nline2",
    "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "0\r\n\r\n",
];

/// How a request says how long its body is.
#[derive(Clone, Copy)]
enum ReqFraming {
    None,
    Length,
    LengthTwiceEqual,
    LengthTwiceDifferent,
    LengthJunk(usize),
    Chunked,
    ChunkedAndLength,
    TransferCodings(&'static str),
    TwoTransferEncodings,
}

const LENGTH_JUNK: &[&str] = &["+{}", "{}x", " {} ", "0{}", "{}, {}", "-1", "", "{}.0", "0x{}"];
const TRANSFER_CODINGS: &[&str] = &[
    "identity, chunked",
    "gzip, chunked",
    "chunked, identity",
    "Chunked",
    "xchunked",
    "chunked;q=1",
];

/// One request: (head, body bytes, method).
fn request_message(c: &mut Choices<'_>, id: u64, index: usize, last: bool) -> (Vec<u8>, Vec<u8>, &'static str) {
    let method = if c.rare(40) {
        c.pick(ODD_METHODS)
    } else {
        c.pick(METHODS)
    };
    // A CONNECT only ends a pipeline (what follows a tunnel request is not HTTP).
    let tunnel = method.eq_ignore_ascii_case("CONNECT");
    let method = if tunnel && !last { "GET" } else { method };
    let version = if c.rare(20) { "HTTP/1.0" } else { "HTTP/1.1" };
    let target = if method.eq_ignore_ascii_case("CONNECT") {
        "127.0.0.1:443"
    } else if c.rare(56) {
        c.pick(ODD_TARGETS)
    } else {
        c.pick(TARGETS)
    };
    let host = if c.rare(6) { Some("evil.example") } else { c.pick(HOSTS) };
    let mut lines: Vec<Vec<u8>> = vec![format!("{TAG_HEADER}: {id}.{index}").into_bytes()];
    if let Some(host) = host {
        lines.push(format!("Host: {host}").into_bytes());
    }
    for _ in 0..c.below(4) {
        lines.push(c.pick(EXTRA_HEADERS).as_bytes().to_vec());
    }
    let body = c.pick(BODIES).as_bytes().to_vec();
    let framing = match c.below(32) {
        0..=3 if body.is_empty() => ReqFraming::None,
        0..=14 => ReqFraming::Length,
        15..=23 => ReqFraming::Chunked,
        24 => ReqFraming::None,
        25 => ReqFraming::LengthTwiceEqual,
        26 => ReqFraming::LengthTwiceDifferent,
        27 => ReqFraming::LengthJunk(c.below(LENGTH_JUNK.len())),
        28 => ReqFraming::ChunkedAndLength,
        29 => ReqFraming::TwoTransferEncodings,
        _ => ReqFraming::TransferCodings(c.pick(TRANSFER_CODINGS)),
    };
    let len = body.len();
    let cl = |v: String| format!("Content-Length: {v}").into_bytes();
    let mut chunked = false;
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length => lines.push(cl(len.to_string())),
        ReqFraming::LengthTwiceEqual => {
            lines.push(cl(len.to_string()));
            lines.push(cl(len.to_string()));
        }
        ReqFraming::LengthTwiceDifferent => {
            lines.push(cl(len.to_string()));
            lines.push(cl((len + 1).to_string()));
        }
        ReqFraming::LengthJunk(which) => lines.push(cl(LENGTH_JUNK[which].replace("{}", &len.to_string()))),
        ReqFraming::Chunked => {
            lines.push(b"Transfer-Encoding: chunked".to_vec());
            chunked = true;
        }
        ReqFraming::ChunkedAndLength => {
            let te = b"Transfer-Encoding: chunked".to_vec();
            let length = cl(len.to_string());
            if c.rare(128) {
                lines.extend([length, te]);
            } else {
                lines.extend([te, length]);
            }
            chunked = true;
        }
        ReqFraming::TransferCodings(codings) => {
            lines.push(format!("Transfer-Encoding: {codings}").into_bytes());
            chunked = true;
        }
        ReqFraming::TwoTransferEncodings => {
            lines.push(b"Transfer-Encoding: gzip".to_vec());
            lines.push(b"Transfer-Encoding: chunked".to_vec());
            chunked = true;
        }
    }
    if c.rare(14) {
        // One header line broken as request smugglers break them.
        let at = 1 + c.below(lines.len());
        let broken: &[u8] = c.pick(&[
            b" folded continuation".as_slice(),
            b"\tTransfer-Encoding: chunked",
            b"X-Space : before colon",
            b"X-Nul: a\0b",
            b"X-Cr: a\rb",
            b"Bad Name: x",
            b"x-colonless",
            b": no-name",
        ]);
        lines.insert(at.min(lines.len()), broken.to_vec());
    }
    let request_line = if c.rare(8) {
        match c.below(6) {
            0 => format!("{method}  {target} {version}"),
            1 => format!("{method} {target}"),
            2 => format!("{method} {target} {}", version.to_ascii_lowercase()),
            3 => format!("{method} {target} HTTP/1.2"),
            4 => format!("\r\n{method} {target} {version}"),
            _ => format!("{method} {target} {version} "),
        }
    } else {
        format!("{method} {target} {version}")
    };
    // Line ends: CRLF, or bare LF throughout, or one line's; and the blank line's own.
    let bare_lf_everywhere = c.rare(16);
    let odd_line = if c.rare(24) {
        Some(c.below(lines.len() + 1))
    } else {
        None
    };
    let blank = if c.rare(24) {
        c.pick(&[b"\n".as_slice(), b"\r\n".as_slice()])
    } else if bare_lf_everywhere {
        b"\n".as_slice()
    } else {
        b"\r\n".as_slice()
    };
    let eol = |i: usize| -> &'static [u8] {
        if bare_lf_everywhere || odd_line == Some(i) {
            b"\n"
        } else {
            b"\r\n"
        }
    };
    let mut head = request_line.into_bytes();
    head.extend_from_slice(eol(0));
    for (i, line) in lines.iter().enumerate() {
        head.extend_from_slice(line);
        head.extend_from_slice(eol(i + 1));
    }
    head.extend_from_slice(blank);
    let body = if chunked { chunked_body(c, &body) } else { body };
    (head, body, method)
}

/// Chunk-size line variants: `{}` is the size in hex.
const CHUNK_SIZES: &[&str] = &[
    "{}",
    "{}",
    "{}",
    "{};ext=1",
    "{} ;ext",
    "{};e=\"q v\"",
    "0{}",
    "{} ",
    "{}\t",
    "{};",
    "{}\n;x",
    "{}\x0c",
    "00000000000000000{}",
];

/// `body` in the chunked coding, with generated chunk boundaries, size lines and trailers.
fn chunked_body(c: &mut Choices<'_>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    let odd = c.rare(40);
    while !rest.is_empty() {
        let take = (1 + c.below(8)).min(rest.len());
        let take = if c.below(2) == 0 { rest.len() } else { take };
        let (chunk, after) = rest.split_at(take);
        let hex = if c.rare(32) {
            format!("{:X}", chunk.len())
        } else {
            format!("{:x}", chunk.len())
        };
        let line = if odd { c.pick(CHUNK_SIZES) } else { "{}" };
        out.extend_from_slice(line.replace("{}", &hex).as_bytes());
        out.extend_from_slice(if c.rare(8) { b"\n" } else { b"\r\n" });
        out.extend_from_slice(chunk);
        out.extend_from_slice(if c.rare(8) { b"\n" } else { b"\r\n" });
        rest = after;
    }
    out.extend_from_slice(c.pick(&[b"0".as_slice(), b"0", b"0", b"000", b"0;end=1"]));
    out.extend_from_slice(b"\r\n");
    if c.rare(40) {
        out.extend_from_slice(c.pick(&[b"x-trailer: t\r\n".as_slice(), b"x-trailer: t\n", b"bad trailer\r\n"]));
    }
    out.extend_from_slice(if c.rare(8) { b"\n" } else { b"\r\n" });
    out
}

// ---------------------------------------------------------------------------------------------
// Request side: hyper's view.

/// How hyper's server connection ended after the whole stream (and its end) was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefEnd {
    /// Everything parsed (or hyper closed after a message that asked it to).
    Clean,
    /// The stream ended inside a message: hyper would wait for the rest.
    Incomplete,
    /// hyper refused a head or a body (it answers 4xx or closes).
    Refused,
}

#[derive(Debug)]
pub struct Reference {
    /// Every head hyper parsed, in order; the body is `Some` once it was whole.
    pub parsed: Vec<Parsed>,
    pub end: RefEnd,
    pub error: Option<String>,
}

impl Reference {
    /// The messages hyper parsed whole (a prefix of `parsed`).
    fn complete(&self) -> &[Parsed] {
        let n = self.parsed.iter().take_while(|p| p.body.is_some()).count();
        &self.parsed[..n]
    }
}

/// Feed the bytes (cut as the case says, then end of stream) to a hyper HTTP/1.1 server
/// connection with default settings, over an in-memory pipe. `half_close` lets it finish the
/// messages it has when the stream ends, as it would on a connection kept open.
pub async fn hyper_server_view(bytes: &[u8], splits: &[usize]) -> Reference {
    let (mut client, server) = tokio::io::duplex(bytes.len() + 64 * 1024);
    let log: Log = Arc::default();
    let seq = Arc::new(AtomicU64::new(0));
    let service_log = log.clone();
    let serving = tokio::spawn(async move {
        hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(
                TokioIo::new(server),
                service_fn(move |req| record(req, service_log.clone(), seq.clone())),
            )
            .await
    });
    write_pieces(&mut client, bytes, splits).await;
    let _ = client.shutdown().await;
    // Drain what hyper writes so it never blocks on a full pipe.
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(BACKSTOP, client.read_to_end(&mut sink)).await;
    let result = tokio::time::timeout(BACKSTOP, serving).await;
    let (end, error) = match result {
        Ok(Ok(Ok(()))) => (RefEnd::Clean, None),
        Ok(Ok(Err(e))) if e.is_incomplete_message() => (RefEnd::Incomplete, Some(e.to_string())),
        Ok(Ok(Err(e))) => (RefEnd::Refused, Some(e.to_string())),
        Ok(Err(join)) => panic!("hyper's server connection panicked: {join}"),
        Err(_) => panic!("hyper's server connection did not end after the stream did"),
    };
    let parsed = lock(&log).iter().map(|(_, p)| p.clone()).collect();
    Reference { parsed, end, error }
}

// ---------------------------------------------------------------------------------------------
// Request side: the proxy's view.

/// The recording upstream: hyper's server over plain TCP on loopback.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    log: Log,
    /// Sequence numbers of the records a case has taken.
    taken: Mutex<std::collections::BTreeSet<u64>>,
}

impl RecordingUpstream {
    pub async fn start() -> RecordingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let log: Log = Arc::default();
        let seq = Arc::new(AtomicU64::new(0));
        let accept_log = log.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (log, seq) = (accept_log.clone(), seq.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| record(req, log.clone(), seq.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        RecordingUpstream {
            addr,
            log,
            taken: Mutex::default(),
        }
    }

    /// Requests received whole and not taken before, in order, with their sequence numbers.
    fn take_new(&self) -> Vec<(u64, Parsed)> {
        let log = lock(&self.log);
        let mut taken = lock(&self.taken);
        let mut new: Vec<(u64, Parsed)> = log
            .iter()
            .filter(|(seq, p)| p.body.is_some() && !taken.contains(seq))
            .cloned()
            .collect();
        new.sort_by_key(|(seq, _)| *seq);
        taken.extend(new.iter().map(|(seq, _)| *seq));
        new
    }
}

/// One response the client read from the proxy.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The recording upstream's sequence number: this answer came from the upstream.
    fn upstream_seq(&self) -> Option<u64> {
        std::str::from_utf8(self.header("x-diff-upstream")?).ok()?.parse().ok()
    }

    /// A JSON error the proxy made itself: `Some(Some(code))`, or `Some(None)` when its body
    /// was not sent (an answer to HEAD).
    fn proxy_error(&self) -> Option<Option<String>> {
        if self.upstream_seq().is_some() || self.header("x-request-id").is_none() {
            return None;
        }
        if self.body.is_empty() && self.header("content-type") == Some(b"application/json".as_slice()) {
            return Some(None);
        }
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        Some(Some(json.get("code")?.as_str()?.to_string()))
    }

    fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        })
    }

    fn summary(&self) -> String {
        match (self.upstream_seq(), self.proxy_error()) {
            (Some(seq), _) => format!("{} from the upstream (request #{seq})", self.status),
            (None, Some(Some(code))) => format!("{} {code} from the proxy", self.status),
            (None, Some(None)) => format!("{} from the proxy (to HEAD: no body, no code)", self.status),
            (None, None) => format!("{} {}", self.status, show(&self.body)),
        }
    }
}

enum Step {
    Response(ClientResponse, usize),
    /// A 1xx interim head of this length.
    Interim(usize),
    NeedMore,
}

/// Parse one response at the start of `buf` (strictly: the proxy writes these).
fn parse_response(buf: &[u8], head_request: bool, eof: bool) -> Result<Step, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof && !buf.is_empty() => {
            return Err(format!("the connection ended inside a response head: {}", show(buf)))
        }
        Ok(httparse::Status::Partial) => return Ok(Step::NeedMore),
        Err(e) => return Err(format!("an unparseable response ({e}): {}", show(buf))),
    };
    let status = response.code.unwrap_or(0);
    if (100..200).contains(&status) && status != 101 {
        return Ok(Step::Interim(head_len));
    }
    let headers: Vec<(String, Vec<u8>)> = response
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    fn get<'h>(headers: &'h [(String, Vec<u8>)], name: &'h str) -> impl Iterator<Item = &'h [u8]> + 'h {
        headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
    let rest = &buf[head_len..];
    let no_body = head_request || status == 204 || status == 304 || status == 101;
    let chunked = get(&headers, "transfer-encoding").any(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    let length = get(&headers, "content-length").next().map(|v| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| format!("the proxy sent Content-Length {}", show(v)))
    });
    let (body, used) = if no_body {
        (Vec::new(), 0)
    } else if chunked {
        match dechunk(rest)? {
            Some(done) => done,
            None if eof => return Err(format!("the connection ended inside a chunked response: {}", show(buf))),
            None => return Ok(Step::NeedMore),
        }
    } else if let Some(length) = length {
        let length = length?;
        if rest.len() < length {
            if eof {
                return Err(format!("the connection ended inside a response body: {}", show(buf)));
            }
            return Ok(Step::NeedMore);
        }
        (rest[..length].to_vec(), length)
    } else if eof {
        (rest.to_vec(), rest.len())
    } else {
        return Ok(Step::NeedMore);
    };
    Ok(Step::Response(
        ClientResponse { status, headers, body },
        head_len + used,
    ))
}

/// A strict chunked decoder for what the proxy writes: (body, bytes used), or `None` for more.
fn dechunk(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(end) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[at..at + end];
        let size = std::str::from_utf8(line)
            .ok()
            .and_then(|l| usize::from_str_radix(l, 16).ok())
            .ok_or_else(|| format!("the proxy sent the chunk-size line {}", show(line)))?;
        at += end + 2;
        if size == 0 {
            // No trailers from the proxy: the blank line.
            if buf.len() < at + 2 {
                return Ok(None);
            }
            if &buf[at..at + 2] != b"\r\n" {
                return Err(format!("the proxy's last chunk is not followed by CRLF: {}", show(buf)));
            }
            return Ok(Some((body, at + 2)));
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(format!("the proxy's chunk is longer than its size: {}", show(buf)));
        }
        at += size + 2;
    }
}

/// What the client saw on its connection to the proxy.
#[derive(Debug)]
pub struct ClientView {
    pub responses: Vec<ClientResponse>,
    /// The proxy closed the connection before the client did.
    pub closed_early: bool,
    pub error: Option<String>,
}

/// Write the case to the proxy; read until `want` final responses have come (or the proxy
/// closes); then end the stream and read what else comes until the proxy closes.
/// `head_request(i)`: whether the i-th response answers a HEAD (it has no body).
async fn client_view(
    addr: SocketAddr,
    case: &RequestCase,
    want: usize,
    head_request: impl Fn(usize) -> bool,
) -> ClientView {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the proxy");
    let _ = stream.set_nodelay(true);
    write_pieces(&mut stream, &case.bytes, &case.splits).await;
    let mut view = ClientView {
        responses: Vec::new(),
        closed_early: false,
        error: None,
    };
    let mut buf = Vec::new();
    let mut eof = false;
    let mut half_closed = false;
    loop {
        // Take every complete response in hand.
        loop {
            match parse_response(&buf, head_request(view.responses.len()), eof) {
                Ok(Step::Response(response, used)) => {
                    buf.drain(..used);
                    view.responses.push(response);
                }
                Ok(Step::Interim(used)) => {
                    buf.drain(..used);
                }
                Ok(Step::NeedMore) => break,
                Err(e) => {
                    view.error = Some(e);
                    return view;
                }
            }
            if eof && buf.is_empty() {
                break;
            }
        }
        if eof {
            return view;
        }
        if view.responses.len() >= want && !half_closed {
            // All the answers hyper's view calls for are in: end the stream, so whatever else
            // the proxy would still send (an answer to a message hyper did not see) shows up
            // before it closes.
            let _ = stream.shutdown().await;
            half_closed = true;
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(BACKSTOP, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                eof = true;
                view.closed_early = !half_closed;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                view.error = Some(format!(
                    "the proxy neither answered nor closed within {BACKSTOP:?} ({} of {want} answers in)",
                    view.responses.len()
                ));
                return view;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request side: the allow-list.

/// Why the proxy may refuse a request hyper accepts: `Some(reason)` when the refusal (status and
/// JSON code of the proxy's answer; no code in an answer to HEAD, which has no body) is on the
/// list for `parsed` (hyper's view of the request, and the head as generated when known).
/// Anything else the proxy refuses is a failure.
pub fn allowed_refusal(parsed: &Parsed, head: Option<&[u8]>, status: u16, code: Option<&str>) -> Option<&'static str> {
    let is = |want_status: u16, want_code: &str| status == want_status && code.is_none_or(|c| c == want_code);
    let loopback = |host: &str| {
        let host = host.trim_start_matches('[').split(']').next().unwrap_or(host);
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    if parsed.method == "CONNECT" && is(405, "METHOD_NOT_ALLOWED") {
        return Some("CONNECT: the proxy is not a forward proxy (guard: 405)");
    }
    if let Some(authority) = parsed.uri.authority() {
        if !loopback(authority.host()) && is(400, "BAD_REQUEST") {
            return Some(
                "an absolute-form target naming another host: the proxy forwards only to its upstream (guard: 400)",
            );
        }
    }
    if let Some(host) = parsed.headers.get(http::header::HOST) {
        let host = String::from_utf8_lossy(host.as_bytes());
        let name = if host.starts_with('[') {
            host.split(']').next().unwrap_or("").trim_start_matches('[').to_string()
        } else {
            host.rsplit_once(':').map_or(host.to_string(), |(h, _)| h.to_string())
        };
        if !loopback(&name) && is(421, "FORBIDDEN_HOST") {
            return Some("a Host that is not a loopback name: DNS rebinding (guard: 421)");
        }
    }
    if parsed.headers.contains_key(http::header::ORIGIN) && is(403, "FORBIDDEN_ORIGIN") {
        return Some("a browser Origin (guard: 403)");
    }
    if head.is_some_and(unsupported_coding) && is(400, "BAD_REQUEST") {
        return Some(
            "a Transfer-Encoding other than one `chunked` (gzip, chunked; chunked twice; two \
             headers): re-framing would drop the coding (server/framing.rs, docs/design-notes.md)",
        );
    }
    if matches!(parsed.method.as_str(), "TRACE" | "TRACK") && (400..500).contains(&status) {
        return Some("TRACE/TRACK echo the request, injected key included, back to the caller");
    }
    if parsed.uri.scheme().is_none()
        && parsed.uri.authority().is_some()
        && (is(400, "BAD_REQUEST") || is(405, "METHOD_NOT_ALLOWED"))
    {
        return Some(
            "an authority-form target: only CONNECT uses it (RFC 9112 §3.2.3), and the proxy makes no tunnels",
        );
    }
    let has_body = parsed.body.as_ref().is_some_and(|b| !b.is_empty())
        || parsed.headers.contains_key(http::header::TRANSFER_ENCODING);
    if websocket_handshake(&parsed.headers) && has_body && is(400, "BAD_REQUEST") {
        return Some("a WebSocket handshake with a body: after a 101 the bytes that follow the head are the tunnel's (RFC 6455 §4.1 sends none)");
    }
    None
}

/// `Connection: upgrade` with `Upgrade: websocket`: what the proxy tunnels.
fn websocket_handshake(headers: &HeaderMap) -> bool {
    let has = |name: http::header::HeaderName, token: &[u8]| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    };
    has(http::header::CONNECTION, b"upgrade") && has(http::header::UPGRADE, b"websocket")
}

/// A `Transfer-Encoding` other than a single `chunked`, as the client wrote it: the coding the
/// proxy refuses because it could not forward it. (`Content-Length` beside it, or repeated with
/// one value, is hyper's to read: the proxy forwards hyper's reading.)
pub fn unsupported_coding(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let codings: Vec<&[u8]> = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        .map(|h| h.value)
        .collect();
    codings.len() > 1
        || codings
            .first()
            .is_some_and(|c| !c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

// ---------------------------------------------------------------------------------------------
// Request side: the property.

/// What a run exercised, so that a property that passes can be seen to have said something.
#[derive(Debug, Default)]
pub struct Coverage {
    pub cases: usize,
    /// Requests hyper parsed whole.
    pub parsed: usize,
    /// Requests the proxy forwarded (and the upstream parsed whole).
    pub forwarded: usize,
    /// Cases where hyper refused a head or a body.
    pub hyper_refused: usize,
    /// Cases that ended inside a message.
    pub incomplete: usize,
    /// Refusals on the allow-list, by reason.
    pub allowed: BTreeMap<&'static str, usize>,
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} cases: {} messages parsed by hyper, {} forwarded, {} cases refused by hyper, {} ending mid-message",
            self.cases, self.parsed, self.forwarded, self.hyper_refused, self.incomplete
        )?;
        for (reason, n) in &self.allowed {
            writeln!(f, "  {n} allowed: {reason}")?;
        }
        Ok(())
    }
}

/// One proxy in front of one recording upstream, for many cases in a row.
pub struct RequestHarness {
    pub proxy: Proxy,
    pub upstream: RecordingUpstream,
    next_id: AtomicU64,
    /// The last case checked, for a record that arrives after its case ended.
    previous: Mutex<Option<String>>,
    pub coverage: Mutex<Coverage>,
}

impl RequestHarness {
    pub async fn start() -> RequestHarness {
        let upstream = RecordingUpstream::start().await;
        let proxy = Proxy::start(&format!("http://{}", upstream.addr)).await;
        RequestHarness {
            proxy,
            upstream,
            next_id: AtomicU64::new(1),
            previous: Mutex::new(None),
            coverage: Mutex::default(),
        }
    }

    /// A fresh case id (tags tell cases apart).
    pub fn case_from_choices(&self, choices: &[u8]) -> RequestCase {
        RequestCase::from_choices(self.next_id.fetch_add(1, Ordering::SeqCst), choices)
    }

    /// The property for one case: `Err` says how the proxy diverged from hyper.
    pub async fn check(&self, case: &RequestCase) -> Result<(), String> {
        let late = self.upstream.take_new();
        if !late.is_empty() {
            let previous = lock(&self.previous).clone().unwrap_or_default();
            return Err(format!(
                "the upstream received {} request(s) after their case had ended (forwarded although \
                 the client had its answers): {:?}\nthat case: {previous}",
                late.len(),
                late.iter().map(|(_, p)| (&p.method, &p.target)).collect::<Vec<_>>()
            ));
        }
        *lock(&self.previous) = Some(case.describe());
        let reference = hyper_server_view(&case.bytes, &case.splits).await;
        let complete = reference.complete().len();
        let want = complete + usize::from(reference.end == RefEnd::Refused);
        // Which answers are to HEAD requests (they carry no body): hyper's messages in order,
        // then the generated one after the last of them.
        let methods: Vec<String> = {
            let mut m: Vec<String> = reference.parsed.iter().map(|p| p.method.clone()).collect();
            let next = reference
                .parsed
                .last()
                .and_then(|p| p.tag())
                .and_then(|t| t.rsplit_once('.').and_then(|(_, i)| i.parse::<usize>().ok()))
                .map_or(m.len(), |i| i + 1);
            m.extend(case.messages.iter().skip(next).map(|g| g.method.to_string()));
            m
        };
        let view = client_view(self.proxy.addr, case, want, |i| {
            methods.get(i).is_some_and(|m| m == "HEAD")
        })
        .await;
        let forwarded = self.upstream.take_new();
        let verdict = judge(case, &reference, &view, &forwarded);
        if let Ok(allowed) = &verdict {
            let mut coverage = lock(&self.coverage);
            coverage.cases += 1;
            coverage.parsed += complete;
            coverage.forwarded += forwarded.len();
            coverage.hyper_refused += usize::from(reference.end == RefEnd::Refused);
            coverage.incomplete += usize::from(reference.end == RefEnd::Incomplete);
            for reason in allowed {
                *coverage.allowed.entry(reason).or_default() += 1;
            }
        }
        verdict.map(drop).map_err(|why| {
            format!(
                "{why}\n  case: {}\n  hyper parsed: {}\n  hyper's end: {:?} {}\n  the client got: {}{}{}\n  the upstream got: {}",
                case.describe(),
                summarize_parsed(&reference.parsed),
                reference.end,
                reference.error.as_deref().unwrap_or(""),
                view.responses.iter().map(ClientResponse::summary).collect::<Vec<_>>().join(", "),
                if view.closed_early { ", then the proxy closed" } else { "" },
                view.error.as_deref().map(|e| format!(", then: {e}")).unwrap_or_default(),
                summarize_parsed(&forwarded.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>()),
            )
        })
    }
}

fn summarize_parsed(parsed: &[Parsed]) -> String {
    if parsed.is_empty() {
        return "nothing".into();
    }
    parsed
        .iter()
        .map(|p| {
            format!(
                "{} {} {:?} body {}",
                p.method,
                p.target,
                end_to_end(&p.headers, &[], &[]),
                p.body.as_deref().map_or("(incomplete)".to_string(), show)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The verdict for one request case: the allowed refusals it met, or what diverged.
fn judge(
    case: &RequestCase,
    reference: &Reference,
    view: &ClientView,
    forwarded: &[(u64, Parsed)],
) -> Result<Vec<&'static str>, String> {
    let mut allowed = Vec::new();
    if let Some(e) = &view.error {
        return Err(format!("the client's connection: {e}"));
    }
    let complete = reference.complete();
    let mut next_record = 0;
    let mut closed_by_refusal = false;
    // The previous answer was an allowed refusal.
    let mut refused_before = false;
    let mut answered = 0;
    for (i, parsed) in complete.iter().enumerate() {
        let Some(response) = view.responses.get(i) else {
            if refused_before {
                // A refusal that leaves a body unread closes the connection: where the next
                // request would start is not known without reading it.
                closed_by_refusal = true;
                break;
            }
            return Err(format!(
                "hyper parsed request {} ({} {}) whole, and the proxy closed without answering it",
                i + 1,
                parsed.method,
                parsed.target
            ));
        };
        answered += 1;
        refused_before = false;
        if let Some(seq) = response.upstream_seq() {
            let Some((record_seq, record)) = forwarded.get(next_record) else {
                return Err(format!(
                    "answer {} names upstream request #{seq}, which is not this case's",
                    i + 1
                ));
            };
            if *record_seq != seq {
                return Err(format!(
                    "answer {} is the upstream's answer to request #{seq}, but the request forwarded next was #{record_seq}: answers out of order",
                    i + 1
                ));
            }
            next_record += 1;
            let named = connection_tokens(&parsed.headers);
            let (want, got) = (parsed.compared(&named), record.compared(&named));
            if want != got {
                return Err(format!(
                    "request {} reached the upstream changed:\n    hyper parsed {want:?}\n    the upstream got {got:?}",
                    i + 1
                ));
            }
            continue;
        }
        let head = case.generated(parsed).map(|g| g.head.as_slice());
        match response.proxy_error() {
            Some(code) if allowed_refusal(parsed, head, response.status, code.as_deref()).is_some() => {
                allowed.extend(allowed_refusal(parsed, head, response.status, code.as_deref()));
                if response.closes() {
                    closed_by_refusal = true;
                    break;
                }
                refused_before = true;
            }
            Some(code) => {
                return Err(format!(
                    "the proxy refused request {} ({} {}) with {} {}, which hyper accepts, and that refusal is not on the allow-list",
                    i + 1,
                    parsed.method,
                    parsed.target,
                    response.status,
                    code.unwrap_or_default()
                ))
            }
            None if response.header("x-request-id").is_some() => {
                return Err(format!(
                    "request {} ({} {}) was forwarded in a form the upstream's hyper refused ({})",
                    i + 1,
                    parsed.method,
                    parsed.target,
                    response.summary()
                ))
            }
            None => {
                return Err(format!(
                    "the proxy's HTTP layer refused request {} ({} {}), which hyper accepts: {}",
                    i + 1,
                    parsed.method,
                    parsed.target,
                    response.summary()
                ))
            }
        }
    }
    if next_record < forwarded.len() {
        let (seq, extra) = &forwarded[next_record];
        return Err(format!(
            "the proxy forwarded a request hyper did not parse whole: #{seq} {} {}",
            extra.method, extra.target
        ));
    }
    // Answers past those hyper's messages call for: only a refusal of the message hyper refused
    // or had not seen the end of, never an upstream's answer.
    let extra = &view.responses[answered..];
    let trailing_allowed = !closed_by_refusal
        && (reference.end == RefEnd::Refused
            || reference.parsed.len() > complete.len()
            || reference.end == RefEnd::Incomplete);
    match extra {
        [] => Ok(allowed),
        [one] if trailing_allowed && one.upstream_seq().is_none() && one.status >= 400 => Ok(allowed),
        [first, ..] => Err(format!(
            "the proxy answered more than hyper's view calls for: {} after {} answer(s) (hyper ended {:?})",
            first.summary(),
            answered,
            reference.end
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Response side: generation.

/// An upstream's response bytes, and the request the client makes for them.
#[derive(Debug, Clone)]
pub struct ResponseCase {
    pub id: u64,
    pub method: &'static str,
    pub bytes: Vec<u8>,
    pub splits: Vec<usize>,
}

impl ResponseCase {
    pub fn raw(method: &'static str, bytes: &[u8]) -> ResponseCase {
        ResponseCase {
            id: 0,
            method,
            bytes: bytes.to_vec(),
            splits: Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} answered with {} written in pieces cut at {:?}",
            self.method,
            show(&self.bytes),
            self.splits
        )
    }

    /// Build a response (1xx heads, then a final one) from choice bytes.
    pub fn from_choices(id: u64, choices: &[u8]) -> ResponseCase {
        let mut c = Choices::new(choices);
        let method = if c.rare(48) { c.pick(&["HEAD", "POST"]) } else { "GET" };
        let mut bytes = Vec::new();
        if c.rare(40) {
            for _ in 0..1 + c.below(2) {
                bytes.extend_from_slice(c.pick(INTERIM).as_bytes());
            }
        }
        response_message(&mut c, &mut bytes);
        let splits = splits(&mut c, bytes.len());
        ResponseCase {
            id,
            method,
            bytes,
            splits,
        }
    }
}

/// Interim heads; the last, an unasked 101, is drawn less often (it ends every exchange).
const INTERIM: &[&str] = &[
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    "HTTP/1.1 102 Processing\r\n\r\n",
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    "HTTP/1.1 102 Processing\r\n\r\n",
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
];
/// Final statuses. Not 401 (the proxy refreshes the key and resends), 429 or 503 (it pauses
/// and resends): those are the retry logic's, not HTTP framing.
const STATUSES: &[&str] = &[
    "200 OK",
    "201 Created",
    "204 No Content",
    "304 Not Modified",
    "404 Not Found",
    "500 Internal Server Error",
];
const ODD_STATUSES: &[&str] = &[
    "206 Partial Content",
    "299 Whatever",
    "200",
    "200 ",
    "418 I'm a teapot",
    "600 Beyond",
    "99 Low",
    "2000 What",
    "200 \u{e9}t\u{e9}",
];
const RESPONSE_HEADERS: &[&str] = &[
    "Content-Type: text/plain",
    "x-up: 1",
    "Set-Cookie: a=1",
    "Set-Cookie: b=2",
    "Connection: keep-alive",
    "Connection: close",
    "Keep-Alive: timeout=5",
    "Connection: x-hop",
    "x-hop: 1",
    "Trailer: x-t",
    "x-obs: caf\u{e9}",
    "x-empty:",
    "Cache-Control: no-cache",
    "Proxy-Authenticate: Basic",
];
const RESPONSE_BODIES: &[&str] = &["hello world", "", "data: 1\n\n", "0\r\n\r\n"];

#[derive(Clone, Copy)]
enum RespFraming {
    Close,
    Length,
    LengthTwiceEqual,
    LengthTwiceDifferent,
    LengthLonger,
    LengthShorter,
    LengthJunk(usize),
    Chunked,
    ChunkedAndLength,
    TransferCodings(&'static str),
}

const RESPONSE_CODINGS: &[&str] = &["gzip, chunked", "gzip", "chunked, gzip", "Chunked", "identity"];

fn response_message(c: &mut Choices<'_>, bytes: &mut Vec<u8>) {
    let version = if c.rare(24) { "HTTP/1.0" } else { "HTTP/1.1" };
    let status = if c.rare(40) {
        c.pick(ODD_STATUSES)
    } else {
        c.pick(STATUSES)
    };
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for _ in 0..c.below(4) {
        lines.push(c.pick(RESPONSE_HEADERS).as_bytes().to_vec());
    }
    let body = c.pick(RESPONSE_BODIES).as_bytes().to_vec();
    let len = body.len();
    let framing = match c.below(16) {
        0..=2 => RespFraming::Close,
        3..=7 => RespFraming::Length,
        8..=10 => RespFraming::Chunked,
        11 => RespFraming::LengthTwiceEqual,
        12 if c.rare(128) => RespFraming::LengthTwiceDifferent,
        12 => RespFraming::LengthJunk(c.below(LENGTH_JUNK.len())),
        13 => c.pick(&[RespFraming::LengthLonger, RespFraming::LengthShorter]),
        14 => RespFraming::ChunkedAndLength,
        _ => RespFraming::TransferCodings(c.pick(RESPONSE_CODINGS)),
    };
    let cl = |v: usize| format!("Content-Length: {v}").into_bytes();
    let mut chunked = false;
    match framing {
        RespFraming::Close => {}
        RespFraming::Length => lines.push(cl(len)),
        RespFraming::LengthTwiceEqual => lines.extend([cl(len), cl(len)]),
        RespFraming::LengthTwiceDifferent => lines.extend([cl(len), cl(len + 1)]),
        RespFraming::LengthLonger => lines.push(cl(len + 3)),
        RespFraming::LengthShorter => lines.push(cl(len.saturating_sub(2))),
        RespFraming::LengthJunk(which) => {
            lines.push(format!("Content-Length: {}", LENGTH_JUNK[which].replace("{}", &len.to_string())).into_bytes())
        }
        RespFraming::Chunked => {
            lines.push(b"Transfer-Encoding: chunked".to_vec());
            chunked = true;
        }
        RespFraming::ChunkedAndLength => {
            lines.push(b"Transfer-Encoding: chunked".to_vec());
            lines.push(cl(len));
            chunked = true;
        }
        RespFraming::TransferCodings(codings) => {
            lines.push(format!("Transfer-Encoding: {codings}").into_bytes());
            chunked = codings.to_ascii_lowercase().ends_with("chunked");
        }
    }
    if c.rare(32) {
        let at = c.below(lines.len() + 1);
        let broken: &[u8] = c.pick(&[
            b" folded continuation".as_slice(),
            b"X-Space : before colon",
            b"X-Nul: a\0b",
            b"Bad Name: x",
            b"x-colonless",
        ]);
        lines.insert(at, broken.to_vec());
    }
    let bare_lf = c.rare(16);
    let eol: &[u8] = if bare_lf { b"\n" } else { b"\r\n" };
    bytes.extend_from_slice(format!("{version} {status}").as_bytes());
    bytes.extend_from_slice(eol);
    for line in &lines {
        bytes.extend_from_slice(line);
        bytes.extend_from_slice(eol);
    }
    bytes.extend_from_slice(if c.rare(16) { b"\n" } else { eol });
    if chunked {
        bytes.extend_from_slice(&chunked_body(c, &body));
    } else {
        bytes.extend_from_slice(&body);
    }
}

// ---------------------------------------------------------------------------------------------
// Response side: the scripted upstream and both views.

/// A plain-TCP upstream that answers `GET /r/<id>` with case `<id>`'s bytes, written in its
/// pieces, then closes the connection (so close-delimited bodies end, and nothing is reused).
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    scripts: Arc<Mutex<BTreeMap<u64, ResponseCase>>>,
    /// Requests received per case.
    received: Arc<Mutex<BTreeMap<u64, usize>>>,
}

impl ScriptedUpstream {
    pub async fn start() -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the scripted upstream");
        let addr = listener.local_addr().expect("upstream address");
        let scripts: Arc<Mutex<BTreeMap<u64, ResponseCase>>> = Arc::default();
        let received: Arc<Mutex<BTreeMap<u64, usize>>> = Arc::default();
        let (s, r) = (scripts.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (scripts, received) = (s.clone(), r.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    serve_script(tcp, &scripts, &received).await;
                });
            }
        });
        ScriptedUpstream {
            addr,
            scripts,
            received,
        }
    }

    fn received(&self, id: u64) -> usize {
        lock(&self.received).get(&id).copied().unwrap_or(0)
    }
}

/// Read one request (head, and a `Content-Length` body), answer it from its script, close.
async fn serve_script(
    mut tcp: TcpStream,
    scripts: &Mutex<BTreeMap<u64, ResponseCase>>,
    received: &Mutex<BTreeMap<u64, usize>>,
) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(&buf[..head_end]), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let id = request
        .path
        .and_then(|p| p.strip_prefix("/r/"))
        .and_then(|id| id.parse::<u64>().ok());
    let length = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let Some(id) = id else { return };
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    *lock(received).entry(id).or_default() += 1;
    let Some(script) = lock(scripts).get(&id).cloned() else {
        return;
    };
    write_pieces(&mut tcp, &script.bytes, &script.splits).await;
    let _ = tcp.shutdown().await;
}

/// A response as a hyper client saw it.
#[derive(Debug)]
pub enum Seen {
    /// hyper refused the head (or the connection ended first).
    Refused(String),
    Answered {
        status: u16,
        headers: HeaderMap,
        /// The body, or why it did not end well.
        body: Result<Bytes, String>,
    },
}

impl Seen {
    fn summary(&self) -> String {
        match self {
            Seen::Refused(e) => format!("refused: {e}"),
            Seen::Answered { status, headers, body } => format!(
                "{status} {:?} body {}",
                end_to_end(headers, &[], &[]),
                match body {
                    Ok(b) => show(b),
                    Err(e) => format!("(failed: {e})"),
                }
            ),
        }
    }
}

/// One request over a fresh hyper HTTP/1.1 client connection to `addr`.
async fn hyper_client_view(addr: SocketAddr, method: &str, id: u64) -> Seen {
    let tcp = match TcpStream::connect(addr).await {
        Ok(tcp) => tcp,
        Err(e) => return Seen::Refused(format!("connect: {e}")),
    };
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(pair) => pair,
        Err(e) => return Seen::Refused(format!("handshake: {e}")),
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let body = if method == "POST" {
        Bytes::from_static(b"ping")
    } else {
        Bytes::new()
    };
    let request = Request::builder()
        .method(method)
        .uri(format!("/r/{id}"))
        .header("host", "127.0.0.1")
        .body(Full::new(body))
        .expect("a valid request");
    let response = match tokio::time::timeout(BACKSTOP, sender.send_request(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return Seen::Refused(describe_hyper_error(&e)),
        Err(_) => return Seen::Refused(format!("no response head within {BACKSTOP:?}")),
    };
    let (parts, body) = response.into_parts();
    let body = match tokio::time::timeout(BACKSTOP, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) => Err(describe_hyper_error(&e)),
        Err(_) => Err(format!("the body did not end within {BACKSTOP:?}")),
    };
    Seen::Answered {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

fn describe_hyper_error(e: &hyper::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Why the proxy may answer 502 where hyper's client accepts the response: `Some(reason)`
/// when the case is on the list. Anything else is a failure.
pub fn allowed_upstream_refusal(case: &ResponseCase, status: u16, body_failed: bool) -> Option<&'static str> {
    if status == 101 {
        return Some(
            "an unasked 101: nothing on this path asked to upgrade, so what follows on the connection \
             is not HTTP; hyper's client hands such a response to the caller as an upgrade",
        );
    }
    if body_failed {
        return Some(
            "a body hyper's client fails after passing on the head: the proxy had read the failing \
             start of the body together with the head, so it answers 502 rather than a head whose \
             body then breaks",
        );
    }
    let bodiless = case.method == "HEAD" || status == 204 || status == 304;
    if bodiless && length_is_unusable(&case.bytes) {
        return Some(
            "a malformed or conflicting Content-Length on an answer without a body (HEAD, 204, 304): \
             hyper's client never reads that length; the proxy would pass it on to its client, so it \
             refuses the answer",
        );
    }
    None
}

/// The final head's `Content-Length`s are not one decimal number (bad, or different values).
fn length_is_unusable(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = response.parse(rest) else {
            return false;
        };
        if response.code.is_some_and(|c| (100..200).contains(&c) && c != 101) {
            rest = &rest[n..];
            continue;
        }
        let values: Vec<&[u8]> = response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| h.value.trim_ascii())
            .collect();
        let decimal = |v: &[u8]| !v.is_empty() && v.iter().all(u8::is_ascii_digit);
        return values.iter().any(|v| !decimal(v)) || values.windows(2).any(|w| w[0] != w[1]);
    }
}

/// What a response run exercised.
#[derive(Debug, Default)]
pub struct ResponseCoverage {
    pub cases: usize,
    /// Answers hyper's client read whole, and passed whole through the proxy.
    pub whole: usize,
    /// Heads hyper's client refused (and the proxy answered 502).
    pub refused_heads: usize,
    /// Bodies that failed both ways.
    pub failed_bodies: usize,
    /// Answers on the allow-list, by reason.
    pub allowed: BTreeMap<&'static str, usize>,
    /// Final statuses hyper's client saw.
    pub statuses: BTreeMap<u16, usize>,
}

impl std::fmt::Display for ResponseCoverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} cases: {} answers passed whole, {} heads refused by both, {} bodies failed both ways; statuses {:?}",
            self.cases, self.whole, self.refused_heads, self.failed_bodies, self.statuses
        )?;
        for (reason, n) in &self.allowed {
            writeln!(f, "  {n} allowed: {reason}")?;
        }
        Ok(())
    }
}

/// How one response case came out, when it passed.
enum ResponseOutcome {
    Whole,
    RefusedHead,
    FailedBody,
    Allowed(&'static str),
}

/// One proxy in front of one scripted upstream, for many cases in a row.
pub struct ResponseHarness {
    pub proxy: Proxy,
    pub upstream: ScriptedUpstream,
    next_id: AtomicU64,
    pub coverage: Mutex<ResponseCoverage>,
}

impl ResponseHarness {
    pub async fn start() -> ResponseHarness {
        let upstream = ScriptedUpstream::start().await;
        let proxy = Proxy::start(&format!("http://{}", upstream.addr)).await;
        ResponseHarness {
            proxy,
            upstream,
            next_id: AtomicU64::new(1),
            coverage: Mutex::default(),
        }
    }

    pub fn case_from_choices(&self, choices: &[u8]) -> ResponseCase {
        ResponseCase::from_choices(self.next_id.fetch_add(1, Ordering::SeqCst), choices)
    }

    /// The property for one case: `Err` says how the proxy diverged from hyper.
    pub async fn check(&self, case: &ResponseCase) -> Result<(), String> {
        let mut case = case.clone();
        if case.id == 0 {
            case.id = self.next_id.fetch_add(1, Ordering::SeqCst);
        }
        lock(&self.upstream.scripts).insert(case.id, case.clone());
        let reference = hyper_client_view(self.upstream.addr, case.method, case.id).await;
        let mut through_proxy = hyper_client_view(self.proxy.addr, case.method, case.id).await;
        // A pooled connection the upstream had closed (it closes after every answer) can take
        // a request that never reaches it: the proxy's 502 then says nothing about framing.
        for _ in 0..3 {
            if self.upstream.received(case.id) >= 2 || !is_proxy_502(&through_proxy) {
                break;
            }
            through_proxy = hyper_client_view(self.proxy.addr, case.method, case.id).await;
        }
        lock(&self.upstream.scripts).remove(&case.id);
        let verdict = judge_response(&case, &reference, &through_proxy);
        if let Ok(outcome) = &verdict {
            let mut coverage = lock(&self.coverage);
            coverage.cases += 1;
            if let Seen::Answered { status, .. } = &reference {
                *coverage.statuses.entry(*status).or_default() += 1;
            }
            match outcome {
                ResponseOutcome::Whole => coverage.whole += 1,
                ResponseOutcome::RefusedHead => coverage.refused_heads += 1,
                ResponseOutcome::FailedBody => coverage.failed_bodies += 1,
                ResponseOutcome::Allowed(reason) => *coverage.allowed.entry(reason).or_default() += 1,
            }
        }
        verdict.map(drop).map_err(|why| {
            format!(
                "{why}\n  case: {}\n  hyper's client saw: {}\n  through the proxy: {}",
                case.describe(),
                reference.summary(),
                through_proxy.summary()
            )
        })
    }
}

fn proxy_code(seen: &Seen) -> Option<String> {
    let Seen::Answered { body: Ok(body), .. } = seen else {
        return None;
    };
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    json.get("code")?.as_str().map(str::to_string)
}

/// The proxy's own 502 `UPSTREAM_UNAVAILABLE` (to HEAD it has no body, so no code: a JSON
/// 502 with the proxy's request id).
fn is_proxy_502(seen: &Seen) -> bool {
    let Seen::Answered {
        status: 502,
        headers,
        body,
    } = seen
    else {
        return false;
    };
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/json");
    let empty = body.as_ref().is_ok_and(|b| b.is_empty());
    proxy_code(seen).as_deref() == Some("UPSTREAM_UNAVAILABLE")
        || (json && empty && headers.contains_key("x-request-id"))
}

/// The verdict for one response case.
fn judge_response(case: &ResponseCase, reference: &Seen, through_proxy: &Seen) -> Result<ResponseOutcome, String> {
    let Seen::Answered {
        status: got_status,
        headers: got_headers,
        body: got_body,
    } = through_proxy
    else {
        return Err("the proxy gave its client no response".into());
    };
    // The proxy's own framing, whatever the upstream sent: what hyper's server would write.
    let lengths = got_headers.get_all(http::header::CONTENT_LENGTH).iter().count();
    if lengths > 1 {
        return Err(format!("the client got {lengths} Content-Length headers"));
    }
    if lengths > 0 && (*got_status == 204 || (100..200).contains(got_status)) {
        return Err(format!(
            "the client got a Content-Length on a {got_status} (RFC 9110 §8.6: never on 1xx or 204)"
        ));
    }
    match reference {
        Seen::Refused(why) => {
            if is_proxy_502(through_proxy) {
                Ok(ResponseOutcome::RefusedHead)
            } else {
                Err(format!(
                    "hyper's client refused the response ({why}); the proxy passed it on"
                ))
            }
        }
        Seen::Answered { status, headers, body } => {
            if is_proxy_502(through_proxy) && *status != 502 {
                return match allowed_upstream_refusal(case, *status, body.is_err()) {
                    Some(reason) => Ok(ResponseOutcome::Allowed(reason)),
                    None => Err(format!(
                        "hyper's client accepted the response ({status}); the proxy answered 502 UPSTREAM_UNAVAILABLE, and that is not on the allow-list"
                    )),
                };
            }
            if status != got_status {
                return Err(format!("status {status} became {got_status}"));
            }
            let skip = RESPONSE_HEADERS_NOT_COMPARED;
            let want = end_to_end(headers, &connection_tokens(headers), skip);
            let got = end_to_end(got_headers, &connection_tokens(headers), skip);
            if want != got {
                return Err(format!("the headers changed:\n    hyper: {want:?}\n    proxy: {got:?}"));
            }
            match (body, got_body) {
                (Ok(a), Ok(b)) if a == b => Ok(ResponseOutcome::Whole),
                (Err(_), Err(_)) => Ok(ResponseOutcome::FailedBody),
                (Ok(a), Ok(b)) => Err(format!("the body {} became {}", show(a), show(b))),
                (Ok(a), Err(e)) => Err(format!(
                    "hyper's client read the body {} whole; through the proxy it failed: {e}",
                    show(a)
                )),
                (Err(e), Ok(b)) => Err(format!(
                    "hyper's client refused the body ({e}); through the proxy it arrived as {}",
                    show(b)
                )),
            }
        }
    }
}
