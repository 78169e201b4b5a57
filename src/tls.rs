//! The rustls client configuration every outgoing TLS connection verifies with: the upstream
//! pool and the Vault client. Public web roots plus an optional extra CA file, ring crypto,
//! TLS 1.2 and 1.3. Nothing here knows which peer it is for.

use rustls::RootCertStore;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The public web roots plus the optional `ca_file`, ring crypto, TLS 1.2 and 1.3. Shared by
/// the upstream clients and the Vault client.
pub fn client_tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let ca_err = |reason: String| TlsSetupError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| ca_err(format!("not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ca_err(format!("not a usable CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(ca_err("holds no PEM certificate".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}
