//! `[limits.shared]`: one limit across proxy processes through a real `redis-server`, slots of
//! a killed replica freed after `lease`, and prompt answers when Redis goes away.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::servers::Redis;
use support::*;

fn replica_config(upstream: &TestUpstream, key_file: &std::path::Path, redis: &Redis, extra: &str) -> String {
    proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        key_file,
        &format!(
            "[[limits.class]]\nname = \"tts\"\npaths = [\"/waves/v1/lightning\", \"/hang\"]\nmax_concurrent = 1\n{extra}\n[limits.shared]\nredis_url = \"{}\"\nlease = \"2s\"\n[log]\nlevel = \"info\"\n",
            redis.url()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_never_let_two_requests_through() {
    let redis = Redis::start();
    let upstream = TestUpstream::start().await;
    upstream.state.concurrency_limit.store(1, Ordering::SeqCst);
    upstream.state.work_ms.store(15, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(&upstream, &key_file(&dir), &redis, "");
    let replicas: Vec<_> = (0..3).map(|_| ProxyProcess::spawn(&config, &[])).collect();
    for replica in &replicas {
        replica.wait_for_log("shared limits in effect", 1, Duration::from_secs(10));
    }
    let requests: Vec<_> = (0..30)
        .map(|i| {
            let url = replicas[i % 3].url("/waves/v1/lightning-v2/get_speech");
            tokio::spawn(async move { get(&url).await.0 })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(
        upstream.state.max_in_flight.load(Ordering::SeqCst),
        1,
        "two replicas let requests through at once"
    );
    assert_eq!(upstream.state.rejected_429.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_holds_its_slot_no_longer_than_the_lease() {
    let redis = Redis::start();
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(&upstream, &key_file(&dir), &redis, "queue_timeout = \"20s\"");
    let mut doomed = ProxyProcess::spawn(&config, &[]);
    let survivor = ProxyProcess::spawn(&config, &[]);
    doomed.wait_for_log("shared limits in effect", 1, Duration::from_secs(10));
    survivor.wait_for_log("shared limits in effect", 1, Duration::from_secs(10));

    // The doomed replica takes the one slot with a request the upstream holds, then dies
    // without releasing it.
    let url: http::Uri = doomed.url("/hang").parse().unwrap();
    // Its client sees the connection die with the replica; that is expected.
    let _held = tokio::spawn(async move { support::client().get(url).await.is_ok() });
    upstream.state.wait_arrivals(1).await;
    doomed.signal(libc::SIGKILL);
    let _ = doomed.child.wait();

    // The dead slot is in Redis (the limit is shared), and by Redis' own clock its lease ends
    // no later than one lease from now: nothing renews it any more.
    let remaining = dead_lease_remaining(&redis).await;
    let read_at = Instant::now();
    assert!(
        remaining <= Duration::from_secs(2),
        "the dead slot's lease ends {remaining:?} from now, past the 2s lease"
    );

    // Same class, a path the upstream answers at once: it waits for the dead slot, and only
    // for it.
    let (status, _, _) = get(&survivor.url("/waves/v1/lightning/get_voices")).await;
    assert_eq!(status, 200);
    let blocked = read_at.elapsed();
    assert!(
        blocked + Duration::from_millis(20) >= remaining,
        "served after {blocked:?}, before the dead slot's lease ended ({remaining:?}): the slot was not shared"
    );
    // The survivor's queue head polls at most every 50 ms; the rest is room for a loaded machine.
    assert!(
        blocked < remaining + Duration::from_secs(3),
        "blocked {blocked:?} by a dead replica's slot whose lease ended after {remaining:?}"
    );
}

/// How long the one held slot of the `tts` class has left, by Redis' clock (zero if it has
/// already run out); panics when no slot is held in Redis.
async fn dead_lease_remaining(redis: &Redis) -> Duration {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis-server");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.expect("KEYS");
    let mut leases = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.expect("TYPE");
        if kind == "zset" {
            let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .expect("ZRANGE");
            leases.extend(members.into_iter().map(|(_, expiry)| (key.clone(), expiry)));
        }
    }
    assert_eq!(
        leases.len(),
        1,
        "expected the dead replica's one slot in Redis, found {leases:?}"
    );
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.expect("TIME");
    let now_ms = seconds * 1000 + micros / 1000;
    Duration::from_millis((leases[0].1 as u64).saturating_sub(now_ms))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopping_falls_back_to_local_limits_and_recovers() {
    let mut redis = Redis::start();
    let port = redis.port;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::spawn(&replica_config(&upstream, &key_file(&dir), &redis, ""), &[]);
    proxy.wait_for_log("shared limits in effect", 1, Duration::from_secs(10));
    assert_eq!(get(&proxy.url("/waves/v1/lightning/get_voices")).await.0, 200);

    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, _, _) = get(&proxy.url("/waves/v1/lightning/get_voices")).await;
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a request took {:?} with Redis down",
            started.elapsed()
        );
    }
    proxy.wait_for_log("redis unavailable", 1, Duration::from_secs(5));
    let fallbacks = metric(&proxy.url(""), "smallest_proxy_redis_fallbacks_total").await;
    assert!(fallbacks >= 1.0, "no fallback counted");

    let _redis = Redis::start_on(port);
    proxy.wait_for_log("shared limits in effect", 2, Duration::from_secs(15));
    assert_eq!(get(&proxy.url("/waves/v1/lightning/get_voices")).await.0, 200);
    assert_eq!(
        proxy.stderr_text().matches("redis unavailable").count(),
        1,
        "the outage was logged more than once"
    );
}

/// `max_concurrent = "auto"` in shared mode: a limit one replica learns is the limit of all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_limit_is_shared_by_the_replicas() {
    let redis = Redis::start();
    let upstream = TestUpstream::start().await;
    upstream.state.concurrency_limit.store(3, Ordering::SeqCst);
    upstream.state.work_ms.store(10, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    // No class of our own: the profile's `tts` class learns.
    let config = proxy_config_text(
        &upstream.url(),
        &upstream.pki.ca_file,
        &key_file(&dir),
        &format!(
            "[limits.shared]\nredis_url = \"{}\"\nlease = \"2s\"\n[log]\nlevel = \"info\"\n",
            redis.url()
        ),
    );
    let learner = ProxyProcess::spawn(&config, &[]);
    let follower = ProxyProcess::spawn(&config, &[]);
    for replica in [&learner, &follower] {
        replica.wait_for_log("shared limits in effect", 1, Duration::from_secs(10));
    }
    let concurrency = |body: &[u8]| json(body)["limits"]["tts"]["concurrency"].as_u64().unwrap();
    let (_, _, before) = get(&follower.url("/ready")).await;
    assert_eq!(concurrency(&before), 1);
    let requests: Vec<_> = (0..40)
        .map(|_| {
            let url = learner.url("/waves/v1/tts");
            tokio::spawn(async move { get(&url).await.0 })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    let (_, _, ready) = get(&learner.url("/ready")).await;
    let learned = concurrency(&ready);
    assert!(learned >= 2, "{}", String::from_utf8_lossy(&ready));
    // The follower takes the shared limit with its next slot.
    assert_eq!(get(&follower.url("/waves/v1/tts")).await.0, 200);
    let (_, _, ready) = get(&follower.url("/ready")).await;
    assert_eq!(concurrency(&ready), learned, "{}", String::from_utf8_lossy(&ready));
}

/// The `tts` class's queue depth on `/metrics`.
const TTS_QUEUE: &str = "smallest_proxy_limit_queue_depth{class=\"tts\"}";

/// One replica with the one shared `tts` slot and a 20 s queue, in shared mode.
fn queueing_replica(upstream: &TestUpstream, key_file: &std::path::Path, redis: &Redis) -> ProxyProcess {
    let config = replica_config(upstream, key_file, redis, "queue_timeout = \"20s\"");
    let proxy = ProxyProcess::spawn(&config, &[]);
    proxy.wait_for_log("shared limits in effect", 1, Duration::from_secs(10));
    proxy
}

/// `GET /hang?id=ID` in a task of its own (the upstream holds it until released): its status.
fn send_hang(proxy: &ProxyProcess, id: &str) -> tokio::task::JoinHandle<http::StatusCode> {
    let url = proxy.url(&format!("/hang?id={id}"));
    tokio::spawn(async move { get(&url).await.0 })
}

/// Redis stops answering while requests are queued in shared mode: the class falls back to
/// local slots, the queued requests keep their places ahead of newer arrivals (FIFO), and none
/// goes out beside the one still holding its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_when_redis_stops_keep_their_places() {
    let redis = Redis::start();
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = queueing_replica(&upstream, &key_file(&dir), &redis);
    let (base, depth) = (proxy.url(""), TTS_QUEUE);
    let send = |id: &str| send_hang(&proxy, id);
    let mut clients = vec![send("holder")];
    upstream.state.wait_arrivals(1).await;
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        clients.push(send(id));
        wait_metric(&base, depth, |d| d == (i + 1) as f64).await;
    }
    // Redis hangs (every call now takes the whole `timeout`). The holder's slot still counts
    // on this replica, so nobody is let through beside it.
    unsafe { libc::kill(redis.child.id() as i32, libc::SIGSTOP) };
    clients.push(send("d"));
    wait_metric(&base, depth, |d| d == 4.0).await;
    assert_eq!(upstream.records().len(), 1, "a request went out beside the holder");
    // Released, each goes out in its turn, giving up on Redis (the head first) and taking the
    // local slot.
    upstream.state.hold.0.add_permits(5);
    for client in clients {
        assert_eq!(client.await.unwrap(), 200);
    }
    let order: Vec<String> = upstream
        .records()
        .iter()
        .filter_map(|r| r.uri.query().map(|q| q.trim_start_matches("id=").to_string()))
        .collect();
    assert_eq!(
        order,
        ["holder", "a", "b", "c", "d"],
        "a newer arrival overtook the queue"
    );
    assert_eq!(upstream.state.max_in_flight.load(Ordering::SeqCst), 1);
    unsafe { libc::kill(redis.child.id() as i32, libc::SIGCONT) };
}

/// A limit of one holds across a switch between shared and local limits, both ways: a slot
/// taken under one mode is counted by the other, so the upstream never sees two at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_taken_in_one_mode_counts_in_the_other() {
    let mut redis = Redis::start();
    let port = redis.port;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = queueing_replica(&upstream, &key_file(&dir), &redis);
    let (base, depth) = (proxy.url(""), TTS_QUEUE);
    let send = |id: &str| send_hang(&proxy, id);

    // Shared, then local: a slot from Redis, then Redis goes away.
    let shared_holder = send("shared-holder");
    upstream.state.wait_arrivals(1).await;
    redis.stop();
    let local_waiter = send("local-waiter");
    tokio::select! {
        _ = wait_metric(&base, depth, |d| d == 1.0) => {}
        _ = upstream.state.wait_arrivals(2) => panic!("with Redis gone, a request went out beside one holding a shared slot"),
    }
    upstream.state.hold.0.add_permits(1);
    assert_eq!(shared_holder.await.unwrap(), 200);
    upstream.state.wait_arrivals(2).await;
    proxy.wait_for_log("redis unavailable", 1, Duration::from_secs(10));

    // Local, then shared: the waiter now holds a local slot when Redis comes back.
    let _redis = Redis::start_on(port);
    proxy.wait_for_log("shared limits in effect", 2, Duration::from_secs(15));
    let shared_waiter = send("shared-waiter");
    tokio::select! {
        _ = wait_metric(&base, depth, |d| d == 1.0) => {}
        _ = upstream.state.wait_arrivals(3) => panic!("with Redis back, a request went out beside one holding a local slot"),
    }
    upstream.state.hold.0.add_permits(2);
    assert_eq!(local_waiter.await.unwrap(), 200);
    assert_eq!(shared_waiter.await.unwrap(), 200);
    assert_eq!(upstream.state.max_in_flight.load(Ordering::SeqCst), 1);
}
