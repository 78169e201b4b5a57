//! One request's record, from its head to the end of its response body: the access log line
//! and the per-request metrics (`requests_total`, latency histograms, bytes).
//!
//! [`Exchange`] is created when the request head arrives and shared (an `Arc`) with the request
//! path, which notes what only it knows (queue wait, upstream latency, request body bytes).
//! [`ObservedBody`] wraps the response body and finishes the record exactly once: when the body
//! ends, fails, or is dropped (the client went away), so duration and bytes are the whole
//! stream's, SSE included. A WebSocket handshake's record ends with its `101`; the tunnel is
//! not a request/response and is counted by `websockets_active` instead.
//!
//! Never a header, never the key, never the query string (it may carry secrets): the line holds
//! method, path, status, duration, bytes in and out, request id, class, queue wait, the
//! caller's uid on a Unix socket, its app (`[[app]]`), and the fallback when a `[[route]]`
//! handed the request on. When the path is metered, the record also carries the request's
//! [`super::meter::Metering`], fed the body bytes as they pass and committed when the record
//! finishes.

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use super::body::{BodyError, ProxyBody};
use crate::metrics::{CallerLabels, ClassLabel, Metrics, RequestLabels};

/// The `tracing` target of access lines, so a filter can route or silence them alone.
pub const ACCESS_TARGET: &str = "smallest_proxy::access";

/// Not measured (the request never reached that step).
const UNSET: u64 = u64::MAX;

/// One request, as the access log and the metrics see it.
#[derive(Debug)]
pub struct Exchange {
    started: Instant,
    method: Method,
    /// Without the query string.
    path: String,
    class: Arc<ClassHandles>,
    /// The caller's uid (SO_PEERCRED) on a Unix socket; `None` on TCP.
    peer_uid: Option<u32>,
    access_log: bool,
    request_bytes: AtomicU64,
    queue_wait_us: AtomicU64,
    upstream_us: AtomicU64,
    request_id: OnceLock<String>,
    /// `from->to (reason)` when a `[[route]]` handed the request to its fallback.
    fallback: OnceLock<String>,
    /// The local app (`[[app]]`), once the client side identified it.
    app: OnceLock<Arc<str>>,
    /// What the request spends, when its path is metered (`meter`).
    metering: OnceLock<super::meter::Metering>,
}

impl Exchange {
    pub fn new(
        method: Method,
        path: &str,
        class: Arc<ClassHandles>,
        peer_uid: Option<u32>,
        access_log: bool,
    ) -> Exchange {
        Exchange {
            started: Instant::now(),
            method,
            path: path.to_string(),
            class,
            peer_uid,
            access_log,
            request_bytes: AtomicU64::new(0),
            queue_wait_us: AtomicU64::new(UNSET),
            upstream_us: AtomicU64::new(UNSET),
            request_id: OnceLock::new(),
            fallback: OnceLock::new(),
            app: OnceLock::new(),
            metering: OnceLock::new(),
        }
    }

    pub fn set_app(&self, app: Arc<str>) {
        let _ = self.app.set(app);
    }

    /// The request's app; `default` until (or unless) one was identified.
    pub fn app(&self) -> &str {
        self.app.get().map_or(crate::config::DEFAULT_APP_NAME, |a| a)
    }

    pub fn set_metering(&self, metering: super::meter::Metering) {
        let _ = self.metering.set(metering);
    }

    /// A streamed request body's bytes: counted, and shown to the meter (which keeps the first
    /// few of an audio upload to read its header).
    pub fn note_request_data(&self, data: &[u8]) {
        self.add_request_bytes(data.len() as u64);
        if let Some(metering) = self.metering.get() {
            metering.request_data(data);
        }
    }

