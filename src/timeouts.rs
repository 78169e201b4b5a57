//! Idle deadlines the proxy keeps itself, where hyper has none or the wrong one.
//!
//! - Client connections. hyper 1.x starts its `header_read_timeout` the moment a connection
//!   goes idle (proto/h1/conn.rs `State::idle` re-arms it for the next head), so with hyper
//!   alone a keep-alive connection is closed after the header timeout (10 s), and there is no
//!   separate idle timeout. [`watch_connection`] keeps both deadlines apart: a connection with
//!   no request in progress and no bytes arriving is closed after `listen.idle_timeout`; once
//!   the first byte of a request head arrives, the head must be complete within
//!   `listen.header_read_timeout` (slowloris). hyper's own timer stays set, at the sum of the
//!   two, as the outer bound.
//! - Upstream streams. A response body (SSE, streamed audio) has no total deadline, but
//!   [`IdleTimer`] cuts it after `upstream.stream_idle_timeout` without a frame; a WebSocket
//!   tunnel is cut after the same time with no byte in either direction ([`until_idle`]).
//!
//! The bookkeeping is one shared [`Activity`] per connection or tunnel: atomics stamped by an
//! IO wrapper, and a `Notify` that wakes the watchdog only when a change brings its deadline
//! forward (a head started, a request ended while it waits for none), never on every read. On
//! a keep-alive connection under steady load that is no wake-up and one clock read per
//! request: the watchdog publishes when it will wake next ([`Activity`] `wake_at`); a request
//! starting only removes the deadline, and a later one re-arms at or after it, so the watchdog
//! finds the new state when it wakes by itself. Client connections stamp no time per read or
//! write (their idle deadline counts from the end of the last request); tunnels do.

use pin_project_lite::pin_project;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Sentinel for "no byte read since the connection went idle".
const NONE: u64 = u64::MAX;
/// `wake_at` while the watchdog is working out its next deadline (or none runs): any change
/// wakes it.
const COMPUTING: u64 = 0;
/// `wake_at` while the watchdog waits with no deadline (a request in progress).
const PARKED: u64 = u64::MAX;

/// When bytes last moved on one connection or tunnel, and (client connections) whether a
/// request is in progress.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    /// Milliseconds since `base` of the last read or write.
    last_io: AtomicU64,
    /// Milliseconds since `base` at which the connection last went idle (no request).
    idle_since: AtomicU64,
    /// Milliseconds since `base` of the first byte read since then, or `NONE`.
    first_read_since_idle: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds since `base` at which the watchdog wakes next, or `COMPUTING`/`PARKED`.
    wake_at: AtomicU64,
    /// The watchdog's deadlines in milliseconds, so a change can tell whether it moves the
    /// next wake-up forward.
    idle_ms: AtomicU64,
    header_ms: AtomicU64,
    /// Stamp `last_io` on every read and write (tunnels); client connections do not need it.
    stamp_io: bool,
    changed: Notify,
}

impl Activity {
    /// For a tunnel: every read and write stamps the time ([`until_idle`]).
    pub fn new() -> Arc<Activity> {
        Activity::with_stamping(true)
    }

    /// For a client connection ([`watch_connection`]): reads and writes stamp nothing; the
    /// idle deadline counts from the end of the last request.
    pub fn for_connection() -> Arc<Activity> {
        Activity::with_stamping(false)
    }

    fn with_stamping(stamp_io: bool) -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            last_io: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            first_read_since_idle: AtomicU64::new(NONE),
            in_flight: AtomicUsize::new(0),
            wake_at: AtomicU64::new(COMPUTING),
            idle_ms: AtomicU64::new(0),
            header_ms: AtomicU64::new(0),
            stamp_io,
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn on_read(&self) {
        if self.stamp_io {
            self.last_io.store(self.now_ms(), Ordering::Relaxed);
        }
        // The first byte of a head: the header deadline starts (one clock read per request).
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.first_read_since_idle.load(Ordering::Relaxed) == NONE {
            let now = self.now_ms();
            if self
                .first_read_since_idle
                .compare_exchange(NONE, now, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                self.nudge(now.saturating_add(self.header_ms.load(Ordering::Relaxed)));
            }
        }
    }

