//! The API key: where it comes from, where it is kept, and how it is swapped.
//!
//! A [`KeySource`] fetches the key's value (env, file, ...: one trait implementation per
//! backend). The [`KeyStore`] keeps the current [`ApiKey`] in an `ArcSwap` so the request path
//! reads it with one atomic load and no lock; a request holds its `Arc<ApiKey>` for its whole
//! life, so a rotation never changes the key under a request already in flight.
//!
//! Secret handling: the value lives in a `SecretString` (zeroised on drop) and in a
//! `HeaderValue` marked sensitive (HPACK never indexes it, its `Debug` prints `Sensitive`).
//! Nothing here formats the value into a log line, an error or a `Debug` string; errors carry
//! only what failed and why, and the fingerprint (8 hex digits of SHA-256) is the only thing
//! about a key that may be shown.

pub mod aws;
pub mod env;
pub mod file;
pub mod vault;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use zeroize::Zeroizing;

use crate::config::{AuthScheme, Config, KeySourceKind};

/// The longest key value accepted (DESIGN.md: ≤ 4 KiB).
pub const MAX_KEY_LEN: usize = 4096;

/// Why a key could not be had. Never contains the key or any other secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("cannot read key file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("the key source returned an unusable value: {0}")]
    Invalid(&'static str),
    #[error("{0}")]
    Source(String),
}

/// A validated key, ready to inject.
pub struct ApiKey {
    secret: SecretString,
    header: HeaderValue,
    fingerprint: String,
    fetched_at: Instant,
}

impl ApiKey {
    /// Validate `value` and build the `Authorization` value once, so the request path only
    /// clones a `HeaderValue` (a refcount bump) instead of formatting per request.
    pub fn new(value: SecretString, scheme: AuthScheme) -> Result<ApiKey, KeyError> {
        validate_key_value(value.expose_secret())?;
        let mut text = Zeroizing::new(String::with_capacity(
            scheme.as_str().len() + 1 + value.expose_secret().len(),
        ));
        text.push_str(scheme.as_str());
        text.push(' ');
        text.push_str(value.expose_secret());
        let mut header = HeaderValue::from_str(&text).map_err(|_| KeyError::Invalid("not a valid header value"))?;
        header.set_sensitive(true);
        let fingerprint = fingerprint(value.expose_secret());
        Ok(ApiKey {
            secret: value,
            header,
            fingerprint,
            fetched_at: Instant::now(),
        })
    }

    /// The full `Authorization` header value (`Bearer <key>`), marked sensitive.
    pub fn authorization(&self) -> &HeaderValue {
        &self.header
    }

