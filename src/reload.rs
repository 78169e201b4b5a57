//! How the per-run state a request uses ([`RunState`]: config, client-side checks, upstream
//! clients, key store, limits, request metrics) is built, and how SIGHUP replaces it.
//!
//! A reload re-reads the config file (and the same environment), builds a complete new state
//! beside the running one, and only then swaps it in with one atomic store: a request loads the
//! state once when its head arrives and finishes on it, so in-flight requests, streams and
//! tunnels keep the upstream, key and limits they started with. Any error (parse, validation,
//! key source construction, a new key source that yields no key) leaves the running state
//! untouched; it is logged with the config's `file:line:column` and counted.
//!
//! Parts are reused when their config did not change, so a reload that only changes a limit
//! does not re-fetch the key, and one that only changes the key file keeps the limiter's queues.
//! A changed `[limits]` gets a fresh limiter: requests admitted before the reload keep their
//! slots in the old one until they end, so for that long old and new slots both count.
//! `[[route]]`s are rebuilt the same way, matched by name: a route keeps its key store and
//! limiter when their config did not change; a new route, like a new `[key]`, must produce a
//! key before the reload is taken.
//! What cannot change without a restart (`[listen]`, `[admin]`, `log.format`) is logged at
//! warn and kept as it is.

use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::config::DEFAULT_CLASS_NAME;
use crate::config::{self, Config};
use crate::keys::{self, KeyRuntime, KeyStore};
use crate::limits::{self, redis::SharedStore};
use crate::metrics::{Metrics, ReloadLabels};
use crate::proxy::exchange::RequestMetrics;
use crate::proxy::route::{Route, Router};
use crate::proxy::tunnel::Tunnels;
use crate::proxy::{Bounds, Proxy};
use crate::server::app::{Checks, RunState};
use crate::upstream::Upstream;
use crate::{RunError, INITIAL_KEY_WAIT, SHARED_LIMITS_WAIT};

/// What every state of one run shares.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub tunnels: Tunnels,
    /// Cancelled at shutdown: stops every key refresher.
    pub run: CancellationToken,
    /// Usage per app: kept across reloads (a reload changes the apps and budgets only).
    pub usage: Arc<crate::usage::Usage>,
}

/// Replaces the running subscriber's filter with one parsed from a `log.level` string.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the log filter of the running subscriber (a `tracing_subscriber` reload handle,
/// built in `main.rs`).
pub struct LogControl {
    /// `RUST_LOG` is set: it wins over `log.level`, so a reload leaves the filter alone.
    pub rust_log_set: bool,
    pub set_level: SetLogLevel,
}

/// Where a reload reads its config from: the same file and environment as at start.
pub struct ReloadSource {
    pub requests: tokio::sync::mpsc::Receiver<()>,
    pub config_path: Option<PathBuf>,
    pub vars: Vec<(String, String)>,
    pub log: Option<LogControl>,
}

/// Build a state from `config`, reusing what `previous` has for unchanged sections. At start
/// (`previous` is `None`) a key source that fails its first fetch still serves (`/ready` says
/// why); on reload it is an error, because swapping in a source with no key would turn a
/// working proxy into one that answers `KEY_UNAVAILABLE`.
pub async fn build(config: Config, previous: Option<&RunState>, shared: &Shared) -> Result<RunState, RunError> {
    let upstream = Upstream::new(&config.upstream)?;
    // Caller control, size limits and path policy: a bad token file fails here, before a key
    // source is started for nothing.
    let checks = Checks::from_config(&config).map_err(RunError::Hardening)?;
    let keys = match previous {
        Some(p) if p.config.key == config.key && p.config.auth == config.auth => p.keys.clone(),
        _ => start_keys(&config, previous.is_some(), shared).await?,
    };
    let (limiter, shared_store) = match previous {
        Some(p) if p.config.limits == config.limits => (p.limiter.clone(), p.shared.clone()),
        _ => {
            let running = previous.map(|p| (&p.config.limits, &p.shared));
            start_limits(DEFAULT_CLASS_NAME, &config.limits, running, shared).await?
        }
    };
    let routes = build_routes(&config, previous, shared).await?;
    let request_metrics = RequestMetrics::new(
        limiter
            .classes()
            .iter()
            .chain(routes.routes().iter().flat_map(|r| r.limiter.classes()))
            .map(|c| c.name()),
        &shared.metrics,
    );
    let proxy = Proxy::new(
        upstream,
        keys.store.clone(),
        limiter.clone(),
        Bounds::from_config(&config),
    )
    .with_tunnels(shared.tunnels.clone())
    .with_usage(shared.usage.clone());
    crate::usage::configure(&shared.usage, &config, previous.map(|p| &p.config));
    Ok(RunState {
        config,
        checks,
        proxy,
        keys,
        limiter,
        shared: shared_store,
        request_metrics,
        routes,
    })
}

