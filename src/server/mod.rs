//! Listeners and connections: binding TCP and Unix sockets, the accept loops, the per-connection
//! HTTP/1.1 settings, and the drain on shutdown.
//!
//! Shutdown is one `CancellationToken`: accept loops stop (and drop their sockets, so new
//! connections are refused at once), every open connection is told to finish its current
//! request and close, and the drain waits for connections and WebSocket tunnels, all spawned on
//! one `TaskTracker`, up to `drain_timeout`.
//!
//! A connection starts in [`front`], the proxy's own HTTP/1.1 loop for plain requests; the
//! first request that is not plain (an upgrade, a streamed upload, ...) hands it to hyper for
//! the rest of its life.
//!
//! Each connection's [`ConnInfo`] (transport, and the Unix peer's uid from SO_PEERCRED) is
//! handed to `App::handle` with every request. The front end keeps its own idle and head
//! deadlines; a connection handed to hyper gets an idle watchdog
//! ([`crate::timeouts::watch_connection`]) beside hyper's own timers.

pub mod admin;
pub mod app;
pub mod apps;
pub mod caller;
pub mod framing;
mod front;
pub mod guard;
pub mod policy;
pub mod request_limits;
pub mod systemd;
pub mod usage;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::config::ListenConfig;
use crate::proxy::body::ClientBody;
use crate::timeouts::{watch_connection, Activity, ActivityIo, ConnDeadline, Tracked};
use app::App;
use caller::ConnInfo;
use request_limits::RequestLimits;

/// Bound sockets, ready to serve. Binding is separate from serving so tests (and socket
/// activation) can bind port 0 and read the port back before the proxy starts.
#[derive(Debug, Default)]
pub struct Listeners {
    pub tcp: Vec<TcpListener>,
    /// With the path we created (and remove at exit); `None` for a socket inherited from
    /// systemd, whose file is not ours to remove.
    pub unix: Vec<(UnixListener, Option<PathBuf>)>,
}

impl Listeners {
    /// Bind what `[listen]` asks for.
    pub async fn bind(config: &ListenConfig) -> io::Result<Listeners> {
        let mut listeners = Listeners::default();
        if let Some(address) = config.tcp_address() {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {address}: {e}")))?;
            listeners.tcp.push(listener);
        }
        if let Some(path) = &config.unix_socket {
            let listener = bind_unix(path, config.unix_mode_bits())?;
            listeners.unix.push((listener, Some(path.clone())));
        }
        Ok(listeners)
    }

    pub fn tcp_addresses(&self) -> Vec<SocketAddr> {
        self.tcp.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.tcp_addresses().iter().map(|a| format!("http://{a}")).collect();
        parts.extend(self.unix.iter().map(|(listener, path)| match path {
            Some(path) => format!("unix:{}", path.display()),
            None => format!(
                    "unix:{:?} (inherited)",
                    listener
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
                ),
        }));
        parts.join(", ")
    }
}

/// Bind a Unix socket so that it never exists at `path` with the wrong permissions: bind it in
/// a fresh 0700 directory beside `path` (nobody else can connect there), set its mode, then
/// rename it into place (atomic, and it replaces a stale socket in the same step). A socket a
/// live process is serving on is never replaced, nor anything that is not a socket.
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display()));
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; not replacing it", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another process is serving on {}", path.display()),
            ));
        }
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a socket file", path.display()),
        )
    })?;
    let private_dir = parent.join(format!(
        ".{}.{}-{:08x}",
        file_name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)
        .map_err(named)?;
    let staged = private_dir.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private_dir);
    bound.map_err(named)
}

/// Serve until `shutdown` is cancelled, then drain for up to `drain_timeout`.
pub async fn serve(app: Arc<App>, listeners: Listeners, shutdown: CancellationToken, config: &ListenConfig) {
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let settings = ConnSettings {
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        limits: RequestLimits::from_config(config),
    };
    // Every accept loop shares the app, the connection tracker, the slot limit and shutdown.
    let new_ctx = || AcceptCtx {
        app: app.clone(),
        connections: connections.clone(),
        slots: slots.clone(),
        shutdown: shutdown.clone(),
        settings,
    };
    let mut accept_loops = Vec::new();
    for listener in listeners.tcp {
        let ctx = new_ctx();
        accept_loops.push(tokio::spawn(async move {
            accept_loop(ctx, || async {
                listener.accept().await.map(|(s, _)| {
                    // Responses are written whole or as events arrive, never in pieces to be
                    // joined: Nagle's algorithm would only delay the next SSE event.
                    let _ = s.set_nodelay(true);
                    (s, ConnInfo::tcp())
                })
            })
            .await
        }));
    }
    for (listener, path) in listeners.unix {
        let ctx = new_ctx();
        accept_loops.push(tokio::spawn(async move {
            accept_loop(ctx, || async {
                listener.accept().await.map(|(s, _)| {
                    let info = ConnInfo::unix(&s);
                    tracing::debug!(
                        peer_uid = info.peer_uid,
                        peer_pid = info.peer_pid,
                        "unix socket client connected"
                    );
                    (s, info)
                })
            })
            .await;
            if let Some(path) = path {
                let _ = std::fs::remove_file(&path);
            }
        }));
    }
    for accept in accept_loops {
        let _ = accept.await;
    }
    // Listeners are closed now; let what is in flight finish.
    connections.close();
    let open = connections.len();
    if open > 0 {
        tracing::info!(open, drain_timeout = %humantime::format_duration(config.drain_timeout), "draining open connections");
    }
    if tokio::time::timeout(config.drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "drain timeout reached; closing what is still open"
        );
    }
}

