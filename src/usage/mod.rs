//! Usage per local app, per UTC day: TTS characters, STT seconds, LLM tokens, upstream auth
//! failures, and the daily budgets of `[[app]]`.
//!
//! The request path measures (see `proxy::meter`) and reports here once the upstream accepted
//! the work; this store keeps the day's totals, answers "may this app start more work?"
//! ([`Usage::check`]), feeds the `usage_*` metrics, warns once a day when an app passes 80% of
//! a budget, and renders `/usage`. Only numbers and app names ever enter it: never text,
//! audio, prompts or tokens.
//!
//! Time comes from a [`Clock`], so tests can turn the day without waiting for one. The totals
//! are kept in this process and, with `[usage] state_file`, in a file written atomically (see
//! `state`); with `[limits.shared]` they live in Redis instead (see `shared`) so all replicas
//! spend one budget.

pub mod shared;
pub mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{AppConfig, DEFAULT_APP_NAME};
use crate::metrics::{AppLabel, AppStatusLabels, LlmLabels, Metrics, SttLabels};

const DAY_SECS: u64 = 86_400;
/// An app passing this share of a budget gets one WARN a day.
const WARN_SHARE: f64 = 0.8;

/// Where the store reads the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock tests set by hand (seconds since the epoch).
#[derive(Debug, Clone)]
pub struct TestClock(Arc<AtomicU64>);

impl TestClock {
    pub fn at(unix_secs: u64) -> TestClock {
        TestClock(Arc::new(AtomicU64::new(unix_secs)))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst))
    }
}

/// What a budget is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Meter {
    TtsCharacters,
    SttSeconds,
    LlmTokens,
}

impl Meter {
    pub fn budget_name(self) -> &'static str {
        match self {
            Meter::TtsCharacters => "daily_tts_characters",
            Meter::SttSeconds => "daily_stt_seconds",
            Meter::LlmTokens => "daily_llm_tokens",
        }
    }
}

/// One app's totals for one day.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub tts_characters: u64,
    pub stt_seconds: f64,
    pub stt_unmetered_requests: u64,
    pub llm_prompt_tokens: u64,
    pub llm_completion_tokens: u64,
    pub upstream_401: u64,
    pub upstream_403: u64,
}

impl Totals {
    pub fn spent(&self, meter: Meter) -> f64 {
        match meter {
            Meter::TtsCharacters => self.tts_characters as f64,
            Meter::SttSeconds => self.stt_seconds,
            Meter::LlmTokens => (self.llm_prompt_tokens + self.llm_completion_tokens) as f64,
        }
    }
}

/// One app's daily budgets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budgets {
    pub tts_characters: Option<u64>,
    pub stt_seconds: Option<u64>,
    pub llm_tokens: Option<u64>,
}

impl Budgets {
    pub fn from_app(app: &AppConfig) -> Budgets {
        Budgets {
            tts_characters: app.daily_tts_characters,
            stt_seconds: app.daily_stt_seconds,
            llm_tokens: app.daily_llm_tokens,
        }
    }

    pub fn get(&self, meter: Meter) -> Option<u64> {
        match meter {
            Meter::TtsCharacters => self.tts_characters,
            Meter::SttSeconds => self.stt_seconds,
            Meter::LlmTokens => self.llm_tokens,
        }
    }
}

/// An app has spent its day's budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Exceeded {
    pub app: String,
    pub meter: Meter,
    pub budget: u64,
    /// The next UTC midnight, RFC 3339.
    pub resets_at: String,
    pub retry_after: Duration,
}

impl From<Exceeded> for crate::error::ProxyError {
    fn from(e: Exceeded) -> Self {
        crate::error::ProxyError::BudgetExceeded {
            message: format!(
                "app {:?} has spent its {} of {} for today (UTC); it resets at {}",
                e.app,
                e.meter.budget_name(),
                e.budget,
                e.resets_at
            ),
            app: e.app,
            resets_at: e.resets_at,
            retry_after: e.retry_after,
        }
    }
}

