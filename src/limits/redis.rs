//! Shared limits in Redis: one concurrency limit and one rate across every replica.
//!
//! - Slots are leases: a sorted set per class and kind whose members are slot ids scored by
//!   their expiry (Redis `TIME`, so replicas' clocks don't matter). Acquiring drops expired
//!   leases and adds one if fewer than `max` remain, atomically in one Lua script. A held slot
//!   is renewed every `lease / 3`; a replica killed with `kill -9` stops renewing, and its
//!   slots free themselves within `lease`.
//! - The rate is GCRA in one Lua script over a single "theoretical arrival time" key.
//! - A learned concurrency limit (`max_concurrent = "auto"`) is one key per class: the acquire
//!   script uses it in place of the replica's own limit and returns it, so every replica
//!   follows the same limit; a replica that learns a lower limit writes it at once (only ever
//!   lowering it), and a raise is written only over the value it was raised from.
//! - Waiting replicas poll, with backoff from 5 ms to 50 ms, and only the head of each replica's
//!   queue polls. We chose polling over pub/sub: it needs no second connection per replica,
//!   survives Redis restarts without resubscribing, and bounds the delay to learn of a freed
//!   slot to 50 ms, short next to a TTS request. A slot released on the same replica wakes the
//!   local head at once.
//! - Redis down or slow (any call over `timeout`): the store marks itself down, logs once,
//!   counts a fallback, and the classes use their local limits; a background probe pings every
//!   second and switches back when Redis answers.

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::SharedLimitsConfig;

pub const POLL_MIN: Duration = Duration::from_millis(5);
pub const POLL_MAX: Duration = Duration::from_millis(50);
/// How often a down store probes Redis.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Returns {slots held with this one (0 = none free), the limit used}.
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local max = tonumber(ARGV[1])
if ARGV[4] == '1' then
  local learned = tonumber(redis.call('GET', KEYS[2]) or '0')
  if learned > 0 then max = learned end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held < max then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return {held + 1, max}
end
return {0, max}
"#;

/// A learned limit: `lower` only ever lowers it; a raise applies only over the value it was
/// raised from (two replicas raising at once raise it once). Kept a day after the last change.
const SET_LIMIT: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local new = tonumber(ARGV[1])
if (ARGV[2] == 'lower' and (current == 0 or new < current))
   or (ARGV[2] == 'raise' and (current == 0 or current == tonumber(ARGV[3]))) then
  redis.call('SET', KEYS[1], new, 'EX', 86400)
  return new
end
return current
"#;

const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return 1
end
return 0
"#;

/// GCRA: returns the microseconds to wait (0 = go now, and the arrival is recorded).
const RATE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - (burst - 1) * interval
if now < allow_at then return allow_at - now end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
"#;

pub struct SharedStore {
    client: redis::Client,
    connection: ArcSwapOption<ConnectionManager>,
    up: AtomicBool,
    probing: AtomicBool,
    prefix: String,
    lease: Duration,
    timeout: Duration,
    fallbacks: Counter,
    acquire: redis::Script,
    renew: redis::Script,
    rate: redis::Script,
    set_limit: redis::Script,
}

impl SharedStore {
    /// Connect in the background; until Redis answers, limits are local.
    pub fn start(config: &SharedLimitsConfig, fallbacks: Counter) -> Result<Arc<SharedStore>, String> {
        let client =
            redis::Client::open(config.redis_url.as_str()).map_err(|e| format!("limits.shared.redis_url: {e}"))?;
        let store = Arc::new(SharedStore {
            client,
            connection: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            prefix: config.key_prefix.clone(),
            lease: config.lease,
            timeout: config.timeout,
            fallbacks,
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
            rate: redis::Script::new(RATE),
            set_limit: redis::Script::new(SET_LIMIT),
        });
        store.clone().spawn_probe();
        Ok(store)
    }

