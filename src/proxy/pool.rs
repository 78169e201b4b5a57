//! Pooled connections to the one upstream, for everything but WebSocket handshakes.
//!
//! Why not hyper-util's pooled `Client` (which the WebSocket path still uses): it is built for
//! many hosts, and per request it hashes a (scheme, authority) key with SipHash into three maps,
//! clones the whole client into a lazy connect future, races that against the checkout, boxes
//! the result and spawns a task that hands the connection back once the body ends. For a
//! sidecar with exactly one upstream that was ~12% of the proxy's instructions per request
//! (callgrind, benches/RESULTS.md). Here the pool is one list behind a mutex:
//!
//! - HTTP/1.1: a connection is taken out of the list while its request is sent and put back as
//!   soon as the response head arrives; it is reused once hyper says it is ready again (the
//!   response body ended). Most recently used first, so surplus connections age out.
//! - HTTP/2 (when ALPN picks it): one shared connection, cloned per request.
//! - A request that a pooled connection closed before taking (the upstream dropped an idle
//!   keep-alive connection) is sent once more, on another connection; hyper hands such a
//!   request back untouched, so this never sends anything twice.
//! - A reaper task, started with the first pooled connection and ended with the pool, closes
//!   connections idle longer than `upstream.pool_idle_timeout`.

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tower_service::Service;

use super::body::ProxyBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response from the pool.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be made (TCP, TLS, or the HTTP handshake).
    Connect(BoxError),
    /// A connection was there, and the exchange on it failed.
    Send(hyper::Error),
}

impl PoolError {
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }

    /// The error itself, for walking the cause chain.
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            PoolError::Connect(e) => e.as_ref(),
            PoolError::Send(e) => e,
        }
    }
}

/// The pool for one upstream.
pub struct UpstreamPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: what the connector connects to.
    destination: Uri,
    idle_timeout: Duration,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// HTTP/1.1 connections not carrying a request right now (some may still be streaming a
    /// response body: those are not ready yet). Newest at the end.
    http1: Vec<Http1Entry>,
    http2: Option<Http2Entry>,
    reaper_running: bool,
}

struct Http1Entry {
    sender: http1::SendRequest<ProxyBody>,
    /// When it was last seen busy or put back.
    since: Instant,
}

struct Http2Entry {
    sender: http2::SendRequest<ProxyBody>,
    last_used: Instant,
}

enum Checkout {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

impl UpstreamPool {
    pub fn new(connector: HttpsConnector<HttpConnector>, destination: Uri, idle_timeout: Duration) -> UpstreamPool {
        UpstreamPool {
            inner: Arc::new(PoolInner {
                connector,
                destination,
                idle_timeout,
                idle: Mutex::new(Idle::default()),
            }),
        }
    }