    /// First 8 hex digits of the SHA-256 of the key: enough to tell keys apart, useless to an
    /// attacker.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn age(&self) -> Duration {
        self.fetched_at.elapsed()
    }

    /// Same key value as `other` (used to tell whether a refresh actually rotated the key).
    pub fn same_value(&self, other: &ApiKey) -> bool {
        self.secret.expose_secret() == other.secret.expose_secret()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The rules every source's value must pass: non-empty, visible ASCII only (so no CR/LF header
/// injection and no stray spaces), at most 4 KiB.
pub fn validate_key_value(value: &str) -> Result<(), KeyError> {
    if value.is_empty() {
        return Err(KeyError::Invalid("the value is empty"));
    }
    if value.len() > MAX_KEY_LEN {
        return Err(KeyError::Invalid("the value is longer than 4 KiB"));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(KeyError::Invalid("the value contains a line break"));
    }
    // Name the rule broken, so an operator knows what to look for in the source.
    if let Some(bad) = value.bytes().find(|b| !b.is_ascii_graphic()) {
        return Err(KeyError::Invalid(match bad {
            b'\t' => "the value contains a tab (only visible ASCII is allowed)",
            b' ' => "the value contains a space (only visible ASCII is allowed)",
            b if b.is_ascii_control() => "the value contains a control character (only visible ASCII is allowed)",
            _ => "the value contains a non-ASCII character (only visible ASCII is allowed)",
        }));
    }
    Ok(())
}

pub fn fingerprint(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// One backend that can produce the key's current value.
#[async_trait::async_trait]
pub trait KeySource: Send + Sync + 'static {
    /// Short name for logs, `/ready` and metrics: `env`, `file`, `vault`, `aws`.
    fn kind(&self) -> &'static str;
    /// Fetch the current value. Must not log or embed the value in the error.
    async fn fetch(&self) -> Result<SecretString, KeyError>;
    /// Whether the value can change while the process runs (env cannot).
    fn rotates(&self) -> bool {
        true
    }
    /// What an operator does when the upstream rejects the key: a sentence naming the place
    /// to fix (never the value).
    fn remedy(&self) -> String {
        format!(
            "put a valid key in the {} key source; the proxy picks it up at the next refresh (or SIGHUP)",
            self.kind()
        )
    }
}

/// Build the configured source. Nothing is fetched yet; a source that cannot even be built
/// (bad CA file for Vault) is a start-up error.
pub async fn source_from_config(config: &Config) -> Result<Arc<dyn KeySource>, KeyError> {
    let missing = |section: &str| KeyError::Source(format!("[{section}] is missing"));
    Ok(match config.key.source {
        KeySourceKind::Env => Arc::new(env::EnvSource::new(&config.key.env)),
        KeySourceKind::File => Arc::new(file::FileSource::new(config.key.file.clone().unwrap_or_default())),
        KeySourceKind::Vault => Arc::new(vault::VaultSource::new(
            config.key.vault.as_ref().ok_or_else(|| missing("key.vault"))?,
        )?),
        KeySourceKind::Aws => {
            Arc::new(aws::AwsSource::new(config.key.aws.as_ref().ok_or_else(|| missing("key.aws"))?).await)
        }
    })
}

/// What `/ready` reports about the key, without the key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyStatus {
    pub source: &'static str,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Failed fetches since start.
    pub refresh_errors: u64,
    /// Times the key value changed since start (the first load does not count).
    pub rotations: u64,
    /// The upstream refuses the key in use (see [`Rejection`]); absent while it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejection>,
    /// Upstream 401 answers since start.
    pub upstream_401: u64,
    /// Upstream 403 answers since start.
    pub upstream_403: u64,
}

/// The upstream's refusal of the key in use: a 401 that a refresh and a resend did not cure,
/// or a self-hosted server's 403 saying its licence expired or its quota is spent. It lasts
/// until the source yields a different key, or the upstream accepts this key again (a 2xx).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// 401 or 403.
    pub status: u16,
    pub fingerprint: String,
    /// Refusals of this key since the state began.
    pub count: u64,
    /// The upstream's `code` for a 403 (`LICENSE_EXPIRED`, `QUOTA_EXCEEDED`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// When the self-hosted server's licence expires or expired, as it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl Rejection {
    /// The `/ready` status word: `key_rejected`, `license_expired` or `quota_exceeded`.
    pub fn ready_status(&self) -> &'static str {
        match self.code.as_deref() {
            Some(code) if code.eq_ignore_ascii_case("LICENSE_EXPIRED") => "license_expired",
            Some(_) => "quota_exceeded",
            None => "key_rejected",
        }
    }
}

/// A 403 body from the upstream that says the account (a self-hosted server's licence) cannot
/// serve at all: `{"code": "LICENSE_EXPIRED", "expires_at": ...}` or a quota code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: String,
    pub expires_at: Option<String>,
    pub message: Option<String>,
}

impl Refusal {
    /// Read a 403 body; `None` for a 403 that is about one endpoint, not the account.
    pub fn from_body(body: &[u8]) -> Option<Refusal> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let field = |name: &str| {
            value
                .get(name)
                .or_else(|| value.get("error").and_then(|e| e.get(name)))
                .and_then(|v| v.as_str())
                .map(|s| s.chars().take(200).collect::<String>())
        };
        let code = field("code")?;
        let upper = code.to_ascii_uppercase();
        if upper != "LICENSE_EXPIRED" && !upper.contains("QUOTA") {
            return None;
        }
        Some(Refusal {
            code,
            expires_at: field("expires_at"),
            message: field("message").or_else(|| field("error")),
        })
    }
}

/// Fingerprints already warned about, bounded so a source cycling through bad keys cannot
/// grow it without end.
const MAX_WARNED: usize = 64;

/// The current key and the machinery to replace it.
pub struct KeyStore {
    current: ArcSwapOption<ApiKey>,
    source: Arc<dyn KeySource>,
    scheme: AuthScheme,
    max_stale: Duration,
    /// Serialises fetches; together with `generation` makes a burst of refresh requests cost
    /// one fetch (single-flight).
    fetch_lock: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    refresh_errors: AtomicU64,
    rotations: AtomicU64,
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Wakes the refresher for an on-demand fetch (SIGHUP, file change).
    wake: tokio::sync::Notify,
    /// Set while `rejection` holds something: the success path checks only this.
    rejected: AtomicBool,
    rejection: Mutex<Option<Rejection>>,
    warned: Mutex<Vec<String>>,
    upstream_401: AtomicU64,
    upstream_403: AtomicU64,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("source", &self.source.kind())
            .field("current", &self.current.load())
            .finish()
    }
}

