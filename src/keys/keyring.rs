//! `source = "keyring"`: the key from the OS keychain, the place a developer's laptop keeps
//! secrets: the login Keychain on macOS, the freedesktop Secret Service (GNOME Keyring,
//! KWallet) on Linux, both through the `keyring` crate. An entry is named by service and
//! account (`[key.keyring]`); `smallest-proxy key set` writes it with [`store`].
//!
//! The crate's calls block (a D-Bus round trip, or a Keychain call that may wait for the user
//! to allow access), so [`KeyringSource::fetch`] runs them on the blocking pool. Each fetch
//! opens a fresh session: the proxy keeps no connection to the keychain between refreshes,
//! and a keychain that was locked or restarted in between is simply asked again.
//!
//! Errors name the entry and what the keychain said, never the value: the crate's only error
//! that carries the stored bytes (`BadEncoding`) is replaced by a fixed sentence.

use secrecy::{ExposeSecret, SecretString};

use super::{validate_key_value, KeyError, KeySource};
use crate::config::KeyringConfig;

pub struct KeyringSource {
    entry: KeyringConfig,
}

impl KeyringSource {
    pub fn new(entry: KeyringConfig) -> KeyringSource {
        KeyringSource { entry }
    }
}

#[async_trait::async_trait]
impl KeySource for KeyringSource {
    fn kind(&self) -> &'static str {
        "keyring"
    }

    async fn fetch(&self) -> Result<SecretString, KeyError> {
        let entry = self.entry.clone();
        tokio::task::spawn_blocking(move || read(&entry))
            .await
            .map_err(|_| KeyError::Source("the keyring read did not finish".into()))?
    }
}

/// `service "S", account "A"`: how errors and `key status` name an entry.
pub fn describe(entry: &KeyringConfig) -> String {
    format!("service {:?}, account {:?}", entry.service, entry.account)
}

/// Read the entry's value. Blocking.
pub fn read(entry: &KeyringConfig) -> Result<SecretString, KeyError> {
    platform::read(entry)
}

/// Validate `value` as every source's value is validated, then write it to the entry
/// (replacing any value there). Blocking.
pub fn store(entry: &KeyringConfig, value: &SecretString) -> Result<(), KeyError> {
    validate_key_value(value.expose_secret())?;
    platform::store(entry, value)
}

#[cfg(any(target_os = "linux", target_os = "macos"))]
mod platform {
    use secrecy::{ExposeSecret, SecretString};

    use super::describe;
    use crate::config::KeyringConfig;
    use crate::keys::KeyError;

    pub fn read(entry: &KeyringConfig) -> Result<SecretString, KeyError> {
        let handle = open(entry)?;
        match handle.get_password() {
            Ok(value) => Ok(SecretString::from(value)),
            Err(keyring::Error::NoEntry) => Err(KeyError::Source(format!(
                "the keyring has no entry for {}: store the key with `smallest-proxy key set`",
                describe(entry)
            ))),
            Err(e) => Err(failure(entry, "reading", &e)),
        }
    }

    pub fn store(entry: &KeyringConfig, value: &SecretString) -> Result<(), KeyError> {
        open(entry)?
            .set_password(value.expose_secret())
            .map_err(|e| failure(entry, "writing", &e))
    }

    /// What must be there for the keychain to answer.
    #[cfg(target_os = "linux")]
    const KEYCHAIN: &str = "the key is kept by the Secret Service: GNOME Keyring or KWallet running and unlocked in this login session, found through DBUS_SESSION_BUS_ADDRESS";
    #[cfg(target_os = "macos")]
    const KEYCHAIN: &str =
        "the key is kept in the login Keychain, which must be unlocked and allow this program to read it";

    fn open(entry: &KeyringConfig) -> Result<keyring::Entry, KeyError> {
        keyring::Entry::new(&entry.service, &entry.account).map_err(|e| failure(entry, "opening", &e))
    }

    fn failure(entry: &KeyringConfig, doing: &str, error: &keyring::Error) -> KeyError {
        let why = match error {
            keyring::Error::BadEncoding(_) => "the stored value is not UTF-8 text".to_string(),
            keyring::Error::PlatformFailure(_) | keyring::Error::NoStorageAccess(_) => {
                format!("{error} ({KEYCHAIN})")
            }
            other => other.to_string(),
        };
        KeyError::Source(format!("keyring {doing} {}: {why}", describe(entry)))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod platform {
    use secrecy::SecretString;

    use crate::config::KeyringConfig;
    use crate::keys::KeyError;

    fn unsupported() -> KeyError {
        KeyError::Source("source = \"keyring\" is supported on Linux and macOS only".into())
    }

    pub fn read(_: &KeyringConfig) -> Result<SecretString, KeyError> {
        Err(unsupported())
    }

    pub fn store(_: &KeyringConfig, _: &SecretString) -> Result<(), KeyError> {
        Err(unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_value_is_refused_before_the_keychain_is_asked() {
        // No Secret Service runs for unit tests: reaching it would fail differently.
        let entry = KeyringConfig {
            service: "smallest-proxy-unit-test".into(),
            account: "nobody".into(),
        };
        let err = store(&entry, &SecretString::from("two words")).unwrap_err();
        assert_eq!(
            err,
            KeyError::Invalid("the value contains a space (only visible ASCII is allowed)")
        );
        let err = store(&entry, &SecretString::from("")).unwrap_err();
        assert_eq!(err, KeyError::Invalid("the value is empty"));
    }

    #[test]
    fn entries_are_named_by_service_and_account() {
        let entry = KeyringConfig::default();
        assert_eq!(describe(&entry), "service \"smallest-proxy\", account \"default\"");
    }
}
