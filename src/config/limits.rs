//! `[limits]`, `[[limits.class]]` and `[limits.shared]`: client-side rate and concurrency
//! limits per class of paths, optionally shared through Redis, and the built-in `smallest`
//! profile (on by default) that puts every text-to-speech path in one `tts` class, because the
//! account allows one synthesis in flight across all of them.

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
    /// Built-in classes: `smallest` (the default) adds the `tts` class; `none` adds nothing.
    pub profile: Profile,
    /// In-flight upstream requests; 0 = unlimited, `"auto"` = learned from upstream 429s.
    pub max_concurrent: Concurrency,
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
            profile: Profile::Smallest,
            max_concurrent: Concurrency::Fixed(0),
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
    /// Path prefixes; a segment `*` matches any one segment and a last segment `**` anything
    /// below. A class named like a profile class may leave this out to keep the profile's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<Concurrency>,
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
    /// Count each synthesis on a WebSocket (a text frame carrying `text`, until the upstream's
    /// `complete` or `error`) as an in-flight request of this class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket_messages: Option<bool>,
}

/// The limits one class runs with, after inheritance from `[limits]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassLimits {
    pub name: String,
    pub paths: Vec<String>,
    pub max_concurrent: Concurrency,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub rate: u32,
    pub per: Duration,
    pub burst: u32,
    pub max_websockets: usize,
    pub upstream_retries: u32,
    pub websocket_messages: bool,
    /// Defined by `[limits] profile` (not written by the user): its paths match only where no
    /// class the user wrote does.
    pub from_profile: bool,
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
            websocket_messages: false,
            from_profile: false,
        }
    }

    /// The named classes in force: the user's, then the profile's (a user class with a profile
    /// class's name replaces it, keeping the profile's paths and limits where it sets none).
    pub fn classes(&self) -> Vec<ClassLimits> {
        let profile = self.profile.classes();
        let mut classes: Vec<ClassLimits> = self
            .class
            .iter()
            .map(|c| {
                let base = profile.iter().find(|p| p.name == c.name);
                ClassLimits {
                    name: c.name.clone(),
                    paths: match base {
                        Some(base) if c.paths.is_empty() => base.paths.clone(),
                        _ => c.paths.clone(),
                    },
                    max_concurrent: c
                        .max_concurrent
                        .or(base.map(|b| b.max_concurrent))
                        .unwrap_or(self.max_concurrent),
                    max_queue: c.max_queue.unwrap_or(self.max_queue),
                    queue_timeout: c.queue_timeout.unwrap_or(self.queue_timeout),
                    rate: c.rate.unwrap_or(self.rate),
                    per: c.per.unwrap_or(self.per),
                    burst: c.burst.unwrap_or(self.burst),
                    max_websockets: c
                        .max_websockets
                        .or(base.map(|b| b.max_websockets))
                        .unwrap_or(self.max_websockets),
                    upstream_retries: c.upstream_retries.unwrap_or(self.upstream_retries),
                    websocket_messages: c
                        .websocket_messages
                        .or(base.map(|b| b.websocket_messages))
                        .unwrap_or(false),
                    from_profile: false,
                }
            })
            .collect();
        for p in profile {
            if self.class.iter().any(|c| c.name == p.name) {
                continue;
            }
            // The profile sets what the account's rules decide; queueing is the user's.
            classes.push(ClassLimits {
                name: p.name.into(),
                paths: p.paths,
                max_concurrent: p.max_concurrent,
                max_queue: self.max_queue,
                queue_timeout: self.queue_timeout,
                rate: 0,
                per: Duration::from_secs(1),
                burst: 1,
                max_websockets: p.max_websockets,
                upstream_retries: self.upstream_retries,
                websocket_messages: p.websocket_messages,
                from_profile: true,
            });
        }
        classes
    }
}