impl KeyStore {
    pub fn new(source: Arc<dyn KeySource>, scheme: AuthScheme, max_stale: Duration) -> KeyStore {
        KeyStore {
            current: ArcSwapOption::empty(),
            source,
            scheme,
            max_stale,
            fetch_lock: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            refresh_errors: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            last_error: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            rejected: AtomicBool::new(false),
            rejection: Mutex::new(None),
            warned: Mutex::new(Vec::new()),
            upstream_401: AtomicU64::new(0),
            upstream_403: AtomicU64::new(0),
        }
    }

    /// Count an upstream 401 or 403 (the `upstream_auth_failures_total` metric).
    pub fn count_auth_failure(&self, status: u16) {
        match status {
            401 => self.upstream_401.fetch_add(1, Ordering::Relaxed),
            403 => self.upstream_403.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// The upstream still answers 401 to `key` after the refresh and resend, or a 403 with
    /// `refusal`: enter (or stay in) the rejected state, warning once per fingerprint. A key
    /// that is no longer the current one is ignored (its successor has not been refused).
    pub fn note_rejected(&self, key: &ApiKey, refusal: Option<&Refusal>) {
        let Some(current) = self.current.load_full() else {
            return;
        };
        if !current.same_value(key) {
            return;
        }
        let status = if refusal.is_some() { 403 } else { 401 };
        let Ok(mut rejection) = self.rejection.lock() else {
            return;
        };
        let code = refusal.map(|r| r.code.clone());
        let count = match rejection.as_ref() {
            Some(r) if r.fingerprint == key.fingerprint() && r.code == code => r.count + 1,
            _ => 1,
        };
        *rejection = Some(Rejection {
            status,
            fingerprint: key.fingerprint().to_string(),
            count,
            code: code.clone(),
            expires_at: refusal.and_then(|r| r.expires_at.clone()),
        });
        self.rejected.store(true, Ordering::Release);
        drop(rejection);
        let warn_key = format!("{}:{}", key.fingerprint(), code.as_deref().unwrap_or("401"));
        let first = self.warned.lock().is_ok_and(|mut warned| {
            if warned.contains(&warn_key) {
                return false;
            }
            if warned.len() >= MAX_WARNED {
                warned.remove(0);
            }
            warned.push(warn_key);
            true
        });
        if !first {
            return;
        }
        match refusal {
            None => tracing::warn!(
                source = self.source.kind(),
                fingerprint = key.fingerprint(),
                "the upstream rejects the API key (401, also after a refresh and a resend): every request fails until a valid key arrives; {}. /ready answers 503 key_rejected meanwhile",
                self.source.remedy()
            ),
            Some(refusal) => tracing::warn!(
                source = self.source.kind(),
                fingerprint = key.fingerprint(),
                code = %refusal.code,
                expires_at = refusal.expires_at.as_deref().unwrap_or("unknown"),
                message = refusal.message.as_deref().unwrap_or(""),
                "the upstream refuses to serve this account (403 {}): renew the self-hosted server's licence or quota; /ready answers 503 meanwhile",
                refusal.code
            ),
        }
    }

    /// The upstream accepted `key` (a 2xx): if it was the rejected one, the state ends. One
    /// atomic load when nothing is rejected.
    pub fn note_accepted(&self, key: &ApiKey) {
        if !self.rejected.load(Ordering::Acquire) {
            return;
        }
        self.clear_rejection_unless(key.fingerprint(), true);
    }

    /// End the rejected state when it is about `fingerprint` (`same`) or about another key
    /// (`!same`, a new key arrived).
    fn clear_rejection_unless(&self, fingerprint: &str, same: bool) {
        let Ok(mut rejection) = self.rejection.lock() else {
            return;
        };
        let matches = rejection.as_ref().is_some_and(|r| r.fingerprint == fingerprint);
        if rejection.is_some() && matches == same {
            if let Some(r) = rejection.take() {
                tracing::info!(
                    fingerprint = %r.fingerprint,
                    now = fingerprint,
                    "the upstream refusal of the key is over"
                );
            }
            self.rejected.store(false, Ordering::Release);
        }
    }

    /// Ask the refresher to fetch now (coalesced with any fetch already under way).
    pub fn request_refresh(&self) {
        self.wake.notify_one();
    }

    pub fn source_kind(&self) -> &'static str {
        self.source.kind()
    }

    pub fn source_rotates(&self) -> bool {
        self.source.rotates()
    }

    /// The key to use for a request starting now, or `None` when there is no usable key (never
    /// fetched, or older than `max_stale` while the source fails). One atomic load.
    pub fn current(&self) -> Option<Arc<ApiKey>> {
        let key = self.current.load_full()?;
        if self.source.rotates() && key.age() > self.max_stale && self.last_error_message().is_some() {
            return None;
        }
        Some(key)
    }

    /// Fetch from the source now and swap the key in if it is valid. Concurrent callers share
    /// one fetch: whoever waited on the lock while another fetched returns that result.
    pub async fn refresh(&self) -> Result<Arc<ApiKey>, KeyError> {
        self.fetch_coalesced(None).await
    }

    /// The one fetch path. Without `rejected`, a caller that waited while another fetch ran
    /// takes that fetch's result. With `rejected` (an upstream 401), that is not enough: the
    /// fetch it waited on may have started before the rotation and read the old value. So it
    /// takes the current key only if it differs from the rejected one, and fetches otherwise.
    async fn fetch_coalesced(&self, rejected: Option<&ApiKey>) -> Result<Arc<ApiKey>, KeyError> {
        let seen = self.generation.load(Ordering::Acquire);
        let _fetching = self.fetch_lock.lock().await;
        let current = self.current.load_full();
        match (rejected, current) {
            (Some(rejected), Some(key)) if !key.same_value(rejected) => return Ok(key),
            (None, Some(key)) if self.generation.load(Ordering::Acquire) != seen => return Ok(key),
            _ => {}
        }
        let result = self
            .source
            .fetch()
            .await
            .and_then(|value| ApiKey::new(value, self.scheme));
        self.generation.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(key) => {
                let key = Arc::new(key);
                let previous = self.current.swap(Some(key.clone()));
                match previous {
                    Some(old) if old.same_value(&key) => {
                        // Same value re-read: nothing rotated; the new Arc only resets the age.
                    }
                    Some(old) => {
                        self.rotations.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            source = self.source.kind(),
                            old = old.fingerprint(),
                            new = key.fingerprint(),
                            "API key rotated"
                        )
                    }
                    None => {
                        tracing::info!(
                            source = self.source.kind(),
                            fingerprint = key.fingerprint(),
                            "API key loaded"
                        )
                    }
                }
                // A different key ends a rejection of the old one.
                if self.rejected.load(Ordering::Acquire) {
                    self.clear_rejection_unless(key.fingerprint(), false);
                }
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                Ok(key)
            }
            Err(err) => {
                self.refresh_errors.fetch_add(1, Ordering::Relaxed);
                if self.current.load().is_some() {
                    tracing::warn!(source = self.source.kind(), error = %err, "key refresh failed; keeping the last good key");
                } else {
                    tracing::warn!(source = self.source.kind(), error = %err, "no usable API key: nothing is served (503 KEY_UNAVAILABLE) until the source yields a valid one");
                }
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some((err.to_string(), SystemTime::now()));
                }
                Err(err)
            }
        }
    }

    fn last_error_message(&self) -> Option<String> {
        self.last_error
            .lock()
            .ok()
            .and_then(|e| e.as_ref().map(|(m, _)| m.clone()))
    }

    pub fn status(&self) -> KeyStatus {
        let key = self.current();
        KeyStatus {
            source: self.source.kind(),
            ready: key.is_some(),
            fingerprint: key.as_ref().map(|k| k.fingerprint().to_string()),
            age_seconds: key.as_ref().map(|k| k.age().as_secs()),
            last_error: self.last_error_message(),
            refresh_errors: self.refresh_errors.load(Ordering::Relaxed),
            rotations: self.rotations.load(Ordering::Relaxed),
            rejected: if self.rejected.load(Ordering::Acquire) {
                self.rejection.lock().ok().and_then(|r| r.clone())
            } else {
                None
            },
            upstream_401: self.upstream_401.load(Ordering::Relaxed),
            upstream_403: self.upstream_403.load(Ordering::Relaxed),
        }
    }

    /// The upstream refused `rejected` (401): get the key to retry with, if there is a
    /// different one. A burst of 401s costs one fetch: whoever finds the key already replaced
    /// (by a concurrent refresh) takes that one, and concurrent callers share the fetch.
    /// Returns `None` when the source still holds the same value (the 401 is genuine).
    pub async fn replacement_for(&self, rejected: &ApiKey) -> Option<Arc<ApiKey>> {
        if let Some(current) = self.current() {
            if !current.same_value(rejected) {
                return Some(current);
            }
        }
        if !self.source.rotates() {
            return None;
        }
        let fresh = self.fetch_coalesced(Some(rejected)).await.ok()?;
        (!fresh.same_value(rejected)).then_some(fresh)
    }
}

