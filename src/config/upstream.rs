//! `[upstream]` and `[auth]`: where requests go, the timeouts on the way, and the word before
//! the key in `Authorization`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

use super::{duration_str, host_is_loopback, invalid, Invalid};

/// The Smallest AI API.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.smallest.ai";

/// TCP connect to the upstream; past it the request gets 504.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From sending the request to the upstream's response head; past it 504. Bodies (SSE) are not
/// bounded by this: a stream may run as long as it keeps moving.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle pooled upstream connections are closed after this.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// An upstream response body (SSE, streamed audio) or WebSocket tunnel with no bytes moving for
/// this long is cut. Streams have no total deadline; a live TTS session or an LLM stream can be
/// silent for seconds between utterances, so this is generous, but a dead upstream connection
/// must not hold a concurrency slot forever.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub url: String,
    /// An extra trust root (PEM) beside the public web roots, for a self-hosted server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    #[serde(with = "duration_str")]
    pub response_timeout: Duration,
    #[serde(with = "duration_str")]
    pub pool_idle_timeout: Duration,
    /// A streamed response body or WebSocket tunnel idle this long is cut (no total deadline).
    #[serde(with = "duration_str")]
    pub stream_idle_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: DEFAULT_UPSTREAM_URL.into(),
            ca_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub scheme: AuthScheme,
}

/// The word before the key in `Authorization`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum AuthScheme {
    /// api.smallest.ai
    #[default]
    Bearer,
    /// A self-hosted Smallest server.
    Token,
}

impl AuthScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthScheme::Bearer => "Bearer",
            AuthScheme::Token => "Token",
        }
    }
}

impl UpstreamConfig {
    /// Checks serde cannot express.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if self.stream_idle_timeout < Duration::from_millis(100) {
            return invalid("upstream.stream_idle_timeout", "must be at least 100ms".into());
        }
        let url = self.url.parse::<http::Uri>().ok().filter(|u| u.authority().is_some());
        let Some(url) = url else {
            return invalid(
                "upstream.url",
                format!("{:?} is not an absolute URL like \"https://api.smallest.ai\"", self.url),
            );
        };
        if url.query().is_some() {
            return invalid("upstream.url", "must not carry a query string".into());
        }
        match url.scheme_str() {
            Some("https") => {}
            Some("http") if host_is_loopback(url.host().unwrap_or_default()) => {}
            Some("http") => return invalid(
                "upstream.url",
                "plain http is allowed only to a loopback host: the key would cross the network in clear; use https"
                    .into(),
            ),
            _ => {
                return invalid(
                    "upstream.url",
                    "the scheme must be https (or http to a loopback host)".into(),
                )
            }
        }
        if let Some(ca) = &self.ca_file {
            if !ca.is_file() {
                return invalid(
                    "upstream.ca_file",
                    format!("{} does not exist or is not a file", ca.display()),
                );
            }
        }
        Ok(())
    }
}
