//! `source = "file"`: the key from a mounted file (Kubernetes secret, Docker secret,
//! systemd credential), with the trailing newline that editors and `echo` add trimmed.

use secrecy::SecretString;
use std::path::PathBuf;
use zeroize::Zeroizing;

use super::{KeyError, KeySource};

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
        let bytes = Zeroizing::new(tokio::fs::read(&self.path).await.map_err(|e| KeyError::File {
            path: self.path.display().to_string(),
            reason: e.kind().to_string(),
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Invalid("the file is not UTF-8 text"))?;
        let trimmed = text.trim_end_matches(['\n', '\r']);
        Ok(SecretString::from(trimmed.to_string()))
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
        assert!(err.to_string().contains("/nonexistent/key"), "{err}");
    }
}