    fn on_write(&self) {
        if self.stamp_io {
            self.last_io.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Wake the watchdog if `deadline_ms` comes before the wake-up it is sleeping towards.
    fn nudge(&self, deadline_ms: u64) {
        let wake_at = self.wake_at.load(Ordering::SeqCst);
        if wake_at == COMPUTING || deadline_ms < wake_at {
            self.changed.notify_one();
        }
    }

    /// A request is being served until the returned guard drops (put it in the response
    /// body, so it lives until the body is written or abandoned). No wake-up: a request in
    /// progress only removes the deadline, which the watchdog sees when it next wakes.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// The last time bytes moved.
    pub fn last_io(&self) -> Instant {
        self.at(self.last_io.load(Ordering::Relaxed))
    }
}

/// Marks a request in progress on its connection.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            let now = activity.now_ms();
            activity.idle_since.store(now, Ordering::Relaxed);
            activity.first_read_since_idle.store(NONE, Ordering::SeqCst);
            activity.nudge(now.saturating_add(activity.idle_ms.load(Ordering::Relaxed)));
        }
    }
}

pin_project! {
    /// An IO stream that stamps `Activity` on every read and write that moves bytes.
    pub struct ActivityIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> ActivityIo<T> {
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead> AsyncRead for ActivityIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for ActivityIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

pin_project! {
    /// A response body on a client connection, marking its request in progress until hyper
    /// has written it (or dropped it), for the connection's idle deadline.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        in_flight: InFlight,
    }
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked { inner, in_flight }
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why [`watch_connection`] gave up on a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnDeadline {
    /// No request in progress and no bytes for `idle_timeout`: close it politely.
    Idle,
    /// A request head was started but not finished in time: drop it.
    HeaderRead,
}

/// Resolve when a client connection has passed one of its deadlines; pending forever while a
/// request is in progress (its body and response have their own bounds).
pub async fn watch_connection(activity: &Activity, idle_timeout: Duration, header_timeout: Duration) -> ConnDeadline {
    let idle_ms = idle_timeout.as_millis().try_into().unwrap_or(u64::MAX);
    let header_ms = header_timeout.as_millis().try_into().unwrap_or(u64::MAX);
    activity.idle_ms.store(idle_ms, Ordering::Relaxed);
    activity.header_ms.store(header_ms, Ordering::Relaxed);
    loop {
        // Any change wakes us while the state is read; then only one that comes before the
        // published wake-up does (`Activity::nudge`). Registered before reading the state, so
        // a change in between is not missed.
        activity.wake_at.store(COMPUTING, Ordering::SeqCst);
        let changed = activity.changed.notified();
        let first_read = activity.first_read_since_idle.load(Ordering::SeqCst);
        let (wake_ms, verdict) = if activity.in_flight.load(Ordering::SeqCst) > 0 {
            // No deadline while a request is in progress. Parked, the end of the request would
            // have to wake us; instead sleep on to the header deadline of its head and look
            // again then: with keep-alive traffic that is one wake-up per header timeout,
            // not two per request.
            match first_read {
                NONE => (PARKED, None),
                first => (first.saturating_add(header_ms), None),
            }
        } else {
            match first_read {
                NONE => {
                    let since = activity
                        .idle_since
                        .load(Ordering::Relaxed)
                        .max(activity.last_io.load(Ordering::Relaxed));
                    (since.saturating_add(idle_ms), Some(ConnDeadline::Idle))
                }
                first => (first.saturating_add(header_ms), Some(ConnDeadline::HeaderRead)),
            }
        };
        let wake = (wake_ms != PARKED).then(|| activity.at(wake_ms));
        let now = Instant::now();
        match (wake, verdict) {
            (Some(at), Some(verdict)) if at <= now => return verdict,
            (Some(at), _) if at > now => {
                activity.wake_at.store(wake_ms.max(COMPUTING + 1), Ordering::SeqCst);
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = changed => {}
                }
            }
            // In progress past its header deadline, or with no head read: until it ends.
            _ => {
                activity.wake_at.store(PARKED, Ordering::SeqCst);
                changed.await
            }
        }
    }
}

/// Resolve once no byte has moved for `timeout` (WebSocket tunnels).
pub async fn until_idle(activity: &Activity, timeout: Duration) {
    loop {
        let deadline = activity.last_io() + timeout;
        if deadline <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A per-body idle deadline, reset by every frame.
///
/// The timer itself is armed only while the body waits: a frame just notes the time, and
/// `poll_expired` (called when the upstream has nothing yet) arms or moves the timer to that
/// time plus the timeout. A small response that arrives whole never touches the timer wheel,
/// and a stream re-arms it at most once per wait, not once per frame.
#[derive(Debug)]
pub struct IdleTimer {
    timeout: Duration,
    last_frame: Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleTimer {
    pub fn new(timeout: Duration) -> IdleTimer {
        IdleTimer {
            timeout,
            last_frame: Instant::now(),
            sleep: None,
        }
    }

    pub fn reset(&mut self) {
        self.last_frame = Instant::now();
    }

    /// True once the deadline has passed (registers a wake-up otherwise).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last_frame + self.timeout;
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        sleep.as_mut().poll(cx).is_ready()
    }

    pub fn error(&self) -> StreamIdle {
        StreamIdle(self.timeout)
    }
}

/// The error a body ends with when its upstream went quiet for too long.
#[derive(Debug, thiserror::Error)]
#[error("no data from the upstream for {}; stream cut (upstream.stream_idle_timeout)", humantime::format_duration(*.0))]
pub struct StreamIdle(pub Duration);

#[cfg(test)]
mod tests {
    use super::*;

    // Paused tokio time: the deadlines are exercised without real waiting or timing asserts.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_passes_its_idle_deadline() {
        let activity = Activity::new();
        let verdict = watch_connection(&activity, Duration::from_secs(60), Duration::from_secs(10)).await;
        assert_eq!(verdict, ConnDeadline::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_gets_the_header_deadline_and_a_request_none() {
        let activity = Activity::new();
        activity.on_read();
        let verdict = watch_connection(&activity, Duration::from_secs(60), Duration::from_secs(10)).await;
        assert_eq!(verdict, ConnDeadline::HeaderRead);

        let activity = Activity::new();
        let request = activity.request_started();
        let watch = watch_connection(&activity, Duration::from_secs(1), Duration::from_secs(1));
        tokio::pin!(watch);
        // A request in progress: no deadline however long it takes.
        assert!(tokio::time::timeout(Duration::from_secs(3600), watch.as_mut())
            .await
            .is_err());
        drop(request);
        assert_eq!(watch.await, ConnDeadline::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_started_while_the_watchdog_sleeps_towards_the_idle_deadline_wakes_it() {
        let activity = Activity::for_connection();
        let watch = watch_connection(&activity, Duration::from_secs(3600), Duration::from_secs(10));
        tokio::pin!(watch);
        // The watchdog is asleep until the idle deadline, an hour away.
        assert!(tokio::time::timeout(Duration::from_secs(60), watch.as_mut())
            .await
            .is_err());
        activity.on_read();
        // The header deadline (10 s) comes first, so the first byte woke the watchdog.
        let verdict = tokio::time::timeout(Duration::from_secs(60), watch).await;
        assert_eq!(verdict.ok(), Some(ConnDeadline::HeaderRead));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_ends_without_waking_the_watchdog_still_gets_its_idle_deadline() {
        let activity = Activity::for_connection();
        let watch = watch_connection(&activity, Duration::from_secs(30), Duration::from_secs(10));
        tokio::pin!(watch);
        assert!(tokio::time::timeout(Duration::from_secs(1), watch.as_mut())
            .await
            .is_err());
        // A head, and its request started before the watchdog looked.
        activity.on_read();
        let request = activity.request_started();
        assert!(tokio::time::timeout(Duration::from_secs(1), watch.as_mut())
            .await
            .is_err());
        // Ends while the watchdog sleeps towards the header deadline: no wake-up needed, the
        // idle deadline is found when it wakes.
        drop(request);
        let verdict = tokio::time::timeout(Duration::from_secs(120), watch).await;
        assert_eq!(verdict.ok(), Some(ConnDeadline::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_ending_after_the_header_deadline_restarts_the_idle_clock() {
        let activity = Activity::for_connection();
        let watch = watch_connection(&activity, Duration::from_secs(30), Duration::from_secs(10));
        tokio::pin!(watch);
        activity.on_read();
        let request = activity.request_started();
        // Past the header deadline with the request in progress: no verdict.
        assert!(tokio::time::timeout(Duration::from_secs(20), watch.as_mut())
            .await
            .is_err());
        drop(request);
        // Idle again: the next head gets its own header deadline, not the old one.
        activity.on_read();
        let verdict = tokio::time::timeout(Duration::from_secs(60), watch).await;
        assert_eq!(verdict.ok(), Some(ConnDeadline::HeaderRead));
    }
}
