//! The upstream side: verified TLS, pooled connections, timeouts, and error classification.
//! It knows nothing of clients: it takes a request with its `Host` and key already set, and
//! gives back the response head and a body that streams. Rooms: `base` (where the upstream
//! is), `pool` (connections), `h1` (our HTTP/1.1 client), `wire` (HTTP/1.1 bytes shared with
//! the client side's plain path), `body` (what is sent and received).
//!
//! Two pools share one TLS configuration. The main one ([`UpstreamPool`]) offers ALPN `h2` and
//! `http/1.1` so requests multiplex over HTTP/2 when the upstream speaks it (HTTP/1.1 goes
//! through our own client, [`h1`]); the WebSocket one
//! (hyper-util's client, which joins upgraded connections) offers only `http/1.1`, because the
//! upgrade handshake (RFC 6455) is an HTTP/1.1 mechanism.
//! Redirects are never followed (hyper's client does not), so the key can only ever travel to
//! the configured authority.

use http::{HeaderMap, Request, Response};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

pub mod base;
pub mod body;
pub mod h1;
pub mod pool;
pub mod wire;

use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use crate::tls::{client_tls_config, TlsSetupError};
pub use base::UpstreamBase;
use body::{SendBody, UpstreamBody};
use pool::{Connector, PoolError, UpstreamPool};

type HttpsClient = Client<HttpsConnector<HttpConnector>, SendBody>;

/// Pooled clients to the one upstream.
pub struct Upstream {
    pub base: UpstreamBase,
    pool: UpstreamPool,
    websocket_client: HttpsClient,
    response_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("upstream.url: {0}")]
    Url(String),
    #[error("upstream.{0}")]
    Tls(#[from] TlsSetupError),
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, UpstreamSetupError> {
        let base = UpstreamBase::parse(&config.url).map_err(UpstreamSetupError::Url)?;
        let tls = Arc::new(client_tls_config(config.ca_file.as_deref())?);
        let mut tls_http1 = (*tls).clone();
        tls_http1.alpn_protocols.clear();

        let tcp_connector = || {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(config.connect_timeout));
            http
        };
        let pool_tls = if base.scheme == http::uri::Scheme::HTTPS {
            let mut tls = (*tls).clone();
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            // The certificate is checked against the host as written in upstream.url (an IPv6
            // literal without its brackets), as hyper-rustls does.
            let host = base.authority.host().trim_start_matches('[').trim_end_matches(']');
            let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| UpstreamSetupError::Url(format!("{host} is not a valid TLS server name: {e}")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(tls)), server_name))
        } else {
            None
        };
        let pool = UpstreamPool::new(
            Connector {
                tcp: tcp_connector(),
                tls: pool_tls,
                destination: base.destination(),
            },
            config.pool_idle_timeout,
        );
        let websocket_connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls_http1)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp_connector());
        let websocket_client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            // The request path inserts a pre-built Host (rewrite::set_upstream_host).
            .set_host(false)
            .build(websocket_connector);
        Ok(Upstream {
            base,
            pool,
            websocket_client,
            response_timeout: config.response_timeout,
        })
    }

    /// Send a request and wait for the response head (bounded by `response_timeout`); the body
    /// then streams with no overall deadline. The request's headers come back beside the
    /// response, for a resend.
    pub async fn send(
        &self,
        req: Request<SendBody>,
        websocket: bool,
    ) -> Result<(Response<UpstreamBody>, HeaderMap), ProxyError> {
        let sent = if websocket {
            let headers = req.headers().clone();
            let sending = self.websocket_client.request(req);
            tokio::time::timeout(self.response_timeout, sending).await.map(|sent| {
                sent.map(|response| (response.map(UpstreamBody::Hyper), headers))
                    .map_err(|err| classify(&err, err.is_connect(), &self.base))
            })
        } else {
            tokio::time::timeout(self.response_timeout, self.pool.send(req))
                .await
                .map(|sent| sent.map_err(|err: PoolError| classify(err.as_error(), err.is_connect(), &self.base)))
        };
        match sent {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(ProxyError::UpstreamTimeout(format!(
                "{} did not answer within {}",
                self.base.authority,
                humantime::format_duration(self.response_timeout)
            ))),
        }
    }
}

/// How a connection that could not be made is described (see [`is_connect_failure`]).
const CONNECT_FAILED: &str = "cannot connect to";

/// Whether `err` says no connection could be made at all (refused, unreachable, DNS), as
/// opposed to one lost mid-exchange: only then is it certain the upstream saw nothing.
pub fn is_connect_failure(err: &ProxyError) -> bool {
    matches!(err, ProxyError::UpstreamUnavailable(message) if message.starts_with(CONNECT_FAILED))
}

/// Map a client error to the proxy's table: TLS failures, timeouts, and everything else that
/// means "could not get an answer" (refused, reset, DNS).
fn classify(err: &(dyn StdError + 'static), is_connect: bool, base: &UpstreamBase) -> ProxyError {
    // Walk the cause chain. `io::Error::source()` skips the error it wraps, and hyper-rustls
    // nests the rustls error two io::Errors deep, so io errors are descended via `get_ref`.
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    let mut root = String::new();
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return ProxyError::UpstreamTls(format!("TLS with {} failed: {tls}", base.authority));
        }
        root = e.to_string();
        source = match e.downcast_ref::<std::io::Error>() {
            Some(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                return ProxyError::UpstreamTimeout(format!("connecting to {} timed out", base.authority));
            }
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn StdError + 'static)),
                None => None,
            },
            None => e.source(),
        };
    }
    let what = if is_connect {
        CONNECT_FAILED
    } else {
        "lost the connection to"
    };
    ProxyError::UpstreamUnavailable(format!("{what} {}: {root}", base.authority))
}
