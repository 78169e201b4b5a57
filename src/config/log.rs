//! `[log]`: the log format, level and access line.

use serde::{Deserialize, Serialize};

use super::{invalid, Invalid};

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

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogConfig {
    /// Checks serde cannot express.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if let Some(level) = &self.level {
            if tracing_subscriber::EnvFilter::try_new(level).is_err() {
                return invalid(
                    "log.level",
                    format!("{level:?} is not a log filter like \"info\" or \"smallest_proxy=debug\""),
                );
            }
        }
        Ok(())
    }
}
