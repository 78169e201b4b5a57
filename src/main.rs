//! The command line: parse arguments, load the config, set up logging and signals, and hand
//! over to [`smallest_proxy::run`]. Nothing else lives here.
//!
//! Exit codes: 0 success, 1 a bad config or a runtime failure, 2 no key configured (and
//! command-line usage errors, as clap reports them).

use anyhow::Context;
use clap::{Parser, Subcommand};
use smallest_proxy::config::{Config, KeySourceKind, LogFormat, CONFIG_PATH_ENV};
use smallest_proxy::keys::{fingerprint, keyring};
use smallest_proxy::reload::{LogControl, ReloadSource, SetLogLevel};
use smallest_proxy::service::{FileState, Manager};
use smallest_proxy::Listeners;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the platform allocator: the request path allocates and frees dozens of
/// small buffers per request, and glibc's malloc/free were ~5% of the proxy's CPU under load
/// (benches/PROFILE.md has the before and after).
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// mimalloc, called the cheap way. The `mimalloc` crate's own `GlobalAlloc` passes every
/// request through `mi_malloc_aligned`, whose generic path cost ~4% of the proxy's
/// instructions; plain `mi_malloc` already guarantees [`MI_MAX_ALIGN`], which is all but a few
/// Rust types ask for.
struct Allocator;

/// mimalloc's guaranteed alignment on 64-bit targets (`MI_MAX_ALIGN_SIZE`).
const MI_MAX_ALIGN: usize = 16;

