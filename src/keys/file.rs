//! `source = "file"`: the key from a mounted file (Kubernetes secret, Docker secret,
//! systemd credential), with the trailing newline that editors and `echo` add trimmed.
//!
//! Changes are noticed through inotify on the file's *directory*, not the file: Kubernetes
//! updates a secret volume by swapping the `..data` symlink, and editors save by writing a new
//! file and renaming it over the old one; either way the watched inode would be the wrong one.
//! Any event in the directory asks for a refresh (cheap: the refresh is single-flight and a
//! re-read of the same value is not a rotation). The periodic refresh stays on as a slow poll,
//! the safety net for filesystems where inotify is silent (some network and FUSE mounts).

use secrecy::SecretString;
use std::path::PathBuf;
use zeroize::Zeroizing;

use super::{KeyError, KeySource, KeyStore};
use std::path::Path;
use std::sync::Arc;

/// Start watching `path`'s directory (and, when `path` is a symlink, its target's directory).
/// Keep the returned watcher alive as long as the store; dropping it stops the watch.
/// `None` when inotify is unavailable: the periodic refresh still picks changes up.
pub fn watch(path: &Path, keys: Arc<KeyStore>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            keys.request_refresh();
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the key file; relying on the periodic refresh");
            return None;
        }
    };
    let mut dirs = Vec::new();
    if let Some(parent) = path.parent() {
        dirs.push(parent.to_path_buf());
    }
    if let Ok(target) = std::fs::canonicalize(path) {
        if let Some(parent) = target.parent() {
            if !dirs.iter().any(|d| d == parent) {
                dirs.push(parent.to_path_buf());
            }
        }
    }
    let mut watching = 0;
    for dir in &dirs {
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => watching += 1,
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the key file's directory"),
        }
    }
    (watching > 0).then_some(watcher)
}

pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: PathBuf) -> FileSource {
        FileSource { path }
    }
}

#[async_trait::async_trait]
impl KeySource for FileSource {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn fetch(&self) -> Result<SecretString, KeyError> {
        let bytes = Zeroizing::new(tokio::fs::read(&self.path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KeyError::Source(format!("not found: {}", self.path.display())),
            kind => KeyError::File {
                path: self.path.display().to_string(),
                reason: kind.to_string(),
            },
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Invalid("the file is not UTF-8 text"))?;
        let trimmed = text.trim_end_matches(['\n', '\r']);
        Ok(SecretString::from(trimmed.to_string()))
    }

    fn remedy(&self) -> String {
        format!(
            "write a valid key to {} (the proxy re-reads it when it changes)",
            self.path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[tokio::test]
    async fn trailing_newline_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-file\n").unwrap();
        let value = FileSource::new(path).fetch().await.unwrap();
        assert_eq!(value.expose_secret(), "sk-file");
    }

    #[tokio::test]
    async fn missing_file_error_names_the_path_not_the_content() {
        let err = FileSource::new("/nonexistent/key".into()).fetch().await.unwrap_err();
        assert_eq!(err.to_string(), "not found: /nonexistent/key");
    }
}
