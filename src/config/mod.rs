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
//!
//! Each section is a file with its schema, defaults and checks (`listen`, `upstream` with
//! `[auth]`, `key`, `limits`, `policy`, `log`, `admin`); `env` maps `SMALLEST_PROXY_*` names
//! onto the schema; this one holds the whole, loading, error positions and the duration format.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::Path;
use std::time::Duration;

mod admin;
mod app;
mod env;
mod key;
mod limits;
mod listen;
mod log;
mod policy;
mod route;
mod upstream;

pub use admin::*;
pub use app::*;
pub use env::{ignored_service_links, is_service_link};
pub use key::*;
pub use limits::*;
pub use listen::*;
pub use log::*;
pub use policy::*;
pub use route::*;
pub use upstream::*;

/// Environment variable naming the config file, the same as `--config`.
pub const CONFIG_PATH_ENV: &str = "SMALLEST_PROXY_CONFIG";
/// Prefix of every config override variable.
pub const ENV_OVERRIDE_PREFIX: &str = "SMALLEST_PROXY_";

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
    /// `[[route]]`: more upstreams, each with its own key, chosen by path prefix.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteConfig>,
    pub usage: UsageConfig,
    /// `[[app]]`: the local apps sharing the key (see `app.rs`).
    #[serde(rename = "app", skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<AppConfig>,
}

/// A failed check: the dotted key path and a sentence saying what is wrong.
pub(crate) type Invalid = (String, String);

