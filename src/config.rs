//! The configuration contract: the TOML schema, every default, validation and env overrides.
//!
//! A config comes from three layers, later ones winning: built-in defaults, the TOML file
//! (`--config` / `SMALLEST_PROXY_CONFIG`), then `SMALLEST_PROXY_<SECTION>_<KEY>` environment
//! variables. Overrides are merged into the TOML tree *before* deserialising, so one code path
//! validates all three, and an error can always say where the bad value came from: the file with
//! line, column and key path, or the environment variable's name.
//!
//! The config holds no secret: the key itself lives in the key source and is fetched at run
//! time, so `Config` can be printed (`smallest-proxy check`) and logged as it is.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the proxy listens when nothing says otherwise: loopback only, port 8787.
pub const DEFAULT_LISTEN_ADDRESS: &str = "127.0.0.1:8787";
/// Unix socket permissions when `unix_socket` is set: owner and group may connect.
pub const DEFAULT_UNIX_SOCKET_MODE: &str = "0660";
/// The Smallest AI API.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.smallest.ai";
/// The environment variable the key is read from with `source = "env"` (and with no config).
pub const DEFAULT_KEY_ENV: &str = "SMALLEST_API_KEY";
/// Environment variable naming the config file, the same as `--config`.
pub const CONFIG_PATH_ENV: &str = "SMALLEST_PROXY_CONFIG";
/// Prefix of every config override variable.
pub const ENV_OVERRIDE_PREFIX: &str = "SMALLEST_PROXY_";
/// TCP connect to the upstream; past it the request gets 504.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From sending the request to the upstream's response head; past it 504. Bodies (SSE) are not
/// bounded by this: a stream may run as long as it keeps moving.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle pooled upstream connections are closed after this.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Key re-fetch period for sources that rotate (file, vault, aws).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// How long the last good key keeps serving while its source fails.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(3600);
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
/// An upstream response body (SSE, streamed audio) or WebSocket tunnel with no bytes moving for
/// this long is cut. Streams have no total deadline; a live TTS session or an LLM stream can be
/// silent for seconds between utterances, so this is generous, but a dead upstream connection
/// must not hold a concurrency slot forever.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The whole configuration. Field names are the public TOML contract (DESIGN.md).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub key: KeyConfig,
    pub limits: LimitsConfig,
    pub policy: PolicyConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
}

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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeyConfig {
    pub source: KeySourceKind,
    /// `source = "env"`: the variable holding the key.
    pub env: String,
    /// `source = "file"`: the file holding the key (trailing newline trimmed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(with = "duration_str")]
    pub refresh_interval: Duration,
    #[serde(with = "duration_str")]
    pub max_stale: Duration,
    /// `source = "vault"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultConfig>,
    /// `source = "aws"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsConfig>,
}

/// Default KV mount, path and field for `[key.vault]`.
pub const DEFAULT_VAULT_MOUNT: &str = "secret";
pub const DEFAULT_VAULT_FIELD: &str = "api_key";
/// Where Kubernetes mounts the pod's service-account token (for `method = "kubernetes"`).
pub const DEFAULT_KUBERNETES_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// HashiCorp Vault or OpenBao KV secret holding the key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// `https://vault.example:8200`; defaults to `VAULT_ADDR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default = "default_vault_mount")]
    pub mount: String,
    pub path: String,
    #[serde(default = "default_vault_field")]
    pub field: String,
    #[serde(default = "default_kv_version")]
    pub kv_version: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub auth: VaultAuthConfig,
}

fn default_vault_mount() -> String {
    DEFAULT_VAULT_MOUNT.into()
}
fn default_vault_field() -> String {
    DEFAULT_VAULT_FIELD.into()
}
fn default_kv_version() -> u8 {
    2
}

/// How the proxy logs in to Vault. Credentials are read from files at each login (never kept
/// in the config), because Vault Agent sinks, secret IDs and service-account tokens rotate.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VaultAuthConfig {
    pub method: VaultAuthMethod,
    /// `token`: file holding the token (a Vault Agent sink works); default: `VAULT_TOKEN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// `approle`: the role ID, inline (it is not a secret) or from a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_id_file: Option<PathBuf>,
    /// `approle`: file holding the secret ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_id_file: Option<PathBuf>,
    /// `jwt` / `kubernetes`: the Vault role to log in as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `jwt` / `kubernetes`: file holding the JWT (kubernetes default: the service-account token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_file: Option<PathBuf>,
    /// Auth mount path; defaults to the method's name (`approle`, `jwt`, `kubernetes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VaultAuthMethod {
    #[default]
    Token,
    Approle,
    Jwt,
    Kubernetes,
}

