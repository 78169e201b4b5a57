//! Which methods and paths may be forwarded: `[policy]` allow and deny rules and the ready
//! `smallest` preset → 403 `FORBIDDEN_PATH`.
//!
//! The proxy spends the account's money and can change its state, so an operator can narrow
//! it to what their apps call. A rule is `"METHOD /path"` or `"/path"` (any method; `*` as the
//! method too). In the path, `*` matches within one segment and `**` across segments; a
//! trailing `/**` also matches the path without it. Matching is ASCII case-insensitive, for
//! the method as for the path (so a deny rule cannot be dodged by spelling `delete` or a path
//! in capitals), and ignores the query. `GET` rules cover `HEAD`.
//!
//! Evaluation: a deny rule that matches refuses; otherwise, when there is any allow rule (the
//! preset's or the config's), one must match; with none at all everything passes. A path that
//! is not in canonical form (`.`/`..` segments, `//`, percent-encoded `/`, `\` or `.`) is
//! refused while a policy is active: the upstream might normalise it into a path the rules
//! would have refused.
//!
//! The `smallest` preset covers both route families the SDKs use (`/waves/v1/...` on
//! api.smallest.ai and the older `/api/v1/...`): speech (Lightning `get_speech` and its SSE
//! `stream`, unified `/tts` and live TTS over WebSocket), transcription (Pulse / `stt`,
//! `get_text`, HTTP and WebSocket), every read (`GET`: voices, cloned voices, models,
//! dictionaries), voice-clone creation (`add_voice`) and LLM chat completions. Deleting a
//! cloned voice (`DELETE .../lightning-large`, `DELETE .../voices/...`) and writing
//! pronunciation dictionaries are left out unless their switches are on.

use http::Method;

use crate::config::{PolicyConfig, PolicyPreset, Rule};
use crate::error::ProxyError;

/// The two route families of the Smallest API.
const SMALLEST_PREFIXES: [&str; 2] = ["/waves/v1", "/api/v1"];

/// Preset rules, written once per prefix (`{p}` is replaced by each prefix).
const SMALLEST_ALLOW: &[&str] = &[
    // Every read: voices, cloned voices, models, languages, dictionaries, and the WebSocket
    // handshakes (live TTS, realtime Pulse STT), which are GETs.
    "GET {p}/**",
    // Speech: per-model endpoints and their SSE streams, and the unified endpoint.
    "POST {p}/*/get_speech",
    "POST {p}/*/get_speech/stream",
    "POST {p}/tts",
    "POST {p}/tts/**",
    // Transcription.
    "POST {p}/stt/**",
    "POST {p}/pulse/**",
    "POST {p}/*/get_text",
    // Voice cloning: creating a clone (reading them is a GET).
    "POST {p}/*/add_voice",
    // LLM (Electron) chat completions.
    "POST {p}/chat/completions",
    "POST {p}/*/chat/completions",
];

/// `allow_voice_clone_delete = true`.
const SMALLEST_VOICE_CLONE_DELETE: &[&str] = &["DELETE {p}/lightning-large", "DELETE {p}/**/voices/**"];

/// `allow_pronunciation_edits = true`.
const SMALLEST_PRONUNCIATION_EDITS: &[&str] = &[
    "POST {p}/pronunciation-dicts/**",
    "PUT {p}/pronunciation-dicts/**",
    "PATCH {p}/pronunciation-dicts/**",
    "DELETE {p}/pronunciation-dicts/**",
];