    /// Send `req` (absolute-form URI, `Host` already set) and wait for the response head.
    pub async fn send(&self, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, PoolError> {
        // A second round only when a pooled (not a fresh) connection handed the request back
        // unsent: a fresh connection that fails that way is the upstream's answer.
        let mut may_resend = true;
        loop {
            let checkout = match self.inner.checkout() {
                Some(found) => found,
                None => {
                    may_resend = false;
                    // Boxed: the connect path's state (TCP, TLS, handshake) is large and rare,
                    // and inlined it would make every request's future, which hyper moves
                    // into place per request, several KiB bigger.
                    Box::pin(self.inner.connect()).await?
                }
            };
            let mut failed = match checkout {
                Checkout::Http2(mut sender) => match sender.try_send_request(req).await {
                    Ok(response) => return Ok(response),
                    Err(failed) => failed,
                },
                Checkout::Http1(mut sender) => {
                    origin_form(req.uri_mut());
                    match sender.try_send_request(req).await {
                        Ok(response) => {
                            self.inner.put_back(sender);
                            return Ok(response);
                        }
                        Err(failed) => failed,
                    }
                }
            };
            match failed.take_message() {
                // Never written: safe to send on another connection, once.
                Some(unsent) if may_resend => {
                    tracing::debug!("pooled upstream connection closed before the request; resending");
                    req = unsent;
                    may_resend = false;
                }
                _ => return Err(PoolError::Send(failed.into_error())),
            }
        }
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, Idle> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn checkout(&self) -> Option<Checkout> {
        let mut idle = self.lock();
        if let Some(entry) = &mut idle.http2 {
            if !entry.sender.is_closed() {
                entry.last_used = Instant::now();
                return Some(Checkout::Http2(entry.sender.clone()));
            }
            idle.http2 = None;
        }
        idle.http1.retain(|entry| !entry.sender.is_closed());
        let ready = idle.http1.iter().rposition(|entry| entry.sender.is_ready())?;
        Some(Checkout::Http1(idle.http1.remove(ready).sender))
    }

    fn put_back(self: &Arc<Self>, sender: http1::SendRequest<ProxyBody>) {
        let mut idle = self.lock();
        idle.http1.push(Http1Entry {
            sender,
            since: Instant::now(),
        });
        self.start_reaper(&mut idle);
    }

    /// A new connection: TCP, TLS (ALPN decides the protocol), the HTTP handshake, and a task
    /// that drives it.
    async fn connect(self: &Arc<Self>) -> Result<Checkout, PoolError> {
        let io = self
            .connector
            .clone()
            .call(self.destination.clone())
            .await
            .map_err(PoolError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .adaptive_window(true)
                .handshake(io)
                .await
                .map_err(|e| PoolError::Connect(Box::new(e)))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            let mut idle = self.lock();
            idle.http2 = Some(Http2Entry {
                sender: sender.clone(),
                last_used: Instant::now(),
            });
            self.start_reaper(&mut idle);
            Ok(Checkout::Http2(sender))
        } else {
            let (sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| PoolError::Connect(Box::new(e)))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Checkout::Http1(sender))
        }
    }

    fn start_reaper(self: &Arc<Self>, idle: &mut Idle) {
        if idle.reaper_running {
            return;
        }
        idle.reaper_running = true;
        let pool = Arc::downgrade(self);
        // Expiry is checked a few times per timeout, so a connection lives at most ~1.25x it.
        let every = (self.idle_timeout / 4).max(Duration::from_millis(50));
        tokio::spawn(reap(pool, every));
    }

    /// Drop what has been idle too long; true when nothing is left to watch.
    fn expire(&self, now: Instant) -> bool {
        let mut idle = self.lock();
        let timeout = self.idle_timeout;
        idle.http1.retain_mut(|entry| {
            if entry.sender.is_closed() {
                return false;
            }
            if !entry.sender.is_ready() {
                // Still streaming a response body: busy, not idle.
                entry.since = now;
                return true;
            }
            now.duration_since(entry.since) < timeout
        });
        if let Some(entry) = &idle.http2 {
            if entry.sender.is_closed() || now.duration_since(entry.last_used) >= timeout {
                idle.http2 = None;
            }
        }
        if idle.http1.is_empty() && idle.http2.is_none() {
            idle.reaper_running = false;
            return true;
        }
        false
    }
}

/// The reaper: ends when the pool is gone or empty (the next pooled connection restarts it).
async fn reap(pool: Weak<PoolInner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.expire(Instant::now()) {
            return;
        }
    }
}

/// HTTP/1.1 requests carry only the path and query on the request line.
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    let origin = match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" || pq.query().is_some() => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts).ok()
        }
        _ => None,
    };
    *uri = origin.unwrap_or_else(|| Uri::from_static("/"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        let mut uri: Uri = "https://api.smallest.ai/waves/v1/x?a=1".parse().unwrap();
        origin_form(&mut uri);
        assert_eq!(uri.to_string(), "/waves/v1/x?a=1");
        let mut root: Uri = "https://api.smallest.ai".parse().unwrap();
        origin_form(&mut root);
        assert_eq!(root.to_string(), "/");
        let mut already: Uri = "/a/b".parse().unwrap();
        origin_form(&mut already);
        assert_eq!(already.to_string(), "/a/b");
    }
}
