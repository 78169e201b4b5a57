//! `[key]`: where the key comes from (env, file, Vault/OpenBao, AWS Secrets Manager, the OS
//! keychain) and how often it is re-read. The config names the source; the key itself is never in it.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

use super::{duration_str, host_is_loopback, invalid, Invalid};

/// The environment variable the key is read from with `source = "env"` (and with no config).
pub const DEFAULT_KEY_ENV: &str = "SMALLEST_API_KEY";

/// Key re-fetch period for sources that rotate (file, vault, aws, keyring).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// How long the last good key keeps serving while its source fails.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(3600);

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
    /// `source = "keyring"`; without the table, [`KeyringConfig::default`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyring: Option<KeyringConfig>,
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

/// Default `[key.keyring]` entry: the names `smallest-proxy key set` stores under.
pub const DEFAULT_KEYRING_SERVICE: &str = "smallest-proxy";
pub const DEFAULT_KEYRING_ACCOUNT: &str = "default";

/// The OS keychain entry holding the key (macOS Keychain, or the freedesktop Secret Service:
/// GNOME Keyring, KWallet), named by service and account as the keychain tools name it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KeyringConfig {
    pub service: String,
    pub account: String,
}

impl Default for KeyringConfig {
    fn default() -> Self {
        KeyringConfig {
            service: DEFAULT_KEYRING_SERVICE.into(),
            account: DEFAULT_KEYRING_ACCOUNT.into(),
        }
    }
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
            keyring: None,
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
    Keyring,
}

impl KeyConfig {
    /// The keychain entry `source = "keyring"` reads: the `[key.keyring]` table or its defaults.
    pub fn keyring_entry(&self) -> KeyringConfig {
        self.keyring.clone().unwrap_or_default()
    }
}

impl KeyConfig {
    /// Checks serde cannot express.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if self.source == KeySourceKind::File && self.file.is_none() {
            return invalid(
                "key.file",
                "source = \"file\" needs `file`, the path of the file holding the key".into(),
            );
        }
        if self.source == KeySourceKind::Env && self.env.is_empty() {
            return invalid("key.env", "must name an environment variable".into());
        }
        if self.source == KeySourceKind::Vault {
            let Some(vault) = &self.vault else {
                return invalid(
                    "key.vault",
                    "source = \"vault\" needs a [key.vault] table with at least `path`".into(),
                );
            };
            let Some(address) = &vault.address else {
                return invalid(
                    "key.vault.address",
                    "set it, or VAULT_ADDR, to the Vault/OpenBao URL".into(),
                );
            };
            match address.parse::<http::Uri>().ok().filter(|u| u.authority().is_some()) {
                Some(u) if u.scheme_str() == Some("https") => {}
                Some(u) if u.scheme_str() == Some("http") && host_is_loopback(u.host().unwrap_or_default()) => {}
                _ => {
                    return invalid(
                        "key.vault.address",
                        format!("{address:?} must be an https URL (plain http only to a loopback host: the Vault token would cross the network in clear)"),
                    )
                }
            }
            if vault.kv_version != 1 && vault.kv_version != 2 {
                return invalid("key.vault.kv_version", "must be 1 or 2".into());
            }
            let auth = &vault.auth;
            match auth.method {
                VaultAuthMethod::Approle if auth.role_id.is_none() && auth.role_id_file.is_none() => {
                    return invalid(
                        "key.vault.auth.role_id",
                        "method = \"approle\" needs role_id or role_id_file".into(),
                    )
                }
                VaultAuthMethod::Jwt | VaultAuthMethod::Kubernetes if auth.role.is_none() => {
                    return invalid(
                        "key.vault.auth.role",
                        format!(
                            "method = \"{}\" needs the Vault role to log in as",
                            auth.method.as_str()
                        ),
                    )
                }
                VaultAuthMethod::Jwt if auth.jwt_file.is_none() => {
                    return invalid(
                        "key.vault.auth.jwt_file",
                        "method = \"jwt\" needs the file holding the JWT".into(),
                    )
                }
                _ => {}
            }
        }
        if self.source == KeySourceKind::Aws && self.aws.is_none() {
            return invalid(
                "key.aws",
                "source = \"aws\" needs a [key.aws] table with at least `secret_id`".into(),
            );
        }
        if let Some(keyring) = &self.keyring {
            if keyring.service.is_empty() {
                return invalid("key.keyring.service", "must not be empty".into());
            }
            if keyring.account.is_empty() {
                return invalid("key.keyring.account", "must not be empty".into());
            }
        }
        if self.refresh_interval < Duration::from_secs(1) {
            return invalid("key.refresh_interval", "must be at least 1s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{load_text, KeySourceKind, KeyringConfig};
    use std::path::Path;

    #[test]
    fn keyring_entry_defaults_overrides_and_empty_names() {
        let c = load_text(None, "[key]\nsource = \"keyring\"\n", &[]).unwrap();
        assert_eq!(c.key.source, KeySourceKind::Keyring);
        assert_eq!(
            c.key.keyring_entry(),
            KeyringConfig {
                service: "smallest-proxy".into(),
                account: "default".into()
            }
        );
        let c = load_text(
            None,
            "[key]\nsource = \"keyring\"\n[key.keyring]\naccount = \"work\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.key.keyring_entry().service, "smallest-proxy");
        assert_eq!(c.key.keyring_entry().account, "work");
        let vars = [
            ("SMALLEST_PROXY_KEY_SOURCE".to_string(), "keyring".to_string()),
            ("SMALLEST_PROXY_KEY_KEYRING_SERVICE".to_string(), "team".to_string()),
        ];
        let c = load_text(None, "", &vars).unwrap();
        assert_eq!(c.key.source, KeySourceKind::Keyring);
        assert_eq!(c.key.keyring_entry().service, "team");
        let e = load_text(
            Some(Path::new("p.toml")),
            "[key]\nsource = \"keyring\"\n[key.keyring]\nservice = \"\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.location.as_str()),
            ("key.keyring.service", "p.toml:4:1")
        );
        let e = load_text(None, "[key.keyring]\nuser = \"x\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "key.keyring.user");
    }
}