/// A key store for `config.key` with its refresher and file watcher, after one bounded first
/// fetch. At start a source that fails it still serves (`/ready` says why); on reload it is an
/// error, because swapping in a source with no key would turn working paths into
/// `KEY_UNAVAILABLE`.
async fn start_keys(config: &Config, reloading: bool, shared: &Shared) -> Result<Arc<KeyRuntime>, RunError> {
    let source = keys::source_from_config(config).await?;
    let store = Arc::new(KeyStore::new(source, config.auth.scheme, config.key.max_stale));
    // A first fetch before serving, bounded so a dead source cannot hold start-up hostage.
    let first = tokio::time::timeout(INITIAL_KEY_WAIT, store.refresh()).await;
    if reloading {
        match first {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(RunError::KeySource(e)),
            Err(_) => {
                return Err(RunError::Reload(format!(
                    "the new key source gave no key within {}",
                    humantime::format_duration(INITIAL_KEY_WAIT)
                )))
            }
        }
    }
    let stop = shared.run.child_token();
    let _ = keys::spawn_refresher(store.clone(), config.key.refresh_interval, stop.clone());
    let watcher = match (&config.key.source, &config.key.file) {
        (config::KeySourceKind::File, Some(path)) => keys::file::watch(path, store.clone()),
        _ => None,
    };
    Ok(Arc::new(KeyRuntime::new(store, stop, watcher)))
}

/// A limiter for `limits` whose default class is `name`, reusing the running Redis connection
/// when `[limits.shared]` did not change.
async fn start_limits(
    name: &str,
    limits: &config::LimitsConfig,
    running: Option<(&config::LimitsConfig, &Option<Arc<SharedStore>>)>,
    shared: &Shared,
) -> Result<(Arc<limits::Limiter>, Option<Arc<SharedStore>>), RunError> {
    let store = match (&limits.shared, running) {
        (Some(wanted), Some((old, store))) if old.shared.as_ref() == Some(wanted) => store.clone(),
        (Some(wanted), _) => {
            let store = SharedStore::start(wanted, shared.metrics.redis_fallbacks.clone()).map_err(RunError::Limits)?;
            // Start in shared mode when Redis is there; never hold start-up hostage to it.
            store.wait_up(SHARED_LIMITS_WAIT).await;
            Some(store)
        }
        (None, _) => None,
    };
    let limiter = Arc::new(limits::Limiter::named(name, limits, &shared.metrics, store.clone()));
    Ok((limiter, store))
}

/// The `[[route]]`s, each a request path of its own, in config order.
async fn build_routes(config: &Config, previous: Option<&RunState>, shared: &Shared) -> Result<Router, RunError> {
    let mut routes = Vec::with_capacity(config.route.len());
    for route in &config.route {
        routes.push(build_route(route, config, previous, shared).await?);
    }
    Ok(Router::new(
        routes,
        &config.upstream.url,
        config.auth.scheme.as_str(),
        shared.metrics.clone(),
    ))
}

