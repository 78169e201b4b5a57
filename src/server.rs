//! Listeners and connections: binding TCP and Unix sockets, the accept loops, the per-connection
//! HTTP/1.1 settings, and the drain on shutdown.
//!
//! Shutdown is one `CancellationToken`: accept loops stop (and drop their sockets, so new
//! connections are refused at once), every open connection is told to finish its current
//! request and close, and the drain waits for connections and WebSocket tunnels, all spawned on
//! one `TaskTracker`, up to `drain_timeout`.

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenConfig;
use crate::proxy::framing::{self, FramingTap};
use crate::proxy::guard::Transport;
use crate::App;

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

/// Bind a Unix socket, replacing a stale one left by a crashed run but never one a live process
/// is serving on, then set its mode.
fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
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
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Serve until `shutdown` is cancelled, then drain for up to `drain_timeout`.
pub async fn serve(app: Arc<App>, listeners: Listeners, shutdown: CancellationToken, config: &ListenConfig) {
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let settings = ConnSettings {
        header_read_timeout: config.header_read_timeout,
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
            accept_loop(ctx, Transport::Tcp, || async {
                listener.accept().await.map(|(s, _)| s)
            })
            .await
        }));
    }
    for (listener, path) in listeners.unix {
        let ctx = new_ctx();
        accept_loops.push(tokio::spawn(async move {
            accept_loop(ctx, Transport::Unix, || async {
                listener.accept().await.map(|(s, _)| s)
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
struct ConnSettings {
    header_read_timeout: Duration,
}

struct AcceptCtx {
    app: Arc<App>,
    connections: TaskTracker,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    settings: ConnSettings,
}

async fn accept_loop<S, F, Fut>(ctx: AcceptCtx, transport: Transport, mut accept: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<S>>,
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
            Ok(stream) => {
                let app = ctx.app.clone();
                let shutdown = ctx.shutdown.clone();
                let settings = ctx.settings;
                ctx.connections.spawn(async move {
                    serve_connection(stream, app, transport, shutdown, settings).await;
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

async fn serve_connection<S>(
    stream: S,
    app: Arc<App>,
    transport: Transport,
    shutdown: CancellationToken,
    settings: ConnSettings,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Framing hyper would resolve silently (CL+TE, duplicate CL) is refused before anything else.
    let (stream, verdicts) = FramingTap::new(stream);
    let service = service_fn(move |req| {
        let app = app.clone();
        let refusal = verdicts.take().map(|reason| framing::refuse(reason, &req));
        async move {
            Ok::<_, Infallible>(match refusal {
                Some(refusal) => refusal,
                None => app.handle(req, transport).await,
            })
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
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