impl LimitsConfig {
    /// The classes in force, one line each (the `check` subcommand prints them).
    pub fn describe_classes(&self) -> Vec<String> {
        std::iter::once(self.default_class())
            .chain(self.classes())
            .map(|c| {
                let paths = if c.paths.is_empty() {
                    "every path no other class claims".to_string()
                } else {
                    c.paths.join(" ")
                };
                let source = if c.from_profile {
                    format!(" [profile {}]", self.profile.name())
                } else {
                    String::new()
                };
                let messages = if c.websocket_messages {
                    ", each WebSocket synthesis counted as a request"
                } else {
                    ""
                };
                format!(
                    "{}{source}: {paths}: max_concurrent {}, max_websockets {}, rate {}/{}, max_queue {}, queue_timeout {}{messages}",
                    c.name,
                    c.max_concurrent,
                    c.max_websockets,
                    c.rate,
                    humantime::format_duration(c.per),
                    c.max_queue,
                    humantime::format_duration(c.queue_timeout),
                )
            })
            .collect()
    }
}

/// `[limits] profile`: classes built in for a known upstream.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Smallest AI's account rules: one synthesis in flight across sync, SSE and WebSocket TTS,
    /// at most 5 WebSocket connections.
    #[default]
    Smallest,
    None,
}

/// Every text-to-speech path of the Smallest API, today's and the deprecated ones still served.
pub const SMALLEST_TTS_PATHS: &[&str] = &[
    "/waves/v1/tts",
    "/waves/v1/tts/live",
    "/waves/v1/*/get_speech",
    "/waves/v1/*/get_speech/stream",
    "/waves/v1/*/stream",
    "/waves/v1/streaming-tts/**",
];

/// Smallest allows this many WebSocket connections per account.
pub const SMALLEST_MAX_WEBSOCKETS: usize = 5;

/// One class a profile defines.
#[derive(Debug, Clone)]
pub struct ProfileClass {
    pub name: &'static str,
    pub paths: Vec<String>,
    pub max_concurrent: Concurrency,
    pub max_websockets: usize,
    pub websocket_messages: bool,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Smallest => "smallest",
            Profile::None => "none",
        }
    }

    pub fn classes(self) -> Vec<ProfileClass> {
        match self {
            Profile::None => Vec::new(),
            Profile::Smallest => vec![ProfileClass {
                name: "tts",
                paths: SMALLEST_TTS_PATHS.iter().map(|p| p.to_string()).collect(),
                max_concurrent: Concurrency::Auto,
                max_websockets: SMALLEST_MAX_WEBSOCKETS,
                websocket_messages: true,
            }],
        }
    }
}

/// `max_concurrent`: a number (0 = unlimited) or `"auto"`: start at 1 and learn the account's
/// limit from the upstream's 429s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    Fixed(usize),
    Auto,
}

impl Concurrency {
    /// Whether requests of the class take a slot at all.
    pub fn is_limited(self) -> bool {
        !matches!(self, Concurrency::Fixed(0))
    }