/// One route. It keeps the running route's key store when its key config (and scheme) did not
/// change, and its limiter when its limits did not; its upstream pool is rebuilt, like the
/// default route's.
async fn build_route(
    route: &config::RouteConfig,
    config: &Config,
    previous: Option<&RunState>,
    shared: &Shared,
) -> Result<Route, RunError> {
    let name = &route.name;
    let blame = |e: RunError| RunError::Reload(format!("route {name:?}: {e}"));
    let own = route.as_config(config);
    let upstream = Upstream::new(&own.upstream).map_err(|e| blame(e.into()))?;
    let running = previous.and_then(|p| p.routes.routes().iter().find(|r| &r.config.name == name));
    let keys = match running {
        Some(r) if r.config.key == route.key && r.config.scheme == route.scheme => r.keys.clone(),
        _ => start_keys(&own, previous.is_some(), shared).await.map_err(blame)?,
    };
    let (limiter, store) = match running {
        Some(r) if r.config.limits == route.limits => (r.limiter.clone(), r.shared.clone()),
        _ => {
            let old = running.and_then(|r| r.config.limits.as_ref().map(|l| (l, &r.shared)));
            start_limits(name, &own.limits, old, shared).await.map_err(blame)?
        }
    };
    // A route's requests are metered for their app like the default route's.
    let proxy = Proxy::new(upstream, keys.store.clone(), limiter.clone(), Bounds::from_config(&own))
        .with_tunnels(shared.tunnels.clone())
        .with_usage(shared.usage.clone());
    Ok(Route {
        config: route.clone(),
        proxy,
        keys,
        limiter,
        shared: store,
    })
}

/// Re-read the config and swap in a new state; on any error keep the running one.
pub async fn reload(state: &arc_swap::ArcSwap<RunState>, source: &ReloadSource, shared: &Shared) -> Result<(), String> {
    let current = state.load_full();
    let mut config = Config::load(source.config_path.as_deref(), &source.vars).map_err(|e| e.to_string())?;
    keep_restart_only(&mut config, &current.config);
    let level_changed = config.log.level != current.config.log.level;
    let next = build(config, Some(&current), shared).await.map_err(|e| e.to_string())?;
    if level_changed {
        match &source.log {
            Some(log) if log.rust_log_set => {
                tracing::warn!("log.level changed, but RUST_LOG is set and wins; the log filter stays as it is")
            }
            Some(log) => (log.set_level)(next.config.log.level.as_deref().unwrap_or("info"))
                .map_err(|e| format!("log.level: {e}"))?,
            None => {}
        }
    }
    if !Arc::ptr_eq(&next.keys, &current.keys) {
        shared.metrics.keys.set_store(next.keys.store.clone());
    }
    state.store(Arc::new(next));
    Ok(())
}

/// Settings bound at start (sockets, the log format): keep the running ones, say so.
fn keep_restart_only(config: &mut Config, running: &Config) {
    if config.listen != running.listen {
        tracing::warn!(
            "[listen] changed: listeners and connection settings change only on restart; keeping the running ones"
        );
        config.listen = running.listen.clone();
    }
    if config.admin != running.admin {
        tracing::warn!("[admin] changed: the admin address changes only on restart; keeping the running one");
        config.admin = running.admin.clone();
    }
    if config.log.format != running.log.format {
        tracing::warn!("log.format changed: the log format changes only on restart; keeping the running one");
        config.log.format = running.log.format;
    }
}

/// Serve reload requests until the channel closes: each one re-reads the config, counts the
/// result, and forces a key refresh (SIGHUP's other job).
pub async fn serve_reloads(state: Arc<arc_swap::ArcSwap<RunState>>, mut source: ReloadSource, shared: Shared) {
    while source.requests.recv().await.is_some() {
        let file = source
            .config_path
            .as_deref()
            .map_or("<defaults and environment>".into(), |p| p.display().to_string());
        tracing::info!(config = %file, "reload requested: re-reading the config");
        let result = reload(&state, &source, &shared).await;
        match &result {
            Ok(()) => tracing::info!(config = %file, "config reloaded; new requests use it"),
            Err(e) => tracing::error!(error = %e, "config reload failed; keeping the running config"),
        }
        let label = ReloadLabels {
            result: if result.is_ok() { "success" } else { "failure" },
        };
        shared.metrics.config_reloads.get_or_create(&label).inc();
        let state = state.load();
        state.keys.store.request_refresh();
        for route in state.routes.routes() {
            route.keys.store.request_refresh();
        }
    }
}