impl VaultAuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            VaultAuthMethod::Token => "token",
            VaultAuthMethod::Approle => "approle",
            VaultAuthMethod::Jwt => "jwt",
            VaultAuthMethod::Kubernetes => "kubernetes",
        }
    }
}

/// AWS Secrets Manager secret holding the key, read with the standard AWS credential chain.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    pub secret_id: String,
    /// Defaults to the chain's region (`AWS_REGION`, profile, IMDS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// When the SecretString is JSON: the field holding the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_stage: Option<String>,
    /// A different endpoint (a VPC endpoint, or a local test server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

impl Default for KeyConfig {
    fn default() -> Self {
        KeyConfig {
            source: KeySourceKind::Env,
            env: DEFAULT_KEY_ENV.into(),
            file: None,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            max_stale: DEFAULT_MAX_STALE,
            vault: None,
            aws: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeySourceKind {
    #[default]
    Env,
    File,
    Vault,
    Aws,
}

/// Waiting requests per class beyond which new ones are shed at once.
pub const DEFAULT_MAX_QUEUE: usize = 1000;
/// Longest wait for a slot before a 429.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Resends of a replayable request after an upstream 429/503.
pub const DEFAULT_UPSTREAM_RETRIES: u32 = 2;
/// A crashed replica's shared slots free themselves after this.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// A Redis call slower than this counts as Redis being down (fall back to local limits).
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// `[limits]`: the default class (every path no `[[limits.class]]` claims), the named classes,
/// and optional shared state. serde cannot combine `flatten` with `deny_unknown_fields`, so
/// the default class's fields are spelled out here; a named class inherits any field it does
/// not set from them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// In-flight upstream requests; 0 = unlimited.
    pub max_concurrent: usize,
    pub max_queue: usize,
    #[serde(with = "duration_str")]
    pub queue_timeout: Duration,
    /// Requests per `per`; 0 = unlimited.
    pub rate: u32,
    #[serde(with = "duration_str")]
    pub per: Duration,
    pub burst: u32,
    /// Open WebSocket tunnels; 0 = unlimited.
    pub max_websockets: usize,
    pub upstream_retries: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub class: Vec<ClassConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedLimitsConfig>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_concurrent: 0,
            max_queue: DEFAULT_MAX_QUEUE,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            rate: 0,
            per: Duration::from_secs(1),
            burst: 1,
            max_websockets: 0,
            upstream_retries: DEFAULT_UPSTREAM_RETRIES,
            class: Vec::new(),
            shared: None,
        }
    }
}

/// One `[[limits.class]]`: the limits for requests whose path starts with one of `paths`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    pub name: String,
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_duration_str")]
    pub queue_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_duration_str")]
    pub per: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_websockets: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_retries: Option<u32>,
}

/// The limits one class runs with, after inheritance from `[limits]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassLimits {
    pub name: String,
    pub paths: Vec<String>,
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub rate: u32,
    pub per: Duration,
    pub burst: u32,
    pub max_websockets: usize,
    pub upstream_retries: u32,
}

/// The name of the class every unclaimed path falls in.
pub const DEFAULT_CLASS_NAME: &str = "default";

impl LimitsConfig {
    pub fn default_class(&self) -> ClassLimits {
        ClassLimits {
            name: DEFAULT_CLASS_NAME.into(),
            paths: Vec::new(),
            max_concurrent: self.max_concurrent,
            max_queue: self.max_queue,
            queue_timeout: self.queue_timeout,
            rate: self.rate,
            per: self.per,
            burst: self.burst,
            max_websockets: self.max_websockets,
            upstream_retries: self.upstream_retries,
        }
    }

    pub fn classes(&self) -> Vec<ClassLimits> {
        self.class
            .iter()
            .map(|c| ClassLimits {
                name: c.name.clone(),
                paths: c.paths.clone(),
                max_concurrent: c.max_concurrent.unwrap_or(self.max_concurrent),
                max_queue: c.max_queue.unwrap_or(self.max_queue),
                queue_timeout: c.queue_timeout.unwrap_or(self.queue_timeout),
                rate: c.rate.unwrap_or(self.rate),
                per: c.per.unwrap_or(self.per),
                burst: c.burst.unwrap_or(self.burst),
                max_websockets: c.max_websockets.unwrap_or(self.max_websockets),
                upstream_retries: c.upstream_retries.unwrap_or(self.upstream_retries),
            })
            .collect()
    }
}

/// `[limits.shared]`: hold the limits in Redis so they apply across replicas.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SharedLimitsConfig {
    pub redis_url: String,
    #[serde(default = "default_lease", with = "duration_str")]
    pub lease: Duration,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_redis_timeout", with = "duration_str")]
    pub timeout: Duration,
}

