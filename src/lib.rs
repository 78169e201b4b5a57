//! smallest-proxy: a local sidecar that adds the Smallest AI API key to requests from apps
//! that hold no credentials, and forwards them over verified TLS.
//!
//! [`run`] is the seam: `main.rs` and the integration tests both build a [`Config`], bind
//! [`Listeners`], and call it. Module map (a room per concern):
//! `config` (the TOML contract), `keys` (sources and rotation), `proxy` (the request path),
//! `admin` (`/health`, `/ready`), `server` (listeners and connections), `error` (the JSON
//! error table).

pub mod admin;
pub mod config;
pub mod error;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod systemd;
pub mod timeouts;

use http::{Request, Response};
use hyper::body::Incoming;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use server::Listeners;

use keys::KeyStore;
use proxy::body::ProxyBody;
use proxy::guard::{Guard, Transport};
use proxy::Proxy;

/// How long start-up waits for the first key fetch before serving anyway (with `/ready` 503
/// and `KEY_UNAVAILABLE` answers until the source comes up).
pub const INITIAL_KEY_WAIT: Duration = Duration::from_secs(2);
/// How long start-up waits for Redis before serving with local limits (shared mode resumes by
/// itself once Redis answers).
pub const SHARED_LIMITS_WAIT: Duration = Duration::from_secs(2);

/// Everything a request needs, shared by all connections.
pub struct App {
    proxy: Proxy,
    keys: Arc<KeyStore>,
    metrics: Arc<metrics::Metrics>,
}

impl App {
    async fn handle(&self, req: Request<Incoming>, transport: Transport) -> Response<ProxyBody> {
        // Before anything else, admin endpoints included: a refused caller learns nothing.
        let conn = req.extensions().get::<proxy::caller::ConnInfo>();
        if let Err(refused) = self.proxy.hardening.callers.check_peer(conn) {
            tracing::debug!(peer_uid = conn.and_then(|c| c.peer_uid), "caller refused");
            return refused.into_response(&proxy::request_id(&req));
        }
        if admin::is_admin_request(&req) {
            return admin::respond(&req, &self.keys, &self.metrics);
        }
        self.proxy.handle(req, transport).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Upstream(#[from] proxy::forward::UpstreamSetupError),
    #[error("key source: {0}")]
    KeySource(#[from] keys::KeyError),
    #[error("{0}")]
    Limits(String),
    #[error("{0}")]
    Hardening(String),
}

/// Run the proxy on `listeners` until `shutdown` completes, then drain and return.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with_reload(config, listeners, shutdown, None).await
}

/// [`run`], plus a reload trigger (SIGHUP in `main.rs`): each message forces a key refresh.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reload: Option<tokio::sync::mpsc::Receiver<()>>,
) -> Result<(), RunError> {
    let upstream = proxy::forward::Upstream::new(&config.upstream)?;
    let source = keys::source_from_config(&config).await?;
    let keys = Arc::new(KeyStore::new(source, config.auth.scheme, config.key.max_stale));
    let token = CancellationToken::new();

    // A first fetch before serving, bounded so a dead source cannot hold start-up hostage.
    let _ = tokio::time::timeout(INITIAL_KEY_WAIT, keys.refresh()).await;
    let refresher = keys::spawn_refresher(keys.clone(), config.key.refresh_interval, token.clone());
    // Held for the whole run: dropping the watcher stops it.
    let _key_file_watcher = match (&config.key.source, &config.key.file) {
        (config::KeySourceKind::File, Some(path)) => keys::file::watch(path, keys.clone()),
        _ => None,
    };
    if let Some(mut reload) = reload.take() {
        let keys = keys.clone();
        tokio::spawn(async move {
            while reload.recv().await.is_some() {
                tracing::info!("reload requested: refreshing the key");
                keys.request_refresh();
            }
        });
    }

    let guard = Guard {
        check_host: !config.listen.allow_remote,
        allowed_origins: config.listen.allowed_origins.clone(),
    };
    let hardening = proxy::Hardening::from_config(&config).map_err(RunError::Hardening)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let shared = match &config.limits.shared {
        Some(shared) => {
            let store =
                limits::redis::SharedStore::start(shared, metrics.redis_fallbacks.clone()).map_err(RunError::Limits)?;
            // Start in shared mode when Redis is there; never hold start-up hostage to it.
            store.wait_up(SHARED_LIMITS_WAIT).await;
            Some(store)
        }
        None => None,
    };
    let limiter = Arc::new(limits::Limiter::new(&config.limits, &metrics, shared));
    let app = Arc::new(App {
        proxy: Proxy::new(upstream, keys.clone(), guard, limiter.clone()).with_hardening(hardening),
        keys: keys.clone(),
        metrics,
    });

    let status = keys.status();
    tracing::info!(
        listen = %listeners.describe(),
        upstream = %config.upstream.url,
        key_source = status.source,
        key_fingerprint = status.fingerprint.as_deref().unwrap_or("none yet"),
        limits = %limiter.describe(),
        "smallest-proxy serving"
    );
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

    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        systemd::notify("STOPPING=1\nSTATUS=draining");
        cancel.cancel();
    });
    server::serve(app, listeners, token.clone(), &config.listen).await;
    token.cancel();
    if let Some(refresher) = refresher {
        let _ = refresher.await;
    }
    tracing::info!("smallest-proxy stopped");
    Ok(())
}
