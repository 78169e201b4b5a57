//! The two systemd protocols, spoken directly (no libsystemd link): readiness notification
//! (`NOTIFY_SOCKET`: `READY=1`, `STATUS=`, `STOPPING=1`, `WATCHDOG=1`) and socket activation
//! (`LISTEN_PID`/`LISTEN_FDS`: listening sockets inherited from a `.socket` unit or
//! `systemd-socket-activate`). Both are a few lines of well-specified protocol (sd_notify(3),
//! sd_listen_fds(3)), so they are written here rather than pulled in as crates.
//! Outside systemd (and so on macOS) every function here is a no-op.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use super::Listeners;

/// First inherited descriptor (sd_listen_fds(3)).
const SD_LISTEN_FDS_START: RawFd = 3;

/// Send one notification (several `KEY=value` lines) to the service manager, if there is one.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            send_abstract(&socket, name, state)
        } else {
            socket.send_to(state.as_bytes(), &path).map(drop)
        }
    })();
    if let Err(e) = result {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// An abstract socket name (`@name`): a Linux feature, as is systemd.
#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &addr).map(drop)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist on Linux only",
    ))
}

/// `WATCHDOG_USEC` (when meant for this process): ping at half the interval until the runtime
/// stops. A hung runtime stops pinging, which is the point.
pub fn spawn_watchdog() {
    let Some(usec) = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|v| v.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return;
        }
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        loop {
            notify("WATCHDOG=1");
            tokio::time::sleep(every).await;
        }
    });
}

/// Listening sockets passed by systemd, taken before the async runtime starts (so the
/// environment is changed while the process has one thread); [`Inherited::into_listeners`]
/// then hands them to tokio inside the runtime.
pub struct Inherited {
    tcp: Vec<std::net::TcpListener>,
    unix: Vec<std::os::unix::net::UnixListener>,
}

impl Inherited {
    pub fn into_listeners(self) -> io::Result<Listeners> {
        let mut listeners = Listeners::default();
        for listener in self.tcp {
            listeners.tcp.push(tokio::net::TcpListener::from_std(listener)?);
        }
        for listener in self.unix {
            // No path: the socket file belongs to systemd and must outlive us.
            listeners
                .unix
                .push((tokio::net::UnixListener::from_std(listener)?, None));
        }
        Ok(listeners)
    }
}

/// The sockets systemd passed, or `None` when the process was not socket-activated. The
/// variables are removed so that nothing we spawn inherits them.
pub fn inherited_sockets() -> io::Result<Option<Inherited>> {
    let for_us = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<RawFd>().ok())
        .unwrap_or(0);
    // SAFETY (remove_var): called once at start, before the runtime's threads exist.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if !for_us || count <= 0 {
        return Ok(None);
    }
    let mut inherited = Inherited {
        tcp: Vec::new(),
        unix: Vec::new(),
    };
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count {
        match socket_family(fd)? {
            libc::AF_INET | libc::AF_INET6 => {
                // SAFETY: systemd hands us this descriptor as a listening socket we now own.
                let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
                std_listener.set_nonblocking(true)?;
                inherited.tcp.push(std_listener);
            }
            libc::AF_UNIX => {
                // SAFETY: as above.
                let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
                std_listener.set_nonblocking(true)?;
                inherited.unix.push(std_listener);
            }
            family => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("inherited descriptor {fd} is neither TCP nor a Unix socket (family {family})"),
                ))
            }
        }
    }
    Ok(Some(inherited))
}

fn socket_family(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: getsockname writes at most `len` bytes into the zeroed storage we own.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(libc::c_int::from(storage.ss_family))
    }
}
