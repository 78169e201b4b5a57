//! Which local app a request is (`[[app]]`): by the token it sends in `X-Proxy-Token`, else
//! by the uid of a Unix socket caller, else `default` (refused with 401 `APP_REQUIRED` when
//! `listen.require_app` is set). Identification only: admission stays with `caller`
//! (`listen.allowed_uids`, `listen.token_file`).
//!
//! Tokens are compared as SHA-256 digests in constant time, against every app's digest with
//! no early exit, so neither a token's bytes, its length nor which app it belongs to leak
//! through timing. Only the digests are kept. A matched header is removed before forwarding.

use http::HeaderMap;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::caller::{ConnInfo, PROXY_TOKEN_HEADER};
use crate::config::{read_token_file, Config, DEFAULT_APP_NAME};
use crate::error::ProxyError;

struct Known {
    name: Arc<str>,
    token_digest: Option<[u8; 32]>,
    uids: Vec<u32>,
}

/// The apps of `[[app]]`, ready to match requests.
#[derive(Clone)]
pub struct AppIdentity {
    apps: Arc<Vec<Known>>,
    default: Arc<str>,
    require_app: bool,
}

impl std::fmt::Debug for AppIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.apps.iter().map(|a| &*a.name).collect();
        f.debug_struct("AppIdentity")
            .field("apps", &names)
            .field("require_app", &self.require_app)
            .finish()
    }
}

/// What identification found.
pub enum Identified {
    /// By its token: the header was removed and admits the request by itself.
    ByToken(Arc<str>),
    /// By uid, or `default`: the token header (if any) is left for `listen.token_file`.
    Other(Arc<str>),
}

impl AppIdentity {
    pub fn from_config(config: &Config) -> Result<AppIdentity, String> {
        let mut apps = Vec::with_capacity(config.apps.len());
        for app in &config.apps {
            let token_digest = match &app.token_file {
                Some(path) => Some(
                    Sha256::digest(
                        read_token_file(path)
                            .map_err(|e| format!("app {:?} token_file: {e}", app.name))?
                            .as_bytes(),
                    )
                    .into(),
                ),
                None => None,
            };
            apps.push(Known {
                name: Arc::from(app.name.as_str()),
                token_digest,
                uids: app.uids.clone(),
            });
        }
        Ok(AppIdentity {
            apps: Arc::new(apps),
            default: Arc::from(DEFAULT_APP_NAME),
            require_app: config.listen.require_app,
        })
    }

    fn has_tokens(&self) -> bool {
        self.apps.iter().any(|a| a.token_digest.is_some())
    }

