//! What every client connection serves from: the per-run state a request loads once
//! ([`RunState`], replaced whole by a reload), and [`App::handle`], the one gate every request
//! passes in order before the request path sees it: caller (uid), admin endpoints, then the
//! [`Checks`] (guard, size limits, local token, path policy), then `proxy::Proxy::handle`, or
//! the `[[route]]` that claims the path (`proxy::route::Router`).
//!
//! The checks run here, on the client side, so the request path below only ever sees a request
//! the proxy has agreed to forward.

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use std::sync::Arc;

use super::admin;
use super::apps::{AppIdentity, Identified};
use super::caller::{CallerControl, ConnInfo};
use super::framing;
use super::guard::{self, Guard};
use super::policy::PathPolicy;
use super::request_limits::RequestLimits;
use crate::config::Config;
use crate::error::ProxyError;
use crate::keys::KeyRuntime;
use crate::limits::{redis::SharedStore, Limiter};
use crate::metrics::Metrics;
use crate::proxy::body::{ClientBody, ProxyBody};
use crate::proxy::exchange::{Exchange, ObservedBody, RequestMetrics};
use crate::proxy::route::Router;
use crate::proxy::{self, Proxy};

/// Everything a request needs that a reload may replace.
pub struct RunState {
    pub config: Config,
    pub checks: Checks,
    pub proxy: Proxy,
    pub keys: Arc<KeyRuntime>,
    pub limiter: Arc<Limiter>,
    /// Kept so a reload that leaves `[limits.shared]` alone reuses the Redis connection.
    pub shared: Option<Arc<SharedStore>>,
    pub request_metrics: RequestMetrics,
    /// `[[route]]`s: paths they claim go through them instead of `proxy`.
    pub routes: Router,
}

/// The client side's checks on a request, from `[listen]` and `[policy]`.
#[derive(Debug, Clone)]
pub struct Checks {
    pub guard: Guard,
    pub callers: CallerControl,
    pub limits: RequestLimits,
    pub paths: PathPolicy,
    /// `[[app]]`: which app a request is.
    pub apps: AppIdentity,
}

impl Checks {
    pub fn from_config(config: &Config) -> Result<Checks, String> {
        Ok(Checks {
            guard: Guard {
                check_host: !config.listen.allow_remote,
                allowed_origins: config.listen.allowed_origins.clone(),
            },
            callers: CallerControl::from_config(&config.listen).map_err(|e| format!("listen.token_file: {e}"))?,
            limits: RequestLimits::from_config(&config.listen),
            paths: PathPolicy::from_config(&config.policy),
            apps: AppIdentity::from_config(config)?,
        })
    }

    /// In order: what is refused outright (guard, body framing), then the target in origin
    /// form, sizes, the local token (removed from the request once it matched), then the method
    /// and path. Returns the app the request belongs to: an app's own token (`[[app]]`) admits
    /// in place of `listen.token_file`'s anonymous one.
    fn check(&self, req: &mut Request<ClientBody>, conn: &ConnInfo) -> Result<std::sync::Arc<str>, ProxyError> {
        self.guard.check(req, conn.transport)?;
        // A whole body comes from the plain path, which hands every head with
        // Transfer-Encoding or Upgrade to hyper: only a streamed request can break these rules.
        if let ClientBody::Streaming(_) = req.body() {
            framing::check(req)?;
        }
        guard::to_origin_form(req.uri_mut())?;
        self.limits.check(req)?;
        let app = match self.apps.identify(req.headers_mut(), conn, self.callers.has_token())? {
            Identified::ByToken(app) => app,
            Identified::Other(app) => {
                self.callers.take_token(req.headers_mut())?;
                app
            }
        };
        self.paths.check(req.method(), req.uri().path())?;
        Ok(app)
    }
}

/// What every connection shares: the swappable per-run state and the run-wide parts.
pub struct App {
    /// Replaced whole by a reload; each request loads it once and finishes on it.
    pub state: Arc<ArcSwap<RunState>>,
    pub metrics: Arc<Metrics>,
    /// Usage per app, for `/usage` (on the admin address when set, like `/metrics`).
    pub usage: Arc<crate::usage::Usage>,
    /// `[admin] address` is set: `/metrics` is served there, not on the main listeners.
    pub metrics_on_main: bool,
}

impl App {
    /// `conn` is passed beside the request rather than in its extensions: inserting it there
    /// allocated a type map per request.
    pub async fn handle(&self, mut req: Request<ClientBody>, conn: ConnInfo) -> Response<ObservedBody> {
        let state = self.state.load_full();
        // Before anything else, admin endpoints included: a refused caller learns nothing.
        let peer_uid = conn.peer_uid;
        if let Err(refused) = state.checks.callers.check_peer(Some(&conn)) {
            tracing::debug!(peer_uid, "caller refused");
            let (parts, body) = refused
                .into_response::<ProxyBody>(&proxy::request_id(&req))
                .into_parts();
            let status = parts.status;
            return Response::from_parts(parts, ObservedBody::new(body, status, None));
        }
        if req.uri().path() == super::usage::USAGE_PATH {
            let response = if self.metrics_on_main {
                super::usage::respond(&req, &self.usage)
            } else {
                super::usage::elsewhere()
            };
            let (parts, body) = response.into_parts();
            return Response::from_parts(parts, ObservedBody::new(body, StatusCode::OK, None));
        }
        if admin::is_admin_request(&req) {
            let response = if req.uri().path() == admin::METRICS_PATH && !self.metrics_on_main {
                admin::metrics_elsewhere()
            } else {
                admin::respond(&req, &state.keys.store, &state.routes, &state.limiter, &self.metrics)
            };
            // Probes and scrapes are not API traffic: no access line, no request metrics.
            let (parts, body) = response.into_parts();
            return Response::from_parts(parts, ObservedBody::new(body, StatusCode::OK, None));
        }
        let route = state.routes.route_for(req.uri().path());
        let class = state
            .routes
            .limiter(route, &state.limiter)
            .class_for(req.uri().path())
            .name();
        let exchange = Arc::new(Exchange::new(
            req.method().clone(),
            req.uri().path(),
            state.request_metrics.class(class),
            // The caller's uid on a Unix socket (SO_PEERCRED).
            peer_uid,
            state.config.log.access,
        ));
        let request_id = proxy::request_id(&req);
        exchange.set_request_id(&request_id);
        let response = match state.checks.check(&mut req, &conn) {
            Ok(app) => {
                exchange.set_app(app);
                match route {
                    Some(route) => {
                        state
                            .routes
                            .handle(route, &state.proxy, req, &request_id, &exchange)
                            .await
                    }
                    None => state.proxy.handle(req, &request_id, &exchange).await,
                }
            }
            Err(err) => {
                tracing::debug!(request_id = %request_id, code = err.status_and_code().1, "answered locally");
                err.into_response(&request_id)
            }
        };
        let (parts, body) = response.into_parts();
        let status = parts.status;
        Response::from_parts(parts, ObservedBody::new(body, status, Some(exchange)))
    }

    /// `/health`, `/ready` and `/metrics` on the `[admin] address`.
    pub fn handle_admin<B>(&self, req: &Request<B>) -> Response<ProxyBody> {
        if req.uri().path() == super::usage::USAGE_PATH {
            return super::usage::respond(req, &self.usage);
        }
        if !admin::is_admin_request(req) {
            return admin::not_found();
        }
        let state = self.state.load();
        admin::respond(req, &state.keys.store, &state.routes, &state.limiter, &self.metrics)
    }
}