/// One change to an app's totals.
#[derive(Debug, Clone, Copy)]
pub enum Add {
    Tts(u64),
    Stt { seconds: f64, how: &'static str },
    SttUnmetered,
    Llm { prompt: u64, completion: u64 },
    AuthFailure(u16),
}

/// The day's totals of every app seen.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Day {
    /// Days since the epoch (UTC).
    pub number: u64,
    pub apps: BTreeMap<String, Totals>,
}

#[derive(Debug, Default)]
struct Local {
    day: Day,
    warned: HashSet<(String, Meter)>,
}

/// The usage store of one run (it outlives config reloads).
pub struct Usage {
    clock: Arc<dyn Clock>,
    budgets: RwLock<HashMap<String, Budgets>>,
    local: Mutex<Local>,
    shared: RwLock<Option<Arc<shared::SharedUsage>>>,
    /// The last shared totals read from Redis per app (for `/usage`), and of which day.
    shared_seen: Mutex<(u64, HashMap<String, Totals>)>,
    metrics: Arc<Metrics>,
    /// Changed since the state file was last written.
    dirty: AtomicBool,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage")
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Usage {
    pub fn new(clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Usage {
        Usage {
            clock,
            budgets: RwLock::new(HashMap::new()),
            local: Mutex::new(Local::default()),
            shared: RwLock::new(None),
            shared_seen: Mutex::new((0, HashMap::new())),
            metrics,
            dirty: AtomicBool::new(false),
        }
    }

    /// The apps and their budgets (at start and on reload); totals are kept.
    pub fn set_apps(&self, apps: &[AppConfig]) {
        let budgets = apps.iter().map(|a| (a.name.clone(), Budgets::from_app(a))).collect();
        *self.budgets.write().unwrap_or_else(|p| p.into_inner()) = budgets;
    }

    /// Keep totals in Redis from now on (`[limits.shared]`), or locally (`None`).
    pub fn set_shared(&self, shared: Option<Arc<shared::SharedUsage>>) {
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = shared;
    }

    fn shared(&self) -> Option<Arc<shared::SharedUsage>> {
        self.shared.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn day_number(&self) -> u64 {
        self.unix_secs() / DAY_SECS
    }

    fn unix_secs(&self) -> u64 {
        self.clock.now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    fn budget(&self, app: &str, meter: Meter) -> Option<u64> {
        self.budgets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(app)
            .and_then(|b| b.get(meter))
    }

    /// The local day, turned when the clock passed midnight.
    fn local_today(&self) -> std::sync::MutexGuard<'_, Local> {
        let today = self.day_number();
        let mut local = lock(&self.local);
        if local.day.number != today {
            local.day = Day {
                number: today,
                apps: BTreeMap::new(),
            };
            local.warned.clear();
            self.dirty.store(true, Ordering::Relaxed);
        }
        local
    }

    /// This app's totals today (from Redis when shared and reachable).
    pub async fn totals(&self, app: &str) -> Totals {
        let day = self.day_number();
        if let Some(shared) = self.shared() {
            if let Some(totals) = shared.totals(day, app).await {
                self.seen_shared(day, app, &totals);
                return totals;
            }
        }
        self.local_today().day.apps.get(app).cloned().unwrap_or_default()
    }

    /// Whether `app` may start more work counted in `meter`: refused once the day's spent
    /// total has reached the budget. The work that crosses the line was allowed when it
    /// started, and is counted in full.
    pub async fn check(&self, app: &str, meter: Meter) -> Result<(), Exceeded> {
        let Some(budget) = self.budget(app, meter) else {
            return Ok(());
        };
        let spent = self.totals(app).await.spent(meter);
        if spent < budget as f64 {
            return Ok(());
        }
        self.metrics
            .budget_refusals
            .get_or_create(&AppLabel { app: app.to_string() })
            .inc();
        let now = self.unix_secs();
        let next = (now / DAY_SECS + 1) * DAY_SECS;
        Err(Exceeded {
            app: app.to_string(),
            meter,
            budget,
            resets_at: humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(next)).to_string(),
            retry_after: Duration::from_secs((next - now).max(1)),
        })
    }

    /// Count work the upstream accepted.
    pub async fn add(&self, app: &str, add: Add) {
        let label = || AppLabel { app: app.to_string() };
        match add {
            Add::Tts(n) => {
                self.metrics.usage_tts_characters.get_or_create(&label()).inc_by(n);
            }
            Add::Stt { seconds, how } => {
                self.metrics
                    .usage_stt_seconds
                    .get_or_create(&SttLabels {
                        app: app.to_string(),
                        how,
                    })
                    .inc_by(seconds);
            }
            Add::SttUnmetered => {
                self.metrics.usage_stt_unmetered.get_or_create(&label()).inc();
            }
            Add::Llm { prompt, completion } => {
                for (kind, n) in [("prompt", prompt), ("completion", completion)] {
                    self.metrics
                        .usage_llm_tokens
                        .get_or_create(&LlmLabels {
                            app: app.to_string(),
                            kind,
                        })
                        .inc_by(n);
                }
            }
            Add::AuthFailure(status) => {
                self.metrics
                    .app_auth_failures
                    .get_or_create(&AppStatusLabels {
                        app: app.to_string(),
                        status,
                    })
                    .inc();
            }
        }
        let day = self.day_number();
        let after = {
            let mut local = self.local_today();
            let totals = local.day.apps.entry(app.to_string()).or_default();
            apply(totals, add);
            totals.clone()
        };
        self.dirty.store(true, Ordering::Relaxed);
        let after = match self.shared() {
            Some(shared) => match shared.add(day, app, add).await {
                Some(totals) => {
                    self.seen_shared(day, app, &totals);
                    totals
                }
                None => after,
            },
            None => after,
        };
        let _ = self.warn_near_budget(app, &after);
    }

    fn seen_shared(&self, day: u64, app: &str, totals: &Totals) {
        let mut seen = lock(&self.shared_seen);
        if seen.0 != day {
            *seen = (day, HashMap::new());
        }
        seen.1.insert(app.to_string(), totals.clone());
    }

    fn app_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .budgets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        names.push(DEFAULT_APP_NAME.to_string());
        names.extend(self.local_today().day.apps.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Read every known app's shared totals (what other replicas spent), for `/usage`.
    pub async fn refresh_shared(&self) {
        if self.shared().is_some() {
            for app in self.app_names() {
                let _ = self.totals(&app).await;
            }
        }
    }

    /// WARN once a day per app and budget past 80%; returns how many were logged now.
    fn warn_near_budget(&self, app: &str, totals: &Totals) -> usize {
        let mut warned = 0;
        for meter in [Meter::TtsCharacters, Meter::SttSeconds, Meter::LlmTokens] {
            let Some(budget) = self.budget(app, meter) else {
                continue;
            };
            let spent = totals.spent(meter);
            if spent < WARN_SHARE * budget as f64 {
                continue;
            }
            if lock(&self.local).warned.insert((app.to_string(), meter)) {
                tracing::warn!(
                    app,
                    budget = meter.budget_name(),
                    spent,
                    limit = budget,
                    percent = (spent * 100.0 / budget.max(1) as f64).round(),
                    "an app passed 80% of its daily budget"
                );
                warned += 1;
            }
        }
        warned
    }

    /// `/usage`: today's totals and budgets of every configured app, `default`, and any other
    /// app seen today. Shared totals are the last read from Redis (refreshed every second and
    /// on every request of the app).
    pub fn report(&self) -> serde_json::Value {
        let now = self.unix_secs();
        let day = now / DAY_SECS;
        let budgets = self.budgets.read().unwrap_or_else(|p| p.into_inner()).clone();
        let shared = self.shared().is_some();
        let seen = lock(&self.shared_seen).clone();
        let local = self.local_today().day.clone();
        let mut apps = serde_json::Map::new();
        for name in self.app_names() {
            let from_shared = (shared && seen.0 == day).then(|| seen.1.get(&name).cloned()).flatten();
            let totals = from_shared
                .or_else(|| local.apps.get(&name).cloned())
                .unwrap_or_default();
            let b = budgets.get(&name).cloned().unwrap_or_default();
            apps.insert(
                name,
                serde_json::json!({
                    "tts_characters": totals.tts_characters,
                    "stt_seconds": totals.stt_seconds,
                    "stt_unmetered_requests": totals.stt_unmetered_requests,
                    "llm_tokens": {
                        "prompt": totals.llm_prompt_tokens,
                        "completion": totals.llm_completion_tokens,
                        "total": totals.llm_prompt_tokens + totals.llm_completion_tokens,
                    },
                    "upstream_auth_failures": {"401": totals.upstream_401, "403": totals.upstream_403},
                    "budgets": {
                        "daily_tts_characters": b.tts_characters,
                        "daily_stt_seconds": b.stt_seconds,
                        "daily_llm_tokens": b.llm_tokens,
                    },
                }),
            );
        }
        let midnight = |d: u64| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(d * DAY_SECS));
        serde_json::json!({
            "day": midnight(day).to_string().get(..10).unwrap_or_default(),
            "resets_at": midnight(day + 1).to_string(),
            "shared": shared,
            "apps": apps,
        })
    }

    /// The local day as it is now, for the state file; `None` when nothing changed since the
    /// last call.
    pub fn take_changes(&self) -> Option<Day> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return None;
        }
        Some(self.local_today().day.clone())
    }

