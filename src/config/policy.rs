//! `[policy]`: which methods and paths may be forwarded, and the rule grammar.

use http::Method;
use serde::{Deserialize, Serialize};

use super::{invalid, Invalid};

/// `[policy]`: which methods and paths may be forwarded at all (DESIGN.md: "path outside
/// allow-list → 403"). Rules are `"METHOD /path"` or `"/path"` (any method); in paths `*`
/// matches within one segment and `**` across segments. The matcher is `server::policy`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// `"none"` (default: forward every path) or `"smallest"` (only the Smallest API surface the
    /// SDKs call: speech, streaming, transcription, voices, voice cloning, dictionary reads, LLM
    /// chat, usage time series; README.md has the table).
    pub preset: PolicyPreset,
    /// Rules allowed on top of the preset. With `preset = "none"`, a non-empty list makes it
    /// an allow-list.
    pub allow: Vec<String>,
    /// Rules refused whatever else says; checked first.
    pub deny: Vec<String>,
    /// `preset = "smallest"`: also allow deleting cloned voices.
    pub allow_voice_clone_delete: bool,
    /// `preset = "smallest"`: also allow creating, changing and deleting pronunciation
    /// dictionaries.
    pub allow_pronunciation_edits: bool,
    /// `preset = "smallest"`: also allow reading the organisation's request logs (TTS, speech
    /// recognition with transcripts, webhooks): any local app could read every app's data.
    pub allow_logs: bool,
    /// `preset = "smallest"`: also allow deleting speech-recognition history.
    pub allow_history_delete: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PolicyPreset {
    #[default]
    None,
    Smallest,
}

/// One parsed `"METHOD /path"` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `None` = any method.
    pub method: Option<Method>,
    /// Lower-cased path pattern.
    pub path: String,
}

impl Rule {
    /// Parse a rule; the error is a sentence for the config error.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let mut words = text.split_whitespace();
        let (method, path) = match (words.next(), words.next(), words.next()) {
            (Some(path), None, None) => (None, path),
            (Some(method), Some(path), None) => (Some(method), path),
            _ => {
                return Err(format!(
                    "{text:?} is not a rule like \"POST /waves/v1/*/get_speech\" or \"/waves/v1/**\""
                ))
            }
        };
        if !path.starts_with('/') {
            return Err(format!("{text:?}: the path must start with /"));
        }
        if path.contains('?') {
            return Err(format!(
                "{text:?}: rules match paths; the query is ignored, leave it out"
            ));
        }
        let method = match method {
            None | Some("*") => None,
            Some(m) => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("{text:?}: {m:?} is not an HTTP method"))?,
            ),
        };
        Ok(Rule {
            method,
            path: path.to_ascii_lowercase(),
        })
    }

    /// Whether a request's method and path fall under this rule. The method is compared in
    /// any letter case: methods are case-sensitive (RFC 9110 §9.1), so `delete` is not
    /// `DELETE` to HTTP, but an upstream may treat it as one, and a deny rule must not be
    /// dodged by spelling. A `GET` rule covers `HEAD` in any case too.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        let method_ok = match &self.method {
            None => true,
            Some(m) => {
                // The rule's method is upper case (see `parse`); a byte comparison, no copy.
                let asked = method.as_str().as_bytes();
                m.as_str().as_bytes().eq_ignore_ascii_case(asked)
                    || (m == Method::GET && asked.eq_ignore_ascii_case(b"HEAD"))
            }
        };
        method_ok && glob(self.path.as_bytes(), path.as_bytes())
    }
}

/// `*` within a segment, `**` across segments, a trailing `/**` matching nothing too.
fn glob(pattern: &[u8], path: &[u8]) -> bool {
    match pattern {
        [] => path.is_empty(),
        [b'/', b'*', b'*'] if path.is_empty() => true,
        [b'*', b'*', rest @ ..] => (0..=path.len()).any(|i| glob(rest, &path[i..])),
        [b'*', rest @ ..] => {
            let segment_end = path.iter().position(|&b| b == b'/').unwrap_or(path.len());
            (0..=segment_end).any(|i| glob(rest, &path[i..]))
        }
        [p, rest @ ..] => path.first().is_some_and(|c| c.eq_ignore_ascii_case(p)) && glob(rest, &path[1..]),
    }
}

impl PolicyConfig {
    /// Checks serde cannot express.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        for (list, rules) in [("allow", &self.allow), ("deny", &self.deny)] {
            for (i, rule) in rules.iter().enumerate() {
                if let Err(message) = Rule::parse(rule) {
                    return invalid(&format!("policy.{list}[{i}]"), message);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_within_and_across_segments() {
        assert!(glob(b"/a/*/c", b"/a/b/c"));
        assert!(glob(b"/a/*/c", b"/a//c"));
        assert!(!glob(b"/a/*/c", b"/a/b/x/c"));
        assert!(glob(b"/a/**/c", b"/a/b/x/c"));
        assert!(glob(b"/a/**", b"/a"));
        assert!(glob(b"/a/**", b"/a/"));
        assert!(glob(b"/a/**", b"/a/b/c"));
        assert!(!glob(b"/a/**", b"/ab"));
        assert!(glob(b"/a/b*", b"/a/bcd"));
        assert!(!glob(b"/a/b", b"/a/b/"));
        assert!(glob(b"/waves/v1", b"/WAVES/V1"));
    }

    #[test]
    fn methods_match_in_any_case_and_get_covers_head() {
        let method = |m: &str| Method::from_bytes(m.as_bytes()).unwrap();
        let delete = Rule::parse("DELETE /**").unwrap();
        for m in ["DELETE", "delete", "Delete", "dELETE"] {
            assert!(delete.matches(&method(m), "/x"), "{m}");
        }
        for m in ["DELETES", "DELET", "GET", "POST"] {
            assert!(!delete.matches(&method(m), "/x"), "{m}");
        }
        let get = Rule::parse("get /v1/**").unwrap();
        for m in ["GET", "get", "HEAD", "head", "Head"] {
            assert!(get.matches(&method(m), "/v1/voices"), "{m}");
        }
        assert!(!get.matches(&method("HEADS"), "/v1/voices"));
        assert!(!Rule::parse("HEAD /v1/**")
            .unwrap()
            .matches(&method("get"), "/v1/voices"));
        assert!(Rule::parse("/v1/**").unwrap().matches(&method("anything"), "/v1/x"));
    }
}
