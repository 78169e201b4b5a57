//! `[[route]]`: more upstreams beside the default one (`[upstream]` + `[auth]` + `[key]`), each
//! with its own key, auth scheme, TLS trust and optional limits, chosen by path prefix. A team
//! running self-hosted Smallest servers next to the cloud API sends, say, `/v1/listen` to a
//! local server with its license key (`Token`) and everything else to api.smallest.ai
//! (`Bearer`), from one sidecar.
//!
//! Matching is by the longest prefix over all routes, on a segment boundary: `/v1/listen`
//! claims `/v1/listen` and `/v1/listen/x`, never `/v1/listening`. Unclaimed paths go to the
//! default route. The name `default` is that route's, so `fallback = "default"` sends a
//! refused request to `[upstream]` with `[key]`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

use super::{host_is_loopback, invalid, opt_duration_str, AuthScheme, Config, Invalid, KeyConfig, LimitsConfig};
use super::{UpstreamConfig, VaultConfig};

/// The name of the route every path no `[[route]]` claims goes to.
pub const DEFAULT_ROUTE_NAME: &str = "default";

/// One `[[route]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in `/ready`, logs, metrics and `fallback` references.
    pub name: String,
    /// Path prefixes this route claims (segment-boundary match, longest over all routes wins).
    pub paths: Vec<String>,
    /// `https://...`, or `http://` to a loopback host (to any host with `allow_plaintext`).
    pub upstream: String,
    /// Allow plain http to a non-loopback host: the key then crosses the network in clear.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// An extra trust root (PEM) beside the public web roots, as in `[upstream]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The word before the key: `Bearer` (cloud) or `Token` (self-hosted).
    #[serde(default)]
    pub scheme: AuthScheme,
    /// Where a replayable request goes when this route's upstream refuses the connection,
    /// times out before answering, or answers 503 or 429: another route's name, or `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Overrides of `[upstream]`'s timeouts for this route (a short one makes a fallback quick).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_duration_str")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_duration_str")]
    pub response_timeout: Option<Duration>,
    /// This route's own key, same shape and sources as `[key]`. Required: a route never
    /// borrows another route's key.
    pub key: KeyConfig,
    /// This route's own limits, same shape as `[limits]`; without it the route is unlimited
    /// (the account limits in `[limits]` belong to the default upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsConfig>,
}

impl RouteConfig {
    /// Whether this route claims `path`: `prefix` itself, or `prefix` followed by `/`.
    pub fn claims(prefix: &str, path: &str) -> bool {
        match path.strip_prefix(prefix) {
            Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
            None => false,
        }
    }

    /// The `[upstream]` this route runs with: the default route's timeouts and pool settings,
    /// with this route's URL, trust root and timeout overrides.
    pub fn upstream_config(&self, base: &UpstreamConfig) -> UpstreamConfig {
        UpstreamConfig {
            url: self.upstream.clone(),
            ca_file: self.ca_file.clone(),
            connect_timeout: self.connect_timeout.unwrap_or(base.connect_timeout),
            response_timeout: self.response_timeout.unwrap_or(base.response_timeout),
            ..base.clone()
        }
    }

    /// A whole config whose `[key]`, `[auth]` and `[limits]` are this route's, for building
    /// the route's key source and limiter with the same code as the default route's.
    pub fn as_config(&self, base: &Config) -> Config {
        let mut config = base.clone();
        config.route.clear();
        config.upstream = self.upstream_config(&base.upstream);
        config.auth.scheme = self.scheme;
        config.key = self.key.clone();
        config.limits = self.limits.clone().unwrap_or_default();
        config
    }
}

/// `VAULT_ADDR` for a route's `[route.key.vault]` without an address, as for `[key.vault]`.
pub(crate) fn vault_address_from_env(routes: &mut [RouteConfig], vars: &[(String, String)]) {
    let from_env = vars.iter().find(|(k, _)| k == "VAULT_ADDR").map(|(_, v)| v.clone());
    for vault in routes.iter_mut().filter_map(|r| r.key.vault.as_mut()) {
        fill_address(vault, &from_env);
    }
}

