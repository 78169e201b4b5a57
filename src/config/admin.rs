//! `[admin]`: a second listener for `/health`, `/ready` and `/metrics`.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

use super::{invalid, Invalid};

/// `[admin]`: where `/metrics`, `/health` and `/ready` are served besides the main listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// A separate TCP address (e.g. `127.0.0.1:9090`). When set, `/metrics` is served only
    /// there; `/health` and `/ready` are served on both. It forwards nothing and holds no key,
    /// so it may listen beyond loopback (a Prometheus scraping the pod).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl AdminConfig {
    /// The admin address (validated at load).
    pub fn socket_address(&self) -> Option<SocketAddr> {
        self.address.as_deref().and_then(|a| a.parse().ok())
    }
}

impl AdminConfig {
    /// Checks serde cannot express.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if let Some(address) = &self.address {
            if address.parse::<SocketAddr>().is_err() {
                return invalid(
                    "admin.address",
                    format!("{address:?} is not an IP address with a port, like \"127.0.0.1:9090\""),
                );
            }
        }
        Ok(())
    }
}
