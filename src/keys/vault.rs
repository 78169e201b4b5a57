//! `source = "vault"`: the key from a HashiCorp Vault or OpenBao KV secret (v1 or v2).
//!
//! The source owns a Vault login token. It logs in lazily (token, AppRole, JWT or Kubernetes
//! auth), renews the token in the background at two thirds of its TTL, and logs in again when
//! a renewal fails or Vault stops extending the TTL (its max TTL is near). Credentials are read
//! from their files at every login, because Vault Agent sinks, AppRole secret IDs and
//! service-account tokens rotate too. A read refused with 403 (token revoked) logs in once more.
//!
//! Vault speaks a tiny JSON-over-HTTP API, so this is a few calls over the same hyper/rustls
//! stack the proxy already uses rather than a Vault SDK (none of the Rust ones covers
//! OpenBao, namespaces and all four login methods while sharing our TLS setup).
//! Tokens live in `SecretString`s; no token, secret ID or JWT is ever logged or put in an error.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use secrecy::{ExposeSecret, SecretString};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

use super::{KeyError, KeySource};
use crate::config::{VaultAuthMethod, VaultConfig, DEFAULT_KUBERNETES_JWT_FILE};

/// Any single Vault call longer than this counts as a failure (and is retried with backoff).
const VAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Consider a token expired this long before Vault would, so a read never races its expiry.
const EXPIRY_MARGIN: Duration = Duration::from_millis(500);

pub struct VaultSource {
    inner: Arc<Inner>,
}

struct Inner {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    config: VaultConfig,
    /// The login token in use; the lock also serialises logins.
    token: tokio::sync::Mutex<Option<LoginToken>>,
}

struct LoginToken {
    value: SecretString,
    /// `None`: the token does not expire (a root or periodic-less static token).
    expires: Option<Instant>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for LoginToken {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

/// What a login or renewal told us about the token.
struct Lease {
    token: SecretString,
    ttl: Duration,
    renewable: bool,
}

enum VaultCallError {
    Forbidden(String),
    Other(String),
}

impl From<VaultCallError> for KeyError {
    fn from(e: VaultCallError) -> KeyError {
        match e {
            VaultCallError::Forbidden(m) | VaultCallError::Other(m) => KeyError::Source(m),
        }
    }
}

impl VaultSource {
    pub fn new(config: &VaultConfig) -> Result<VaultSource, KeyError> {
        let address = config
            .address
            .clone()
            .ok_or_else(|| KeyError::Source("key.vault.address is not set".into()))?;
        let tls = crate::tls::client_tls_config(config.ca_file.as_deref())
            .map_err(|e| KeyError::Source(format!("vault TLS setup: {e}")))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(VaultSource {
            inner: Arc::new(Inner {
                http: client,
                base: address.trim_end_matches('/').to_string(),
                config: config.clone(),
                token: tokio::sync::Mutex::new(None),
            }),
        })
    }
}

#[async_trait::async_trait]
impl KeySource for VaultSource {
    fn kind(&self) -> &'static str {
        "vault"
    }

    async fn fetch(&self) -> Result<SecretString, KeyError> {
        let token = self.inner.token().await?;
        match self.inner.read_secret(&token).await {
            Err(VaultCallError::Forbidden(reason)) => {
                // Revoked or expired early: one fresh login, then give up until the next try.
                tracing::info!(reason = %reason, "vault refused the token; logging in again");
                self.inner.forget_token().await;
                let token = self.inner.token().await?;
                Ok(self.inner.read_secret(&token).await?)
            }
            other => Ok(other?),
        }
    }
}

impl Inner {
    /// The current login token, logging in first when there is none or it has expired.
    async fn token(self: &Arc<Self>) -> Result<SecretString, KeyError> {
        let mut slot = self.token.lock().await;
        if let Some(token) = slot.as_ref() {
            if token.expires.is_none_or(|at| Instant::now() + EXPIRY_MARGIN < at) {
                return Ok(token.value.clone());
            }
        }
        *slot = None;
        let lease = self.login().await?;
        let value = lease.token.clone();
        *slot = Some(self.adopt(lease));
        Ok(value)
    }

    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    /// Keep a fresh lease, with a renewal task when it can be renewed.
    fn adopt(self: &Arc<Self>, lease: Lease) -> LoginToken {
        let expires = (lease.ttl > Duration::ZERO).then(|| Instant::now() + lease.ttl);
        let renewer = (lease.renewable && lease.ttl > Duration::ZERO).then(|| {
            let weak = Arc::downgrade(self);
            let token = lease.token.clone();
            tokio::spawn(renew_until_dropped(weak, token, lease.ttl))
        });
        LoginToken {
            value: lease.token,
            expires,
            renewer,
        }
    }