    /// Put back a day read from the state file (ignored unless it is today).
    pub fn restore(&self, day: Day) {
        let mut local = self.local_today();
        if day.number == local.day.number {
            local.day = day;
        }
    }
}

/// Apply a config to the store: the apps and budgets, and Redis when `[limits.shared]` is set
/// (a new client only when that section changed).
pub fn configure(usage: &Usage, config: &crate::config::Config, previous: Option<&crate::config::Config>) {
    usage.set_apps(&config.apps);
    let unchanged = previous.is_some_and(|p| p.limits.shared == config.limits.shared);
    if unchanged {
        return;
    }
    match &config.limits.shared {
        Some(shared) => match shared::SharedUsage::new(shared) {
            Ok(s) => usage.set_shared(Some(Arc::new(s))),
            Err(e) => tracing::warn!(error = %e, "usage totals stay in this process"),
        },
        None => usage.set_shared(None),
    }
}

/// Every `save_interval`, until `stop`: write the state file if totals changed, and read the
/// shared totals other replicas wrote (for `/usage`).
pub fn spawn_upkeep(
    usage: Arc<Usage>,
    state_file: Option<std::path::PathBuf>,
    save_interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(save_interval.min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_save = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            usage.refresh_shared().await;
            if let Some(path) = &state_file {
                if last_save.elapsed() >= save_interval {
                    last_save = tokio::time::Instant::now();
                    state::save(&usage, path);
                }
            }
        }
    });
}