/// Backoff after a failed fetch starts here and doubles up to [`MAX_RETRY_BACKOFF`].
pub const MIN_RETRY_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);

/// The one background task per store: fetch every `interval` (±10% jitter so replicas started
/// together do not hit the source together), at once when woken, and after a failure again
/// with exponential backoff. Sources that cannot rotate (env) get no task.
pub fn spawn_refresher(
    keys: Arc<KeyStore>,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if !keys.source_rotates() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut backoff = MIN_RETRY_BACKOFF;
        let mut last_ok = keys.status().last_error.is_none() && keys.current().is_some();
        loop {
            let wait = if last_ok { jittered(interval) } else { backoff };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = keys.wake.notified() => {}
                _ = stop.cancelled() => return,
            }
            last_ok = keys.refresh().await.is_ok();
            backoff = if last_ok {
                MIN_RETRY_BACKOFF
            } else {
                (backoff * 2).min(MAX_RETRY_BACKOFF)
            };
        }
    }))
}

fn jittered(interval: Duration) -> Duration {
    let factor = rand::Rng::gen_range(&mut rand::thread_rng(), 0.9..=1.1);
    interval.mul_f64(factor)
}

/// A key store with its background refresher and file watcher; both stop when the last state
/// using this store is gone (a reload replaced `[key]` and the last request on it ended).
pub struct KeyRuntime {
    pub store: Arc<KeyStore>,
    stop: tokio_util::sync::CancellationToken,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl KeyRuntime {
    pub fn new(
        store: Arc<KeyStore>,
        stop: tokio_util::sync::CancellationToken,
        watcher: Option<notify::RecommendedWatcher>,
    ) -> KeyRuntime {
        KeyRuntime {
            store,
            stop,
            _watcher: watcher,
        }
    }
}

impl Drop for KeyRuntime {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str);