fn fill_address(vault: &mut VaultConfig, from_env: &Option<String>) {
    if vault.address.is_none() {
        vault.address.clone_from(from_env);
    }
}

/// Checks serde cannot express, over all routes (names, paths, upstreams, fallbacks, keys,
/// limits). Errors name `route[i].field`, which the loader turns into `file:line:column`.
pub(crate) fn validate(config: &Config) -> Result<(), Invalid> {
    let routes = &config.route;
    // A route's limit classes are metric labels (and Redis keys) beside the default route's:
    // its default class takes the route's name, so every class name must be unique overall.
    let mut class_names: Vec<&str> = config.limits.class.iter().map(|c| c.name.as_str()).collect();
    for (i, route) in routes.iter().enumerate() {
        let at = |field: &str| format!("route[{i}].{field}");
        if !super::is_valid_name(&route.name) {
            return invalid(
                &at("name"),
                format!(
                    "{:?} is not a route name: use 1-64 letters, digits, '-', '_' or '.'",
                    route.name
                ),
            );
        }
        if route.name == DEFAULT_ROUTE_NAME {
            return invalid(
                &at("name"),
                "\"default\" is the name of [upstream] + [key] (the route unclaimed paths take); pick another".into(),
            );
        }
        if routes[..i].iter().any(|r| r.name == route.name) {
            return invalid(&at("name"), format!("{:?} is used by two routes", route.name));
        }
        if route.paths.is_empty() {
            return invalid(
                &at("paths"),
                "needs at least one path prefix, like \"/v1/listen\"".into(),
            );
        }
        for (j, path) in route.paths.iter().enumerate() {
            if let Err(message) = check_prefix(path) {
                return invalid(&at(&format!("paths[{j}]")), message);
            }
            let earlier = routes[..i]
                .iter()
                .flat_map(|r| r.paths.iter().map(move |p| (r, p)))
                .chain(route.paths[..j].iter().map(|p| (route, p)));
            if let Some((other, _)) = earlier.into_iter().find(|(_, p)| *p == path) {
                return invalid(
                    &at(&format!("paths[{j}]")),
                    format!("{path:?} is already claimed by route {:?}", other.name),
                );
            }
        }
        check_upstream(route).or_else(|(field, message)| invalid(&at(&field), message))?;
        if let Some(ca) = &route.ca_file {
            if !ca.is_file() {
                return invalid(
                    &at("ca_file"),
                    format!("{} does not exist or is not a file", ca.display()),
                );
            }
        }
        if let Some(fallback) = &route.fallback {
            if fallback == &route.name {
                return invalid(&at("fallback"), "a route cannot fall back to itself".into());
            }
            if fallback != DEFAULT_ROUTE_NAME && !routes.iter().any(|r| &r.name == fallback) {
                let names: Vec<&str> = std::iter::once(DEFAULT_ROUTE_NAME)
                    .chain(routes.iter().filter(|r| r.name != route.name).map(|r| r.name.as_str()))
                    .collect();
                return invalid(
                    &at("fallback"),
                    format!("{fallback:?} is not a route; choose one of {names:?}"),
                );
            }
        }
        // A key is a cloud API key (Bearer) or a self-hosted license key (Token), never both: a
        // route reading the same source as another route with the other scheme would send one
        // upstream's key to the other (`source = "env"` left at its default SMALLEST_API_KEY).
        let owners = std::iter::once((DEFAULT_ROUTE_NAME, &config.key, config.auth.scheme))
            .chain(routes[..i].iter().map(|r| (r.name.as_str(), &r.key, r.scheme)));
        for (other, key, scheme) in owners {
            if key == &route.key && scheme != route.scheme {
                return invalid(
                    &at("key"),
                    format!(
                        "reads the same key as route {other:?} ({}) but sends it as {}: a key belongs to one kind of upstream; give this route its own key source",
                        scheme.as_str(),
                        route.scheme.as_str()
                    ),
                );
            }
        }
        // The key and the limits have the same checks as the top-level sections; their errors
        // name `key.file`, `limits.class[0].paths`, ...: re-rooted under this route.
        let reroot = |(key, message): Invalid| (format!("route[{i}].{key}"), message);
        route.key.validate().map_err(reroot)?;
        if let Some(limits) = &route.limits {
            limits.validate().map_err(reroot)?;
        }
        if class_names.contains(&route.name.as_str()) {
            return invalid(
                &at("name"),
                format!(
                    "{:?} is also a limit class name; route and class names share the metrics' class label",
                    route.name
                ),
            );
        }
        class_names.push(&route.name);
        for (j, class) in route.limits.iter().flat_map(|l| l.class.iter()).enumerate() {
            if class_names.contains(&class.name.as_str()) || routes.iter().any(|r| r.name == class.name) {
                return invalid(
                    &at(&format!("limits.class[{j}].name")),
                    format!("{:?} is already a route or limit class name", class.name),
                );
            }
            class_names.push(&class.name);
        }
    }
    Ok(())
}