#[derive(Clone, Copy)]
pub(crate) struct ConnSettings {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    limits: RequestLimits,
}

struct AcceptCtx {
    app: Arc<App>,
    connections: TaskTracker,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    settings: ConnSettings,
}

async fn accept_loop<S, F, Fut>(ctx: AcceptCtx, mut accept: F)
where
    S: front::Socket,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<(S, ConnInfo)>>,
{
    loop {
        // Take a connection slot before accepting: past max_connections, clients wait in the
        // kernel backlog instead of being accepted and starved.
        let slot = tokio::select! {
            slot = ctx.slots.clone().acquire_owned() => match slot { Ok(s) => s, Err(_) => return },
            _ = ctx.shutdown.cancelled() => return,
        };
        let stream = tokio::select! {
            accepted = accept() => accepted,
            _ = ctx.shutdown.cancelled() => return,
        };
        match stream {
            Ok((stream, conn)) => {
                let app = ctx.app.clone();
                let shutdown = ctx.shutdown.clone();
                let settings = ctx.settings;
                ctx.connections.spawn(async move {
                    serve_connection(stream, app, conn, shutdown, settings).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection<S: front::Socket>(
    stream: S,
    app: Arc<App>,
    conn: ConnInfo,
    shutdown: CancellationToken,
    settings: ConnSettings,
) {
    match front::serve(stream, &app, conn, &shutdown, &settings).await {
        front::Outcome::Done => {}
        // Boxed: a connection the front end serves keeps only its own (small) state.
        front::Outcome::HandOff(stream, prefix) => {
            Box::pin(serve_with_hyper(
                front::Rewind::new(stream, prefix),
                app,
                conn,
                shutdown,
                settings,
            ))
            .await
        }
    }
}

/// Serve the connection with hyper from here on (see [`front`] for when).
async fn serve_with_hyper<S>(
    stream: S,
    app: Arc<App>,
    conn: ConnInfo,
    shutdown: CancellationToken,
    settings: ConnSettings,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::for_connection();
    let service_activity = activity.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let app = app.clone();
        // Held from here until hyper has written (or dropped) the response body.
        let in_flight = service_activity.request_started();
        async move {
            // Boxed: hyper keeps a slot for this future in every connection for its whole
            // life, sized by the future (~1.1 KiB, the parts past that are boxed inside
            // Proxy::handle), and moves it there per request. Boxed, an idle keep-alive
            // connection holds a pointer and the request's state exists only while it runs.
            let response = Box::pin(app.handle(req.map(ClientBody::Streaming), conn)).await;
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper re-arms this the moment a connection goes idle, so alone it would also be the
        // keep-alive limit; the watchdog below keeps the two apart, this is the outer bound.
        .header_read_timeout(settings.header_read_timeout + settings.idle_timeout)
        .max_headers(settings.limits.parser_max_headers())
        .max_header_size(settings.limits.parser_max_head_bytes())
        .keep_alive(true);
    let io = ActivityIo::new(stream, activity.clone());
    let connection = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(connection);
    // Its own task: inside this select! it was polled with every poll of the connection
    // (~250 instructions each, ~4 per request); a finished task's handle is cheaper to ask.
    let mut watchdog = AbortOnDropHandle::new(tokio::spawn(async move {
        watch_connection(&activity, settings.idle_timeout, settings.header_read_timeout).await
    }));
    let result = tokio::select! {
        result = connection.as_mut() => result,
        deadline = &mut watchdog => match deadline {
            // The watchdog cannot panic; if it ever did, the connection keeps hyper's bounds.
            Err(_) => connection.await,
            Ok(ConnDeadline::Idle) => {
                // No request in progress: this closes at once.
                tracing::debug!("client connection idle; closing");
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            Ok(ConnDeadline::HeaderRead) => {
                tracing::debug!("client did not send its request head in time; closing");
                return;
            }
        },
        _ = shutdown.cancelled() => {
            // Finish the request in progress (an SSE stream runs to its end), then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}
