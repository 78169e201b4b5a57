//! `source = "env"`: the key from an environment variable, read once at start.
//!
//! The variable cannot change under a running process, so this source does not rotate; the
//! refresher leaves it alone and `max_stale` never expires it.

use secrecy::SecretString;

use super::{KeyError, KeySource};

pub struct EnvSource {
    variable: String,
}

impl EnvSource {
    pub fn new(variable: &str) -> EnvSource {
        EnvSource {
            variable: variable.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl KeySource for EnvSource {
    fn kind(&self) -> &'static str {
        "env"
    }

    async fn fetch(&self) -> Result<SecretString, KeyError> {
        match std::env::var(&self.variable) {
            Ok(value) => Ok(SecretString::from(value)),
            Err(_) => Err(KeyError::EnvMissing(self.variable.clone())),
        }
    }

    fn rotates(&self) -> bool {
        false
    }

    fn remedy(&self) -> String {
        format!(
            "restart the proxy with a valid key in {} (better: a key file, which is re-read without a restart)",
            self.variable
        )
    }
}