    async fn login(&self) -> Result<Lease, KeyError> {
        let auth = &self.config.auth;
        let method = auth.method;
        let mount = auth.mount.clone().unwrap_or_else(|| method.as_str().to_string());
        let lease = match method {
            VaultAuthMethod::Token => {
                let token = match &auth.token_file {
                    Some(path) => read_trimmed(path, "token_file").await?,
                    None => SecretString::from(std::env::var("VAULT_TOKEN").map_err(|_| {
                        KeyError::Source(
                            "vault token auth: neither key.vault.auth.token_file nor VAULT_TOKEN is set".into(),
                        )
                    })?),
                };
                let (_, body) = self
                    .call(Method::GET, "/v1/auth/token/lookup-self", Some(&token), None)
                    .await?;
                let ttl = Duration::from_secs(body["data"]["ttl"].as_u64().unwrap_or(0));
                let renewable = body["data"]["renewable"].as_bool().unwrap_or(false);
                Lease { token, ttl, renewable }
            }
            VaultAuthMethod::Approle => {
                let role_id = match (&auth.role_id, &auth.role_id_file) {
                    (Some(id), _) => SecretString::from(id.clone()),
                    (None, Some(path)) => read_trimmed(path, "role_id_file").await?,
                    (None, None) => return Err(KeyError::Source("approle needs role_id or role_id_file".into())),
                };
                let mut payload = serde_json::json!({ "role_id": role_id.expose_secret() });
                if let Some(path) = &auth.secret_id_file {
                    let secret_id = read_trimmed(path, "secret_id_file").await?;
                    payload["secret_id"] = serde_json::Value::String(secret_id.expose_secret().to_string());
                }
                self.login_call(&mount, payload).await?
            }
            VaultAuthMethod::Jwt | VaultAuthMethod::Kubernetes => {
                let default_jwt = std::path::PathBuf::from(DEFAULT_KUBERNETES_JWT_FILE);
                let jwt_file = auth.jwt_file.as_ref().unwrap_or(&default_jwt);
                let jwt = read_trimmed(jwt_file, "jwt_file").await?;
                let payload =
                    serde_json::json!({ "role": auth.role.clone().unwrap_or_default(), "jwt": jwt.expose_secret() });
                self.login_call(&mount, payload).await?
            }
        };
        tracing::info!(
            method = method.as_str(),
            ttl_seconds = lease.ttl.as_secs(),
            renewable = lease.renewable,
            "vault: logged in"
        );
        Ok(lease)
    }

    async fn login_call(&self, mount: &str, payload: serde_json::Value) -> Result<Lease, KeyError> {
        // The payload carries credentials: serialise into a buffer that is wiped afterwards.
        let body = Zeroizing::new(payload.to_string().into_bytes());
        let (_, response) = self
            .call(Method::POST, &format!("/v1/auth/{mount}/login"), None, Some(&body))
            .await?;
        lease_from_auth(&response)
            .ok_or_else(|| KeyError::Source(format!("vault login at auth/{mount} returned no token")))
    }

    async fn renew(&self, token: &SecretString) -> Result<Lease, KeyError> {
        let (_, response) = self
            .call(Method::POST, "/v1/auth/token/renew-self", Some(token), Some(b"{}"))
            .await?;
        lease_from_auth(&response).ok_or_else(|| KeyError::Source("vault renew-self returned no lease".into()))
    }

    async fn read_secret(&self, token: &SecretString) -> Result<SecretString, VaultCallError> {
        let config = &self.config;
        let (mount, path) = (config.mount.trim_matches('/'), config.path.trim_matches('/'));
        let url = if config.kv_version == 1 {
            format!("/v1/{mount}/{path}")
        } else {
            format!("/v1/{mount}/data/{path}")
        };
        let (_, body) = self.call(Method::GET, &url, Some(token), None).await?;
        let data = if config.kv_version == 1 {
            &body["data"]
        } else {
            &body["data"]["data"]
        };
        match data.get(&config.field) {
            Some(serde_json::Value::String(value)) => Ok(SecretString::from(value.clone())),
            Some(_) => Err(VaultCallError::Other(format!(
                "vault secret {mount}/{path}: field {:?} is not a string",
                config.field
            ))),
            None => Err(VaultCallError::Other(format!(
                "vault secret {mount}/{path} has no field {:?}",
                config.field
            ))),
        }
    }

