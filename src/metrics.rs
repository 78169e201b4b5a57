//! The metric families (prometheus-client), one registry per running proxy.
//!
//! Hot paths never look a label set up per request: each limit class clones its counters,
//! gauges and histograms once at start (a clone shares the same atomic), so counting costs an
//! atomic add. Labels are class names, reasons and status codes: never a key, token or path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub class: String,
    /// `queue_full` or `queue_timeout`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabels {
    pub class: String,
    /// 429 or 503.
    pub status: u16,
}

fn wait_histogram() -> Histogram {
    // 1 ms to ~65 s: queue waits range from nothing to a full queue_timeout.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    pub registry: Registry,
    pub admitted: Family<ClassLabel, Counter>,
    pub shed: Family<ShedLabels, Counter>,
    pub queue_depth: Family<ClassLabel, Gauge>,
    pub queue_wait: Family<ClassLabel, Histogram, fn() -> Histogram>,
    pub in_flight: Family<ClassLabel, Gauge>,
    pub websockets_active: Family<ClassLabel, Gauge>,
    pub upstream_throttled: Family<ThrottleLabels, Counter>,
    pub upstream_retries: Family<ClassLabel, Counter>,
    pub redis_fallbacks: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("smallest_proxy");
        let metrics = Metrics {
            admitted: Family::default(),
            shed: Family::default(),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(wait_histogram as fn() -> Histogram),
            in_flight: Family::default(),
            websockets_active: Family::default(),
            upstream_throttled: Family::default(),
            upstream_retries: Family::default(),
            redis_fallbacks: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "limit_admitted",
            "Requests admitted by the client-side limits",
            metrics.admitted.clone(),
        );
        registry.register(
            "limit_shed",
            "Requests refused with 429 by the client-side limits",
            metrics.shed.clone(),
        );
        registry.register(
            "limit_queue_depth",
            "Requests waiting for a slot",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "limit_queue_wait_seconds",
            "Time admitted requests waited",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "limit_in_flight",
            "Upstream requests holding a slot",
            metrics.in_flight.clone(),
        );
        registry.register(
            "websockets_active",
            "Open WebSocket tunnels",
            metrics.websockets_active.clone(),
        );
        registry.register(
            "upstream_throttled",
            "Upstream 429 and 503 answers",
            metrics.upstream_throttled.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests resent after an upstream 429 or 503",
            metrics.upstream_retries.clone(),
        );
        registry.register(
            "redis_fallbacks",
            "Times shared limits fell back to local ones because Redis failed",
            metrics.redis_fallbacks.clone(),
        );
        Metrics { registry, ..metrics }
    }

    /// The text exposition format (what /metrics serves).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