fn default_lease() -> Duration {
    DEFAULT_LEASE
}
fn default_key_prefix() -> String {
    "smallest-proxy".into()
}
fn default_redis_timeout() -> Duration {
    DEFAULT_REDIS_TIMEOUT
}

/// `[policy]`: which methods and paths may be forwarded at all (DESIGN.md: "path outside
/// allow-list → 403"). Rules are `"METHOD /path"` or `"/path"` (any method); in paths `*`
/// matches within one segment and `**` across segments. The matcher is `proxy::policy`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// `"none"` (default: forward every path) or `"smallest"` (only the Smallest API surface:
    /// speech, transcription, voices, voice-clone creation, LLM chat).
    pub preset: PolicyPreset,
    /// Rules allowed on top of the preset. With `preset = "none"`, a non-empty list makes it
    /// an allow-list.
    pub allow: Vec<String>,
    /// Rules refused whatever else says; checked first.
    pub deny: Vec<String>,
    /// `preset = "smallest"`: also allow deleting cloned voices.
    pub allow_voice_clone_delete: bool,
    /// `preset = "smallest"`: also allow creating, changing and deleting pronunciation
    /// dictionaries.
    pub allow_pronunciation_edits: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PolicyPreset {
    #[default]
    None,
    Smallest,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `smallest_proxy=debug`); `RUST_LOG` wins when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// One line per request at info, target `smallest_proxy::access`.
    pub access: bool,
}

/// The access log is on unless turned off: it is what an operator reads first.
pub const DEFAULT_ACCESS_LOG: bool = true;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: None,
            access: DEFAULT_ACCESS_LOG,
        }
    }
}

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

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A config that could not be used, with where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// `file:line:column`, `environment variable NAME`, or the file alone when no position fits.
    pub location: String,
    /// Dotted key path (`listen.address`); empty for a syntax error before any key.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: `{}`: {}", self.location, self.key, self.message)
        }
    }
}

impl Config {
    /// Defaults, then the file at `path` if any, then the `SMALLEST_PROXY_*` variables found
    /// in `vars` (the process environment, passed in so tests need not mutate it).
    pub fn load(path: Option<&Path>, vars: &[(String, String)]) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return load_text(None, "", vars);
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            location: path.display().to_string(),
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        })?;
        load_text(Some(path), &text, vars)
    }

    /// The effective config as TOML, for `smallest-proxy check`. The config holds no secret
    /// (key material never enters it), so nothing needs redacting beyond what it already omits.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not render: {e}\n"))
    }
}

/// Parse `text` (the file at `path`, or empty for defaults), merge the `SMALLEST_PROXY_*`
/// overrides found in `vars`, deserialise and validate.
pub fn load_text(path: Option<&Path>, text: &str, vars: &[(String, String)]) -> Result<Config, ConfigError> {
    let file_name = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<defaults>".into());
    let mut table: toml::Table = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError {
            location: format!("{file_name}:{line}:{col}"),
            key: String::new(),
            message: first_line(e.message()),
        }
    })?;
    let overridden = apply_env_overrides(&mut table, vars)?;

    let locate = |key: &str| -> String {
        if let Some(var) = overridden
            .iter()
            .find(|(k, _)| k == key || key.starts_with(&format!("{k}.")))
            .map(|(_, v)| v)
        {
            return format!("environment variable {var}");
        }
        match key_position(text, key) {
            Some((line, col)) => format!("{file_name}:{line}:{col}"),
            None => file_name.clone(),
        }
    };

    let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let mut key = e.path().to_string();
        let message = first_line(&e.inner().to_string());
        // Name the unknown field itself if the path stops at its parent table.
        if let Some(field) = unknown_field_name(&message) {
            if key == "." || key.is_empty() {
                key = field;
            } else if !key.ends_with(&format!(".{field}")) && key != field {
                key = format!("{key}.{field}");
            }
        }
        ConfigError {
            location: locate(&key),
            key,
            message,
        }
    })?;
    // Vault's own convention: the address may come from VAULT_ADDR.
    if let Some(vault) = config.key.vault.as_mut() {
        if vault.address.is_none() {
            vault.address = vars.iter().find(|(k, _)| k == "VAULT_ADDR").map(|(_, v)| v.clone());
        }
    }
    config.validate().map_err(|(key, message)| ConfigError {
        location: locate(&key),
        key,
        message,
    })?;
    Ok(config)
}