    fn note_response_data(&self, data: &[u8]) {
        if let Some(metering) = self.metering.get() {
            metering.response_data(data);
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Request body bytes taken from the client (counted once, not per resend).
    pub fn add_request_bytes(&self, n: u64) {
        self.request_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Admission took this long (pacing and queueing included).
    pub fn set_queue_wait(&self, waited: std::time::Duration) {
        self.queue_wait_us.store(waited.as_micros() as u64, Ordering::Relaxed);
    }

    /// The upstream's response head came this long after the request was sent (the attempt
    /// whose answer the client gets, when a request is resent).
    pub fn set_upstream_latency(&self, latency: std::time::Duration) {
        self.upstream_us.store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Kept for the access line only (no copy when the access log is off).
    pub fn set_request_id(&self, id: &str) {
        if self.access_log {
            let _ = self.request_id.set(id.to_string());
        }
    }

    /// The request went to route `to` after route `from` gave it up (access line).
    pub fn note_fallback(&self, from: &str, to: &str, reason: &str) {
        if self.access_log {
            let _ = self.fallback.set(format!("{from}->{to} ({reason})"));
        }
    }

    fn finish(&self, status: StatusCode, response_bytes: u64, outcome: &'static str) {
        let elapsed = self.started.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let class = &self.class;
        class.duration.observe(elapsed.as_secs_f64());
        class.request_bytes.inc_by(request_bytes);
        class.response_bytes.inc_by(response_bytes);
        let upstream_us = self.upstream_us.load(Ordering::Relaxed);
        if upstream_us != UNSET {
            class.upstream_latency.observe(upstream_us as f64 / 1e6);
        }
        class.count_request(status.as_u16(), self.app());
        if let Some(metering) = self.metering.get() {
            metering.commit(self.app(), status, request_bytes);
        }
        if let Some(uid) = self.peer_uid {
            class.unix_callers.get_or_create(&CallerLabels { uid }).inc();
        }
        if !self.access_log {
            return;
        }
        let queue_wait_us = self.queue_wait_us.load(Ordering::Relaxed);
        let ms = |us: u64| (us != UNSET).then(|| us as f64 / 1000.0);
        tracing::info!(
            target: ACCESS_TARGET,
            method = %self.method,
            path = %self.path,
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            bytes_in = request_bytes,
            bytes_out = response_bytes,
            request_id = self.request_id.get().map_or("-", String::as_str),
            class = %class.name,
            queue_wait_ms = ms(queue_wait_us),
            upstream_ms = ms(upstream_us),
            uid = self.peer_uid,
            fallback = self.fallback.get().map(String::as_str),
            app = self.app(),
            outcome,
            "access"
        );
    }
}

/// One limit class's request metrics, looked up once per run state rather than per request.
#[derive(Debug)]
pub struct ClassHandles {
    pub name: String,
    duration: Histogram,
    upstream_latency: Histogram,
    request_bytes: Counter,
    response_bytes: Counter,
    requests: Family<RequestLabels, Counter>,
    unix_callers: Family<CallerLabels, Counter>,
    /// The `200` series, looked up once on first use: nearly every request ends with it, and
    /// the family lookup (label String copy, hash, lock) was ~500 instructions each (callgrind).
    /// Created lazily so the exposition is the same as before (no series before a 200).
    ok: OnceLock<Counter>,
}

impl ClassHandles {
    fn new(name: &str, metrics: &Arc<Metrics>) -> ClassHandles {
        let label = ClassLabel {
            class: name.to_string(),
        };
        ClassHandles {
            name: name.to_string(),
            duration: metrics.request_duration.get_or_create(&label).clone(),
            upstream_latency: metrics.upstream_latency.get_or_create(&label).clone(),
            request_bytes: metrics.request_bytes.get_or_create(&label).clone(),
            response_bytes: metrics.response_bytes.get_or_create(&label).clone(),
            requests: metrics.requests.clone(),
            unix_callers: metrics.unix_callers.clone(),
            ok: OnceLock::new(),
        }
    }

    fn count_request(&self, status: u16, app: &str) {
        let lookup = || {
            let labels = RequestLabels {
                class: self.name.clone(),
                app: app.to_string(),
                status,
            };
            self.requests.get_or_create(&labels).clone()
        };
        // The cached series is the default app's (the common case without `[[app]]`).
        if status == 200 && app == crate::config::DEFAULT_APP_NAME {
            self.ok.get_or_init(lookup).inc();
        } else {
            lookup().inc();
        }
    }
}

/// Every class's handles, by class name.
#[derive(Debug)]
pub struct RequestMetrics {
    classes: HashMap<String, Arc<ClassHandles>>,
    fallback: Arc<ClassHandles>,
}

impl RequestMetrics {
    pub fn new<'a>(class_names: impl IntoIterator<Item = &'a str>, metrics: &Arc<Metrics>) -> RequestMetrics {
        let classes = class_names
            .into_iter()
            .map(|name| (name.to_string(), Arc::new(ClassHandles::new(name, metrics))))
            .collect();
        RequestMetrics {
            classes,
            fallback: Arc::new(ClassHandles::new(crate::config::DEFAULT_CLASS_NAME, metrics)),
        }
    }

    pub fn class(&self, name: &str) -> Arc<ClassHandles> {
        self.classes.get(name).unwrap_or(&self.fallback).clone()
    }
}

/// The response body, counted, finishing its [`Exchange`] once it ends or is dropped.
pub struct ObservedBody {
    inner: ProxyBody,
    exchange: Option<Arc<Exchange>>,
    status: StatusCode,
    bytes: u64,
}

impl ObservedBody {
    pub fn new(inner: ProxyBody, status: StatusCode, exchange: Option<Arc<Exchange>>) -> ObservedBody {
        ObservedBody {
            inner,
            exchange,
            status,
            bytes: 0,
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        if let Some(exchange) = self.exchange.take() {
            exchange.finish(self.status, self.bytes, outcome);
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some(exchange) = &this.exchange {
                        exchange.note_response_data(data);
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish("complete");
                }
            }
            Poll::Ready(None) => this.finish("complete"),
            Poll::Ready(Some(Err(_))) => this.finish("upstream_error"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // An empty body hyper never polls, or a client that left mid-stream.
        let outcome = if self.inner.is_end_stream() {
            "complete"
        } else {
            "client_gone"
        };
        self.finish(outcome);
    }
}
