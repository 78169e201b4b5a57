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
//! The `smallest` preset is the API as the official SDKs call it (README.md, "What the
//! `smallest` preset allows", lists every SDK method with its path): Python `smallestai` 5.x
//! on `/waves/v1/...`, and the legacy Lightning routes under `/api/v1/...` that the Node SDK
//! (1.x) still calls. Speech (unified `/tts`, SSE `/tts/live`, live TTS over WebSocket, and the
//! deprecated per-model `get_speech` and `stream` routes still served), transcription, voices,
//! voice-clone creation and listing, dictionary reads, LLM chat, post-call analysis and usage
//! time series pass. Organisation-wide logs (transcripts, request bodies), deletions and
//! dictionary edits are refused unless their switches are on.

use http::Method;

use crate::config::{PolicyConfig, PolicyPreset, Rule};
use crate::error::ProxyError;
use crate::proxy::path::is_canonical;

/// The preset's rules (Python SDK 5.x routes, then the Node SDK's legacy ones).
const SMALLEST_ALLOW: &[&str] = &[
    "GET /waves/v1/health",
    // Speech: unified sync and SSE, live TTS (a WebSocket handshake is a GET), deprecated
    // per-model routes and their SSE streams, the streaming-TTS and speech-to-speech sockets.
    "POST /waves/v1/tts",
    "POST /waves/v1/tts/live",
    "GET /waves/v1/tts/live",
    "POST /waves/v1/*/get_speech",
    "POST /waves/v1/*/get_speech/stream",
    "POST /waves/v1/*/stream",
    "GET /waves/v1/streaming-tts/**",
    "GET /waves/v1/s2s",
    // Transcription: HTTP and realtime.
    "POST /waves/v1/stt/**",
    "GET /waves/v1/stt/live",
    "/waves/v1/pulse/**",
    "POST /waves/v1/*/get_text",
    // Voices and voice cloning (creating and listing clones).
    "GET /waves/v1/*/get_voices",
    "GET /waves/v1/voice/get-all-models",
    "GET /waves/v1/voice-cloning",
    "POST /waves/v1/voice-cloning",
    "POST /waves/v1/*/add_voice",
    "GET /waves/v1/*/get_cloned_voices",
    // Pronunciation dictionaries: reads.
    "GET /waves/v1/pronunciation-dicts",
    // LLM chat and post-call analysis.
    "POST /waves/v1/chat/completions",
    "POST /waves/v1/*/chat/completions",
    "POST /waves/v1/pca",
    "POST /waves/v1/pca/generate",
    // Usage time series (counts, no content).
    "GET /waves/v1/analytics/**/timeseries",
    // The Node SDK's legacy Lightning routes.
    "POST /api/v1/*/get_speech",
    "POST /api/v1/*/stream",
    "GET /api/v1/*/get_voices",
    "POST /api/v1/lightning-large/add_voice",
    "GET /api/v1/lightning-large/get_cloned_voices",
];

/// `allow_voice_clone_delete = true`.
const SMALLEST_VOICE_CLONE_DELETE: &[&str] = &[
    "DELETE /waves/v1/voice-cloning/**",
    "DELETE /waves/v1/lightning-large",
    "DELETE /api/v1/lightning-large",
];

/// `allow_pronunciation_edits = true`.
const SMALLEST_PRONUNCIATION_EDITS: &[&str] = &[
    "POST /waves/v1/pronunciation-dicts/**",
    "PUT /waves/v1/pronunciation-dicts/**",
    "PATCH /waves/v1/pronunciation-dicts/**",
    "DELETE /waves/v1/pronunciation-dicts/**",
];

/// `allow_logs = true`: organisation-wide logs (transcripts, request bodies, webhook payloads).
const SMALLEST_LOGS: &[&str] = &["GET /waves/v1/analytics/*/logs"];

/// `allow_history_delete = true`.
const SMALLEST_HISTORY_DELETE: &[&str] = &["DELETE /waves/v1/analytics/asr/history/**"];