fn apply(totals: &mut Totals, add: Add) {
    match add {
        Add::Tts(n) => totals.tts_characters += n,
        Add::Stt { seconds, .. } => totals.stt_seconds += seconds,
        Add::SttUnmetered => totals.stt_unmetered_requests += 1,
        Add::Llm { prompt, completion } => {
            totals.llm_prompt_tokens += prompt;
            totals.llm_completion_tokens += completion;
        }
        Add::AuthFailure(401) => totals.upstream_401 += 1,
        Add::AuthFailure(_) => totals.upstream_403 += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(clock: &TestClock) -> Usage {
        let u = Usage::new(Arc::new(clock.clone()), Arc::new(Metrics::new()));
        u.set_apps(&[AppConfig {
            name: "agent".into(),
            uids: vec![1],
            daily_tts_characters: Some(10),
            ..AppConfig::default()
        }]);
        u
    }

    #[tokio::test]
    async fn the_crossing_request_is_counted_then_the_next_is_refused_until_midnight() {
        // 2026-11-26T23:00:00Z
        let clock = TestClock::at(1_795_734_000);
        let u = usage(&clock);
        u.check("agent", Meter::TtsCharacters).await.unwrap();
        u.add("agent", Add::Tts(9)).await;
        u.check("agent", Meter::TtsCharacters).await.unwrap();
        u.add("agent", Add::Tts(5)).await;
        assert_eq!(u.totals("agent").await.tts_characters, 14);
        let e = u.check("agent", Meter::TtsCharacters).await.unwrap_err();
        assert_eq!(e.resets_at, "2026-11-27T00:00:00Z");
        assert_eq!(e.retry_after, Duration::from_secs(3600));
        // No budget for STT, and none for other apps.
        u.check("agent", Meter::SttSeconds).await.unwrap();
        u.check("default", Meter::TtsCharacters).await.unwrap();
        clock.advance(Duration::from_secs(3600));
        u.check("agent", Meter::TtsCharacters).await.unwrap();
        assert_eq!(u.totals("agent").await, Totals::default());
    }

    #[tokio::test]
    async fn the_80_percent_warning_comes_once_a_day() {
        let clock = TestClock::at(1_795_734_000);
        let u = usage(&clock);
        let at = |n| Totals {
            tts_characters: n,
            ..Totals::default()
        };
        assert_eq!(u.warn_near_budget("agent", &at(7)), 0);
        assert_eq!(u.warn_near_budget("agent", &at(8)), 1);
        assert_eq!(u.warn_near_budget("agent", &at(12)), 0, "once");
        assert_eq!(u.warn_near_budget("default", &at(100)), 0, "no budget, no warning");
        clock.advance(Duration::from_secs(DAY_SECS));
        assert_eq!(u.totals("agent").await, Totals::default(), "a new day");
        assert_eq!(u.warn_near_budget("agent", &at(9)), 1, "again the next day");
    }

    #[tokio::test]
    async fn the_report_lists_configured_apps_and_default_with_budgets() {
        let clock = TestClock::at(1_795_734_000);
        let u = usage(&clock);
        u.add(
            "agent",
            Add::Llm {
                prompt: 3,
                completion: 4,
            },
        )
        .await;
        u.add(
            "default",
            Add::Stt {
                seconds: 1.5,
                how: "wav_header",
            },
        )
        .await;
        let r = u.report();
        assert_eq!(r["day"], "2026-11-26");
        assert_eq!(r["apps"]["agent"]["llm_tokens"]["total"], 7);
        assert_eq!(r["apps"]["agent"]["budgets"]["daily_tts_characters"], 10);
        assert_eq!(r["apps"]["default"]["stt_seconds"], 1.5);
        assert!(r["apps"]["default"]["budgets"]["daily_tts_characters"].is_null());
    }

    #[tokio::test]
    async fn changes_are_taken_once_and_a_stale_day_is_not_restored() {
        let clock = TestClock::at(1_795_734_000);
        let u = usage(&clock);
        u.add("agent", Add::Tts(2)).await;
        let day = u.take_changes().expect("changed");
        assert!(u.take_changes().is_none());
        let v = usage(&clock);
        v.restore(day.clone());
        assert_eq!(v.totals("agent").await.tts_characters, 2);
        clock.advance(Duration::from_secs(DAY_SECS));
        let w = usage(&clock);
        w.restore(day);
        assert_eq!(w.totals("agent").await.tts_characters, 0);
    }
}