    /// Whether shared mode is in effect right now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Wait (bounded) for the first connection, so a proxy that starts next to a healthy Redis
    /// begins in shared mode.
    pub async fn wait_up(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.is_up() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn key(&self, class: &str, what: &str) -> String {
        format!("{}:{}:{}", self.prefix, class, what)
    }

    /// Take a slot if fewer than the limit are held, with how many are held now (this one
    /// included). The limit is `max`, or with `learned` the class's shared learned limit when
    /// one is set; the limit used comes back either way. `Err` = Redis failed (already marked
    /// down).
    pub async fn try_acquire(
        self: &Arc<Self>,
        class: &str,
        kind: &str,
        max: usize,
        learned: bool,
    ) -> Result<(Option<(SharedLease, usize)>, usize), ()> {
        let key = self.key(class, kind);
        let id = format!("{:032x}", rand::random::<u128>());
        let lease_ms = self.lease.as_millis() as u64;
        let mut invocation = self.acquire.key(&key);
        invocation.key(self.key(class, "concurrency"));
        invocation
            .arg(max)
            .arg(lease_ms)
            .arg(&id)
            .arg(if learned { "1" } else { "0" });
        let (got, limit): (i64, i64) = self
            .call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        let limit = usize::try_from(limit).unwrap_or(max);
        if got < 1 {
            return Ok((None, limit));
        }
        let renewer = tokio::spawn(renew_while_held(Arc::downgrade(self), key.clone(), id.clone()));
        let lease = SharedLease {
            store: self.clone(),
            key,
            id,
            renewer,
        };
        Ok((Some((lease, usize::try_from(got).unwrap_or(1))), limit))
    }

    /// Write a learned limit for every replica: `raised_from` is `None` for a lower limit.
    pub async fn publish_limit(&self, class: &str, limit: usize, raised_from: Option<usize>) {
        let mut invocation = self.set_limit.key(self.key(class, "concurrency"));
        match raised_from {
            None => invocation.arg(limit).arg("lower").arg(0),
            Some(from) => invocation.arg(limit).arg("raise").arg(from),
        };
        let _: Result<i64, ()> = self
            .call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await;
    }

    /// GCRA wait for one arrival at `rate` per `per` with `burst`. `Err` = Redis failed.
    pub async fn rate_wait(&self, class: &str, rate: u32, per: Duration, burst: u32) -> Result<Duration, ()> {
        let key = self.key(class, "rate");
        let interval_us = (per.as_micros() / u128::from(rate.max(1))) as u64;
        let mut invocation = self.rate.key(&key);
        invocation.arg(interval_us).arg(burst.max(1));
        let wait_us: i64 = self
            .call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        Ok(Duration::from_micros(wait_us.max(0) as u64))
    }

    /// Run one Redis call with the timeout; on failure mark the store down.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ()>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.connection.load_full() else {
            self.mark_down("not connected");
            return Err(());
        };
        match tokio::time::timeout(self.timeout, f((*conn).clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.mark_down(&e.to_string());
                Err(())
            }
            Err(_) => {
                self.mark_down(&format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ));
                Err(())
            }
        }
    }

    fn mark_down(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.fallbacks.inc();
            tracing::warn!(
                error = why,
                "redis unavailable: using local limits until it answers again"
            );
        }
    }

    fn spawn_probe(self: Arc<Self>) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            let mut logged_initial_failure = false;
            loop {
                let Some(store) = weak.upgrade() else { return };
                if !store.is_up() {
                    match store.connect_and_ping().await {
                        Ok(()) => {
                            store.up.store(true, Ordering::Release);
                            tracing::info!("redis reachable: shared limits in effect");
                        }
                        Err(e) if !logged_initial_failure && store.connection.load().is_none() => {
                            logged_initial_failure = true;
                            store.fallbacks.inc();
                            tracing::warn!(error = %e, "redis unavailable: using local limits until it answers");
                        }
                        Err(_) => {}
                    }
                }
                drop(store);
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        });
    }

    async fn connect_and_ping(&self) -> Result<(), String> {
        let conn = match self.connection.load_full() {
            Some(conn) => conn,
            None => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout.max(Duration::from_millis(500)))
                    .set_response_timeout(self.timeout.max(Duration::from_millis(500)))
                    .set_number_of_retries(1);
                let conn = tokio::time::timeout(
                    Duration::from_secs(2),
                    ConnectionManager::new_with_config(self.client.clone(), config),
                )
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
                let conn = Arc::new(conn);
                self.connection.store(Some(conn.clone()));
                conn
            }
        };
        let mut conn = (*conn).clone();
        let pong: String = tokio::time::timeout(
            self.timeout.max(Duration::from_millis(500)),
            redis::cmd("PING").query_async(&mut conn),
        )
        .await
        .map_err(|_| "ping timed out".to_string())?
        .map_err(|e| e.to_string())?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(format!("unexpected PING answer {pong:?}"))
        }
    }
}

/// A held shared slot; renewed in the background, released on drop.
pub struct SharedLease {
    store: Arc<SharedStore>,
    key: String,
    id: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        self.renewer.abort();
        let (store, key, id) = (
            self.store.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.id),
        );
        // Release promptly; if Redis is down, the lease expires by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _: Result<i64, ()> = store
                    .call(|mut conn| async move { redis::cmd("ZREM").arg(&key).arg(&id).query_async(&mut conn).await })
                    .await;
            });
        }
    }
}

async fn renew_while_held(store: std::sync::Weak<SharedStore>, key: String, id: String) {
    loop {
        let Some(lease) = store.upgrade().map(|s| s.lease) else {
            return;
        };
        tokio::time::sleep(lease / 3).await;
        let Some(store) = store.upgrade() else { return };
        let mut invocation = store.renew.key(&key);
        invocation.arg(lease.as_millis() as u64).arg(&id);
        let renewed: Result<i64, ()> = store
            .call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await;
        if renewed == Ok(0) {
            tracing::debug!(
                "a shared slot's lease expired while held (Redis was unreachable for longer than the lease)"
            );
            return;
        }
    }
}
