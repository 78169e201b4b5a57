//! `[[app]]` and `[usage]`: the local apps that share the key, how a request is told to be
//! theirs (a token in `X-Proxy-Token`, or the uid of a Unix socket caller), their daily
//! budgets, and where the day's usage totals are kept across restarts.
//!
//! Like `listen.token_file`, an app's token is never in the config itself (the config is
//! printed by `check`): only the path of a file holding it.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use super::{duration_str, invalid, read_token_file, Invalid};

/// The app a request belongs to when it matches no `[[app]]`.
pub const DEFAULT_APP_NAME: &str = "default";
/// How often `[usage] state_file` is rewritten while totals change.
pub const DEFAULT_USAGE_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// One `[[app]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// Shown in metrics labels, the access line and `/usage`.
    pub name: String,
    /// A file holding the token this app sends in `X-Proxy-Token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Unix socket callers with these uids are this app.
    pub uids: Vec<u32>,
    /// Budgets per UTC day; unset = no budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_tts_characters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_stt_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_llm_tokens: Option<u64>,
}

/// `[usage]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// The day's totals are written here (atomically) and read back at start, so a restart
    /// does not reset a day's spend. Unused with `[limits.shared]`, where Redis holds them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    #[serde(with = "duration_str")]
    pub save_interval: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            state_file: None,
            save_interval: DEFAULT_USAGE_SAVE_INTERVAL,
        }
    }
}

/// Checks serde cannot express, over all apps.
pub(crate) fn validate_apps(apps: &[AppConfig]) -> Result<(), Invalid> {
    let mut names = HashSet::new();
    let mut uids = HashSet::new();
    let mut tokens = HashSet::new();
    for (i, app) in apps.iter().enumerate() {
        let key = |field: &str| format!("app[{i}].{field}");
        if !super::is_valid_name(&app.name) {
            return invalid(
                &key("name"),
                format!(
                    "{:?} is not a name of 1 to 64 letters, digits, '-', '_' or '.'",
                    app.name
                ),
            );
        }
        if app.name == DEFAULT_APP_NAME {
            return invalid(
                &key("name"),
                "\"default\" is the app of callers that match no [[app]]; choose another name".into(),
            );
        }
        if !names.insert(app.name.as_str()) {
            return invalid(&key("name"), format!("{:?} is used by two apps", app.name));
        }
        if app.token_file.is_none() && app.uids.is_empty() {
            return invalid(
                &key("name"),
                format!(
                    "app {:?} has neither token_file nor uids: no request could be its",
                    app.name
                ),
            );
        }
        if let Some(path) = &app.token_file {
            let token = match read_token_file(path) {
                Ok(token) => token,
                Err(message) => return invalid(&key("token_file"), message),
            };
            if !tokens.insert(token.to_string()) {
                return invalid(&key("token_file"), "holds the same token as another app".into());
            }
        }
        for uid in &app.uids {
            if !uids.insert(*uid) {
                return invalid(&key("uids"), format!("uid {uid} belongs to two apps"));
            }
        }
    }
    Ok(())
}

/// One line per app for `check`: how it is told, and its budgets.
pub fn describe_apps(apps: &[AppConfig], require_app: bool) -> Vec<String> {
    let mut lines: Vec<String> = apps
        .iter()
        .map(|a| {
            let mut by = Vec::new();
            if let Some(path) = &a.token_file {
                by.push(format!("token in {}", path.display()));
            }
            if !a.uids.is_empty() {
                let uids: Vec<String> = a.uids.iter().map(u32::to_string).collect();
                by.push(format!("uids {}", uids.join(", ")));
            }
            let budgets: Vec<String> = [
                ("tts characters", a.daily_tts_characters),
                ("stt seconds", a.daily_stt_seconds),
                ("llm tokens", a.daily_llm_tokens),
            ]
            .iter()
            .filter_map(|(what, n)| n.map(|n| format!("{n} {what}")))
            .collect();
            let budgets = if budgets.is_empty() {
                "no budget".to_string()
            } else {
                format!("a day: {}", budgets.join(", "))
            };
            format!("{}: by {}; {budgets}", a.name, by.join(" or "))
        })
        .collect();
    lines.push(if require_app {
        format!("{DEFAULT_APP_NAME}: refused (listen.require_app)")
    } else {
        format!("{DEFAULT_APP_NAME}: every other caller; no budget")
    });
    lines
}

impl UsageConfig {
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if self.save_interval < Duration::from_millis(100) {
            return invalid("usage.save_interval", "must be at least 100ms".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load_text;

    #[test]
    fn bad_apps_are_named_by_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("t");
        std::fs::write(&token, "tok\n").unwrap();
        let t = token.display();
        for (text, key, needle) in [
            (
                "[[app]]\nname = \"default\"\nuids = [1]\n".to_string(),
                "app[0].name",
                "default",
            ),
            (
                "[[app]]\nname = \"a b\"\nuids = [1]\n".to_string(),
                "app[0].name",
                "not a name",
            ),
            ("[[app]]\nname = \"a\"\n".to_string(), "app[0].name", "neither"),
            (
                "[[app]]\nname = \"a\"\nuids = [1]\n[[app]]\nname = \"a\"\nuids = [2]\n".to_string(),
                "app[1].name",
                "two apps",
            ),
            (
                "[[app]]\nname = \"a\"\nuids = [1]\n[[app]]\nname = \"b\"\nuids = [1]\n".to_string(),
                "app[1].uids",
                "two apps",
            ),
            (
                format!("[[app]]\nname = \"a\"\ntoken_file = \"{t}\"\n[[app]]\nname = \"b\"\ntoken_file = \"{t}\"\n"),
                "app[1].token_file",
                "same token",
            ),
            (
                "[[app]]\nname = \"a\"\ntoken_file = \"/nonexistent/t\"\n".to_string(),
                "app[0].token_file",
                "cannot read",
            ),
        ] {
            let e = load_text(Some(std::path::Path::new("p.toml")), &text, &[]).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.message.contains(needle), "{e}");
            assert!(e.location.starts_with("p.toml:"), "{e}");
        }
    }

    #[test]
    fn check_describes_each_app_and_the_default() {
        let apps = vec![super::AppConfig {
            name: "agent".into(),
            uids: vec![5, 6],
            daily_tts_characters: Some(10),
            ..Default::default()
        }];
        assert_eq!(
            super::describe_apps(&apps, false),
            vec![
                "agent: by uids 5, 6; a day: 10 tts characters".to_string(),
                "default: every other caller; no budget".to_string()
            ]
        );
        assert_eq!(
            super::describe_apps(&[], true)[0],
            "default: refused (listen.require_app)"
        );
    }

    #[test]
    fn usage_and_apps_are_set_from_the_environment_too() {
        let vars = vec![
            ("SMALLEST_PROXY_USAGE_STATE_FILE".to_string(), "/tmp/u.json".to_string()),
            ("SMALLEST_PROXY_LISTEN_REQUIRE_APP".to_string(), "true".to_string()),
            (
                "SMALLEST_PROXY_APP".to_string(),
                r#"[{name = "agent", uids = [5], daily_tts_characters = 10}]"#.to_string(),
            ),
        ];
        let c = load_text(None, "", &vars).unwrap();
        assert_eq!(c.usage.state_file.as_deref(), Some(std::path::Path::new("/tmp/u.json")));
        assert!(c.listen.require_app);
        assert_eq!(c.apps[0].daily_tts_characters, Some(10));
    }
}