// SAFETY: every path returns memory from mimalloc with at least the layout's alignment (plain
// calls only when the alignment is within what mimalloc always guarantees), and frees it with
// mimalloc's own free.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= MI_MAX_ALIGN {
            libmimalloc_sys::mi_malloc(layout.size()).cast()
        } else {
            libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= MI_MAX_ALIGN {
            libmimalloc_sys::mi_zalloc(layout.size()).cast()
        } else {
            libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MI_MAX_ALIGN {
            libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

/// The binary's only libm function, from the `libm` crate instead of libm.so. The AWS SDK's
/// retry back-off calls `pow` and nothing else here needs libm, so with `pow` defined in the
/// binary the linker (`--as-needed`) leaves libm.so out and the process maps none of it:
/// ~480 KiB less resident at idle (benches/PROFILE.md). musl links its `pow` statically anyway.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[no_mangle]
pub extern "C" fn pow(base: f64, exponent: f64) -> f64 {
    libm::pow(base, exponent)
}

#[derive(Parser)]
#[command(
    name = "smallest-proxy",
    version,
    about = "Call the Smallest AI APIs through a local proxy that holds the key"
)]
struct Cli {
    /// TOML config file (see proxy.toml.example). Without one: 127.0.0.1:8787, key from SMALLEST_API_KEY.
    #[arg(long, short, env = CONFIG_PATH_ENV, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config and print the effective settings (no secrets), then exit.
    Check,
    /// Ask a running proxy for /health; exit 0 when healthy (for container HEALTHCHECKs).
    Health {
        /// Where to ask; defaults to the configured listen address.
        #[arg(long)]
        url: Option<String>,
    },
    /// The key in the OS keychain (`[key] source = "keyring"`), and the configured key's status.
    Key {
        #[command(subcommand)]
        action: KeyCommand,
    },
    /// The per-user service: a launchd agent on macOS, a systemd user unit on Linux.
    Service {
        #[command(subcommand)]
        action: ServiceCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Store the key in the OS keychain, read from standard input (never from the command line;
    /// not echoed on a terminal), and print its fingerprint.
    Set {
        /// Keychain service name; default: [key.keyring] service, or "smallest-proxy".
        #[arg(long)]
        service: Option<String>,
        /// Keychain account name; default: [key.keyring] account, or "default".
        #[arg(long)]
        account: Option<String>,
    },
    /// Print the configured key source and the fingerprint of the key it holds now.
    Status,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Write the service files for the current user (and only those) and say how to start them.
    Install {
        #[arg(long, value_enum, default_value_t = ManagerArg::native())]
        manager: ManagerArg,
    },
    /// Remove exactly the files `service install` wrote.
    Uninstall {
        #[arg(long, value_enum, default_value_t = ManagerArg::native())]
        manager: ManagerArg,
    },
    /// Show which service files are installed and whether the service manager runs them
    /// (exit 0 when installed, 3 when not).
    Status {
        #[arg(long, value_enum, default_value_t = ManagerArg::native())]
        manager: ManagerArg,
    },
}

/// Which service manager's files (default: this OS's).
#[derive(Clone, Copy, clap::ValueEnum)]
enum ManagerArg {
    Launchd,
    Systemd,
}

impl ManagerArg {
    fn native() -> ManagerArg {
        match Manager::native() {
            Manager::Launchd => ManagerArg::Launchd,
            Manager::Systemd => ManagerArg::Systemd,
        }
    }
}

fn main() -> ExitCode {
    harden_process();
    let cli = Cli::parse();
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::load(cli.config.as_deref(), &vars) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            // The same refusal as `run`, so a green check means the proxy would start.
            if let Some(message) = missing_key_source(&config) {
                eprintln!("{message}");
                return ExitCode::from(2);
            }
            print_check(&config, cli.config.as_deref());
            if !config.route.is_empty() {
                println!("# routing table (longest prefix first; a prefix matches itself and paths under it)");
                for line in smallest_proxy::config::routing_table(&config).lines() {
                    println!("#   {line}");
                }
            }
            ExitCode::SUCCESS
        }
        Command::Health { url } => health(url, &config),
        Command::Key {
            action: KeyCommand::Set { service, account },
        } => key_set(&config, service, account),
        Command::Key {
            action: KeyCommand::Status,
        } => key_status(&config),
        Command::Service { action } => service(action, cli.config.as_deref()),
        Command::Run => {
            if let Some(message) = missing_key_source(&config) {
                eprintln!("{message}");
                return ExitCode::from(2);
            }
            let log = init_logging(&config);
            for name in smallest_proxy::config::ignored_service_links(&vars) {
                tracing::debug!(variable = %name, "ignoring a Kubernetes service-link variable (not a config override)");
            }
            let reload_from = ReloadFrom {
                config_path: cli.config.clone(),
                vars,
                log,
            };
            match run(config, reload_from) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `run` and `check` refuse a config whose key comes from an unset variable (exit 2).
fn missing_key_source(config: &Config) -> Option<String> {
    let unset =
        config.key.source == KeySourceKind::Env && std::env::var_os(&config.key.env).is_none_or(|v| v.is_empty());
    unset.then(|| {
        format!(
            "error: {} is not set: export {}=<your Smallest API key>, or pass --config FILE with a [key] source",
            config.key.env, config.key.env
        )
    })
}

/// `check`'s report: the effective config (every value, defaults included), what unset
/// options mean, the limit classes after inheritance, and the path policy's rules.
fn print_check(config: &Config, path: Option<&std::path::Path>) {
    println!(
        "# effective configuration ({})",
        path.map_or("defaults and environment".to_string(), |p| p.display().to_string())
    );
    print!("{}", config.to_toml());
    println!();
    println!("# in effect:");
    match config.listen.tcp_address() {
        Some(address) => println!("#   listen: http://{address}"),
        None => println!("#   listen: no TCP listener"),
    }
    if let Some(socket) = &config.listen.unix_socket {
        println!("#   listen: unix socket {}", socket.display());
    }
    println!(
        "#   request bodies: {}",
        config
            .listen
            .max_body_size
            .map_or("no size cap".to_string(), |n| format!("at most {n} bytes"))
    );
    println!(
        "#   admin endpoints: {}",
        config
            .admin
            .address
            .as_deref()
            .map_or("on the main listener".to_string(), |a| format!("http://{a}"))
    );
    let key_place = match config.key.source {
        KeySourceKind::Env => format!("environment variable {}", config.key.env),
        KeySourceKind::File => format!(
            "file {}",
            config
                .key
                .file
                .as_deref()
                .map_or("?".into(), |p| p.display().to_string())
        ),
        _ => format!("{:?} source", config.key.source).to_ascii_lowercase(),
    };
    println!("#   key: from the {key_place}");
    println!("# apps (usage per app, /usage):");
    for line in smallest_proxy::config::describe_apps(&config.apps, config.listen.require_app) {
        println!("#   {line}");
    }
    println!("# limit classes in force (your classes' paths first, then the profile's; 0 = unlimited):");
    for line in config.limits.describe_classes() {
        println!("#   {line}");
    }
    let preset = smallest_proxy::server::policy::preset_rules(&config.policy);
    if preset.is_empty() && config.policy.allow.is_empty() && config.policy.deny.is_empty() {
        println!("# path policy: none (every path is forwarded)");
    } else {
        println!("# path policy (a deny rule refuses; else an allow rule must match):");
        for rule in &config.policy.deny {
            println!("#   deny  {rule}");
        }
        for rule in preset {
            println!("#   allow {rule}   (preset)");
        }
        for rule in &config.policy.allow {
            println!("#   allow {rule}");
        }
    }
}

/// What a SIGHUP reload re-reads: the same file and environment as at start.
struct ReloadFrom {
    config_path: Option<PathBuf>,
    vars: Vec<(String, String)>,
    log: LogControl,
}

fn run(config: Config, reload_from: ReloadFrom) -> anyhow::Result<()> {
    // Before the runtime starts threads: this also clears the LISTEN_* variables.
    let inherited =
        smallest_proxy::server::systemd::inherited_sockets().context("taking the sockets systemd passed")?;
    // Confined to one CPU (taskset, a cpuset, a one-CPU container quota), the multi-thread
    // scheduler runs one worker and only adds cross-thread handoffs: the current-thread
    // scheduler does the same work for less CPU per request (benches/RESULTS.md).
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut runtime = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = runtime.enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        // Sockets from systemd (a .socket unit) take the place of [listen].
        let listeners = match inherited {
            Some(sockets) => sockets.into_listeners()?,
            None => Listeners::bind(&config.listen).await?,
        };
        let reload = ReloadSource {
            requests: reload_signal()?,
            config_path: reload_from.config_path,
            vars: reload_from.vars,
            log: Some(reload_from.log),
        };
        smallest_proxy::run_with_reload(config, listeners, shutdown_signal(), Some(reload)).await?;
        Ok(())
    })
}

/// SIGHUP: each one asks the running proxy to reload (re-read the config, refresh the key).
fn reload_signal() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            // A full channel means a reload is already pending: coalesce.
            let _ = tx.try_send(());
        }
    });
    Ok(rx)
}

