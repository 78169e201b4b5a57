//! `[listen]`: where and how clients connect, and the bounds on what they send.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{duration_str, invalid, Invalid};

/// Where the proxy listens when nothing says otherwise: loopback only, port 8787.
pub const DEFAULT_LISTEN_ADDRESS: &str = "127.0.0.1:8787";
/// Unix socket permissions when `unix_socket` is set: owner and group may connect.
pub const DEFAULT_UNIX_SOCKET_MODE: &str = "0660";

/// A client must send its whole request head within this (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Client connections open at once; more wait in the kernel's accept queue.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// SIGTERM waits this long for in-flight requests and streams.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// A keep-alive client connection with no request in progress and no bytes moving is closed
/// after this. hyper's header read timeout alone would close it after `header_read_timeout`,
/// because hyper starts that timer the moment a connection goes idle.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Request headers (names, values and separators, the request line not counted) beyond this
/// total get 431 HEADERS_TOO_LARGE (Envoy's and nginx's order of magnitude).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// More request header fields than this get 431 HEADERS_TOO_LARGE.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// A request target longer than this gets 414 URI_TOO_LONG.
pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
/// hyper's own parser limits are this many times the configured ones: requests between the two
/// get the proxy's JSON answer, only grossly oversized heads hit hyper's bare 431 and close.
pub const PARSER_BOUND_FACTOR: usize = 2;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// TCP address. Unset with `unix_socket` set means "Unix socket only".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<PathBuf>,
    pub unix_socket_mode: String,
    /// Listening beyond loopback hands the key to anyone who can reach the port: opt in.
    pub allow_remote: bool,
    /// Browser origins allowed to call the proxy (laptop web development); empty = none.
    pub allowed_origins: Vec<String>,
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    #[serde(with = "duration_str")]
    pub drain_timeout: Duration,
    /// Unix socket callers (by SO_PEERCRED uid) allowed to use the proxy; empty = anyone who
    /// can open the socket. Does not apply to TCP, so it cannot be combined with `address`.
    pub allowed_uids: Vec<u32>,
    /// A file holding a token clients must send in `X-Proxy-Token` (never the token itself in
    /// the config: the config is printed by `check`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A caller that matches no `[[app]]` (by token or uid) is refused with 401 `APP_REQUIRED`
    /// instead of being counted as the `default` app.
    pub require_app: bool,
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    /// Request bodies beyond this many bytes get 413; unset = no cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_size: Option<u64>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            address: None,
            unix_socket: None,
            unix_socket_mode: DEFAULT_UNIX_SOCKET_MODE.into(),
            allow_remote: false,
            allowed_origins: Vec::new(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            allowed_uids: Vec::new(),
            token_file: None,
            require_app: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_uri_bytes: DEFAULT_MAX_URI_BYTES,
            max_body_size: None,
        }
    }
}

impl ListenConfig {
    /// The TCP address in effect: the configured one, the default when no listener is
    /// configured at all, none when only a Unix socket is asked for.
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        match (&self.address, &self.unix_socket) {
            (Some(a), _) => a.parse().ok(),
            (None, None) => DEFAULT_LISTEN_ADDRESS.parse().ok(),
            (None, Some(_)) => None,
        }
    }

    /// `unix_socket_mode` as permission bits (validated at load).
    pub fn unix_mode_bits(&self) -> u32 {
        u32::from_str_radix(self.unix_socket_mode.trim_start_matches("0o"), 8).unwrap_or(0o660)
    }
}

/// Longest token accepted in the file (the same bound as a key).
const MAX_TOKEN_BYTES: usize = 4096;

/// Read and check the token file; the error is a sentence for the config error.
pub fn read_token_file(path: &Path) -> Result<zeroize::Zeroizing<String>, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let token = text.trim_end_matches(['\r', '\n']);
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{} must hold one token of 1 to {MAX_TOKEN_BYTES} visible ASCII characters",
            path.display()
        ));
    }
    Ok(zeroize::Zeroizing::new(token.to_string()))
}

impl ListenConfig {
    /// Checks serde cannot express.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if let Some(address) = &self.address {
            match address.parse::<SocketAddr>() {
                Err(_) => return invalid("listen.address", format!("{address:?} is not an IP address with a port, like \"127.0.0.1:8787\"")),
                Ok(a) if !a.ip().is_loopback() && !self.allow_remote => {
                    return invalid(
                        "listen.address",
                        format!("{address:?} is not a loopback address: anyone who can reach it could spend the key; set listen.allow_remote = true to allow it"),
                    )
                }
                Ok(_) => {}
            }
        }
        if u32::from_str_radix(self.unix_socket_mode.trim_start_matches("0o"), 8).map_or(true, |m| m > 0o777) {
            return invalid(
                "listen.unix_socket_mode",
                format!("{:?} is not an octal file mode like \"0660\"", self.unix_socket_mode),
            );
        }
        if self.max_connections == 0 {
            return invalid("listen.max_connections", "must be at least 1".into());
        }
        if !self.allowed_uids.is_empty() && self.tcp_address().is_some() {
            return invalid(
                "listen.allowed_uids",
                "restricts Unix socket callers only, but a TCP listener is open too and would let any local user in; set unix_socket without address".into(),
            );
        }
        if let Some(token_file) = &self.token_file {
            if let Err(message) = read_token_file(token_file) {
                return invalid("listen.token_file", message);
            }
        }
        for (key, value, minimum) in [
            ("listen.max_header_bytes", self.max_header_bytes, 1024),
            ("listen.max_headers", self.max_headers, 8),
            ("listen.max_uri_bytes", self.max_uri_bytes, 256),
        ] {
            if value < minimum {
                return invalid(key, format!("must be at least {minimum}"));
            }
        }
        if self.max_body_size == Some(0) {
            return invalid(
                "listen.max_body_size",
                "must be at least 1 (leave it unset for no cap)".into(),
            );
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return invalid("listen.idle_timeout", "must be at least 100ms".into());
        }
        Ok(())
    }
}