/// A path prefix: absolute, no query or fragment, no empty or dot segments, no wildcard (the
/// match is a plain prefix), no trailing slash (except `/` itself, which claims every path).
fn check_prefix(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with /"));
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(format!(
            "{path:?} ends with /: write {:?} (it matches the path and everything under it)",
            path.trim_end_matches('/')
        ));
    }
    if path.contains(['?', '#', '*']) || path.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "{path:?} is not a plain path prefix (no query, fragment, wildcard, space or control character)"
        ));
    }
    if path[1..].split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(format!("{path:?} has an empty or dot segment"));
    }
    Ok(())
}

/// The route's upstream URL: absolute, no query, https or (plain http) loopback unless
/// `allow_plaintext`. Returns the field to blame.
fn check_upstream(route: &RouteConfig) -> Result<(), (String, String)> {
    let bad = |message: String| Err(("upstream".to_string(), message));
    let url = route
        .upstream
        .parse::<http::Uri>()
        .ok()
        .filter(|u| u.authority().is_some());
    let Some(url) = url else {
        return bad(format!(
            "{:?} is not an absolute URL like \"https://api.smallest.ai\" or \"http://127.0.0.1:7100\"",
            route.upstream
        ));
    };
    if url.query().is_some() {
        return bad("must not carry a query string".into());
    }
    // The config is printed (`check`, `/ready`) and holds no secret: credentials in the URL
    // would be shown, and the route's key comes from `[route.key]` anyway.
    if url.authority().is_some_and(|a| a.as_str().contains('@')) {
        return bad("must not carry credentials (user:password@); the route's key comes from [route.key]".into());
    }
    match url.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if route.allow_plaintext || host_is_loopback(url.host().unwrap_or_default()) => Ok(()),
        Some("http") => bad(format!(
            "plain http to {} (not a loopback host) would send the key across the network in clear; use https, or set allow_plaintext = true on this route if that network is trusted",
            url.host().unwrap_or_default()
        )),
        _ => bad("the scheme must be https or http".into()),
    }
}

/// The routing table, one line per route (longest prefixes first), for `smallest-proxy check`.
pub fn routing_table(config: &Config) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    for route in &config.route {
        for path in &route.paths {
            let fallback = route
                .fallback
                .as_deref()
                .map_or(String::new(), |f| format!(", falls back to {f}"));
            let plain = if route.allow_plaintext { ", allow_plaintext" } else { "" };
            rows.push((
                path.clone(),
                format!(
                    "{path} -> {} {} ({} key from {}{plain}{fallback})",
                    route.name,
                    route.upstream,
                    route.scheme.as_str(),
                    key_source_label(&route.key)
                ),
            ));
        }
    }
    rows.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    let mut out = String::new();
    for (_, line) in rows {
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!(
        "* -> {DEFAULT_ROUTE_NAME} {} ({} key from {})\n",
        config.upstream.url,
        config.auth.scheme.as_str(),
        key_source_label(&config.key)
    ));
    out
}

