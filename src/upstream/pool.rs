//! Pooled connections to the one upstream, for everything but WebSocket handshakes.
//!
//! Why not hyper-util's pooled `Client` (which the WebSocket path still uses): it is built for
//! many hosts, and per request it hashes a (scheme, authority) key with SipHash into three maps,
//! clones the whole client into a lazy connect future, races that against the checkout, boxes
//! the result and spawns a task that hands the connection back once the body ends. For a
//! sidecar with exactly one upstream that was ~12% of the proxy's instructions per request
//! (callgrind, benches/RESULTS.md). Here the pool is one list behind a mutex:
//!
//! - HTTP/1.1 ([`super::h1`]): a connection is taken out of the list for one exchange and put
//!   back by its response body when that ends cleanly. Most recently used first, so surplus
//!   connections age out. One that the upstream closed while idle is noticed at checkout
//!   (without a syscall unless its socket became readable) and dropped.
//! - HTTP/2 (when ALPN picks it): one shared hyper connection, cloned per request.
//! - A request that a pooled connection failed before a byte of it was written (the upstream
//!   closed an idle keep-alive connection just then) is sent once more, on another connection.
//!   Once a byte is out it is never resent: the upstream may have acted on it.
//! - A reaper task, started with the first pooled connection and ended with the pool, closes
//!   connections idle longer than `upstream.pool_idle_timeout`, or closed by the upstream.

use http::{HeaderMap, Request, Response, Uri};
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tower_service::Service;

use super::body::{SendBody, UpstreamBody};
use super::h1::{self, ExchangeError, H1Conn, UpstreamIo};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response from the pool.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be made (TCP, TLS, or the HTTP/2 handshake).
    Connect(BoxError),
    /// A connection was there, and the exchange on it failed.
    Send(BoxError),
}

impl PoolError {
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }

    /// The error itself, for walking the cause chain.
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            PoolError::Connect(e) | PoolError::Send(e) => e.as_ref(),
        }
    }
}

/// How connections are made: TCP (hyper-util's connector: resolution, several addresses,
/// the connect timeout, `TCP_NODELAY`), then TLS when the upstream is `https`.
pub struct Connector {
    pub tcp: HttpConnector,
    pub tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// `scheme://authority/`: what the TCP connector connects to.
    pub destination: Uri,
}

/// The pool for one upstream.
pub struct UpstreamPool {
    inner: Arc<PoolInner>,
}

pub struct PoolInner {
    connector: Connector,
    idle_timeout: Duration,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// HTTP/1.1 connections not carrying a request. Newest at the end.
    http1: Vec<H1Conn>,
    http2: Option<Http2Entry>,
    reaper_running: bool,
}

struct Http2Entry {
    sender: http2::SendRequest<SendBody>,
    last_used: Instant,
}

enum Checkout {
    Http1(H1Conn),
    Http2(http2::SendRequest<SendBody>),
}

impl UpstreamPool {
    pub fn new(connector: Connector, idle_timeout: Duration) -> UpstreamPool {
        UpstreamPool {
            inner: Arc::new(PoolInner {
                connector,
                idle_timeout,
                idle: Mutex::new(Idle::default()),
            }),
        }
    }

    /// Send `req` (absolute-form URI, `Host` already set) and wait for the response head. The
    /// request's headers come back with it, for a resend: HTTP/1.1 only reads them; for HTTP/2,
    /// which takes them, they are copied.
    pub async fn send(&self, mut req: Request<SendBody>) -> Result<(Response<UpstreamBody>, HeaderMap), PoolError> {
        // A second round only when a pooled (not a fresh) connection failed before the
        // request was written: a fresh connection that fails that way is the upstream's answer.
        let mut may_resend = true;
        loop {
            let checkout = match self.inner.checkout() {
                Some(found) => found,
                None => {
                    may_resend = false;
                    // Boxed: the connect path's state (TCP, TLS, handshake) is large and rare,
                    // and inlined it would make every request's future several KiB bigger.
                    Box::pin(self.inner.connect()).await?
                }
            };
            match checkout {
                Checkout::Http2(mut sender) => {
                    let headers = req.headers().clone();
                    match sender.try_send_request(req).await {
                        Ok(response) => return Ok((response.map(UpstreamBody::Hyper), headers)),
                        Err(mut failed) => match failed.take_message() {
                            Some(unsent) if may_resend => req = unsent,
                            _ => return Err(PoolError::Send(Box::new(failed.into_error()))),
                        },
                    }
                }
                Checkout::Http1(conn) => match h1::exchange(conn, req, &self.inner).await {
                    Ok((response, headers)) => return Ok((response.map(UpstreamBody::H1), headers)),
                    Err(ExchangeError::NotSent(_, unsent)) if may_resend => req = *unsent,
                    Err(ExchangeError::NotSent(e, _) | ExchangeError::Failed(e)) => {
                        return Err(PoolError::Send(Box::new(e)))
                    }
                },
            }
            tracing::debug!("pooled upstream connection closed before the request; resending");
            may_resend = false;
        }
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, Idle> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn checkout(&self) -> Option<Checkout> {
        {
            let mut idle = self.lock();
            if let Some(entry) = &mut idle.http2 {
                if !entry.sender.is_closed() {
                    entry.last_used = Instant::now();
                    return Some(Checkout::Http2(entry.sender.clone()));
                }
                idle.http2 = None;
            }
        }
        loop {
            let mut conn = self.lock().http1.pop()?;
            // Looked at outside the lock; one that is closed is dropped here.
            if conn.is_usable() {
                return Some(Checkout::Http1(conn));
            }
        }
    }

    /// A connection whose exchange ended cleanly, ready for the next request.
    pub(super) fn put_back_http1(self: &Arc<Self>, mut conn: H1Conn) {
        conn.mark_idle();
        let mut idle = self.lock();
        idle.http1.push(conn);
        self.start_reaper(&mut idle);
    }

    /// A new connection: TCP, TLS (ALPN decides the protocol), and for HTTP/2 the handshake
    /// and a task that drives it.
    async fn connect(self: &Arc<Self>) -> Result<Checkout, PoolError> {
        let connector = &self.connector;
        let tcp = connector
            .tcp
            .clone()
            .call(connector.destination.clone())
            .await
            .map_err(|e| PoolError::Connect(Box::new(e)))?
            .into_inner();
        let Some((tls, server_name)) = &connector.tls else {
            return Ok(Checkout::Http1(H1Conn::new(UpstreamIo::Left(tcp))));
        };
        let stream = tls
            .connect(server_name.clone(), tcp)
            .await
            .map_err(|e| PoolError::Connect(Box::new(e)))?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(Checkout::Http1(H1Conn::new(UpstreamIo::Right(stream))));
        }
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
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

    /// Drop what has been idle too long or was closed; true when nothing is left to watch.
    fn expire(&self, now: Instant) -> bool {
        let mut idle = self.lock();
        let timeout = self.idle_timeout;
        idle.http1
            .retain_mut(|conn| now.duration_since(conn.idle_since()) < timeout && conn.is_usable());
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