/// The compiled `[policy]`.
#[derive(Debug, Clone, Default)]
pub struct PathPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl PathPolicy {
    /// Build from a config already validated (rules that do not parse are skipped, which
    /// cannot happen after `Config::validate`).
    pub fn from_config(config: &PolicyConfig) -> PathPolicy {
        let mut allow_texts: Vec<String> = Vec::new();
        if config.preset == PolicyPreset::Smallest {
            let mut templates: Vec<&str> = SMALLEST_ALLOW.to_vec();
            if config.allow_voice_clone_delete {
                templates.extend_from_slice(SMALLEST_VOICE_CLONE_DELETE);
            }
            if config.allow_pronunciation_edits {
                templates.extend_from_slice(SMALLEST_PRONUNCIATION_EDITS);
            }
            for prefix in SMALLEST_PREFIXES {
                allow_texts.extend(templates.iter().map(|t| t.replace("{p}", prefix)));
            }
        }
        allow_texts.extend(config.allow.iter().cloned());
        let parse_all = |texts: &[String]| texts.iter().filter_map(|t| Rule::parse(t).ok()).collect();
        PathPolicy {
            allow: parse_all(&allow_texts),
            deny: parse_all(&config.deny),
        }
    }

    pub fn is_active(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }

    /// `Ok` when `method path` may be forwarded, else 403 `FORBIDDEN_PATH`.
    pub fn check(&self, method: &Method, path: &str) -> Result<(), ProxyError> {
        if !self.is_active() {
            return Ok(());
        }
        if !is_canonical(path) {
            return Err(ProxyError::ForbiddenPath(format!(
                "{path:?} is not in canonical form (dot segments, empty segments or encoded separators); send the plain path"
            )));
        }
        if let Some(rule) = self.deny.iter().find(|r| r.matches(method, path)) {
            return Err(ProxyError::ForbiddenPath(format!(
                "{method} {path} is refused by this proxy's policy (deny rule {})",
                rule.describe()
            )));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|r| r.matches(method, path)) {
            return Err(ProxyError::ForbiddenPath(format!(
                "{method} {path} is not in this proxy's allowed paths (policy.preset, policy.allow)"
            )));
        }
        Ok(())
    }
}

impl Rule {
    fn describe(&self) -> String {
        match &self.method {
            Some(m) => format!("\"{m} {}\"", self.path),
            None => format!("\"{}\"", self.path),
        }
    }
}