    /// The app of a request. A token that matches no app is refused when no anonymous
    /// `listen.token_file` could accept it (`anonymous_token`), so a mistyped app token is
    /// answered rather than counted as `default`.
    pub fn identify(
        &self,
        headers: &mut HeaderMap,
        conn: &ConnInfo,
        anonymous_token: bool,
    ) -> Result<Identified, ProxyError> {
        if self.has_tokens() {
            let given: Vec<_> = headers.get_all(&PROXY_TOKEN_HEADER).iter().cloned().collect();
            if let [one] = given.as_slice() {
                let digest: [u8; 32] = Sha256::digest(one.as_bytes()).into();
                // Every app is compared; the index of the match is chosen in constant time.
                let mut found = u32::MAX;
                for (i, app) in self.apps.iter().enumerate() {
                    let expected = app.token_digest.unwrap_or([0; 32]);
                    let hit = digest.ct_eq(&expected) & subtle::Choice::from(u8::from(app.token_digest.is_some()));
                    found = u32::conditional_select(&found, &(i as u32), hit);
                }
                if let Some(app) = self.apps.get(found as usize) {
                    headers.remove(&PROXY_TOKEN_HEADER);
                    return Ok(Identified::ByToken(app.name.clone()));
                }
                if !anonymous_token {
                    headers.remove(&PROXY_TOKEN_HEADER);
                    return Err(ProxyError::ProxyTokenRequired(format!(
                        "the {PROXY_TOKEN_HEADER} header matches no [[app]] token"
                    )));
                }
            }
        }
        if let Some(uid) = conn.peer_uid {
            if let Some(app) = self.apps.iter().find(|a| a.uids.contains(&uid)) {
                return Ok(Identified::Other(app.name.clone()));
            }
        }
        if self.require_app {
            return Err(ProxyError::AppRequired(format!(
                "this proxy serves known apps only (listen.require_app): send an app's token in {PROXY_TOKEN_HEADER}, or call over the Unix socket as one of an app's uids"
            )));
        }
        Ok(Identified::Other(self.default.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::guard::Transport;
    use http::HeaderValue;

    fn identity(require_app: bool) -> (tempfile::TempDir, AppIdentity) {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "tok-a\n").unwrap();
        let b = dir.path().join("b");
        std::fs::write(&b, "tok-b\n").unwrap();
        let text = format!(
            "[listen]\nrequire_app = {require_app}\n[[app]]\nname = \"a\"\ntoken_file = \"{}\"\n[[app]]\nname = \"b\"\ntoken_file = \"{}\"\nuids = [7]\n",
            a.display(),
            b.display()
        );
        let config = crate::config::load_text(None, &text, &[]).unwrap();
        (dir, AppIdentity::from_config(&config).unwrap())
    }

    fn name(i: Result<Identified, ProxyError>) -> String {
        match i.unwrap() {
            Identified::ByToken(n) => format!("token:{n}"),
            Identified::Other(n) => n.to_string(),
        }
    }

    #[test]
    fn apps_are_told_by_token_then_uid_then_default() {
        let (_dir, ids) = identity(false);
        let unix = |uid| ConnInfo {
            transport: Transport::Unix,
            peer_uid: Some(uid),
            peer_pid: None,
        };
        let mut h = HeaderMap::new();
        h.insert(PROXY_TOKEN_HEADER, HeaderValue::from_static("tok-b"));
        assert_eq!(name(ids.identify(&mut h, &ConnInfo::tcp(), false)), "token:b");
        assert!(!h.contains_key(PROXY_TOKEN_HEADER), "a matched token is not forwarded");
        h.insert(PROXY_TOKEN_HEADER, HeaderValue::from_static("tok-a"));
        assert_eq!(
            name(ids.identify(&mut h, &unix(7), false)),
            "token:a",
            "the token wins over the uid"
        );
        assert_eq!(name(ids.identify(&mut HeaderMap::new(), &unix(7), false)), "b");
        assert_eq!(name(ids.identify(&mut HeaderMap::new(), &unix(8), false)), "default");
        assert_eq!(
            name(ids.identify(&mut HeaderMap::new(), &ConnInfo::tcp(), false)),
            "default"
        );
        h.insert(PROXY_TOKEN_HEADER, HeaderValue::from_static("tok-c"));
        let e = ids.identify(&mut h, &ConnInfo::tcp(), false).err().unwrap();
        assert_eq!(e.status_and_code().1, "PROXY_TOKEN_REQUIRED");
        // With an anonymous listen.token_file, an unknown token is left for it to judge.
        h.insert(PROXY_TOKEN_HEADER, HeaderValue::from_static("tok-c"));
        assert_eq!(name(ids.identify(&mut h, &ConnInfo::tcp(), true)), "default");
        assert!(h.contains_key(PROXY_TOKEN_HEADER));
    }

    #[test]
    fn require_app_refuses_the_default_app() {
        let (_dir, ids) = identity(true);
        let e = ids
            .identify(&mut HeaderMap::new(), &ConnInfo::tcp(), false)
            .err()
            .unwrap();
        assert_eq!(e.status_and_code(), (http::StatusCode::UNAUTHORIZED, "APP_REQUIRED"));
        assert!(!format!("{ids:?}").contains("tok-"));
    }
}