    #[async_trait::async_trait]
    impl KeySource for Fixed {
        fn kind(&self) -> &'static str {
            "fixed"
        }
        async fn fetch(&self) -> Result<SecretString, KeyError> {
            Ok(SecretString::from(self.0))
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        for bad in ["", "a\r\nX-Evil: 1", "with space", "tab\tkey", "ünïcode"] {
            assert!(validate_key_value(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_key_value(&"k".repeat(4097)).is_err());
        validate_key_value(&"k".repeat(4096)).expect("4 KiB is allowed");
        validate_key_value("sk_live-abc.DEF~123").expect("ordinary key");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = ApiKey::new(SecretString::from("sk-very-secret-value"), AuthScheme::Bearer).unwrap();
        let shown = format!("{key:?} {:?}", key.authorization());
        assert!(!shown.contains("very-secret"), "{shown}");
        assert_eq!(key.authorization().to_str().unwrap(), "Bearer sk-very-secret-value");
        assert!(key.authorization().is_sensitive());
    }

    #[test]
    fn token_scheme_for_self_hosted() {
        let key = ApiKey::new(SecretString::from("abc"), AuthScheme::Token).unwrap();
        assert_eq!(key.authorization().to_str().unwrap(), "Token abc");
    }

    #[test]
    fn fingerprint_is_8_hex_of_sha256() {
        // sha256("abc") = ba7816bf...
        assert_eq!(fingerprint("abc"), "ba7816bf");
    }

    /// A source whose value the test changes, counting fetches.
    struct Rotating {
        value: Mutex<String>,
        fetches: AtomicU64,
    }

    #[async_trait::async_trait]
    impl KeySource for Rotating {
        fn kind(&self) -> &'static str {
            "rotating"
        }
        async fn fetch(&self) -> Result<SecretString, KeyError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(SecretString::from(self.value.lock().unwrap().clone()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_rejections_costs_one_fetch() {
        let source = Arc::new(Rotating {
            value: Mutex::new("k1".into()),
            fetches: AtomicU64::new(0),
        });
        let store = Arc::new(KeyStore::new(
            source.clone(),
            AuthScheme::Bearer,
            Duration::from_secs(60),
        ));
        let old = store.refresh().await.unwrap();
        *source.value.lock().unwrap() = "k2".into();
        let before = source.fetches.load(Ordering::SeqCst);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (store, old) = (store.clone(), old.clone());
                tokio::spawn(async move { store.replacement_for(&old).await })
            })
            .collect();
        for task in tasks {
            let new = task.await.unwrap().expect("a replacement");
            assert_eq!(new.authorization(), "Bearer k2");
        }
        assert_eq!(
            source.fetches.load(Ordering::SeqCst) - before,
            1,
            "16 rejections, one fetch"
        );
        assert_eq!(store.status().rotations, 1);
        // The source still says k2: a 401 with k2 is genuine, no replacement.
        let k2 = store.current().unwrap();
        assert!(store.replacement_for(&k2).await.is_none());
    }

    /// A source whose first fetch is slow and reads the value before the test changes it.
    struct SlowStale {
        value: Mutex<String>,
        gate: tokio::sync::Semaphore,
        fetches: AtomicU64,
    }

    #[async_trait::async_trait]
    impl KeySource for SlowStale {
        fn kind(&self) -> &'static str {
            "slow"
        }
        async fn fetch(&self) -> Result<SecretString, KeyError> {
            let n = self.fetches.fetch_add(1, Ordering::SeqCst);
            let read = self.value.lock().unwrap().clone();
            if n == 1 {
                // The second fetch (the stale one) read before the rotation, then stalls.
                let _ = self.gate.acquire().await;
            }
            Ok(SecretString::from(read))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_401_never_settles_for_a_fetch_that_started_before_the_rotation() {
        let source = Arc::new(SlowStale {
            value: Mutex::new("k1".into()),
            gate: tokio::sync::Semaphore::new(0),
            fetches: AtomicU64::new(0),
        });
        let store = Arc::new(KeyStore::new(
            source.clone(),
            AuthScheme::Bearer,
            Duration::from_secs(60),
        ));
        let k1 = store.refresh().await.unwrap();
        // A refresh (say, a file event) starts and reads "k1"...
        let stale = tokio::spawn({
            let store = store.clone();
            async move { store.refresh().await }
        });
        while source.fetches.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        // ...then the key rotates and the upstream rejects k1 while that fetch is still running.
        *source.value.lock().unwrap() = "k2".into();
        let replacement = tokio::spawn({
            let (store, k1) = (store.clone(), k1.clone());
            async move { store.replacement_for(&k1).await }
        });
        source.gate.add_permits(1);
        stale.await.unwrap().unwrap();
        let replacement = replacement
            .await
            .unwrap()
            .expect("the rotated key, not the stale fetch's k1");
        assert_eq!(replacement.authorization(), "Bearer k2");
    }

    #[tokio::test]
    async fn an_invalid_value_keeps_the_previous_key() {
        let source = Arc::new(Rotating {
            value: Mutex::new("good".into()),
            fetches: AtomicU64::new(0),
        });
        let store = KeyStore::new(source.clone(), AuthScheme::Bearer, Duration::from_secs(60));
        store.refresh().await.unwrap();
        *source.value.lock().unwrap() = "evil\r\nX-Injected: 1".into();
        assert!(store.refresh().await.is_err());
        assert_eq!(store.current().unwrap().authorization(), "Bearer good");
        let status = store.status();
        assert_eq!(status.refresh_errors, 1);
        assert!(status.last_error.unwrap().contains("line break"));
    }

    #[tokio::test]
    async fn store_serves_the_fetched_key() {
        let store = KeyStore::new(Arc::new(Fixed("k1")), AuthScheme::Bearer, Duration::from_secs(60));
        assert!(store.current().is_none());
        assert!(!store.status().ready);
        store.refresh().await.unwrap();
        assert_eq!(store.current().unwrap().authorization(), "Bearer k1");
        let status = store.status();
        assert!(status.ready);
        assert_eq!(status.fingerprint.as_deref(), Some(fingerprint("k1").as_str()));
        assert!(!format!("{store:?}").contains("k1"));
    }
}
