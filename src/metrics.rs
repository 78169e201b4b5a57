//! The metric families (prometheus-client), one registry per running proxy.
//!
//! Hot paths never look a label set up per request: each limit class clones its counters,
//! gauges and histograms once at start (a clone shares the same atomic), so counting costs an
//! atomic add. Labels are class names, reasons and status codes: never a key, token or path.

use arc_swap::ArcSwapOption;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::keys::KeyStore;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub class: String,
    /// The local app (`[[app]]`, or `default`).
    pub app: String,
    /// The status the client got (from the upstream or from the proxy itself).
    pub status: u16,
}

/// The caller of a request that came over the Unix socket (SO_PEERCRED). A uid is not a
/// secret, and the set is bounded by the host's users (`listen.allowed_uids` narrows it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabels {
    pub uid: u32,
}

/// A request a `[[route]]` handed to its fallback: route names (from the config) and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub from: String,
    pub to: String,
    /// `connect`, `timeout`, `503` or `429`.
    pub reason: &'static str,
}

/// A local app (`[[app]]` names are validated: short, label-safe; `default` otherwise).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SttLabels {
    pub app: String,
    /// How the seconds were measured: `wav_header`, `bitrate`, `pcm_bytes`, `connection`.
    pub how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmLabels {
    pub app: String,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppStatusLabels {
    pub app: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~65 s: from a cached voice list to a long TTS stream.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
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
    pub limit_concurrency: Family<ClassLabel, Gauge>,
    pub upstream_throttled: Family<ThrottleLabels, Counter>,
    pub upstream_retries: Family<ClassLabel, Counter>,
    pub redis_fallbacks: Counter,
    pub requests: Family<RequestLabels, Counter>,
    /// Requests over the Unix socket, by the caller's uid.
    pub unix_callers: Family<CallerLabels, Counter>,
    /// From the request head to the end of the response body (the whole stream).
    pub request_duration: Family<ClassLabel, Histogram, fn() -> Histogram>,
    /// From sending to the upstream to its response head.
    pub upstream_latency: Family<ClassLabel, Histogram, fn() -> Histogram>,
    pub request_bytes: Family<ClassLabel, Counter>,
    pub response_bytes: Family<ClassLabel, Counter>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub route_fallbacks: Family<FallbackLabels, Counter>,
    /// Usage per app (`usage`): what the upstream accepted.
    pub usage_tts_characters: Family<AppLabel, Counter>,
    pub usage_stt_seconds: Family<SttLabels, Counter<f64, AtomicU64>>,
    pub usage_stt_unmetered: Family<AppLabel, Counter>,
    pub usage_llm_tokens: Family<LlmLabels, Counter>,
    pub app_auth_failures: Family<AppStatusLabels, Counter>,
    pub budget_refusals: Family<AppLabel, Counter>,
    /// The key store in use (swapped by a reload that changes `[key]`), read at scrape time.
    pub keys: Arc<KeyMetrics>,
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
            limit_concurrency: Family::default(),
            upstream_throttled: Family::default(),
            upstream_retries: Family::default(),
            redis_fallbacks: Counter::default(),
            requests: Family::default(),
            unix_callers: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            upstream_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            config_reloads: Family::default(),
            route_fallbacks: Family::default(),
            usage_tts_characters: Family::default(),
            usage_stt_seconds: Family::default(),
            usage_stt_unmetered: Family::default(),
            usage_llm_tokens: Family::default(),
            app_auth_failures: Family::default(),
            budget_refusals: Family::default(),
            keys: Arc::new(KeyMetrics::default()),
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
            "limit_concurrency",
            "The request limit in force per class (learned when max_concurrent = \"auto\")",
            metrics.limit_concurrency.clone(),
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
        registry.register(
            "requests",
            "Requests answered, by limit class and status",
            metrics.requests.clone(),
        );
        registry.register(
            "unix_caller_requests",
            "Requests answered over the Unix socket, by the caller's uid",
            metrics.unix_callers.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from the request head to the end of the response body",
            metrics.request_duration.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending to the upstream to its response head",
            metrics.upstream_latency.clone(),
        );
        registry.register(
            "request_bytes",
            "Request body bytes received from clients",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body bytes sent to clients",
            metrics.response_bytes.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads (SIGHUP), by result",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "route_fallbacks",
            "Requests a [[route]] sent to its fallback route, by route and reason",
            metrics.route_fallbacks.clone(),
        );
        registry.register(
            "usage_tts_characters",
            "Characters of text sent for synthesis and accepted by the upstream, by app",
            metrics.usage_tts_characters.clone(),
        );
        registry.register(
            "usage_stt_seconds",
            "Seconds of audio sent for transcription and accepted by the upstream, by app and how they were measured",
            metrics.usage_stt_seconds.clone(),
        );
        registry.register(
            "usage_stt_unmetered_requests",
            "Transcription requests whose audio length could not be measured, by app",
            metrics.usage_stt_unmetered.clone(),
        );
        registry.register(
            "usage_llm_tokens",
            "LLM tokens the upstream reported, by app and kind (prompt or completion)",
            metrics.usage_llm_tokens.clone(),
        );
        registry.register(
            "app_upstream_auth_failures",
            "Upstream 401 and 403 answers, by app",
            metrics.app_auth_failures.clone(),
        );
        registry.register(
            "budget_refusals",
            "Requests refused with 429 BUDGET_EXCEEDED, by app",
            metrics.budget_refusals.clone(),
        );
        // Both results exist from the start, so a failure shows as an increase from 0.
        for result in ["success", "failure"] {
            let _ = metrics.config_reloads.get_or_create(&ReloadLabels { result });
        }
        registry.register_collector(Box::new(KeyCollector(metrics.keys.clone())));
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

/// The key's metrics, computed at scrape from the key store in use. A reload that replaces the
/// store folds the old store's counts into `retired_*`, so the counters never go backwards.
#[derive(Debug, Default)]
pub struct KeyMetrics {
    store: ArcSwapOption<KeyStore>,
    retired_rotations: AtomicU64,
    retired_errors: AtomicU64,
    retired_401: AtomicU64,
    retired_403: AtomicU64,
}

impl KeyMetrics {
    /// Report `store` from now on.
    pub fn set_store(&self, store: Arc<KeyStore>) {
        if let Some(old) = self.store.swap(Some(store)) {
            let status = old.status();
            self.retired_rotations.fetch_add(status.rotations, Ordering::Relaxed);
            self.retired_errors.fetch_add(status.refresh_errors, Ordering::Relaxed);
            self.retired_401.fetch_add(status.upstream_401, Ordering::Relaxed);
            self.retired_403.fetch_add(status.upstream_403, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct KeyCollector(Arc<KeyMetrics>);

impl Collector for KeyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.0.store.load().as_ref().map(|store| store.status());
        let (rotations, errors) = status.as_ref().map_or((0, 0), |s| (s.rotations, s.refresh_errors));
        let rotations = ConstCounter::new(rotations + self.0.retired_rotations.load(Ordering::Relaxed));
        rotations.encode(encoder.encode_descriptor(
            "key_rotations",
            "Times the key value changed (the first load does not count)",
            None,
            rotations.metric_type(),
        )?)?;
        let errors = ConstCounter::new(errors + self.0.retired_errors.load(Ordering::Relaxed));
        errors.encode(encoder.encode_descriptor(
            "key_refresh_errors",
            "Failed key fetches",
            None,
            errors.metric_type(),
        )?)?;
        let failures = self.0.store.load().as_ref().map(|store| store.status());
        let mut family = encoder.encode_descriptor(
            "upstream_auth_failures",
            "Upstream 401 and 403 answers (a key the upstream refuses)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (code, count, retired) in [
            (
                "401",
                failures.as_ref().map_or(0, |s| s.upstream_401),
                &self.0.retired_401,
            ),
            (
                "403",
                failures.as_ref().map_or(0, |s| s.upstream_403),
                &self.0.retired_403,
            ),
        ] {
            let counter = ConstCounter::new(count + retired.load(Ordering::Relaxed));
            counter.encode(family.encode_family(&[("status", code)])?)?;
        }
        // Absent until a key is loaded: an age of 0 would read as "just refreshed".
        if let Some(age) = status.and_then(|s| s.age_seconds) {
            let age = ConstGauge::new(age as i64);
            age.encode(encoder.encode_descriptor(
                "key_age_seconds",
                "Seconds since the key in use was fetched",
                None,
                age.metric_type(),
            )?)?;
        }
        Ok(())
    }
}
