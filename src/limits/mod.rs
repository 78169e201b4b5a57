//! Client-side limits: turn the account's concurrency and rate limits into short, fair waits
//! instead of upstream 429s.
//!
//! Every request falls in one class (the longest `[[limits.class]]` path prefix that matches,
//! else the default class). Admission to a class is FIFO and has two steps: pacing (the class's
//! pause after an upstream 429/503, then its GCRA rate, both behind one fair gate so waiters
//! keep their order) and a slot (a fair semaphore for requests, another for WebSocket tunnels,
//! each behind its own fair gate: only the head of a kind's queue waits for a slot, shared or
//! local, so when Redis stops and the class falls back to local slots, the requests already
//! queued keep their places ahead of newer arrivals).
//! The resulting [`Permit`] is RAII: it lives in the response body or the WebSocket tunnel and
//! is released when they end, on every path (errors, client disconnects), so a slot can't leak.
//! A wait past `queue_timeout`, or arriving at a full queue, is shed with a 429.
//!
//! A class's request limit can be learned (`max_concurrent = "auto"`, see `auto.rs`): it then
//! moves at run time, and the semaphore follows it (permits added, or forgotten as they come
//! back).
//!
//! In shared mode (`[limits.shared]`) the rate and the slots live in Redis (see `redis.rs`),
//! and the local semaphores and rate limiter become the fallback while Redis is unreachable.

pub mod auto;
pub mod redis;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{ClassLimits, Concurrency, LimitsConfig};
use crate::metrics::{ClassLabel, Metrics, ShedLabels, ThrottleLabels};
use redis::{SharedLease, SharedStore};

/// First step of the resend backoff after an upstream 429/503 (then ×2 per attempt, full
/// jitter, capped at [`RETRY_BACKOFF_CAP`]).
pub const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Pause when an upstream 429/503 carries no usable `Retry-After`.
pub const DEFAULT_UPSTREAM_PAUSE: Duration = Duration::from_secs(1);

/// What a permit is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An HTTP request: holds a `max_concurrent` slot until its response body ends.
    Request,
    /// A WebSocket tunnel: holds a `max_websockets` slot until it closes. Tunnels do not take a
    /// request slot, or one open live-TTS socket would block every plain request for its
    /// whole life.
    WebSocket,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    QueueFull,
    QueueTimeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shed {
    pub class: String,
    pub reason: ShedReason,
    pub retry_after: Duration,
}

impl Shed {
    pub fn message(&self) -> String {
        match self.reason {
            ShedReason::QueueFull => format!(
                "too many requests are waiting for the {:?} limit; try again shortly",
                self.class
            ),
            ShedReason::QueueTimeout => format!("waited too long for a {:?} slot; try again shortly", self.class),
        }
    }
}

/// All classes, matched by path prefix.
pub struct Limiter {
    /// Named classes' paths: the user's classes first, then the profile's, each group longest
    /// first, so a class the user wrote wins and the most specific path wins within a group.
    prefixes: Vec<(PathPattern, Arc<Class>)>,
    /// Some path has a `*` segment: split the request path into segments once per lookup.
    segmented: bool,
    /// What every class path starts with (up to its first `*`): a request path that does not
    /// is in the default class without looking at each pattern.
    common_prefix: String,
    default: Arc<Class>,
    classes: Vec<Arc<Class>>,
}

impl Limiter {
    pub fn new(config: &LimitsConfig, metrics: &Metrics, shared: Option<Arc<SharedStore>>) -> Limiter {
        Self::named(crate::config::DEFAULT_CLASS_NAME, config, metrics, shared)
    }

    /// A limiter whose default class is called `default_class` (a `[[route]]`'s name, so its
    /// metrics and Redis keys stay apart from the default route's).
    pub fn named(
        default_class: &str,
        config: &LimitsConfig,
        metrics: &Metrics,
        shared: Option<Arc<SharedStore>>,
    ) -> Limiter {
        let mut default_limits = config.default_class();
        default_limits.name = default_class.to_string();
        let default = Arc::new(Class::new(default_limits, metrics, shared.clone()));
        let mut classes = vec![default.clone()];
        let mut prefixes = Vec::new();
        for mut limits in config.classes() {
            // A route's own profile classes carry the route's name, like its default class:
            // class names label metrics and key Redis state, so two routes' `tts` stay apart.
            if limits.from_profile && default_class != crate::config::DEFAULT_CLASS_NAME {
                limits.name = format!("{default_class}.{}", limits.name);
            }
            let class = Arc::new(Class::new(limits, metrics, shared.clone()));
            for path in &class.limits.paths {
                prefixes.push((PathPattern::new(path), class.clone()));
            }
            classes.push(class);
        }
        prefixes.sort_by_key(|(pattern, class)| (class.limits.from_profile, std::cmp::Reverse(pattern.len())));
        let segmented = prefixes.iter().any(|(p, _)| matches!(p, PathPattern::Segments { .. }));
        let common_prefix = common_prefix(prefixes.iter().map(|(pattern, _)| pattern.literal_start()));
        Limiter {
            prefixes,
            segmented,
            common_prefix,
            default,
            classes,
        }
    }