impl Config {
    /// Checks serde cannot express. Returns the offending key path and a sentence.
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if let Some(address) = &self.listen.address {
            match address.parse::<SocketAddr>() {
                Err(_) => return err("listen.address", format!("{address:?} is not an IP address with a port, like \"127.0.0.1:8787\"")),
                Ok(a) if !a.ip().is_loopback() && !self.listen.allow_remote => {
                    return err(
                        "listen.address",
                        format!("{address:?} is not a loopback address: anyone who can reach it could spend the key; set listen.allow_remote = true to allow it"),
                    )
                }
                Ok(_) => {}
            }
        }
        if u32::from_str_radix(self.listen.unix_socket_mode.trim_start_matches("0o"), 8).map_or(true, |m| m > 0o777) {
            return err(
                "listen.unix_socket_mode",
                format!(
                    "{:?} is not an octal file mode like \"0660\"",
                    self.listen.unix_socket_mode
                ),
            );
        }
        if self.listen.max_connections == 0 {
            return err("listen.max_connections", "must be at least 1".into());
        }
        if !self.listen.allowed_uids.is_empty() && self.listen.tcp_address().is_some() {
            return err(
                "listen.allowed_uids",
                "restricts Unix socket callers only, but a TCP listener is open too and would let any local user in; set unix_socket without address".into(),
            );
        }
        if let Some(token_file) = &self.listen.token_file {
            if let Err(message) = crate::proxy::caller::read_token_file(token_file) {
                return err("listen.token_file", message);
            }
        }
        for (key, value, minimum) in [
            ("listen.max_header_bytes", self.listen.max_header_bytes, 1024),
            ("listen.max_headers", self.listen.max_headers, 8),
            ("listen.max_uri_bytes", self.listen.max_uri_bytes, 256),
        ] {
            if value < minimum {
                return err(key, format!("must be at least {minimum}"));
            }
        }
        if self.listen.max_body_size == Some(0) {
            return err(
                "listen.max_body_size",
                "must be at least 1 (leave it unset for no cap)".into(),
            );
        }
        if self.listen.idle_timeout < Duration::from_millis(100) {
            return err("listen.idle_timeout", "must be at least 100ms".into());
        }
        if self.upstream.stream_idle_timeout < Duration::from_millis(100) {
            return err("upstream.stream_idle_timeout", "must be at least 100ms".into());
        }
        for (list, rules) in [("allow", &self.policy.allow), ("deny", &self.policy.deny)] {
            for (i, rule) in rules.iter().enumerate() {
                if let Err(message) = crate::proxy::policy::Rule::parse(rule) {
                    return err(&format!("policy.{list}[{i}]"), message);
                }
            }
        }
        let url = self
            .upstream
            .url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.authority().is_some());
        let Some(url) = url else {
            return err(
                "upstream.url",
                format!(
                    "{:?} is not an absolute URL like \"https://api.smallest.ai\"",
                    self.upstream.url
                ),
            );
        };
        if url.query().is_some() {
            return err("upstream.url", "must not carry a query string".into());
        }
        match url.scheme_str() {
            Some("https") => {}
            Some("http") if host_is_loopback(url.host().unwrap_or_default()) => {}
            Some("http") => return err(
                "upstream.url",
                "plain http is allowed only to a loopback host: the key would cross the network in clear; use https"
                    .into(),
            ),
            _ => {
                return err(
                    "upstream.url",
                    "the scheme must be https (or http to a loopback host)".into(),
                )
            }
        }
        if let Some(ca) = &self.upstream.ca_file {
            if !ca.is_file() {
                return err(
                    "upstream.ca_file",
                    format!("{} does not exist or is not a file", ca.display()),
                );
            }
        }
        if self.key.source == KeySourceKind::File && self.key.file.is_none() {
            return err(
                "key.file",
                "source = \"file\" needs `file`, the path of the file holding the key".into(),
            );
        }
        if self.key.source == KeySourceKind::Env && self.key.env.is_empty() {
            return err("key.env", "must name an environment variable".into());
        }
        if self.key.source == KeySourceKind::Vault {
            let Some(vault) = &self.key.vault else {
                return err(
                    "key.vault",
                    "source = \"vault\" needs a [key.vault] table with at least `path`".into(),
                );
            };
            let Some(address) = &vault.address else {
                return err(
                    "key.vault.address",
                    "set it, or VAULT_ADDR, to the Vault/OpenBao URL".into(),
                );
            };
            match address.parse::<http::Uri>().ok().filter(|u| u.authority().is_some()) {
                Some(u) if u.scheme_str() == Some("https") => {}
                Some(u) if u.scheme_str() == Some("http") && host_is_loopback(u.host().unwrap_or_default()) => {}
                _ => {
                    return err(
                        "key.vault.address",
                        format!("{address:?} must be an https URL (plain http only to a loopback host: the Vault token would cross the network in clear)"),
                    )
                }
            }
            if vault.kv_version != 1 && vault.kv_version != 2 {
                return err("key.vault.kv_version", "must be 1 or 2".into());
            }
            let auth = &vault.auth;
            match auth.method {
                VaultAuthMethod::Approle if auth.role_id.is_none() && auth.role_id_file.is_none() => {
                    return err(
                        "key.vault.auth.role_id",
                        "method = \"approle\" needs role_id or role_id_file".into(),
                    )
                }
                VaultAuthMethod::Jwt | VaultAuthMethod::Kubernetes if auth.role.is_none() => {
                    return err(
                        "key.vault.auth.role",
                        format!(
                            "method = \"{}\" needs the Vault role to log in as",
                            auth.method.as_str()
                        ),
                    )
                }
                VaultAuthMethod::Jwt if auth.jwt_file.is_none() => {
                    return err(
                        "key.vault.auth.jwt_file",
                        "method = \"jwt\" needs the file holding the JWT".into(),
                    )
                }
                _ => {}
            }
        }
        if self.key.source == KeySourceKind::Aws && self.key.aws.is_none() {
            return err(
                "key.aws",
                "source = \"aws\" needs a [key.aws] table with at least `secret_id`".into(),
            );
        }
        let limits = &self.limits;
        for (i, class) in limits.class.iter().enumerate() {
            let at = |field: &str| format!("limits.class[{i}].{field}");
            if class.name.is_empty() || class.name == DEFAULT_CLASS_NAME {
                return err(&at("name"), format!("needs a name other than {DEFAULT_CLASS_NAME:?}"));
            }
            if limits.class[..i].iter().any(|c| c.name == class.name) {
                return err(&at("name"), format!("{:?} is used by two classes", class.name));
            }
            if class.paths.is_empty() || class.paths.iter().any(|p| !p.starts_with('/')) {
                return err(
                    &at("paths"),
                    "needs at least one path prefix, each starting with /".into(),
                );
            }
        }
        for class in std::iter::once(limits.default_class()).chain(limits.classes()) {
            let key = |field: &str| match limits.class.iter().position(|c| c.name == class.name) {
                Some(i) => format!("limits.class[{i}].{field}"),
                None => format!("limits.{field}"),
            };
            if class.rate > 0 && class.per.is_zero() {
                return err(&key("per"), "must be longer than 0s".into());
            }
            if class.burst == 0 {
                return err(&key("burst"), "must be at least 1".into());
            }
        }
        if let Some(shared) = &limits.shared {
            if !(shared.redis_url.starts_with("redis://")
                || shared.redis_url.starts_with("rediss://")
                || shared.redis_url.starts_with("redis+unix://")
                || shared.redis_url.starts_with("unix://"))
            {
                return err(
                    "limits.shared.redis_url",
                    format!("{:?} is not a redis:// URL", shared.redis_url),
                );
            }
            if shared.lease < Duration::from_secs(1) {
                return err("limits.shared.lease", "must be at least 1s".into());
            }
        }
        if self.key.refresh_interval < Duration::from_secs(1) {
            return err("key.refresh_interval", "must be at least 1s".into());
        }
        if let Some(address) = &self.admin.address {
            if address.parse::<SocketAddr>().is_err() {
                return err(
                    "admin.address",
                    format!("{address:?} is not an IP address with a port, like \"127.0.0.1:9090\""),
                );
            }
        }
        if let Some(level) = &self.log.level {
            if tracing_subscriber::EnvFilter::try_new(level).is_err() {
                return err(
                    "log.level",
                    format!("{level:?} is not a log filter like \"info\" or \"smallest_proxy=debug\""),
                );
            }
        }
        Ok(())
    }
}

