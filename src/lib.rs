//! smallest-proxy: a local sidecar that adds the Smallest AI API key to requests from apps
//! that hold no credentials, and forwards them over verified TLS.
//!
//! [`run`] is the seam: `main.rs` and the integration tests both build a [`Config`], bind
//! [`Listeners`], and call it. Rooms by direction, each importing only from the rooms below it:
//!
//! - `server`: the client side: listeners, the plain-request front end, admin endpoints, and
//!   the checks a request passes before anything is forwarded (caller, guard, size limits,
//!   path policy).
//! - `proxy`: the request path: key, rewrite, admission, resend, response and tunnel bodies,
//!   the access line.
//! - `upstream`: the upstream side: connection pool, our HTTP/1.1 client, hyper's HTTP/2 and
//!   WebSocket clients.
//! - the ground they stand on: `config` (the TOML contract, a file per section), `error` (the
//!   JSON error table), `keys` (sources and rotation), `limits`, `metrics`, `timeouts`, `tls`.
//!
//! `reload` sits above them all: it builds the per-run state from a config and swaps it on
//! SIGHUP. `service` is beside the proxy, not in it: the per-user service files that
//! `smallest-proxy service install` writes.

pub mod config;
pub mod error;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod service;
pub mod timeouts;
pub mod tls;
pub mod upstream;
pub mod usage;

use arc_swap::ArcSwap;
use http::Request;
use hyper::body::Incoming;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use server::Listeners;

use proxy::tunnel::Tunnels;
use server::app::App;
use server::systemd;

/// How long start-up waits for the first key fetch before serving anyway (with `/ready` 503
/// and `KEY_UNAVAILABLE` answers until the source comes up).
pub const INITIAL_KEY_WAIT: Duration = Duration::from_secs(2);
/// How long start-up waits for Redis before serving with local limits (shared mode resumes by
/// itself once Redis answers).
pub const SHARED_LIMITS_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamSetupError),
    #[error("key source: {0}")]
    KeySource(#[from] keys::KeyError),
    #[error("{0}")]
    Limits(String),
    #[error("{0}")]
    Hardening(String),
    #[error("{0}")]
    Reload(String),
    #[error("admin address {address}: {error}")]
    Admin { address: String, error: std::io::Error },
}

/// Run the proxy on `listeners` until `shutdown` completes, then drain and return.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with_reload(config, listeners, shutdown, None).await
}

/// [`run`], plus reloads (SIGHUP in `main.rs`): each request on `reload` re-reads the config
/// from the same file and environment, applies it to new requests, and forces a key refresh.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Option<reload::ReloadSource>,
) -> Result<(), RunError> {
    run_with_clock(config, listeners, shutdown, reload, Arc::new(usage::SystemClock)).await
}

/// [`run_with_reload`] with the time source of usage days and budgets given (tests turn the
/// day with a [`usage::TestClock`]).
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Option<reload::ReloadSource>,
    clock: Arc<dyn usage::Clock>,
) -> Result<(), RunError> {
    let token = CancellationToken::new();
    let metrics = Arc::new(metrics::Metrics::new());
    let tunnels = Tunnels::default();
    let usage = Arc::new(usage::Usage::new(clock, metrics.clone()));
    let usage_file = config.usage.state_file.clone();
    if let Some(path) = &usage_file {
        usage::state::load(&usage, path);
    }
    usage::spawn_upkeep(
        usage.clone(),
        usage_file.clone(),
        config.usage.save_interval,
        token.clone(),
    );
    let shared = || reload::Shared {
        metrics: metrics.clone(),
        tunnels: tunnels.clone(),
        run: token.clone(),
        usage: usage.clone(),
    };
    let admin_listener = match config.admin.socket_address() {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|error| RunError::Admin {
                    address: address.to_string(),
                    error,
                })?,
        ),
        None => None,
    };
    let drain_timeout = config.listen.drain_timeout;
    let listen = config.listen.clone();
    let state = reload::build(config, None, &shared()).await?;
    metrics.keys.set_store(state.keys.store.clone());
    let state = Arc::new(ArcSwap::from_pointee(state));
    if let Some(source) = reload {
        tokio::spawn(reload::serve_reloads(state.clone(), source, shared()));
    }
    let app = Arc::new(App {
        state: state.clone(),
        usage: usage.clone(),
        metrics,
        metrics_on_main: admin_listener.is_none(),
    });

    let current = state.load();
    let status = current.keys.store.status();
    let admin_address = admin_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or("none (on the main listener)".to_string(), |a| format!("http://{a}"));
    tracing::info!(
        listen = %listeners.describe(),
        upstream = %current.config.upstream.url,
        key_source = status.source,
        key_fingerprint = status.fingerprint.as_deref().unwrap_or("none yet"),
        limits = %current.limiter.describe(),
        admin = %admin_address,
        "smallest-proxy serving"
    );
    for route in current.routes.routes() {
        let status = route.keys.store.status();
        tracing::info!(
            route = %route.config.name,
            paths = ?route.config.paths,
            upstream = %route.config.upstream,
            scheme = route.config.scheme.as_str(),
            key_source = status.source,
            key_fingerprint = status.fingerprint.as_deref().unwrap_or("none yet"),
            fallback = route.config.fallback.as_deref().unwrap_or("none"),
            limits = %route.limiter.describe(),
            "route"
        );
    }
    drop(current);
    // Listening, and the first key fetch has been attempted: tell systemd (Type=notify).
    let key_state = match &status.fingerprint {
        Some(fingerprint) => format!("key from {} loaded ({fingerprint})", status.source),
        None => format!(
            "key from {} unavailable: {}",
            status.source,
            status.last_error.as_deref().unwrap_or("not fetched yet")
        ),
    };
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving on {}; {key_state}",
        listeners.describe()
    ));
    systemd::spawn_watchdog();

    if let Some(listener) = admin_listener {
        let app = app.clone();
        tokio::spawn(server::admin::serve(
            listener,
            Arc::new(move |req: &Request<Incoming>| app.handle_admin(req)),
            token.clone(),
        ));
    }

    let cancel = token.clone();
    let close_tunnels = tunnels.close.clone();
    tokio::spawn(async move {
        shutdown.await;
        systemd::notify("STOPPING=1\nSTATUS=draining");
        cancel.cancel();
        // WebSocket tunnels get the whole drain, then a Close(1001).
        tokio::time::sleep(drain_timeout).await;
        close_tunnels.cancel();
    });
    server::serve(app, listeners, token.clone(), &listen).await;
    token.cancel();
    tunnels.tracker.close();
    if !tunnels.tracker.is_empty() {
        tracing::info!(
            open = tunnels.tracker.len(),
            "waiting for WebSocket tunnels (closed with 1001 at the drain deadline)"
        );
        let bound = drain_timeout + proxy::tunnel::BOUNDARY_GRACE + proxy::tunnel::CLOSE_REPLY_WAIT * 2;
        if tokio::time::timeout(bound, tunnels.tracker.wait()).await.is_err() {
            tracing::warn!(
                open = tunnels.tracker.len(),
                "WebSocket tunnels still open; exiting anyway"
            );
        }
    }
    if let Some(path) = &usage_file {
        usage::state::save(&usage, path);
    }
    tracing::info!("smallest-proxy stopped");
    Ok(())
}