    pub fn class_for(&self, path: &str) -> &Arc<Class> {
        if !path.starts_with(self.common_prefix.as_str()) {
            return &self.default;
        }
        // The path's first segments, split once for every `*` pattern (no allocation).
        let mut segments = [""; PathPattern::MAX_SEGMENTS];
        let mut count = 0;
        if self.segmented {
            for segment in path.split('/').skip(1).take(PathPattern::MAX_SEGMENTS) {
                segments[count] = segment;
                count += 1;
            }
        }
        self.prefixes
            .iter()
            .find(|(pattern, _)| pattern.matches(path, &segments[..count]))
            .map_or(&self.default, |(_, class)| class)
    }

    pub fn classes(&self) -> &[Arc<Class>] {
        &self.classes
    }

    /// One line for the startup banner: each class and the limits it actually has.
    pub fn describe(&self) -> String {
        let shared = self.default.shared.is_some();
        let classes: Vec<String> = self.classes.iter().map(|class| class.describe()).collect();
        format!(
            "{}{}",
            classes.join("; "),
            if shared { " (shared in Redis)" } else { "" }
        )
    }

    /// The `limits` object of `/ready`: each class in force and its current limits.
    pub fn status(&self) -> serde_json::Value {
        let classes: serde_json::Map<String, serde_json::Value> = self
            .classes
            .iter()
            .map(|class| (class.name().to_string(), class.status()))
            .collect();
        serde_json::Value::Object(classes)
    }
}

/// The longest start all of `texts` share (empty for no texts).
fn common_prefix<'a>(mut texts: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = texts.next() else {
        return String::new();
    };
    let mut shared = first.len();
    for text in texts {
        shared = first
            .bytes()
            .zip(text.bytes())
            .take(shared)
            .take_while(|(a, b)| a == b)
            .count();
    }
    first[..shared].to_string()
}

/// A class path, parsed once (see [`path_matches`] for what it matches).
enum PathPattern {
    Prefix(String),
    /// Segments after the leading `/`, and the pattern as written.
    Segments {
        segments: Vec<String>,
        text: String,
    },
}

impl PathPattern {
    /// Segments of a request path looked at; a longer pattern is matched by [`path_matches`].
    const MAX_SEGMENTS: usize = 16;

    fn new(pattern: &str) -> PathPattern {
        if pattern.contains('*') {
            PathPattern::Segments {
                segments: pattern.split('/').skip(1).map(str::to_string).collect(),
                text: pattern.to_string(),
            }
        } else {
            PathPattern::Prefix(pattern.to_string())
        }
    }