/// SIGTERM or SIGINT starts the drain; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested; draining (send the signal again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(0);
    });
}

/// Install the subscriber; the returned control lets a reload change `log.level` in place.
fn init_logging(config: &Config) -> LogControl {
    let from_env = EnvFilter::try_from_default_env().ok();
    let rust_log_set = from_env.is_some();
    let filter = from_env
        .or_else(|| config.log.level.as_deref().and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // The two formats are different subscriber types: each gets its own reload handle.
    let set_level: SetLogLevel = match config.log.format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| {
                let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            })
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| {
                let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            })
        }
    };
    LogControl {
        rust_log_set,
        set_level,
    }
}

/// A same-uid process must not read the key from our memory or a core dump: not dumpable on
/// Linux (no ptrace attach, no /proc/PID/mem), `PT_DENY_ATTACH` on macOS (no debugger attach).
fn harden_process() {
    // SAFETY: plain syscalls with constant arguments; failure only means less hardening.
    unsafe {
        #[cfg(target_os = "linux")]
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        #[cfg(target_os = "macos")]
        libc::ptrace(libc::PT_DENY_ATTACH, 0, std::ptr::null_mut(), 0);
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
    }
}

/// `smallest-proxy key set`: the key from standard input into the OS keychain.
fn key_set(config: &Config, service: Option<String>, account: Option<String>) -> ExitCode {
    let mut entry = config.key.keyring_entry();
    if let Some(service) = service {
        entry.service = service;
    }
    if let Some(account) = account {
        entry.account = account;
    }
    let input = match read_key_input() {
        Ok(input) => input,
        Err(e) => {
            eprintln!("error: reading the key from standard input: {e}");
            return ExitCode::from(1);
        }
    };
    let value = secrecy::SecretString::from(input.trim_end_matches(['\n', '\r']).to_string());
    drop(input);
    let where_ = keyring::describe(&entry);
    if let Err(e) = keyring::store(&entry, &value) {
        eprintln!("error: the key was not stored: {e}");
        return ExitCode::from(1);
    }
    // Read it back: a keychain that accepted the write but serves something else is caught here.
    let stored = keyring::read(&entry).map(|v| fingerprint(secrecy::ExposeSecret::expose_secret(&v)));
    let written = fingerprint(secrecy::ExposeSecret::expose_secret(&value));
    match stored {
        Ok(read_back) if read_back == written => {
            println!("stored the key in the OS keychain ({where_}); fingerprint {written}");
        }
        Ok(_) => {
            eprintln!("error: the keychain ({where_}) returns a different value than was stored");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("error: the key was stored but cannot be read back: {e}");
            return ExitCode::from(1);
        }
    }
    if config.key.source != KeySourceKind::Keyring {
        println!("the proxy reads it with [key] source = \"keyring\" (or SMALLEST_PROXY_KEY_SOURCE=keyring; `smallest-proxy service install` sets it)");
    } else if entry != config.key.keyring_entry() {
        println!(
            "note: the config reads {}, not this entry",
            keyring::describe(&config.key.keyring_entry())
        );
    }
    println!("a running proxy picks it up on SIGHUP, its next refresh (key.refresh_interval) or the next 401");
    ExitCode::SUCCESS
}

