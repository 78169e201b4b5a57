//! Where the upstream is: its scheme, authority, base path and `Host`, parsed once at start,
//! and the upstream URI each request is sent to.

use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

use crate::error::ProxyError;

/// The upstream's scheme, authority and optional base path, parsed once at start.
#[derive(Debug, Clone)]
pub struct UpstreamBase {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the upstream URL without a trailing slash ("" for none).
    pub base_path: String,
    /// The `Host` header for the upstream, built once: hyper-util's client would format it
    /// for every request (about 1,700 instructions, callgrind), so it is told not to
    /// (`set_host(false)` in `upstream/mod.rs`) and this one is inserted instead. Same form as
    /// hyper-util's: the host, and the port unless it is the scheme's default. Over HTTP/2 it
    /// travels beside an equal `:authority`, which RFC 9113 §8.3.1 allows an intermediary.
    pub host: HeaderValue,
}

impl UpstreamBase {
    pub fn parse(url: &str) -> Result<UpstreamBase, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| format!("{url:?} has no scheme"))?;
        let authority = uri.authority().cloned().ok_or_else(|| format!("{url:?} has no host"))?;
        let base_path = uri.path().trim_end_matches('/').to_string();
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_string(),
        };
        let host = HeaderValue::from_str(&host).map_err(|_| format!("{url:?}: the host is not a valid Host header"))?;
        Ok(UpstreamBase {
            scheme,
            authority,
            base_path,
            host,
        })
    }

    /// `scheme://authority/`: where connections go.
    pub fn destination(&self) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
        // Scheme and authority came out of a parsed URI, so the parts are valid.
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("https://invalid/"))
    }

    /// Upstream URI for the client's path and query, kept byte for byte.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
        fn bad<E>(_: E) -> ProxyError {
            ProxyError::BadRequest("the request path cannot be forwarded".into())
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        // Without a base path the client's path and query are reused as they are (a shared
        // buffer, not parsed again).
        parts.path_and_query = Some(match (self.base_path.is_empty(), path_and_query) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let pq = pq.map_or("/", |pq| pq.as_str());
                PathAndQuery::try_from(format!("{}{}", self.base_path, pq)).map_err(bad)?
            }
        });
        Uri::from_parts(parts).map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_keeps_path_and_query_and_base_path() {
        let base = UpstreamBase::parse("https://api.smallest.ai").unwrap();
        let pq: PathAndQuery = "/waves/v1/lightning/get_speech?x=1&y=%20".parse().unwrap();
        assert_eq!(
            base.uri_for(Some(&pq)).unwrap().to_string(),
            "https://api.smallest.ai/waves/v1/lightning/get_speech?x=1&y=%20"
        );
        let base = UpstreamBase::parse("https://host:8443/prefix/").unwrap();
        assert_eq!(
            base.uri_for(Some(&pq)).unwrap().to_string(),
            "https://host:8443/prefix/waves/v1/lightning/get_speech?x=1&y=%20"
        );
    }
}
