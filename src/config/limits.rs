//! `[limits]`, `[[limits.class]]` and `[limits.shared]`: client-side rate and concurrency
//! limits per class of paths, optionally shared through Redis.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::{duration_str, invalid, opt_duration_str, Invalid};

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

impl LimitsConfig {
    /// Checks serde cannot express.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        let limits = self;
        for (i, class) in limits.class.iter().enumerate() {
            let at = |field: &str| format!("limits.class[{i}].{field}");
            if class.name.is_empty() || class.name == DEFAULT_CLASS_NAME {
                return invalid(&at("name"), format!("needs a name other than {DEFAULT_CLASS_NAME:?}"));
            }
            if limits.class[..i].iter().any(|c| c.name == class.name) {
                return invalid(&at("name"), format!("{:?} is used by two classes", class.name));
            }
            if class.paths.is_empty() || class.paths.iter().any(|p| !p.starts_with('/')) {
                return invalid(
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
                return invalid(&key("per"), "must be longer than 0s".into());
            }
            if class.burst == 0 {
                return invalid(&key("burst"), "must be at least 1".into());
            }
        }
        if let Some(shared) = &limits.shared {
            if !(shared.redis_url.starts_with("redis://")
                || shared.redis_url.starts_with("rediss://")
                || shared.redis_url.starts_with("redis+unix://")
                || shared.redis_url.starts_with("unix://"))
            {
                return invalid(
                    "limits.shared.redis_url",
                    format!("{:?} is not a redis:// URL", shared.redis_url),
                );
            }
            if shared.lease < Duration::from_secs(1) {
                return invalid("limits.shared.lease", "must be at least 1s".into());
            }
        }
        Ok(())
    }
}