    /// A start every path it matches has: the pattern up to its first `*`, without the `/`
    /// before it (`/a/**` matches `/a` itself).
    fn literal_start(&self) -> &str {
        match self {
            PathPattern::Prefix(p) => p,
            PathPattern::Segments { text, .. } => {
                let literal = &text[..text.find('*').unwrap_or(text.len())];
                literal.strip_suffix('/').unwrap_or(literal)
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            PathPattern::Prefix(p) => p.len(),
            PathPattern::Segments { text, .. } => text.len(),
        }
    }

    /// `path`, and its first segments after the leading `/` (split by the caller once).
    fn matches(&self, path: &str, path_segments: &[&str]) -> bool {
        let (segments, text) = match self {
            PathPattern::Prefix(prefix) => return path.starts_with(prefix.as_str()),
            PathPattern::Segments { segments, text } => (segments, text),
        };
        if segments.len() > Self::MAX_SEGMENTS || !path.starts_with('/') {
            return path_matches(text, path);
        }
        for (i, want) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            if want == "**" && last {
                return true;
            }
            let Some(got) = path_segments.get(i) else {
                return false;
            };
            let ok = match want.as_str() {
                "*" => !got.is_empty(),
                _ if last => got.starts_with(want.as_str()),
                _ => got == want,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// Whether `path` falls under `pattern`: a prefix, segment by segment, where a `*` segment
/// matches any one segment, a last `**` anything below, and a last plain segment any segment
/// starting with it (`/waves/v1/lightning` covers `/waves/v1/lightning-v2/get_speech`).
pub fn path_matches(pattern: &str, path: &str) -> bool {
    if !pattern.as_bytes().contains(&b'*') {
        return path.starts_with(pattern);
    }
    let mut path_segments = path.split('/');
    let mut pattern_segments = pattern.split('/').peekable();
    while let Some(want) = pattern_segments.next() {
        let last = pattern_segments.peek().is_none();
        if want == "**" && last {
            return true;
        }
        let Some(got) = path_segments.next() else {
            return false;
        };
        let ok = match want {
            "*" => !got.is_empty(),
            _ if last => got.starts_with(want),
            _ => got == want,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Counters and gauges of one class, cloned from their families once.
struct ClassMetrics {
    admitted: Counter,
    shed_full: Counter,
    shed_timeout: Counter,
    queue_depth: Gauge,
    wait: Histogram,
    in_flight: Gauge,
    websockets: Gauge,
    throttled_429: Counter,
    throttled_503: Counter,
    retries: Counter,
    concurrency: Gauge,
}

impl ClassMetrics {
    fn new(name: &str, metrics: &Metrics) -> ClassMetrics {
        let class = ClassLabel {
            class: name.to_string(),
        };
        let shed = |reason| {
            metrics
                .shed
                .get_or_create(&ShedLabels {
                    class: name.to_string(),
                    reason,
                })
                .clone()
        };
        let throttled = |status| {
            metrics
                .upstream_throttled
                .get_or_create(&ThrottleLabels {
                    class: name.to_string(),
                    status,
                })
                .clone()
        };
        ClassMetrics {
            admitted: metrics.admitted.get_or_create(&class).clone(),
            shed_full: shed("queue_full"),
            shed_timeout: shed("queue_timeout"),
            queue_depth: metrics.queue_depth.get_or_create(&class).clone(),
            wait: metrics.queue_wait.get_or_create(&class).clone(),
            in_flight: metrics.in_flight.get_or_create(&class).clone(),
            websockets: metrics.websockets_active.get_or_create(&class).clone(),
            throttled_429: throttled(429),
            throttled_503: throttled(503),
            retries: metrics.upstream_retries.get_or_create(&class).clone(),
            concurrency: metrics.limit_concurrency.get_or_create(&class).clone(),
        }
    }
}

/// One class's limits and the state that enforces them.
pub struct Class {
    pub limits: ClassLimits,
    requests: Option<Arc<Semaphore>>,
    /// The request limit in force (0 = unlimited); it moves when learned.
    limit: AtomicUsize,
    /// Permits to forget as they come back, after the limit fell below what was held.
    debt: AtomicUsize,
    /// Requests of this class holding a slot on this replica.
    requests_held: AtomicUsize,
    /// `max_concurrent = "auto"`.
    learning: Option<auto::Learning>,
    websockets: Option<Arc<Semaphore>>,
    rate: Option<DefaultDirectRateLimiter>,
    /// FIFO gate for pacing (pause and rate).
    gate: tokio::sync::Mutex<()>,
    /// FIFO gates for a slot, one per kind (requests, WebSockets): the holder is the head of
    /// that queue and the only one waiting for a slot, in Redis or local.
    slot_gates: [tokio::sync::Mutex<()>; 2],
    waiting: AtomicUsize,
    paused_until: Mutex<Option<Instant>>,
    shared: Option<Arc<SharedStore>>,
    /// Woken when a shared slot of this class is released here, so local waiters retry at once.
    shared_freed: tokio::sync::Notify,
    metrics: ClassMetrics,
}

impl Class {
    fn new(limits: ClassLimits, metrics: &Metrics, shared: Option<Arc<SharedStore>>) -> Class {
        let semaphore = |n: usize| (n > 0).then(|| Arc::new(Semaphore::new(n)));
        let rate = NonZeroU32::new(limits.rate).and_then(|rate| {
            let period = limits.per / rate.get();
            let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
            Quota::with_period(period).map(|q| RateLimiter::direct(q.allow_burst(burst)))
        });
        let limit = limits.max_concurrent.initial();
        let metrics = ClassMetrics::new(&limits.name, metrics);
        metrics.concurrency.set(limit as i64);
        Class {
            requests: semaphore(limit),
            limit: AtomicUsize::new(limit),
            debt: AtomicUsize::new(0),
            requests_held: AtomicUsize::new(0),
            learning: (limits.max_concurrent == Concurrency::Auto).then(auto::Learning::default),
            websockets: semaphore(limits.max_websockets),
            rate,
            gate: tokio::sync::Mutex::new(()),
            slot_gates: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
            waiting: AtomicUsize::new(0),
            paused_until: Mutex::new(None),
            shared,
            shared_freed: tokio::sync::Notify::new(),
            metrics,
            limits,
        }
    }

    pub fn name(&self) -> &str {
        &self.limits.name
    }

    /// The request limit in force now (0 = unlimited).
    pub fn concurrency(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Whether the request limit is learned (`max_concurrent = "auto"`).
    pub fn learns(&self) -> bool {
        self.learning.is_some()
    }

    /// Move the request limit to `new` (the caller holds the learning lock, so changes never
    /// interleave): permits are added, or forgotten now and as held ones come back.
    /// With `publish`, a learned change is written to Redis for the other replicas.
    fn set_limit(&self, new: usize, publish: bool) {
        let new = new.max(1);
        let old = self.limit.swap(new, Ordering::AcqRel);
        if let Some(store) = self.shared.as_ref().filter(|s| publish && new != old && s.is_up()) {
            let (store, class) = (store.clone(), self.name().to_string());
            let raised_from = (new > old).then_some(old);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { store.publish_limit(&class, new, raised_from).await });
            }
        }
        if let Some(semaphore) = &self.requests {
            if new > old {
                let mut add = new - old;
                while add > 0 {
                    let owed = self.debt.load(Ordering::Acquire);
                    if owed == 0 {
                        break;
                    }
                    if self
                        .debt
                        .compare_exchange(owed, owed - 1, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        add -= 1;
                    }
                }
                semaphore.add_permits(add);
            } else if new < old {
                let fewer = old - new;
                let forgotten = semaphore.forget_permits(fewer);
                self.debt.fetch_add(fewer - forgotten, Ordering::AcqRel);
            }
        }
        self.metrics.concurrency.set(new as i64);
        if new != old {
            tracing::info!(class = self.name(), from = old, to = new, "concurrency limit learned");
        }
    }

    /// Follow the learned limit another replica wrote to Redis.
    fn adopt_shared_limit(&self, shared: usize) {
        if let Some(learning) = &self.learning {
            if shared > 0 && shared != self.concurrency() {
                learning.adopt(shared);
                self.set_limit(shared, false);
            }
        }
    }

    /// A returning permit pays one unit of debt (it is forgotten instead of released).
    fn take_debt(&self) -> bool {
        let mut owed = self.debt.load(Ordering::Acquire);
        while owed > 0 {
            match self
                .debt
                .compare_exchange(owed, owed - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => owed = now,
            }
        }
        false
    }

    /// The upstream answered `permit`'s request with a 429. For a learning class this lowers
    /// the limit and says what kind of 429 it was; `None` for a class with a fixed limit.
    pub fn throttled(&self, permit: &mut Permit) -> Option<auto::Throttle> {
        let learning = self.learning.as_ref()?;
        if permit.kind != Kind::Request {
            return None;
        }
        permit.throttled = true;
        let limit = self.concurrency();
        Some(learning.throttled(permit.level, limit, |new| self.set_limit(new, true)))
    }

    fn completed(&self, level: usize, admitted: auto::Admitted) {
        if let Some(learning) = &self.learning {
            let queued = self.waiting.load(Ordering::Acquire) > 0;
            learning.completed(level, admitted, self.concurrency(), queued, |new| {
                self.set_limit(new, true)
            });
        }
    }

    /// The banner's words for this class.
    pub fn describe(&self) -> String {
        let l = &self.limits;
        let mut parts = Vec::new();
        match l.max_concurrent {
            Concurrency::Fixed(0) => {}
            Concurrency::Fixed(n) => parts.push(format!("{n} concurrent")),
            Concurrency::Auto => parts.push(format!("auto concurrent (now {})", self.concurrency())),
        }
        if l.rate > 0 {
            parts.push(format!(
                "{}/{} burst {}",
                l.rate,
                humantime::format_duration(l.per),
                l.burst
            ));
        }
        if l.max_websockets > 0 {
            parts.push(format!("{} websockets", l.max_websockets));
        }
        if l.websocket_messages {
            parts.push("each WebSocket synthesis counted".into());
        }
        let limits = if parts.is_empty() {
            "unlimited".to_string()
        } else {
            parts.join(", ")
        };
        if l.paths.is_empty() {
            format!("{}: {limits}", l.name)
        } else {
            let source = if l.from_profile { "profile " } else { "" };
            format!("{} ({source}{}): {limits}", l.name, l.paths.join(" "))
        }
    }

    /// This class in `/ready`.
    pub fn status(&self) -> serde_json::Value {
        let l = &self.limits;
        serde_json::json!({
            "paths": l.paths,
            "from_profile": l.from_profile,
            "concurrency": if l.max_concurrent.is_limited() { serde_json::json!(self.concurrency()) } else { serde_json::json!("unlimited") },
            "learned": self.learning.is_some(),
            "adjusted": self.learning.as_ref().is_some_and(|l| l.adjusted()),
            "in_flight": self.requests_held.load(Ordering::Acquire),
            "queued": self.queue_depth(),
            "max_websockets": l.max_websockets,
            "websocket_messages": l.websocket_messages,
        })
    }

    /// Wait (FIFO) for admission. Dropping the future (client gone) leaves the queue.
    pub async fn admit(self: &Arc<Self>, kind: Kind) -> Result<Permit, Shed> {
        let started = Instant::now();
        let deadline = started + self.limits.queue_timeout;
        let mut queued: Option<Queued<'_>> = None;

        if self.rate.is_some() || self.paused_for().is_some() {
            let _gate = match self.gate.try_lock() {
                Ok(gate) => gate,
                Err(_) => {
                    self.enter_queue(&mut queued)?;
                    self.by(deadline, self.gate.lock()).await?
                }
            };
            self.pace(deadline, &mut queued).await?;
        }

        let limit = match kind {
            Kind::Request if self.requests.is_some() => self.concurrency(),
            Kind::Request => 0,
            Kind::WebSocket => self.limits.max_websockets,
        };
        let mut slot = Slot::Unlimited;
        let mut shared_level = 0;
        if limit > 0 {
            let slot_gate = &self.slot_gates[match kind {
                Kind::Request => 0,
                Kind::WebSocket => 1,
            }];
            let _turn = match slot_gate.try_lock() {
                Ok(turn) => turn,
                Err(_) => {
                    self.enter_queue(&mut queued)?;
                    self.by(deadline, slot_gate.lock()).await?
                }
            };
            if let Some(store) = self.shared.as_ref().filter(|s| s.is_up()) {
                // A shared slot holds a local one too, so this replica's own count is right
                // whichever mode the next request is admitted in: a switch to local limits
                // (Redis gone) counts the shared slots still held, and a switch back to Redis
                // cannot let a request out beside one still holding a local slot.
                let local = self.local_slot(kind, deadline, &mut queued).await?;
                match self.shared_slot(store, kind, limit, deadline, &mut queued).await? {
                    Some((lease, level)) => {
                        slot = Slot::Shared(lease, local);
                        shared_level = level;
                    }
                    None => slot = Slot::Local(local),
                }
            }
            if matches!(slot, Slot::Unlimited) {
                slot = Slot::Local(self.local_slot(kind, deadline, &mut queued).await?);
            }
        }
        drop(queued);
        self.metrics.admitted.inc();
        self.metrics.wait.observe(started.elapsed().as_secs_f64());
        let level = match kind {
            Kind::Request => {
                self.metrics.in_flight.inc();
                (self.requests_held.fetch_add(1, Ordering::AcqRel) + 1).max(shared_level)
            }
            Kind::WebSocket => {
                self.metrics.websockets.inc();
                0
            }
        };
        let learned = match (&self.learning, kind, &slot) {
            (Some(learning), Kind::Request, Slot::Local(_) | Slot::Shared(..)) => learning.admitted(level),
            _ => auto::Admitted::default(),
        };
        Ok(Permit {
            class: self.clone(),
            kind,
            level,
            learned,
            throttled: false,
            slot,
        })
    }

    async fn local_slot<'a>(
        &'a self,
        kind: Kind,
        deadline: Instant,
        queued: &mut Option<Queued<'a>>,
    ) -> Result<OwnedSemaphorePermit, Shed> {
        let semaphore = match kind {
            Kind::Request => &self.requests,
            Kind::WebSocket => &self.websockets,
        };
        let Some(semaphore) = semaphore else {
            // Only reached with a limit configured, which always has a semaphore.
            return Err(self.shed(ShedReason::QueueFull, DEFAULT_UPSTREAM_PAUSE));
        };
        // tokio's semaphore hands a released permit to the oldest waiter, so try_acquire never
        // jumps the queue: FIFO holds.
        match semaphore.clone().try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(_) => {
                self.enter_queue(queued)?;
                self.by(deadline, semaphore.clone().acquire_owned())
                    .await?
                    .map_err(|_| self.shed(ShedReason::QueueFull, DEFAULT_UPSTREAM_PAUSE))
            }
        }
    }

    /// A slot from Redis. `Ok(None)` means Redis failed: the caller falls back to a local slot.
    /// Only the head of this replica's queue polls Redis (the caller holds the kind's slot
    /// gate), with a short backoff, and a local release wakes it at once; see `redis.rs` for
    /// why polling.
    async fn shared_slot<'a>(
        &'a self,
        store: &Arc<SharedStore>,
        kind: Kind,
        limit: usize,
        deadline: Instant,
        queued: &mut Option<Queued<'a>>,
    ) -> Result<Option<(SharedLease, usize)>, Shed> {
        let kind_key = match kind {
            Kind::Request => "requests",
            Kind::WebSocket => "websockets",
        };
        let mut backoff = redis::POLL_MIN;
        loop {
            let learned = kind == Kind::Request && self.learning.is_some();
            match store.try_acquire(self.name(), kind_key, limit, learned).await {
                Ok((got, shared_limit)) => {
                    if learned {
                        self.adopt_shared_limit(shared_limit);
                    }
                    if got.is_some() {
                        return Ok(got);
                    }
                }
                Err(()) => return Ok(None),
            }
            self.enter_queue(queued)?;
            let wake = async {
                tokio::select! {
                    _ = self.shared_freed.notified() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
            };
            self.by(deadline, wake).await?;
            backoff = (backoff * 2).min(redis::POLL_MAX);
        }
    }

    /// Pause (an upstream 429/503), then the GCRA rate; shared in Redis when it is up.
    async fn pace<'a>(&'a self, deadline: Instant, queued: &mut Option<Queued<'a>>) -> Result<(), Shed> {
        loop {
            if let Some(wait) = self.paused_for() {
                self.enter_queue(queued)?;
                self.sleep_within(wait, deadline).await?;
                continue;
            }
            if self.limits.rate == 0 {
                return Ok(());
            }
            let wait = match self.shared.as_ref().filter(|s| s.is_up()) {
                Some(store) => match store
                    .rate_wait(self.name(), self.limits.rate, self.limits.per, self.limits.burst)
                    .await
                {
                    Ok(wait) => wait,
                    Err(()) => self.local_rate_wait(),
                },
                None => self.local_rate_wait(),
            };
            if wait.is_zero() {
                return Ok(());
            }
            self.enter_queue(queued)?;
            self.sleep_within(wait, deadline).await?;
        }
    }

    fn local_rate_wait(&self) -> Duration {
        match &self.rate {
            Some(rate) => match rate.check() {
                Ok(()) => Duration::ZERO,
                Err(not_until) => not_until.wait_time_from(DefaultClock::default().now()),
            },
            None => Duration::ZERO,
        }
    }

    /// Sleep `wait`, unless that would pass the deadline: then shed now, since waiting could
    /// not end in admission anyway.
    async fn sleep_within(&self, wait: Duration, deadline: Instant) -> Result<(), Shed> {
        if Instant::now() + wait > deadline {
            return Err(self.shed(ShedReason::QueueTimeout, wait));
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }

    async fn by<F: std::future::Future>(&self, deadline: Instant, future: F) -> Result<F::Output, Shed> {
        tokio::time::timeout_at(deadline, future)
            .await
            .map_err(|_| self.shed(ShedReason::QueueTimeout, self.suggested_wait()))
    }

    fn enter_queue<'a>(&'a self, queued: &mut Option<Queued<'a>>) -> Result<(), Shed> {
        if queued.is_some() {
            return Ok(());
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.limits.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(self.shed(ShedReason::QueueFull, self.suggested_wait()));
        }
        self.metrics.queue_depth.inc();
        *queued = Some(Queued { class: self });
        Ok(())
    }

    fn shed(&self, reason: ShedReason, retry_after: Duration) -> Shed {
        match reason {
            ShedReason::QueueFull => self.metrics.shed_full.inc(),
            ShedReason::QueueTimeout => self.metrics.shed_timeout.inc(),
        };
        Shed {
            class: self.limits.name.clone(),
            reason,
            retry_after,
        }
    }

    /// What to tell a shed client: the rest of a pause, else a second.
    fn suggested_wait(&self) -> Duration {
        self.paused_for().unwrap_or(DEFAULT_UPSTREAM_PAUSE)
    }

    fn paused_for(&self) -> Option<Duration> {
        let until = (*self.paused_until.lock().ok()?)?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// The upstream said 429/503: hold new admissions of this class for `wait`.
    pub fn pause(&self, status: u16, wait: Duration) {
        if status == 503 {
            self.metrics.throttled_503.inc();
        } else {
            self.metrics.throttled_429.inc();
        }
        if let Ok(mut until) = self.paused_until.lock() {
            let candidate = Instant::now() + wait;
            if until.is_none_or(|u| u < candidate) {
                *until = Some(candidate);
            }
        }
    }

    /// Count a resend that waits no backoff (a throttled probe's).
    pub fn count_resend(&self) {
        self.metrics.retries.inc();
    }

    /// How long to wait before resend `attempt` (1-based): the rest of the class's pause, or
    /// an exponential backoff with full jitter, whichever is longer.
    pub fn resend_delay(&self, attempt: u32) -> Duration {
        self.metrics.retries.inc();
        let ceiling = RETRY_BACKOFF_BASE
            .saturating_mul(1 << attempt.min(16))
            .min(RETRY_BACKOFF_CAP);
        let jittered = ceiling.mul_f64(rand::random::<f64>());
        jittered.max(self.paused_for().unwrap_or_default())
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// A place in a class's queue, given back on drop (admission, shedding or a vanished client).
struct Queued<'a> {
    class: &'a Class,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.class.waiting.fetch_sub(1, Ordering::AcqRel);
        self.class.metrics.queue_depth.dec();
    }
}

enum Slot {
    Unlimited,
    Local(OwnedSemaphorePermit),
    /// A lease in Redis, and the local permit that counts it on this replica.
    Shared(SharedLease, OwnedSemaphorePermit),
}

/// Admission to a class, held for the life of the response body or WebSocket tunnel.
pub struct Permit {
    class: Arc<Class>,
    kind: Kind,
    /// Requests of the class in flight when this one was admitted, itself included.
    level: usize,
    /// What a learning class admitted it as (a probe or not, and when).
    learned: auto::Admitted,
    /// The upstream answered 429: this request does not count as a success when it ends.
    throttled: bool,
    slot: Slot,
}

impl Permit {
    pub fn class(&self) -> &Arc<Class> {
        &self.class
    }

    /// Requests of the class in flight when this one was admitted, itself included.
    pub fn level(&self) -> usize {
        self.level
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("class", &self.class.limits.name)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.kind {
            Kind::Request => {
                self.class.metrics.in_flight.dec();
                self.class.requests_held.fetch_sub(1, Ordering::AcqRel);
                if !self.throttled && !matches!(self.slot, Slot::Unlimited) {
                    self.class.completed(self.level, self.learned);
                }
                if let Some(learning) = &self.class.learning {
                    learning.ended(self.learned);
                }
            }
            Kind::WebSocket => {
                self.class.metrics.websockets.dec();
            }
        };
        let local = match std::mem::replace(&mut self.slot, Slot::Unlimited) {
            Slot::Shared(lease, local) => {
                drop(lease);
                self.class.shared_freed.notify_one();
                local
            }
            Slot::Local(local) => local,
            Slot::Unlimited => return,
        };
        // After the limit fell, a returning request permit is forgotten, not released.
        if self.kind == Kind::Request && self.class.take_debt() {
            local.forget();
        }
    }
}

/// `Retry-After` as delta-seconds or an HTTP date; `None` when absent or unparsable.
pub fn parse_retry_after(value: Option<&http::HeaderValue>) -> Option<Duration> {
    let text = value?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(toml: &str) -> Limiter {
        let config = crate::config::load_text(None, toml, &[]).expect("config");
        Limiter::new(&config.limits, &Metrics::new(), None)
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let header = |v: &str| http::HeaderValue::from_str(v).unwrap();
        assert_eq!(parse_retry_after(Some(&header("3"))), Some(Duration::from_secs(3)));
        let in_a_minute = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let wait = parse_retry_after(Some(&header(&in_a_minute))).unwrap();
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(
            parse_retry_after(Some(&header("Wed, 21 Oct 2015 07:28:00 GMT"))),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(Some(&header("soon"))), None);
        assert_eq!(parse_retry_after(None), None);
    }

    #[test]
    fn the_banner_line_lists_each_class() {
        let users = limiter("[[limits.class]]\nname = \"tts\"\npaths = [\"/waves/v1/lightning\"]\nmax_concurrent = 1\nmax_websockets = 5\n");
        assert_eq!(
            users.describe(),
            "default: unlimited; tts (/waves/v1/lightning): 1 concurrent, 5 websockets, each WebSocket synthesis counted"
        );
        let profile = limiter("");
        assert_eq!(
            profile.describe(),
            "default: unlimited; tts (profile /waves/v1/tts /waves/v1/tts/live /waves/v1/*/get_speech /waves/v1/*/get_speech/stream /waves/v1/*/stream /waves/v1/streaming-tts/**): auto concurrent (now 1), 5 websockets, each WebSocket synthesis counted"
        );
    }

    #[test]
    fn the_smallest_profile_puts_every_tts_path_in_one_class_by_default() {
        let limiter = limiter("");
        for path in [
            "/waves/v1/tts",
            "/waves/v1/tts/live",
            "/waves/v1/lightning/get_speech",
            "/waves/v1/lightning-v2/get_speech",
            "/waves/v1/lightning-large/get_speech/stream",
            "/waves/v1/lightning-v2/stream",
            "/waves/v1/streaming-tts/lightning/stream",
            "/waves/v1/streaming-tts",
        ] {
            let class = limiter.class_for(path);
            assert_eq!(class.name(), "tts", "{path}");
            assert!(
                Arc::ptr_eq(class, limiter.class_for("/waves/v1/tts")),
                "one class, one queue"
            );
        }
        for path in [
            "/waves/v1/lightning/get_voices",
            "/waves/v1/pulse/get_text",
            "/api/v1/pulse/get_text",
            "/waves/v1/voices",
            "/",
        ] {
            assert_eq!(limiter.class_for(path).name(), "default", "{path}");
        }
        let tts = limiter.class_for("/waves/v1/tts");
        assert!(tts.learns());
        assert_eq!(tts.concurrency(), 1, "auto starts at one");
        assert_eq!(tts.limits.max_websockets, 5);
        assert!(tts.limits.websocket_messages);
        let status = limiter.status();
        assert_eq!(status["tts"]["concurrency"], 1);
        assert_eq!(status["tts"]["learned"], true);
        assert_eq!(status["default"]["concurrency"], "unlimited");
    }

    #[test]
    fn the_parsed_patterns_match_as_path_matches_does() {
        let patterns = [
            "/waves/v1/*/get_speech",
            "/waves/v1/streaming-tts/**",
            "/a/*",
            "/x/**",
            "/waves/v1/tts",
        ];
        let paths = [
            "/waves/v1/lightning/get_speech",
            "/waves/v1/lightning/get_speech/stream",
            "/waves/v1//get_speech",
            "/waves/v1/streaming-tts",
            "/waves/v1/streaming-tts/a/b",
            "/a/b",
            "/a/",
            "/a",
            "/x",
            "/waves/v1/tts/live",
            "/",
            "*",
        ];
        for pattern in patterns {
            let parsed = PathPattern::new(pattern);
            for path in paths {
                let segments: Vec<&str> = path.split('/').skip(1).collect();
                assert_eq!(
                    parsed.matches(path, &segments),
                    path_matches(pattern, path),
                    "{pattern} {path}"
                );
                // The start class_for looks at first never turns a match away.
                if path_matches(pattern, path) {
                    assert!(path.starts_with(parsed.literal_start()), "{pattern} {path}");
                }
            }
        }
    }

    #[test]
    fn paths_outside_every_class_start_go_to_the_default_class_and_the_rest_are_matched() {
        let classes = limiter(
            "[[limits.class]]\nname = \"deep\"\npaths = [\"/x/y/**\"]\nmax_concurrent = 1\n[[limits.class]]\nname = \"wide\"\npaths = [\"/x/*/z\"]\nmax_concurrent = 1\n[limits]\nprofile = \"none\"\n",
        );
        assert_eq!(classes.common_prefix, "/x");
        for (path, class) in [
            ("/x/y", "deep"),
            ("/x/y/a/b", "deep"),
            ("/x/q/z", "wide"),
            ("/x", "default"),
            ("/", "default"),
            ("/y/x/y", "default"),
            ("*", "default"),
        ] {
            assert_eq!(classes.class_for(path).name(), class, "{path}");
        }
        let profile = limiter("");
        assert_eq!(profile.common_prefix, "/waves/v1");
        assert_eq!(profile.class_for("/waves/v1/streaming-tts").name(), "tts");
        assert_eq!(profile.class_for("/waves/v2/tts").name(), "default");
    }

    #[test]
    fn the_users_classes_win_for_their_paths_and_the_profile_can_be_turned_off() {
        let users = limiter(
            "[[limits.class]]\nname = \"batch\"\npaths = [\"/waves/v1/lightning-large\"]\nmax_concurrent = 3\n[[limits.class]]\nname = \"everything\"\npaths = [\"/waves/v2\"]\n",
        );
        assert_eq!(users.class_for("/waves/v1/lightning-large/get_speech").name(), "batch");
        assert_eq!(users.class_for("/waves/v1/lightning/get_speech").name(), "tts");
        assert_eq!(users.class_for("/waves/v1/tts/live").name(), "tts");
        // A shorter path the user wrote still wins over the profile's longer one.
        let broad = limiter("[[limits.class]]\nname = \"mine\"\npaths = [\"/waves\"]\n");
        assert_eq!(broad.class_for("/waves/v1/tts").name(), "mine");
        // A class named like the profile's replaces it, keeping its paths; a number stops learning.
        let fixed = limiter("[[limits.class]]\nname = \"tts\"\nmax_concurrent = 2\n");
        let tts = fixed.class_for("/waves/v1/lightning/get_speech/stream");
        assert_eq!(tts.name(), "tts");
        assert!(!tts.learns());
        assert_eq!(tts.concurrency(), 2);
        assert_eq!(fixed.classes().len(), 2);
        let off = limiter("[limits]\nprofile = \"none\"\n");
        assert_eq!(off.class_for("/waves/v1/tts").name(), "default");
        assert_eq!(off.classes().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_learned_limit_rises_and_falls_with_the_slots() {
        let limiter = limiter("[limits]\nqueue_timeout = \"10s\"\n");
        let class = limiter.class_for("/waves/v1/tts").clone();
        // One request at a time with nobody waiting is not demand above the limit.
        for _ in 0..auto::RAISE_AFTER * 2 {
            let permit = class.admit(Kind::Request).await.expect("admitted");
            assert_eq!(permit.level(), 1);
        }
        assert_eq!(class.concurrency(), 1);
        // With a request queued behind each one, five completions raise the limit.
        let mut held = class.admit(Kind::Request).await.expect("admitted");
        for _ in 0..auto::RAISE_AFTER {
            let next = tokio::spawn({
                let class = class.clone();
                async move { class.admit(Kind::Request).await }
            });
            while class.queue_depth() == 0 {
                tokio::task::yield_now().await;
            }
            drop(held);
            held = next.await.unwrap().expect("admitted");
        }
        drop(held);
        assert_eq!(class.concurrency(), 2, "five saturated completions raise the limit");
        let first = class.admit(Kind::Request).await.expect("first");
        let mut probe = class.admit(Kind::Request).await.expect("a second slot now");
        assert_eq!(probe.level(), 2);
        assert_eq!(class.throttled(&mut probe), Some(auto::Throttle::Probe));
        assert_eq!(class.concurrency(), 1);
        // Both slots are held; the limit of one holds once they come back.
        let waiter = tokio::spawn({
            let class = class.clone();
            async move { class.admit(Kind::Request).await.map(|p| p.level()) }
        });
        tokio::task::yield_now().await;
        drop(probe);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the probe's slot was forgotten, not handed on");
        drop(first);
        assert_eq!(waiter.await.unwrap().expect("admitted"), 1);
        assert_eq!(class.status()["adjusted"], true);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_limit_never_learns() {
        let limiter = limiter("[[limits.class]]\nname = \"tts\"\nmax_concurrent = 1\n");
        let class = limiter.class_for("/waves/v1/tts").clone();
        for _ in 0..20 {
            let mut permit = class.admit(Kind::Request).await.expect("admitted");
            assert_eq!(class.throttled(&mut permit), None);
        }
        assert_eq!(class.concurrency(), 1);
    }

    #[test]
    fn the_longest_prefix_picks_the_class() {
        let limiter = limiter(
            "[[limits.class]]\nname = \"tts\"\npaths = [\"/waves/v1/lightning\"]\n[[limits.class]]\nname = \"large\"\npaths = [\"/waves/v1/lightning-large\"]\n",
        );
        assert_eq!(limiter.class_for("/waves/v1/lightning-v2/get_speech").name(), "tts");
        assert_eq!(
            limiter.class_for("/waves/v1/lightning-large/get_speech").name(),
            "large"
        );
        assert_eq!(limiter.class_for("/api/v1/voices").name(), "default");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_delays_admission_and_resends() {
        let limiter = limiter("[limits]\nqueue_timeout = \"10s\"\n");
        let class = limiter.class_for("/x").clone();
        class.pause(429, Duration::from_secs(2));
        assert!(
            class.resend_delay(1) >= Duration::from_millis(1999),
            "a resend waits out the pause"
        );
        let started = Instant::now();
        let _permit = class.admit(Kind::Request).await.expect("admitted after the pause");
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_queue_timeout_sheds_at_once() {
        let limiter = limiter("[limits]\nqueue_timeout = \"1s\"\n");
        let class = limiter.class_for("/x").clone();
        class.pause(503, Duration::from_secs(5));
        let started = Instant::now();
        let shed = class.admit(Kind::Request).await.expect_err("shed");
        assert_eq!(shed.reason, ShedReason::QueueTimeout);
        assert!(shed.retry_after >= Duration::from_secs(4));
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no point waiting for what cannot be admitted"
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_the_cap() {
        let limiter = limiter("");
        let class = limiter.class_for("/x");
        for attempt in 1..20 {
            let delay = class.resend_delay(attempt);
            assert!(delay <= RETRY_BACKOFF_CAP);
            assert!(delay <= RETRY_BACKOFF_BASE * 2u32.pow(attempt.min(16)));
        }
    }
}