    /// One Vault API call. Errors carry Vault's own messages (which hold no secrets), never
    /// the request body or token.
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&[u8]>,
    ) -> Result<(StatusCode, serde_json::Value), VaultCallError> {
        let mut request = Request::builder().method(method).uri(format!("{}{}", self.base, path));
        if let Some(token) = token {
            let mut value = http::HeaderValue::from_str(token.expose_secret())
                .map_err(|_| VaultCallError::Other("the vault token is not a valid header value".into()))?;
            value.set_sensitive(true);
            request = request.header("x-vault-token", value);
        }
        if let Some(namespace) = &self.config.namespace {
            request = request.header("x-vault-namespace", namespace.as_str());
        }
        let request = request
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.map(Bytes::copy_from_slice).unwrap_or_default()))
            .map_err(|e| VaultCallError::Other(format!("vault request for {path}: {e}")))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| VaultCallError::Other(format!("vault at {} unreachable: {e}", self.base)))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| VaultCallError::Other(format!("vault response: {e}")))?
                .to_bytes();
            Ok::<_, VaultCallError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(VAULT_CALL_TIMEOUT, exchange).await.map_err(|_| {
            VaultCallError::Other(format!(
                "vault at {} did not answer within {}s",
                self.base,
                VAULT_CALL_TIMEOUT.as_secs()
            ))
        })??;
        let bytes = Zeroizing::new(bytes.to_vec());
        let json: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
        };
        if status.is_success() {
            return Ok((status, json));
        }
        let errors = json["errors"]
            .as_array()
            .map(|e| e.iter().filter_map(|m| m.as_str()).collect::<Vec<_>>().join("; "))
            .unwrap_or_default();
        let message = format!(
            "vault {path}: HTTP {}{}",
            status.as_u16(),
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {errors}")
            }
        );
        if status == StatusCode::FORBIDDEN {
            Err(VaultCallError::Forbidden(message))
        } else {
            Err(VaultCallError::Other(message))
        }
    }
}

fn lease_from_auth(response: &serde_json::Value) -> Option<Lease> {
    let auth = &response["auth"];
    let token = auth["client_token"].as_str()?;
    Some(Lease {
        token: SecretString::from(token.to_string()),
        ttl: Duration::from_secs(auth["lease_duration"].as_u64().unwrap_or(0)),
        renewable: auth["renewable"].as_bool().unwrap_or(false),
    })
}

async fn read_trimmed(path: &std::path::Path, what: &str) -> Result<SecretString, KeyError> {
    let bytes = Zeroizing::new(
        tokio::fs::read(path)
            .await
            .map_err(|e| KeyError::Source(format!("vault {what} {}: {}", path.display(), e.kind())))?,
    );
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| KeyError::Source(format!("vault {what} {} is not UTF-8", path.display())))?;
    Ok(SecretString::from(text.trim().to_string()))
}

/// Renew at two thirds of each TTL. When Vault grants noticeably less than the last TTL, the
/// token's max TTL is near: log in afresh before it runs out. When renewal is refused (OpenBao
/// refuses outright near the max TTL), log in again; the key already fetched keeps serving
/// meanwhile, since the token is only needed for the next fetch.
/// Ends when the source is dropped or the token is replaced (its `LoginToken` aborts us).
async fn renew_until_dropped(source: Weak<Inner>, token: SecretString, mut ttl: Duration) {
    loop {
        tokio::time::sleep(ttl.mul_f64(2.0 / 3.0)).await;
        let Some(inner) = source.upgrade() else { return };
        match inner.renew(&token).await {
            Ok(lease) if lease.ttl * 2 >= ttl => {
                tracing::info!(ttl_seconds = lease.ttl.as_secs(), "vault: token renewed");
                if let Some(current) = inner.token.lock().await.as_mut() {
                    current.expires = Some(Instant::now() + lease.ttl);
                }
                ttl = lease.ttl;
            }
            outcome => {
                match outcome {
                    Ok(lease) => tracing::info!(
                        ttl_seconds = lease.ttl.as_secs(),
                        "vault: token max TTL is near; logging in again"
                    ),
                    // Expected at the end of a token's life (Vault and OpenBao refuse renewals
                    // near the max TTL rather than cap them): not a warning, just a new login.
                    Err(e) => tracing::info!(error = %e, "vault: token renewal refused; logging in again"),
                }
                let mut slot = inner.token.lock().await;
                match inner.login().await {
                    Ok(lease) => {
                        // Replacing the slot aborts this task (its handle is in the old token),
                        // after the new token's own renewer has been started.
                        *slot = Some(inner.adopt(lease));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "vault: login failed; the next key fetch will retry");
                        *slot = None;
                    }
                }
                return;
            }
        }
    }
}