/// `Err` for `key` with `message`.
pub(crate) fn invalid(key: &str, message: String) -> Result<(), Invalid> {
    Err((key.to_string(), message))
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
    let overridden = env::apply(&mut table, vars)?;

    let locate = |key: &str| -> String {
        if let Some(var) = overridden
            .iter()
            .find(|(k, _)| {
                k == key
                    || key.starts_with(&format!("{k}."))
                    || key.starts_with(&format!("{k}["))
                    || k.starts_with(&format!("{key}."))
                    || same_element(k, key)
            })
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
    route::vault_address_from_env(&mut config.route, vars);
    config.validate().map_err(|(key, message)| ConfigError {
        location: locate(&key),
        key,
        message,
    })?;
    Ok(config)
}

impl Config {
    /// Checks serde cannot express, section by section. Returns the offending key path and a
    /// sentence.
    fn validate(&self) -> Result<(), Invalid> {
        self.listen.validate()?;
        self.upstream.validate()?;
        self.policy.validate()?;
        self.key.validate()?;
        self.limits.validate()?;
        self.admin.validate()?;
        self.log.validate()?;
        self.usage.validate()?;
        app::validate_apps(&self.apps)?;
        route::validate(self)
    }
}

/// `localhost`, `127.x.y.z`, `::1` (with or without brackets).
pub fn host_is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A name an operator gives a route or an app: 1 to 64 letters, digits, `-`, `_` or `.`, so it
/// is safe as a metrics label, a Redis key part and a log field.
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
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
        // A key that is missing (a required field left out) is blamed on its parent's position.
        let Some((k, item)) = table.get_key_value(name) else {
            break;
        };
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

/// Both keys are fields of one array element (`limits.class[0].name` and
/// `limits.class[0].paths`): an element made from the environment is blamed on its variable.
fn same_element(a: &str, b: &str) -> bool {
    match (a.rfind(']'), b.rfind(']')) {
        (Some(i), Some(j)) => a[..=i] == b[..=j],
        _ => false,
    }
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
        assert_eq!(
            (classes[0].max_concurrent, classes[0].max_websockets),
            (Concurrency::Fixed(1), 5)
        );
        assert_eq!(classes[0].queue_timeout, Duration::from_secs(5), "inherited");
        assert_eq!(c.limits.default_class().max_concurrent, Concurrency::Fixed(8));

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

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn limits_and_classes_come_from_the_environment_typed_as_toml() {
        let vars = env(&[
            ("SMALLEST_PROXY_LIMITS_MAX_CONCURRENT", "1"),
            ("SMALLEST_PROXY_LIMITS_QUEUE_TIMEOUT", "5s"),
            ("SMALLEST_PROXY_LIMITS_SHARED_REDIS_URL", "redis://127.0.0.1:6379"),
            (
                "SMALLEST_PROXY_LIMITS_CLASS",
                r#"[{name = "tts", paths = ["/waves/v1/tts"], max_concurrent = 2}]"#,
            ),
            ("SMALLEST_PROXY_LIMITS_CLASS_0_MAX_WEBSOCKETS", "5"),
            (
                "SMALLEST_PROXY_LIMITS_CLASS_1",
                r#"{name = "stt", paths = ["/waves/v1/stt"]}"#,
            ),
            ("SMALLEST_PROXY_LIMITS_CLASS_1_RATE", "10"),
            ("SMALLEST_PROXY_LISTEN_ALLOWED_ORIGINS", r#"["http://localhost:3000"]"#),
            ("SMALLEST_PROXY_LISTEN_UNIX_SOCKET_MODE", "0600"),
            ("SMALLEST_PROXY_UPSTREAM_RESPONSE_TIMEOUT", "90s"),
            ("SMALLEST_PROXY_POLICY_ALLOW_LOGS", "true"),
        ]);
        let c = load_text(None, "", &vars).expect("valid");
        assert_eq!(c.limits.max_concurrent, limits::Concurrency::Fixed(1));
        assert_eq!(c.limits.queue_timeout, Duration::from_secs(5));
        assert_eq!(c.limits.shared.as_ref().unwrap().redis_url, "redis://127.0.0.1:6379");
        let classes = c.limits.classes();
        assert_eq!(
            (
                classes[0].name.as_str(),
                classes[0].max_concurrent,
                classes[0].max_websockets
            ),
            ("tts", limits::Concurrency::Fixed(2), 5)
        );
        assert_eq!((classes[1].name.as_str(), classes[1].rate), ("stt", 10));
        assert_eq!(c.listen.allowed_origins, vec!["http://localhost:3000".to_string()]);
        assert_eq!(c.listen.unix_mode_bits(), 0o600);
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(90));
        assert!(c.policy.allow_logs);

        // Elements numbered past 9 still go in numeric order.
        let mut many: Vec<(String, String)> = (0..12)
            .map(|i| {
                (
                    format!("SMALLEST_PROXY_LIMITS_CLASS_{i}"),
                    format!("{{name = \"c{i}\", paths = [\"/c{i}\"]}}"),
                )
            })
            .collect();
        many.reverse();
        let c = load_text(None, "", &many).expect("twelve classes");
        assert_eq!(c.limits.classes()[11].name, "c11");

        // An element of the file's array is changed in place.
        let file = "[[limits.class]]\nname = \"tts\"\npaths = [\"/waves/v1/tts\"]\n";
        let c = load_text(
            None,
            file,
            &env(&[("SMALLEST_PROXY_LIMITS_CLASS_0_MAX_CONCURRENT", "3")]),
        )
        .unwrap();
        assert_eq!(c.limits.classes()[0].max_concurrent, limits::Concurrency::Fixed(3));
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        let e = load_text(None, "", &env(&[("SMALLEST_PROXY_LIMITS_MAX_CONCURRENT", "many")])).unwrap_err();
        assert_eq!(e.location, "environment variable SMALLEST_PROXY_LIMITS_MAX_CONCURRENT");
        assert_eq!(e.key, "limits.max_concurrent");
        let e = load_text(None, "", &env(&[("SMALLEST_PROXY_LIMITS_QUEUE_TIMEOUT", "soon")])).unwrap_err();
        assert_eq!(e.location, "environment variable SMALLEST_PROXY_LIMITS_QUEUE_TIMEOUT");
        assert!(e.message.contains("not a duration"), "{e}");
        // A class from the environment without its paths: the variable is blamed.
        let e = load_text(None, "", &env(&[("SMALLEST_PROXY_LIMITS_CLASS_0_NAME", "speech")])).unwrap_err();
        assert_eq!(
            e.location, "environment variable SMALLEST_PROXY_LIMITS_CLASS_0_NAME",
            "{e}"
        );
        let e = load_text(None, "", &env(&[("SMALLEST_PROXY_LIMITS_CLASS_2_NAME", "tts")])).unwrap_err();
        assert!(e.message.contains("gap"), "{e}");
        let e = load_text(None, "", &env(&[("SMALLEST_PROXY_LISTEN_MAX_CONNECTIONS", "0")])).unwrap_err();
        assert_eq!(e.location, "environment variable SMALLEST_PROXY_LISTEN_MAX_CONNECTIONS");
    }

    #[test]
    fn kubernetes_service_links_are_skipped_and_other_unknown_names_still_fail() {
        let links = env(&[
            ("SMALLEST_PROXY_SERVICE_HOST", "10.0.0.7"),
            ("SMALLEST_PROXY_SERVICE_PORT", "8787"),
            ("SMALLEST_PROXY_SERVICE_PORT_HTTP", "8787"),
            ("SMALLEST_PROXY_PORT", "tcp://10.0.0.7:8787"),
            ("SMALLEST_PROXY_PORT_8787_TCP", "tcp://10.0.0.7:8787"),
            ("SMALLEST_PROXY_PORT_8787_TCP_PROTO", "tcp"),
            ("SMALLEST_PROXY_PORT_8787_TCP_PORT", "8787"),
            ("SMALLEST_PROXY_PORT_8787_TCP_ADDR", "10.0.0.7"),
        ]);
        assert_eq!(
            load_text(None, "", &links).expect("links never stop start-up"),
            load("").unwrap()
        );
        assert_eq!(ignored_service_links(&links).len(), links.len());
        let mut with_typo = links.clone();
        with_typo.push(("SMALLEST_PROXY_LISTEN_ADRESS".into(), "127.0.0.1:1".into()));
        let e = load_text(None, "", &with_typo).unwrap_err();
        assert_eq!(e.location, "environment variable SMALLEST_PROXY_LISTEN_ADRESS");
        assert!(e.message.starts_with("does not name a config key"), "{e}");
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
            include_str!("../../proxy.toml.example"),
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