/// No `.`/`..`/empty segments, no backslash, no percent-encoded `/`, `\` or `.`.
fn is_canonical(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains('\\') || lower.contains("%2f") || lower.contains("%5c") || lower.contains("%2e") {
        return false;
    }
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "." || segment == ".." || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> PathPolicy {
        let config: PolicyConfig = toml::from_str(text).expect("policy toml");
        PathPolicy::from_config(&config)
    }

    fn allowed(p: &PathPolicy, method: &str, path: &str) -> bool {
        p.check(&Method::from_bytes(method.as_bytes()).unwrap(), path).is_ok()
    }

    #[test]
    fn rules_parse_or_say_why_not() {
        assert_eq!(Rule::parse("post /x").unwrap().method, Some(Method::POST));
        assert_eq!(Rule::parse("/x").unwrap().method, None);
        assert_eq!(Rule::parse("* /x").unwrap().method, None);
        assert!(Rule::parse("x").unwrap_err().contains("start with /"));
        assert!(Rule::parse("GET /x extra").is_err());
        assert!(Rule::parse("GET /x?y=1").is_err());
        assert!(Rule::parse("G(T /x").is_err());
        assert!(Rule::parse("").is_err());
    }

    #[test]
    fn no_policy_allows_everything() {
        let p = policy("");
        assert!(!p.is_active());
        assert!(allowed(&p, "DELETE", "/waves/v1/lightning-large"));
        assert!(allowed(&p, "GET", "/a/../b"), "no policy, no canonical-form check");
    }

    #[test]
    fn the_smallest_preset_allows_the_api_surface() {
        let p = policy("preset = \"smallest\"");
        for prefix in SMALLEST_PREFIXES {
            for (method, path) in [
                ("POST", "/lightning/get_speech"),
                ("POST", "/lightning-v2/get_speech"),
                ("POST", "/lightning-v3.1/get_speech/stream"),
                ("POST", "/tts"),
                ("GET", "/tts/live"),
                ("GET", "/lightning-v2/get_voices"),
                ("HEAD", "/lightning-v2/get_voices"),
                ("head", "/lightning-v2/get_voices"),
                ("get", "/lightning-v2/get_voices"),
                ("post", "/lightning/get_speech"),
                ("GET", "/lightning-large/get_cloned_voices"),
                ("POST", "/lightning-large/add_voice"),
                ("POST", "/stt/"),
                ("POST", "/pulse/get_text"),
                ("GET", "/pulse/get_text"),
                ("POST", "/lightning/get_text"),
                ("GET", "/pronunciation-dicts"),
                ("POST", "/chat/completions"),
                ("POST", "/electron/chat/completions"),
            ] {
                let full = format!("{prefix}{path}");
                assert!(allowed(&p, method, &full), "{method} {full} should pass");
            }
        }
    }

    #[test]
    fn the_smallest_preset_refuses_risky_and_unknown_calls() {
        let p = policy("preset = \"smallest\"");
        for (method, path) in [
            ("DELETE", "/waves/v1/lightning-large"),
            ("DELETE", "/api/v1/lightning-large"),
            ("DELETE", "/waves/v1/lightning-large/voices/abc"),
            ("POST", "/waves/v1/pronunciation-dicts"),
            ("PUT", "/waves/v1/pronunciation-dicts"),
            ("DELETE", "/api/v1/pronunciation-dicts/d1"),
            ("POST", "/admin/keys"),
            ("GET", "/other/v1/x"),
            ("delete", "/waves/v1/lightning-large"),
            ("Delete", "/api/v1/lightning-large/voices/abc"),
            ("put", "/waves/v1/pronunciation-dicts"),
            ("POST", "/waves/v1/lightning/get_speech/../../pronunciation-dicts"),
            ("GET", "/waves/v1/tts/%2e%2e/x"),
            ("GET", "/waves/v1//x"),
        ] {
            let err = p
                .check(&Method::from_bytes(method.as_bytes()).unwrap(), path)
                .expect_err(&format!("{method} {path} should be refused"));
            assert_eq!(err.status_and_code().1, "FORBIDDEN_PATH");
        }
    }

    #[test]
    fn switches_unlock_the_risky_endpoints() {
        let p = policy("preset = \"smallest\"\nallow_voice_clone_delete = true\nallow_pronunciation_edits = true");
        assert!(allowed(&p, "DELETE", "/waves/v1/lightning-large"));
        assert!(allowed(&p, "POST", "/waves/v1/pronunciation-dicts"));
        assert!(allowed(&p, "PUT", "/api/v1/pronunciation-dicts/d1"));
        assert!(!allowed(&p, "POST", "/admin/keys"));
    }

    #[test]
    fn deny_wins_and_allow_alone_is_an_allow_list() {
        let p = policy("allow = [\"POST /waves/v1/*/get_speech\"]");
        assert!(allowed(&p, "POST", "/waves/v1/lightning/get_speech"));
        assert!(!allowed(&p, "GET", "/waves/v1/lightning/get_speech"));
        assert!(!allowed(&p, "POST", "/waves/v1/tts"));

        let p = policy("deny = [\"DELETE /**\"]");
        assert!(allowed(&p, "POST", "/anything"));
        assert!(!allowed(&p, "DELETE", "/waves/v1/lightning-large"));
        assert!(
            !allowed(&p, "delete", "/waves/v1/lightning-large"),
            "case does not dodge a deny rule"
        );
        assert!(!allowed(&p, "Delete", "/x"));

        let p = policy("preset = \"smallest\"\ndeny = [\"/waves/v1/tts/**\"]");
        assert!(!allowed(&p, "GET", "/waves/v1/tts/live"));
        assert!(!allowed(&p, "POST", "/WAVES/V1/TTS"), "case does not dodge a deny rule");
        assert!(allowed(&p, "POST", "/waves/v1/lightning/get_speech"));
    }
}