/// The key's text: one line typed with echo off on a terminal, otherwise everything on
/// standard input.
fn read_key_input() -> std::io::Result<zeroize::Zeroizing<String>> {
    use std::io::{BufRead, IsTerminal, Read};
    let mut text = zeroize::Zeroizing::new(String::new());
    if !std::io::stdin().is_terminal() {
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(text);
    }
    let _quiet = EchoOff::new()?;
    eprint!("Smallest API key (input hidden): ");
    std::io::stdin().lock().read_line(&mut text)?;
    Ok(text)
}

/// The terminal on standard input with echo off (the newline still echoed, so what follows
/// starts on its own line) until dropped. Written here rather than taken from `rpassword`,
/// which prints its prompt before it turns echo off: a key typed or pasted in between is shown.
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> std::io::Result<EchoOff> {
        // SAFETY: tcgetattr fills the zeroed termios we own; tcsetattr reads it.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut quiet = saved;
            quiet.c_lflag &= !libc::ECHO;
            quiet.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &quiet) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(EchoOff(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0);
        }
    }
}

/// `smallest-proxy key status`: the configured source, and the fingerprint of its key now.
fn key_status(config: &Config) -> ExitCode {
    println!("source: {}", smallest_proxy::keys::describe_source(&config.key));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let source = smallest_proxy::keys::source_from_config(config).await?;
        let value = source.fetch().await?;
        smallest_proxy::keys::ApiKey::new(value, config.auth.scheme)
    });
    match result {
        Ok(key) => {
            println!("fingerprint: {}", key.fingerprint());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("fingerprint: none");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `smallest-proxy service install|uninstall|status`.
fn service(action: ServiceCommand, config_path: Option<&std::path::Path>) -> ExitCode {
    let manager = match action {
        ServiceCommand::Install { manager }
        | ServiceCommand::Uninstall { manager }
        | ServiceCommand::Status { manager } => manager,
    };
    let target = match service_target(manager, config_path) {
        Ok(target) => target,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match action {
        ServiceCommand::Install { .. } => match smallest_proxy::service::install(&target) {
            Ok(written) => {
                for path in written {
                    println!("wrote {}", path.display());
                }
                println!("start it: {}", target.start_hint());
                println!("then apps call http://127.0.0.1:8787 with no key of their own");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        ServiceCommand::Uninstall { .. } => match smallest_proxy::service::uninstall(&target) {
            Ok(removed) if removed.is_empty() => {
                println!("nothing to remove: no file written by `smallest-proxy service install` is there");
                ExitCode::SUCCESS
            }
            Ok(removed) => {
                for path in removed {
                    println!("removed {}", path.display());
                }
                if target.manager == Manager::Launchd {
                    println!("if the agent is still loaded: {}", target.stop_hint());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        ServiceCommand::Status { .. } => {
            let mut all = true;
            for (path, _) in target.files() {
                let state = smallest_proxy::service::file_state(&path);
                all &= state == FileState::Installed;
                let said = match state {
                    FileState::Installed => "installed",
                    FileState::Foreign => "present, not written by `service install`",
                    FileState::Absent => "not installed",
                };
                println!("{}: {said}", path.display());
            }
            println!("service manager: {}", manager_state(target.manager));
            if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
    }
}

fn service_target(
    manager: ManagerArg,
    config_path: Option<&std::path::Path>,
) -> Result<smallest_proxy::service::Target, String> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or("HOME is not set: the service files go under the user's home directory")?;
    let binary = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| format!("cannot tell where this binary is: {e}"))?;
    let config = match config_path {
        Some(path) => Some(std::fs::canonicalize(path).map_err(|e| format!("config file {}: {e}", path.display()))?),
        None => None,
    };
    Ok(smallest_proxy::service::Target {
        manager: match manager {
            ManagerArg::Launchd => Manager::Launchd,
            ManagerArg::Systemd => Manager::Systemd,
        },
        home,
        xdg_config_home: std::env::var_os("XDG_CONFIG_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from),
        binary,
        config,
    })
}

/// What the service manager says about the service, in a few words.
fn manager_state(manager: Manager) -> String {
    let output = match manager {
        Manager::Systemd => std::process::Command::new("systemctl")
            .args(["--user", "is-active", "smallest-proxy.socket", "smallest-proxy.service"])
            .output(),
        Manager::Launchd => {
            // SAFETY: getuid cannot fail.
            let uid = unsafe { libc::getuid() };
            std::process::Command::new("launchctl")
                .args([
                    "print",
                    &format!("gui/{uid}/{}", smallest_proxy::service::LAUNCHD_LABEL),
                ])
                .output()
        }
    };
    match (manager, output) {
        (_, Err(e)) => format!("not asked ({e})"),
        (Manager::Systemd, Ok(out)) => {
            let states: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            match states.as_slice() {
                [socket, service] => format!("socket {socket}, service {service}"),
                _ => format!(
                    "not reachable ({})",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .next()
                        .unwrap_or("no answer")
                ),
            }
        }
        (Manager::Launchd, Ok(out)) if out.status.success() => "loaded".into(),
        (Manager::Launchd, Ok(_)) => "not loaded".into(),
    }
}

/// `smallest-proxy health`: a tiny HTTP/1.1 GET so container images need no curl.
fn health(url: Option<String>, config: &Config) -> ExitCode {
    use std::io::{Read, Write};
    let target = url.unwrap_or_else(|| {
        let address = config
            .listen
            .tcp_address()
            .map_or("127.0.0.1:8787".to_string(), |a| a.to_string());
        format!("http://{address}/health")
    });
    let Some(rest) = target.strip_prefix("http://") else {
        eprintln!("error: --url must be an http:// URL");
        return ExitCode::from(1);
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/health".to_string()), |(a, p)| (a, format!("/{p}")));
    let result = (|| -> std::io::Result<String> {
        let timeout = std::time::Duration::from_secs(5);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)?
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })();
    match result {
        Ok(response) if response.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("unhealthy: {}", response.lines().next().unwrap_or(""));
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("unhealthy: {target}: {e}");
            ExitCode::from(1)
        }
    }
}
