//! `[usage] state_file`: the day's totals on disk, so a restart does not reset a day's spend.
//!
//! Written whole, atomically (a temporary file in the same directory, synced, then renamed
//! over the old one), every `save_interval` while totals change and once more at shutdown;
//! read at start, and used only when it is of today (UTC). It holds app names and numbers.

use std::path::Path;

use super::{Day, Usage};

/// Read the file into `usage`. A missing file is a first start; an unreadable one is logged
/// and ignored (the proxy serves, counting from zero).
pub fn load(usage: &Usage, path: &Path) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "usage.state_file could not be read; counting today from zero");
            return;
        }
    };
    match serde_json::from_str::<Day>(&text) {
        Ok(day) if day.number == usage.day_number() => {
            tracing::info!(file = %path.display(), apps = day.apps.len(), "today's usage totals restored");
            usage.restore(day);
        }
        Ok(_) => {
            tracing::debug!(file = %path.display(), "usage.state_file is of another day; starting the day at zero")
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "usage.state_file is not valid; counting today from zero")
        }
    }
}

/// Write `day` to `path` atomically.
pub fn write(path: &Path, day: &Day) -> std::io::Result<()> {
    use std::io::Write;
    // Beside the target, so the rename stays on one filesystem (and is atomic).
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(name);
    let text = serde_json::to_vec(day).map_err(std::io::Error::other)?;
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// Write the totals if they changed since the last write.
pub fn save(usage: &Usage, path: &Path) {
    if let Some(day) = usage.take_changes() {
        if let Err(e) = write(path, &day) {
            tracing::warn!(file = %path.display(), error = %e, "usage.state_file could not be written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::usage::{Add, TestClock};
    use std::sync::Arc;

    #[tokio::test]
    async fn totals_survive_a_write_and_a_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let clock = TestClock::at(1_795_734_000);
        let a = Usage::new(Arc::new(clock.clone()), Arc::new(Metrics::new()));
        a.add("agent", Add::Tts(12)).await;
        save(&a, &path);
        let b = Usage::new(Arc::new(clock.clone()), Arc::new(Metrics::new()));
        load(&b, &path);
        assert_eq!(b.totals("agent").await.tts_characters, 12);
        std::fs::write(&path, "{not json").unwrap();
        let c = Usage::new(Arc::new(clock), Arc::new(Metrics::new()));
        load(&c, &path);
        assert_eq!(c.totals("agent").await.tts_characters, 0);
    }
}
