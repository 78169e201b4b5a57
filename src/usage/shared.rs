//! Usage totals in Redis (`[limits.shared]`), so every replica adds to, and checks against,
//! one day's totals per app: one budget across N pods.
//!
//! One hash per day and app (`<key_prefix>:usage:<day>:<app>`), its fields the [`Totals`]
//! names, added to with `HINCRBY`/`HINCRBYFLOAT` and kept two days. An add and the read of the
//! new totals are one `MULTI` round trip. When Redis fails or is slower than
//! `limits.shared.timeout`, the store answers from this process's own totals (which it keeps
//! anyway) and says so once in the log; it asks Redis again a second later.

use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Add, Totals};
use crate::config::SharedLimitsConfig;

/// How long a day's hash is kept after its last change.
const KEEP_SECS: i64 = 2 * 86_400;

pub struct SharedUsage {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
    timeout: Duration,
    failing: AtomicBool,
    /// After a failure Redis is not asked again for [`RETRY_AFTER_FAILURE`]: requests must not
    /// each wait out a timeout while it is down.
    down_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

impl std::fmt::Debug for SharedUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a Redis password: not shown.
        f.debug_struct("SharedUsage").field("prefix", &self.prefix).finish()
    }
}

impl SharedUsage {
    pub fn new(config: &SharedLimitsConfig) -> Result<SharedUsage, String> {
        let client =
            redis::Client::open(config.redis_url.as_str()).map_err(|e| format!("limits.shared.redis_url: {e}"))?;
        Ok(SharedUsage {
            client,
            connection: tokio::sync::Mutex::new(None),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            failing: AtomicBool::new(false),
            down_until: std::sync::Mutex::new(None),
        })
    }

    fn key(&self, day: u64, app: &str) -> String {
        format!("{}:usage:{day}:{app}", self.prefix)
    }

    async fn connection(&self) -> Option<ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if slot.is_none() {
            let connecting = ConnectionManager::new(self.client.clone());
            match tokio::time::timeout(self.timeout.max(Duration::from_millis(500)), connecting).await {
                Ok(Ok(c)) => *slot = Some(c),
                Ok(Err(e)) => self.failed(&e.to_string()),
                Err(_) => self.failed("connecting timed out"),
            }
        }
        slot.clone()
    }

    fn failed(&self, why: &str) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::time::Instant::now() + RETRY_AFTER_FAILURE);
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = why,
                "usage totals: Redis failed; counting in this process until it answers"
            );
        }
    }

    fn recovered(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("usage totals: Redis answers again; totals are shared");
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Pipeline) -> Option<T> {
        let down = *self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        if down.is_some_and(|until| tokio::time::Instant::now() < until) {
            return None;
        }
        let mut conn = self.connection().await?;
        match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                self.recovered();
                Some(v)
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("timed out");
                None
            }
        }
    }

    /// The shared totals of `app` on `day`; `None` when Redis did not answer.
    pub async fn totals(&self, day: u64, app: &str) -> Option<Totals> {
        let mut pipe = redis::pipe();
        pipe.hgetall(self.key(day, app));
        let (fields,): (HashMap<String, String>,) = self.run(pipe).await?;
        Some(totals_from(&fields))
    }

    /// Add to the shared totals and read them back, in one round trip.
    pub async fn add(&self, day: u64, app: &str, add: Add) -> Option<Totals> {
        let key = self.key(day, app);
        let mut pipe = redis::pipe();
        pipe.atomic();
        match add {
            Add::Tts(n) => {
                pipe.hincr(&key, "tts_characters", n).ignore();
            }
            Add::Stt { seconds, .. } => {
                pipe.cmd("HINCRBYFLOAT")
                    .arg(&key)
                    .arg("stt_seconds")
                    .arg(seconds)
                    .ignore();
            }
            Add::SttUnmetered => {
                pipe.hincr(&key, "stt_unmetered_requests", 1).ignore();
            }
            Add::Llm { prompt, completion } => {
                pipe.hincr(&key, "llm_prompt_tokens", prompt).ignore();
                pipe.hincr(&key, "llm_completion_tokens", completion).ignore();
            }
            Add::AuthFailure(status) => {
                let field = if status == 401 { "upstream_401" } else { "upstream_403" };
                pipe.hincr(&key, field, 1).ignore();
            }
        }
        pipe.expire(&key, KEEP_SECS).ignore();
        pipe.hgetall(&key);
        let (fields,): (HashMap<String, String>,) = self.run(pipe).await?;
        Some(totals_from(&fields))
    }
}

fn totals_from(fields: &HashMap<String, String>) -> Totals {
    let int = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Totals {
        tts_characters: int("tts_characters"),
        stt_seconds: fields
            .get("stt_seconds")
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0),
        stt_unmetered_requests: int("stt_unmetered_requests"),
        llm_prompt_tokens: int("llm_prompt_tokens"),
        llm_completion_tokens: int("llm_completion_tokens"),
        upstream_401: int("upstream_401"),
        upstream_403: int("upstream_403"),
    }
}
