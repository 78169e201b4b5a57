//! Who is calling: the per-connection facts (transport, Unix peer credentials) and the optional
//! caller controls of `[listen]`: `allowed_uids` (403 `FORBIDDEN_CALLER`) and `token_file`
//! (401 `PROXY_TOKEN_REQUIRED`).
//!
//! A disallowed uid is answered, not disconnected: a client that is refused should learn why
//! (a JSON body naming the uid) rather than see a reset it cannot tell from a crash. The
//! check runs before anything else, admin endpoints included, so a refused caller learns
//! nothing about the key or the limits.
//!
//! The token is compared in constant time, and as SHA-256 digests so that neither its bytes
//! nor its length leak through timing; only the digest of the configured token is kept in
//! memory. The header is removed before forwarding: the upstream never sees it.

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::guard::Transport;
use crate::config::{read_token_file, ListenConfig};
use crate::error::ProxyError;

/// Where clients put the local token.
pub const PROXY_TOKEN_HEADER: HeaderName = HeaderName::from_static("x-proxy-token");

/// What the proxy knows about a client connection, handed with each of its requests to
/// `App::handle` so later stages (caller checks, access log, metrics) can show the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    pub transport: Transport,
    /// The connecting process's uid and pid, Unix socket only: `SO_PEERCRED` on Linux,
    /// `getpeereid` and `LOCAL_PEERPID` on macOS (tokio's `peer_cred` picks the call).
    pub peer_uid: Option<u32>,
    pub peer_pid: Option<i32>,
}

impl ConnInfo {
    pub fn tcp() -> ConnInfo {
        ConnInfo {
            transport: Transport::Tcp,
            peer_uid: None,
            peer_pid: None,
        }
    }

    /// Read the peer's credentials from an accepted Unix stream.
    pub fn unix(stream: &tokio::net::UnixStream) -> ConnInfo {
        let cred = stream.peer_cred().ok();
        ConnInfo {
            transport: Transport::Unix,
            peer_uid: cred.map(|c| c.uid()),
            peer_pid: cred.and_then(|c| c.pid()),
        }
    }
}

/// `allowed_uids` and the token digest.
#[derive(Clone, Default)]
pub struct CallerControl {
    allowed_uids: Vec<u32>,
    token_digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for CallerControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerControl")
            .field("allowed_uids", &self.allowed_uids)
            .field("token", &self.token_digest.map(|_| "<set>"))
            .finish()
    }
}

impl CallerControl {
    pub fn from_config(config: &ListenConfig) -> Result<CallerControl, String> {
        let token_digest = match &config.token_file {
            Some(path) => Some(Sha256::digest(read_token_file(path)?.as_bytes()).into()),
            None => None,
        };
        Ok(CallerControl {
            allowed_uids: config.allowed_uids.clone(),
            token_digest,
        })
    }

    /// Whether `listen.token_file` is set (an anonymous token admits requests).
    pub fn has_token(&self) -> bool {
        self.token_digest.is_some()
    }

    /// Whether the connection's peer may use the proxy at all. `allowed_uids` applies to Unix
    /// socket peers; config validation refuses it together with a TCP listener.
    pub fn check_peer(&self, conn: Option<&ConnInfo>) -> Result<(), ProxyError> {
        if self.allowed_uids.is_empty() {
            return Ok(());
        }
        match conn.and_then(|c| c.peer_uid) {
            Some(uid) if self.allowed_uids.contains(&uid) => Ok(()),
            Some(uid) => Err(ProxyError::ForbiddenCaller(format!(
                "uid {uid} is not in listen.allowed_uids"
            ))),
            None => Err(ProxyError::ForbiddenCaller(
                "the caller's uid could not be read, and listen.allowed_uids is set".into(),
            )),
        }
    }

    /// Check and remove the token header (every copy of it, whatever the outcome).
    pub fn take_token(&self, headers: &mut HeaderMap) -> Result<(), ProxyError> {
        let given: Vec<_> = headers.get_all(&PROXY_TOKEN_HEADER).iter().cloned().collect();
        headers.remove(&PROXY_TOKEN_HEADER);
        let Some(expected) = &self.token_digest else {
            return Ok(());
        };
        let ok = match given.as_slice() {
            [one] => bool::from(Sha256::digest(one.as_bytes()).as_slice().ct_eq(expected)),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(ProxyError::ProxyTokenRequired(format!(
                "this proxy needs its local token in the {PROXY_TOKEN_HEADER} header (missing, repeated or wrong)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn control(uids: &[u32], token: Option<&str>) -> CallerControl {
        CallerControl {
            allowed_uids: uids.to_vec(),
            token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    fn unix(uid: u32) -> ConnInfo {
        ConnInfo {
            transport: Transport::Unix,
            peer_uid: Some(uid),
            peer_pid: None,
        }
    }

    #[test]
    fn uids_are_checked_only_when_listed() {
        control(&[], None).check_peer(Some(&unix(5))).unwrap();
        control(&[5, 6], None).check_peer(Some(&unix(6))).unwrap();
        let e = control(&[5], None).check_peer(Some(&unix(7))).unwrap_err();
        assert_eq!(e.status_and_code().1, "FORBIDDEN_CALLER");
        assert!(control(&[5], None).check_peer(Some(&ConnInfo::tcp())).is_err());
        assert!(control(&[5], None).check_peer(None).is_err());
    }

    #[test]
    fn the_token_is_required_compared_and_always_removed() {
        let c = control(&[], Some("s3cret"));
        let mut headers = HeaderMap::new();
        assert_eq!(
            c.take_token(&mut headers).unwrap_err().status_and_code().1,
            "PROXY_TOKEN_REQUIRED"
        );
        headers.insert(PROXY_TOKEN_HEADER, HeaderValue::from_static("s3cre"));
        assert!(c.take_token(&mut headers).is_err());
        assert!(!headers.contains_key(PROXY_TOKEN_HEADER));
        headers.insert(PROXY_TOKEN_HEADER, HeaderValue::from_static("s3cret"));
        headers.append(PROXY_TOKEN_HEADER, HeaderValue::from_static("s3cret"));
        assert!(c.take_token(&mut headers).is_err(), "a repeated header is refused");
        headers.insert(PROXY_TOKEN_HEADER, HeaderValue::from_static("s3cret"));
        c.take_token(&mut headers).unwrap();
        assert!(!headers.contains_key(PROXY_TOKEN_HEADER));
        // Without a configured token, a client's header is still not forwarded.
        headers.insert(PROXY_TOKEN_HEADER, HeaderValue::from_static("x"));
        control(&[], None).take_token(&mut headers).unwrap();
        assert!(!headers.contains_key(PROXY_TOKEN_HEADER));
    }

    #[test]
    fn the_token_file_is_validated_and_never_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "tok-123\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap().as_str(), "tok-123");
        std::fs::write(&path, "two words\n").unwrap();
        assert!(read_token_file(&path).is_err());
        std::fs::write(&path, "").unwrap();
        assert!(read_token_file(&path).is_err());
        let c = control(&[], Some("tok-123"));
        assert!(!format!("{c:?}").contains("tok-123"));
    }
}