/// The preset's rules with the switches in `config` applied (for the policy and for `check`).
pub fn preset_rules(config: &PolicyConfig) -> Vec<&'static str> {
    if config.preset != PolicyPreset::Smallest {
        return Vec::new();
    }
    let mut rules = SMALLEST_ALLOW.to_vec();
    for (on, extra) in [
        (config.allow_voice_clone_delete, SMALLEST_VOICE_CLONE_DELETE),
        (config.allow_pronunciation_edits, SMALLEST_PRONUNCIATION_EDITS),
        (config.allow_logs, SMALLEST_LOGS),
        (config.allow_history_delete, SMALLEST_HISTORY_DELETE),
    ] {
        if on {
            rules.extend_from_slice(extra);
        }
    }
    rules
}

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
        let mut allow_texts: Vec<String> = preset_rules(config).into_iter().map(String::from).collect();
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
        for (method, path) in [
            ("POST", "/waves/v1/tts"),
            ("POST", "/waves/v1/tts/live"),
            ("GET", "/waves/v1/tts/live"),
            ("POST", "/waves/v1/lightning-v2/get_speech"),
            ("POST", "/waves/v1/lightning-v3.1/get_speech/stream"),
            ("POST", "/waves/v1/lightning-large/stream"),
            ("GET", "/waves/v1/streaming-tts/stream"),
            ("POST", "/waves/v1/stt/"),
            ("GET", "/waves/v1/stt/live"),
            ("POST", "/waves/v1/pulse/get_text"),
            ("GET", "/waves/v1/pulse/get_text"),
            ("POST", "/waves/v1/voice-cloning"),
            ("GET", "/waves/v1/voice-cloning"),
            ("HEAD", "/waves/v1/voice-cloning"),
            ("get", "/waves/v1/lightning-v2/get_voices"),
            ("GET", "/waves/v1/pronunciation-dicts"),
            ("POST", "/waves/v1/chat/completions"),
            ("GET", "/waves/v1/analytics/tts/usage/credits/timeseries"),
            ("GET", "/waves/v1/analytics/asr/usage/timeseries"),
            ("POST", "/api/v1/lightning/get_speech"),
        ] {
            assert!(allowed(&p, method, path), "{method} {path} should pass");
        }
    }

    #[test]
    fn the_smallest_preset_refuses_risky_and_unknown_calls() {
        let p = policy("preset = \"smallest\"");
        for (method, path) in [
            ("GET", "/waves/v1/analytics/asr/logs"),
            ("GET", "/waves/v1/analytics/tts/logs"),
            ("GET", "/waves/v1/analytics/webhooks/logs"),
            ("DELETE", "/waves/v1/analytics/asr/history/r1"),
            ("DELETE", "/waves/v1/voice-cloning/v1"),
            ("DELETE", "/api/v1/lightning-large"),
            ("POST", "/waves/v1/pronunciation-dicts"),
            ("PUT", "/waves/v1/pronunciation-dicts"),
            ("delete", "/waves/v1/pronunciation-dicts"),
            ("POST", "/admin/keys"),
            ("GET", "/other/v1/x"),
            ("GET", "/atoms/v1/agent"),
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
        let p = policy(
            "preset = \"smallest\"\nallow_voice_clone_delete = true\nallow_pronunciation_edits = true\nallow_logs = true\nallow_history_delete = true",
        );
        assert!(allowed(&p, "DELETE", "/waves/v1/voice-cloning/v1"));
        assert!(allowed(&p, "POST", "/waves/v1/pronunciation-dicts"));
        assert!(allowed(&p, "PUT", "/waves/v1/pronunciation-dicts"));
        assert!(allowed(&p, "GET", "/waves/v1/analytics/asr/logs"));
        assert!(allowed(&p, "DELETE", "/waves/v1/analytics/asr/history/r1"));
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