/// Where a key comes from, as an operator names it (no secret: the config holds none).
fn key_source_label(key: &KeyConfig) -> String {
    use super::KeySourceKind;
    match key.source {
        KeySourceKind::Env => format!("env {}", key.env),
        KeySourceKind::File => format!(
            "file {}",
            key.file.as_ref().map_or(String::new(), |f| f.display().to_string())
        ),
        KeySourceKind::Vault => format!(
            "vault {}",
            key.vault
                .as_ref()
                .map_or(String::new(), |v| format!("{}/{}", v.mount, v.path))
        ),
        KeySourceKind::Aws => format!(
            "aws {}",
            key.aws.as_ref().map_or(String::new(), |a| a.secret_id.clone())
        ),
        KeySourceKind::Keyring => {
            let entry = key.keyring_entry();
            format!("keyring {}/{}", entry.service, entry.account)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_text, ConfigError};
    use std::path::Path;

    fn load(text: &str) -> Result<Config, ConfigError> {
        load_text(Some(Path::new("proxy.toml")), text, &[])
    }

    const SELFHOST: &str = r#"
[[route]]
name = "selfhost-stt"
paths = ["/v1/listen"]
upstream = "http://127.0.0.1:7100"
scheme = "Token"
fallback = "default"
[route.key]
source = "file"
file = "/run/secrets/license-key"
"#;

    #[test]
    fn the_issue_contract_parses() {
        let c = load(SELFHOST).expect("valid");
        let r = &c.route[0];
        assert_eq!(r.name, "selfhost-stt");
        assert_eq!(r.scheme, AuthScheme::Token);
        assert_eq!(r.fallback.as_deref(), Some("default"));
        assert!(!r.allow_plaintext);
        assert_eq!(r.key.source, crate::config::KeySourceKind::File);
        let again = load(&c.to_toml()).expect("check's output parses");
        assert_eq!(again, c);
    }

    #[test]
    fn the_commented_route_in_proxy_toml_example_is_valid_once_uncommented() {
        let example = include_str!("../../proxy.toml.example");
        let block: String = example[example.find("# [[route]]").expect("a [[route]] example")..]
            .lines()
            // The block ends at the first blank line; the sections after it are other examples.
            .take_while(|line| !line.trim().is_empty())
            // Its ca_file names a file this machine does not have.
            .filter(|line| !line.starts_with("# ca_file"))
            .map(|line| format!("{}\n", line.strip_prefix("# ").unwrap_or(line)))
            .collect();
        let c = load(&block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let route = &c.route[0];
        assert_eq!((route.name.as_str(), route.scheme), ("selfhost-stt", AuthScheme::Token));
        assert_eq!(route.fallback.as_deref(), Some(DEFAULT_ROUTE_NAME));
        assert_eq!(
            route.limits.as_ref().map(|l| l.max_concurrent),
            Some(crate::config::limits::Concurrency::Fixed(4))
        );
    }

    #[test]
    fn prefixes_match_on_a_segment_boundary() {
        assert!(RouteConfig::claims("/v1/listen", "/v1/listen"));
        assert!(RouteConfig::claims("/v1/listen", "/v1/listen/x"));
        assert!(!RouteConfig::claims("/v1/listen", "/v1/listening"));
        assert!(!RouteConfig::claims("/v1/listen", "/v1"));
        assert!(RouteConfig::claims("/", "/anything"));
    }

    #[test]
    fn plain_http_to_a_remote_host_needs_allow_plaintext_and_names_its_position() {
        let text = SELFHOST.replace("127.0.0.1:7100", "10.0.0.5:7100");
        let e = load(&text).unwrap_err();
        assert_eq!(e.key, "route[0].upstream");
        assert_eq!(e.location, "proxy.toml:5:1");
        assert!(e.message.contains("allow_plaintext"), "{e}");
        let opted_in = text.replace("scheme = \"Token\"", "scheme = \"Token\"\nallow_plaintext = true");
        load(&opted_in).expect("allowed with allow_plaintext");
        load(&SELFHOST.replace("http://127.0.0.1:7100", "https://stt.internal:7100")).expect("https anywhere");
        let e = load(&SELFHOST.replace("http://127.0.0.1:7100", "https://user:pw@stt.internal")).unwrap_err();
        assert_eq!(e.key, "route[0].upstream");
        assert!(!e.message.contains("pw"), "{e}");
    }

    #[test]
    fn names_paths_and_fallbacks_are_checked() {
        let cases = [
            (SELFHOST.replace("selfhost-stt", "default"), "route[0].name"),
            (SELFHOST.replace("selfhost-stt", "has space"), "route[0].name"),
            (SELFHOST.replace("[\"/v1/listen\"]", "[]"), "route[0].paths"),
            (SELFHOST.replace("/v1/listen", "v1/listen"), "route[0].paths[0]"),
            (SELFHOST.replace("/v1/listen", "/v1/listen/"), "route[0].paths[0]"),
            (SELFHOST.replace("/v1/listen", "/v1/*/listen"), "route[0].paths[0]"),
            (SELFHOST.replace("/v1/listen", "/v1//listen"), "route[0].paths[0]"),
            (
                SELFHOST.replace("fallback = \"default\"", "fallback = \"nope\""),
                "route[0].fallback",
            ),
            (
                SELFHOST.replace("fallback = \"default\"", "fallback = \"selfhost-stt\""),
                "route[0].fallback",
            ),
            (
                SELFHOST.replace("file = \"/run/secrets/license-key\"", ""),
                "route[0].key.file",
            ),
            (format!("{SELFHOST}{SELFHOST}"), "route[1].name"),
            (
                format!("{SELFHOST}{}", SELFHOST.replace("selfhost-stt", "other")),
                "route[1].paths[0]",
            ),
        ];
        for (text, key) in cases {
            let e = load(&text).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.location.starts_with("proxy.toml:"), "{e}");
        }
        let e = load(&SELFHOST.replace(
            "[route.key]\nsource = \"file\"\nfile = \"/run/secrets/license-key\"\n",
            "",
        ))
        .unwrap_err();
        assert!(e.message.contains("missing field `key`"), "{e}");
        let cloud_key_as_token = SELFHOST
            .replace("file = \"/run/secrets/license-key\"", "")
            .replace("source = \"file\"", "source = \"env\"");
        let e = load(&cloud_key_as_token).unwrap_err();
        assert_eq!(e.key, "route[0].key", "the cloud key's source, sent as Token: {e}");
        assert!(e.message.contains("\"default\""), "{e}");
        let two = format!(
            "{SELFHOST}{}",
            SELFHOST
                .replace("selfhost-stt", "tts")
                .replace("/v1/listen", "/v1/speak")
                .replace("fallback = \"default\"", "fallback = \"selfhost-stt\"")
        );
        load(&two).expect("a fallback to another route");
    }

    #[test]
    fn route_limits_validate_under_the_route() {
        let text = format!(
            "{SELFHOST}[route.limits]\nmax_concurrent = 2\n[[route.limits.class]]\nname = \"x\"\npaths = [\"nope\"]\n"
        );
        let e = load(&text).unwrap_err();
        assert_eq!(e.key, "route[0].limits.class[0].paths");
        let e = load(&format!("{SELFHOST}[route.limits]\n[[route.limits.class]]\nname = \"tts\"\npaths = [\"/a\"]\n[[limits.class]]\nname = \"tts\"\npaths = [\"/b\"]\n")).unwrap_err();
        assert_eq!(e.key, "route[0].limits.class[0].name", "{e}");
        let ok = format!("{SELFHOST}[route.limits]\nmax_concurrent = 2\n");
        assert_eq!(
            load(&ok).unwrap().route[0].limits.as_ref().unwrap().max_concurrent,
            crate::config::limits::Concurrency::Fixed(2)
        );
    }

    #[test]
    fn the_routing_table_lists_longest_prefixes_first_and_the_default_last() {
        let c = load(&format!(
            "{SELFHOST}{}",
            SELFHOST
                .replace("selfhost-stt", "deep")
                .replace("/v1/listen", "/v1/listen/deep")
        ))
        .unwrap();
        let table = routing_table(&c);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("/v1/listen/deep -> deep http://127.0.0.1:7100 (Token key from file"),
            "{table}"
        );
        assert!(lines[1].starts_with("/v1/listen -> selfhost-stt"), "{table}");
        assert!(lines[1].ends_with("falls back to default)"), "{table}");
        assert_eq!(
            lines[2],
            "* -> default https://api.smallest.ai (Bearer key from env SMALLEST_API_KEY)"
        );
    }
}