    /// The limit a class starts with.
    pub fn initial(self) -> usize {
        match self {
            Concurrency::Fixed(n) => n,
            Concurrency::Auto => 1,
        }
    }
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Concurrency::Fixed(n) => write!(f, "{n}"),
            Concurrency::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for Concurrency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Concurrency::Fixed(n) => serializer.serialize_u64(*n as u64),
            Concurrency::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Concurrency;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of requests (0 = unlimited) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Concurrency, E> {
                usize::try_from(n)
                    .map(Concurrency::Fixed)
                    .map_err(|_| E::custom("is too large"))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Concurrency, E> {
                u64::try_from(n)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
                    .and_then(|n| self.visit_u64(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Concurrency, E> {
                if s.eq_ignore_ascii_case("auto") {
                    return Ok(Concurrency::Auto);
                }
                match s.trim().parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
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
            let from_profile = limits.profile.classes().iter().any(|p| p.name == class.name);
            if class.paths.is_empty() && from_profile {
                // Keeps the profile's paths.
            } else if class.paths.is_empty() || class.paths.iter().any(|p| !p.starts_with('/')) {
                return invalid(
                    &at("paths"),
                    "needs at least one path prefix, each starting with /".into(),
                );
            }
            if let Some(bad) = class.paths.iter().find(|p| p.contains("**") && !p.ends_with("/**")) {
                return invalid(&at("paths"), format!("{bad:?}: `**` may only be the last segment"));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::load_text(None, text, &[])
    }

    #[test]
    fn max_concurrent_takes_a_number_or_auto() {
        let c = load("[limits]\nmax_concurrent = \"auto\"\n[[limits.class]]\nname = \"a\"\npaths = [\"/a\"]\nmax_concurrent = 3\n")
            .expect("config");
        assert_eq!(c.limits.max_concurrent, Concurrency::Auto);
        assert_eq!(c.limits.classes()[0].max_concurrent, Concurrency::Fixed(3));
        assert!(c.to_toml().contains("max_concurrent = \"auto\""), "{}", c.to_toml());
        let e = load("[limits]\nmax_concurrent = \"many\"\n").unwrap_err();
        assert_eq!(e.key, "limits.max_concurrent");
        assert!(e.message.contains("\"auto\""), "{e}");
        let e = load("[limits]\nmax_concurrent = -1\n").unwrap_err();
        assert_eq!(e.key, "limits.max_concurrent");
    }

    #[test]
    fn the_profile_is_smallest_unless_turned_off() {
        let c = load("").expect("config");
        assert_eq!(c.limits.profile, Profile::Smallest);
        let tts = &c.limits.classes()[0];
        assert_eq!(tts.name, "tts");
        assert!(tts.from_profile);
        assert_eq!(tts.max_concurrent, Concurrency::Auto);
        assert_eq!(tts.max_websockets, SMALLEST_MAX_WEBSOCKETS);
        let c = load("[limits]\nmax_queue = 7\nqueue_timeout = \"4s\"\n").expect("config");
        let tts = &c.limits.classes()[0];
        assert_eq!((tts.max_queue, tts.queue_timeout), (7, Duration::from_secs(4)));
        assert!(load("[limits]\nprofile = \"none\"\n")
            .expect("config")
            .limits
            .classes()
            .is_empty());
        let e = load("[limits]\nprofile = \"openai\"\n").unwrap_err();
        assert_eq!(e.key, "limits.profile");
    }

    #[test]
    fn only_a_profile_class_may_leave_out_its_paths() {
        let c = load("[[limits.class]]\nname = \"tts\"\nmax_websockets = 2\n").expect("config");
        let tts = &c.limits.classes()[0];
        assert_eq!(tts.paths.len(), SMALLEST_TTS_PATHS.len());
        assert_eq!((tts.max_concurrent, tts.max_websockets), (Concurrency::Auto, 2));
        assert!(!tts.from_profile);
        let e = load("[[limits.class]]\nname = \"other\"\n").unwrap_err();
        assert_eq!(e.key, "limits.class[0].paths");
        let e = load("[limits]\nprofile = \"none\"\n[[limits.class]]\nname = \"tts\"\n").unwrap_err();
        assert_eq!(e.key, "limits.class[0].paths");
        let e = load("[[limits.class]]\nname = \"x\"\npaths = [\"/a/**/b\"]\n").unwrap_err();
        assert_eq!(e.key, "limits.class[0].paths");
    }

    #[test]
    fn the_readmes_tts_block_keeps_the_profiles_paths_and_stops_learning() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("```toml\n")
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains("name = \"tts\"") && b.contains("the profile's class"))
            .expect("the README's tts block");
        let c = load(block).expect("the README's block is valid");
        let tts = &c.limits.classes()[0];
        assert_eq!(tts.name, "tts");
        assert_eq!(tts.paths.len(), SMALLEST_TTS_PATHS.len());
        assert_eq!(tts.max_concurrent, Concurrency::Fixed(2));
        assert_eq!(c.limits.classes().len(), 1, "it replaces the profile's class");
    }
}