/// `localhost`, `127.x.y.z`, `::1` (with or without brackets).
pub fn host_is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Tables a `SMALLEST_PROXY_<SECTION>_<KEY>` variable can address, longest first so that
/// `KEY_VAULT_AUTH_ROLE_ID` lands in `key.vault.auth` and not in `key`.
const OVERRIDE_SECTIONS: &[&str] = &[
    "listen",
    "upstream",
    "auth",
    "key",
    "key.vault",
    "key.vault.auth",
    "key.aws",
    "policy",
    "log",
    "admin",
];

/// Merge `SMALLEST_PROXY_*` variables into the TOML tree. Returns (key path, variable name)
/// for each applied override so errors can blame the variable. Values are typed the way a
/// shell user means them: `true`/`false` are booleans, plain digits are integers, anything
/// else is a string (so `"0660"` and `"5m"` stay strings).
fn apply_env_overrides(
    table: &mut toml::Table,
    vars: &[(String, String)],
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut applied = Vec::new();
    let mut sections: Vec<&str> = OVERRIDE_SECTIONS.to_vec();
    sections.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_OVERRIDE_PREFIX) else {
            continue;
        };
        if name == CONFIG_PATH_ENV {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        let found = sections.iter().find_map(|section| {
            let prefix = format!("{}_", section.replace('.', "_"));
            lower
                .strip_prefix(&prefix)
                .filter(|k| !k.is_empty())
                .map(|k| (*section, k.to_string()))
        });
        let Some((section, key)) = found else {
            return Err(ConfigError {
                location: format!("environment variable {name}"),
                key: String::new(),
                message: format!("does not name a config key; overrides look like {ENV_OVERRIDE_PREFIX}LISTEN_ADDRESS (section, then key, in capitals)"),
            });
        };
        let mut node = &mut *table;
        for part in section.split('.') {
            let entry = node
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError {
                        location: format!("environment variable {name}"),
                        key: section.into(),
                        message: "the config file sets this to a value, not a table".into(),
                    })
                }
            };
        }
        let typed = match value.as_str() {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            v if !v.is_empty() && v.len() < 18 && v.bytes().all(|b| b.is_ascii_digit()) && !v.starts_with('0') => {
                toml::Value::Integer(v.parse().unwrap_or_default())
            }
            v => toml::Value::String(v.to_string()),
        };
        node.insert(key.clone(), typed);
        applied.push((format!("{section}.{key}"), name.clone()));
    }
    Ok(applied)
}

/// Position (1-based line, column) of a dotted key in the TOML source, for error messages.
fn key_position(text: &str, key: &str) -> Option<(usize, usize)> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    // Segments look like `listen`, or `class[2]` for an element of an array of tables (the
    // form serde_path_to_error prints).
    let parts: Vec<&str> = key.split('.').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (*part, None),
        };
        let (k, item) = table.get_key_value(name)?;
        span = k.span().or_else(|| item.span()).or(span);
        let last = i + 1 == parts.len();
        match item {
            toml_edit::Item::ArrayOfTables(array) => {
                let element = array.get(index.unwrap_or(0))?;
                span = element.span().or(span);
                if last {
                    break;
                }
                table = element;
            }
            _ if last => break,
            toml_edit::Item::Table(t) => table = t,
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => table = t,
            _ => break,
        }
    }
    span.map(|s| line_col(text, s.start))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// Optional durations as human strings.
pub mod opt_duration_str {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration_str::deserialize(d).map(Some)
    }
}

/// Durations as human strings (`"300ms"`, `"5m"`) both ways.
pub mod duration_str {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"300ms\", \"5s\" or \"5m\": {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        load_text(Some(Path::new("proxy.toml")), text, &[])
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = load("").expect("defaults");
        assert_eq!(c.listen.tcp_address(), Some("127.0.0.1:8787".parse().unwrap()));
        assert_eq!(c.upstream.url, "https://api.smallest.ai");
        assert_eq!(c.auth.scheme, AuthScheme::Bearer);
        assert_eq!(c.key.source, KeySourceKind::Env);
        assert_eq!(c.key.env, "SMALLEST_API_KEY");
    }

    #[test]
    fn access_log_and_admin_address_default_set_and_validate() {
        let c = load("").expect("defaults");
        assert!(c.log.access, "the access log is on by default");
        assert_eq!(c.admin.address, None);
        let c = load("[log]\naccess = false\n[admin]\naddress = \"0.0.0.0:9090\"\n").expect("valid");
        assert!(!c.log.access);
        assert_eq!(c.admin.socket_address(), Some("0.0.0.0:9090".parse().unwrap()));
        let e = load("[admin]\naddress = \"localhost\"\n").unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.location.as_str()),
            ("admin.address", "proxy.toml:2:1")
        );
        let vars = [("SMALLEST_PROXY_ADMIN_ADDRESS".to_string(), "127.0.0.1:9191".to_string())];
        let c = load_text(None, "", &vars).expect("env override");
        assert_eq!(c.admin.address.as_deref(), Some("127.0.0.1:9191"));
    }

    #[test]
    fn the_design_md_keys_parse() {
        let c = load(
            r#"
[listen]
address = "127.0.0.1:9000"
unix_socket = "/tmp/p.sock"
unix_socket_mode = "0600"
allow_remote = false

[upstream]
url = "https://smallest.internal:8443"

[auth]
scheme = "Token"

[key]
source = "file"
file = "/run/secrets/smallest-api-key"
refresh_interval = "30s"
max_stale = "2h"
"#,
        )
        .expect("valid");
        assert_eq!(c.auth.scheme, AuthScheme::Token);
        assert_eq!(c.key.refresh_interval, Duration::from_secs(30));
        assert_eq!(c.listen.unix_mode_bits(), 0o600);
    }

    #[test]
    fn unknown_key_names_file_line_column_and_key() {
        let e = load("[listen]\naddress = \"127.0.0.1:1\"\nadress = \"x\"\n").unwrap_err();
        assert_eq!(e.key, "listen.adress");
        assert_eq!(e.location, "proxy.toml:3:1");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = load("[listen]\nallow_remote = \"yes\"\n").unwrap_err();
        assert_eq!(e.key, "listen.allow_remote");
        assert_eq!(e.location, "proxy.toml:2:1");
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let e = load("[listen]\naddress = \n").unwrap_err();
        assert!(e.location.starts_with("proxy.toml:2:"), "{e}");
    }

    #[test]
    fn remote_listen_address_needs_opt_in() {
        let e = load("[listen]\naddress = \"0.0.0.0:8787\"\n").unwrap_err();
        assert_eq!(e.key, "listen.address");
        assert!(e.message.contains("allow_remote"));
        load("[listen]\naddress = \"0.0.0.0:8787\"\nallow_remote = true\n").expect("opted in");
    }

    #[test]
    fn bad_scheme_lists_the_choices() {
        let e = load("[auth]\nscheme = \"Basic\"\n").unwrap_err();
        assert_eq!(e.key, "auth.scheme");
        assert!(e.message.contains("Bearer") && e.message.contains("Token"), "{e}");
    }

    #[test]
    fn plain_http_upstream_only_on_loopback() {
        assert!(load("[upstream]\nurl = \"http://api.smallest.ai\"\n").is_err());
        load("[upstream]\nurl = \"http://127.0.0.1:9000\"\n").expect("loopback http");
    }

    #[test]
    fn file_source_needs_a_file() {
        let e = load("[key]\nsource = \"file\"\n").unwrap_err();
        assert_eq!(e.key, "key.file");
    }

    #[test]
    fn vault_and_aws_sections_parse_and_validate() {
        let c = load_text(
            None,
            "[key]\nsource = \"vault\"\n[key.vault]\npath = \"smallest\"\n[key.vault.auth]\nmethod = \"approle\"\nrole_id = \"r\"\nsecret_id_file = \"/s\"\n",
            &[("VAULT_ADDR".into(), "https://vault.example:8200".into())],
        )
        .expect("valid vault config");
        let vault = c.key.vault.unwrap();
        assert_eq!(
            vault.address.as_deref(),
            Some("https://vault.example:8200"),
            "VAULT_ADDR fallback"
        );
        assert_eq!(
            (vault.mount.as_str(), vault.field.as_str(), vault.kv_version),
            ("secret", "api_key", 2)
        );

        let e = load("[key]\nsource = \"vault\"\n[key.vault]\naddress = \"http://vault.example:8200\"\npath = \"p\"\n")
            .unwrap_err();
        assert_eq!(e.key, "key.vault.address");
        let e = load("[key]\nsource = \"vault\"\n[key.vault]\naddress = \"https://v\"\npath = \"p\"\n[key.vault.auth]\nmethod = \"jwt\"\nrole = \"r\"\n").unwrap_err();
        assert_eq!(e.key, "key.vault.auth.jwt_file");
        let e = load("[key]\nsource = \"aws\"\n").unwrap_err();
        assert_eq!(e.key, "key.aws");
        let c = load("[key]\nsource = \"aws\"\n[key.aws]\nsecret_id = \"smallest/api-key\"\njson_key = \"api_key\"\n")
            .unwrap();
        assert_eq!(c.key.aws.unwrap().json_key.as_deref(), Some("api_key"));
        let vars = vec![(
            "SMALLEST_PROXY_KEY_VAULT_AUTH_ROLE_ID".to_string(),
            "from-env".to_string(),
        )];
        let c = load_text(None, "[key]\nsource = \"vault\"\n[key.vault]\naddress = \"https://v\"\npath = \"p\"\n[key.vault.auth]\nmethod = \"approle\"\n", &vars).unwrap();
        assert_eq!(c.key.vault.unwrap().auth.role_id.as_deref(), Some("from-env"));
    }

    #[test]
    fn limit_classes_inherit_from_the_default_class() {
        let c = load(
            "[limits]\nqueue_timeout = \"5s\"\nmax_concurrent = 8\n\n[[limits.class]]\nname = \"tts\"\npaths = [\"/waves/v1/lightning\", \"/waves/v1/tts\"]\nmax_concurrent = 1\nmax_websockets = 5\n",
        )
        .unwrap();
        let classes = c.limits.classes();
        assert_eq!(classes[0].name, "tts");
        assert_eq!((classes[0].max_concurrent, classes[0].max_websockets), (1, 5));
        assert_eq!(classes[0].queue_timeout, Duration::from_secs(5), "inherited");
        assert_eq!(c.limits.default_class().max_concurrent, 8);

        let e = load("[[limits.class]]\nname = \"tts\"\npaths = [\"waves\"]\n").unwrap_err();
        assert_eq!(e.key, "limits.class[0].paths");
        assert!(e.location.starts_with("proxy.toml:"), "{e}");
        let e = load("[[limits.class]]\nname = \"a\"\npaths = [\"/a\"]\nburst = 0\n").unwrap_err();
        assert_eq!(e.key, "limits.class[0].burst");
        let e = load("[limits.shared]\nredis_url = \"http://x\"\n").unwrap_err();
        assert_eq!(e.key, "limits.shared.redis_url");
    }

    #[test]
    fn env_overrides_win_and_are_blamed_by_name() {
        let vars = vec![
            (
                "SMALLEST_PROXY_LISTEN_ADDRESS".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            ("SMALLEST_PROXY_AUTH_SCHEME".to_string(), "Token".to_string()),
            ("SMALLEST_PROXY_LISTEN_ALLOW_REMOTE".to_string(), "false".to_string()),
        ];
        let c = load_text(None, "[listen]\naddress = \"127.0.0.1:1\"\n", &vars).expect("valid");
        assert_eq!(c.listen.address.as_deref(), Some("127.0.0.1:9999"));
        assert_eq!(c.auth.scheme, AuthScheme::Token);

        let bad = vec![("SMALLEST_PROXY_LISTEN_ADDRESS".to_string(), "10.1.2.3:80".to_string())];
        let e = load_text(None, "", &bad).unwrap_err();
        assert_eq!(e.location, "environment variable SMALLEST_PROXY_LISTEN_ADDRESS");

        let unknown = vec![("SMALLEST_PROXY_NOPE".to_string(), "1".to_string())];
        assert!(load_text(None, "", &unknown).is_err());
    }

    #[test]
    fn unix_socket_alone_means_no_tcp() {
        let c = load("[listen]\nunix_socket = \"/tmp/x.sock\"\n").unwrap();
        assert_eq!(c.listen.tcp_address(), None);
    }

    #[test]
    fn the_documented_example_is_exactly_the_defaults() {
        let example = load_text(
            Some(Path::new("proxy.toml.example")),
            include_str!("../proxy.toml.example"),
            &[],
        )
        .expect("proxy.toml.example is valid");
        let mut defaults = load("").unwrap();
        // The example spells out the default address; the default leaves it implicit.
        defaults.listen.address = Some(DEFAULT_LISTEN_ADDRESS.into());
        assert_eq!(example, defaults);
    }

    #[test]
    fn hardening_options_validate_and_name_their_key() {
        let c = load("[listen]\nunix_socket = \"/tmp/x.sock\"\nallowed_uids = [1000]\nmax_body_size = 10\n[policy]\npreset = \"smallest\"\n").unwrap();
        assert_eq!(c.listen.allowed_uids, vec![1000]);
        assert_eq!(c.policy.preset, PolicyPreset::Smallest);
        let e = load("[policy]\nallow = [\"/ok\", \"GET nope\"]\n").unwrap_err();
        assert_eq!(e.key, "policy.allow[1]");
        assert_eq!(e.location, "proxy.toml:2:1");
        let e = load("[listen]\ntoken_file = \"/nonexistent/token\"\n").unwrap_err();
        assert_eq!(e.key, "listen.token_file");
        let e = load("[listen]\nmax_headers = 2\n").unwrap_err();
        assert_eq!(e.key, "listen.max_headers");
        let e = load("[listen]\nmax_body_size = 0\n").unwrap_err();
        assert_eq!(e.key, "listen.max_body_size");
        let e = load("[policy]\npreset = \"all\"\n").unwrap_err();
        assert_eq!(e.key, "policy.preset");
        let vars = vec![("SMALLEST_PROXY_POLICY_PRESET".to_string(), "smallest".to_string())];
        assert_eq!(
            load_text(None, "", &vars).unwrap().policy.preset,
            PolicyPreset::Smallest
        );
        let c = load("").unwrap();
        assert_eq!(c.listen.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.upstream.stream_idle_timeout, DEFAULT_STREAM_IDLE_TIMEOUT);
        assert!(
            c.to_toml().contains("max_header_bytes = 32768"),
            "check shows the limits"
        );
    }

    #[test]
    fn effective_config_round_trips() {
        let c = load("[key]\nsource = \"file\"\nfile = \"/k\"\n").unwrap();
        let again = load(&c.to_toml()).expect("printed config parses");
        assert_eq!(c, again);
    }
}
