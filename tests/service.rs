//! `smallest-proxy service install|uninstall|status` and the per-user service files in
//! `contrib/`: the launchd plist parses (Python's plistlib) and runs this binary with the
//! keychain as the key source; the systemd user units pass `systemd-analyze --user verify`;
//! install into a temporary HOME writes exactly those files and uninstall removes exactly them;
//! and the installed units, run the way systemd runs them, serve apps that hold no key.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::keyring::KeyringSession;
use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn service_cli(home: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("service")
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("SMALLEST_PROXY_CONFIG")
        .output()
        .expect("run smallest-proxy service")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file (not directory) under `dir`, relative.
fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else {
                found.insert(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    found
}

fn canonical_binary() -> String {
    std::fs::canonicalize(binary()).unwrap().display().to_string()
}

/// The plist as JSON, through Python's plistlib (what launchd's format is checked against
/// here; there is no Mac).
fn plist_as_json(path: &Path) -> serde_json::Value {
    let python = python_with("plistlib, json");
    let out = Command::new(python)
        .args([
            "-c",
            "import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], 'rb'))))",
        ])
        .arg(path)
        .output()
        .expect("python");
    assert!(out.status.success(), "plistlib: {}", text(&out.stderr));
    json(&out.stdout)
}

#[test]
fn the_contrib_plist_parses_and_runs_the_proxy_with_the_keychain_at_login() {
    let plist = plist_as_json(Path::new(&format!("{ROOT}/contrib/launchd/ai.smallest.proxy.plist")));
    assert_eq!(plist["Label"], "ai.smallest.proxy");
    let args = plist["ProgramArguments"].as_array().unwrap();
    assert!(args[0].as_str().unwrap().ends_with("/smallest-proxy"), "{plist}");
    assert_eq!(args[1], "run");
    assert_eq!(plist["EnvironmentVariables"]["SMALLEST_PROXY_KEY_SOURCE"], "keyring");
    assert_eq!(plist["RunAtLoad"], true);
    assert_eq!(plist["KeepAlive"], true);
    for log in ["StandardOutPath", "StandardErrorPath"] {
        assert!(
            plist[log]
                .as_str()
                .unwrap()
                .ends_with("/Library/Logs/smallest-proxy.log"),
            "{plist}"
        );
    }
}

#[test]
fn install_for_launchd_writes_one_plist_naming_this_binary_and_uninstall_removes_it() {
    let home = tempfile::tempdir().unwrap();
    let out = service_cli(home.path(), &["install", "--manager", "launchd"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let path = home.path().join("Library/LaunchAgents/ai.smallest.proxy.plist");
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&format!("wrote {}", path.display())), "{stdout}");
    assert!(stdout.contains("launchctl bootstrap gui/$(id -u)"), "{stdout}");
    assert_eq!(
        files_under(home.path()),
        BTreeSet::from([PathBuf::from("Library/LaunchAgents/ai.smallest.proxy.plist")])
    );
    let plist = plist_as_json(&path);
    assert_eq!(plist["ProgramArguments"][0], canonical_binary().as_str());
    assert_eq!(plist["EnvironmentVariables"]["SMALLEST_PROXY_KEY_SOURCE"], "keyring");
    assert_eq!(
        plist["StandardErrorPath"],
        format!("{}/Library/Logs/smallest-proxy.log", home.path().display()).as_str()
    );
    let out = service_cli(home.path(), &["uninstall", "--manager", "launchd"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("launchctl bootout"), "{}", text(&out.stdout));
    assert!(files_under(home.path()).is_empty());
}

#[test]
fn install_writes_exactly_the_two_units_and_uninstall_removes_exactly_them() {
    let home = tempfile::tempdir().unwrap();
    // Somebody else's user unit, which nothing here may touch.
    let units = home.path().join(".config/systemd/user");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("other.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
    let before = files_under(home.path());

    let out = service_cli(home.path(), &["status"]);
    assert_eq!(out.status.code(), Some(3), "not installed yet");
    assert!(text(&out.stdout).contains("smallest-proxy.service: not installed"));

    let out = service_cli(home.path(), &["install"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let service = units.join("smallest-proxy.service");
    let socket = units.join("smallest-proxy.socket");
    assert!(stdout.contains(&format!("wrote {}\n", service.display())), "{stdout}");
    assert!(stdout.contains(&format!("wrote {}\n", socket.display())), "{stdout}");
    assert!(
        stdout.contains("systemctl --user daemon-reload && systemctl --user enable --now smallest-proxy.socket"),
        "{stdout}"
    );
    let mut expected = before.clone();
    expected.insert(PathBuf::from(".config/systemd/user/smallest-proxy.service"));
    expected.insert(PathBuf::from(".config/systemd/user/smallest-proxy.socket"));
    assert_eq!(files_under(home.path()), expected);
    let unit = std::fs::read_to_string(&service).unwrap();
    assert!(
        unit.contains(&format!("\nExecStart=\"{}\" run\n", canonical_binary())),
        "{unit}"
    );

    let out = service_cli(home.path(), &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("smallest-proxy.socket: installed"));
    // Installing again (a new binary path, say) rewrites the same two files.
    assert_eq!(service_cli(home.path(), &["install"]).status.code(), Some(0));
    assert_eq!(files_under(home.path()), expected);

    // While enabled, uninstall refuses: the files would go and the links would dangle.
    let wants = units.join("sockets.target.wants");
    std::fs::create_dir(&wants).unwrap();
    std::os::unix::fs::symlink(&socket, wants.join("smallest-proxy.socket")).unwrap();
    let out = service_cli(home.path(), &["uninstall"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("systemctl --user disable --now smallest-proxy.socket"),
        "{}",
        text(&out.stderr)
    );
    assert!(service.exists() && socket.exists());
    std::fs::remove_dir_all(&wants).unwrap();

    let out = service_cli(home.path(), &["uninstall"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("removed {}\nremoved {}\n", service.display(), socket.display())
    );
    assert_eq!(files_under(home.path()), before);
    let out = service_cli(home.path(), &["uninstall"]);
    assert!(text(&out.stdout).contains("nothing to remove"));
}

#[test]
fn install_never_overwrites_a_unit_it_did_not_write() {
    let home = tempfile::tempdir().unwrap();
    let units = home.path().join(".config/systemd/user");
    std::fs::create_dir_all(&units).unwrap();
    let mine = "[Service]\nExecStart=/opt/my-own-proxy\n";
    std::fs::write(units.join("smallest-proxy.service"), mine).unwrap();
    let out = service_cli(home.path(), &["install"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("was not written by"),
        "{}",
        text(&out.stderr)
    );
    assert!(!units.join("smallest-proxy.socket").exists(), "nothing is written");
    // Nor does uninstall remove it.
    assert_eq!(service_cli(home.path(), &["uninstall"]).status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(units.join("smallest-proxy.service")).unwrap(),
        mine
    );
}

#[test]
fn a_config_given_to_install_is_named_in_the_unit_and_chooses_the_source() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("proxy.toml");
    std::fs::write(&config, "[key]\nsource = \"keyring\"\n").unwrap();
    let out = Command::new(binary())
        .args(["--config", config.to_str().unwrap(), "service", "install"])
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let unit = std::fs::read_to_string(home.path().join(".config/systemd/user/smallest-proxy.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "\nExecStart=\"{}\" run --config \"{}\"\n",
            canonical_binary(),
            std::fs::canonicalize(&config).unwrap().display()
        )),
        "{unit}"
    );
    assert!(!unit.contains("SMALLEST_PROXY_KEY_SOURCE"), "{unit}");
}

/// `systemd-analyze --user verify` on `units`, as a user manager would load them. It needs a
/// runtime directory (XDG_RUNTIME_DIR), which a login session has and a CI container lacks.
fn verify_user_units(home: &Path, units: &[PathBuf]) -> Output {
    let runtime = home.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    Command::new("systemd-analyze")
        .args(["--user", "verify", "--man=no"])
        .args(units)
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .expect("systemd-analyze (Debian package systemd) is installed: run ./scripts/test.sh")
}

fn assert_verified(out: &Output) {
    let stderr = text(&out.stderr);
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("smallest-proxy")).collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze --user verify:\n{stderr}"
    );
}

#[test]
fn the_user_units_pass_systemd_analyze_user_verify() {
    // As installed.
    let home = tempfile::tempdir().unwrap();
    assert_eq!(service_cli(home.path(), &["install"]).status.code(), Some(0));
    let units = home.path().join(".config/systemd/user");
    let installed = [
        units.join("smallest-proxy.service"),
        units.join("smallest-proxy.socket"),
    ];
    assert_verified(&verify_user_units(home.path(), &installed));

    // As shipped, for `cargo install` users copying them by hand: ExecStart is
    // %h/.cargo/bin/smallest-proxy, which verify requires to exist.
    let home = tempfile::tempdir().unwrap();
    let bin = home.path().join(".cargo/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(binary(), bin.join("smallest-proxy")).unwrap();
    let contrib = [
        PathBuf::from(format!("{ROOT}/contrib/systemd-user/smallest-proxy.service")),
        PathBuf::from(format!("{ROOT}/contrib/systemd-user/smallest-proxy.socket")),
    ];
    assert_verified(&verify_user_units(home.path(), &contrib));

    // The check has teeth: a unit whose program is missing fails it.
    let broken = home.path().join("smallest-proxy.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&contrib[0])
            .unwrap()
            .replace("%h/.cargo/bin/smallest-proxy", "/nonexistent/smallest-proxy"),
    )
    .unwrap();
    assert!(!verify_user_units(home.path(), &[broken]).status.success());
}

/// Split an `ExecStart=` value into words (double quotes group, as systemd reads them).
fn exec_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_units_run_as_systemd_runs_them_serve_apps_that_hold_no_key() {
    let session = KeyringSession::start();
    session.key_set("sk-laptop-Rr5Lw0pQ");
    let home = tempfile::tempdir().unwrap();
    assert_eq!(service_cli(home.path(), &["install"]).status.code(), Some(0));
    let units = home.path().join(".config/systemd/user");
    let unit = std::fs::read_to_string(units.join("smallest-proxy.service")).unwrap();
    let socket = std::fs::read_to_string(units.join("smallest-proxy.socket")).unwrap();
    let exec = exec_words(
        unit.lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart"),
    );
    let environment: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let listen = socket
        .lines()
        .find_map(|l| l.strip_prefix("ListenStream="))
        .expect("ListenStream");
    assert_eq!(listen, "127.0.0.1:8787");

    // The socket unit's address on a free port (8787 may be taken on a shared machine), the
    // unit's command and environment, the desktop session's bus, and for the test only the
    // stand-in upstream. No SMALLEST_API_KEY anywhere.
    let upstream = TestUpstream::start().await;
    let port = support::servers::free_port();
    // systemd-socket-activate hands its child only the variables named with -E, as systemd
    // hands a service only its Environment= lines (and the user manager's own, like the bus).
    let mut child_env: Vec<(String, String)> = environment.clone();
    child_env.extend(session.envs().into_iter().map(|(k, v)| (k.to_string(), v)));
    child_env.push(("SMALLEST_PROXY_UPSTREAM_URL".into(), upstream.url()));
    child_env.push((
        "SMALLEST_PROXY_UPSTREAM_CA_FILE".into(),
        upstream.pki.ca_file.display().to_string(),
    ));
    let mut activate = Command::new("systemd-socket-activate");
    activate.arg("-l").arg(format!("127.0.0.1:{port}"));
    for (k, v) in &child_env {
        activate.arg("-E").arg(format!("{k}={v}"));
    }
    activate.args(&exec).stderr(std::process::Stdio::null());
    let mut activator = activate
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) is installed: run ./scripts/test.sh");
    // systemd-socket-activate binds before anything runs; wait for the port (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, _, body) = get(&format!("http://127.0.0.1:{port}/waves/v1/lightning/get_voices")).await;
    assert_eq!(status, 200, "{}", text(&body));
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        "Bearer sk-laptop-Rr5Lw0pQ"
    );
    let _ = activator.kill();
    let _ = activator.wait();
}

/// The README's "On a laptop" commands, as written: the `key set` and `service install` lines
/// run verbatim (with `smallest-proxy` being the binary under test) in a keyring session and a
/// fresh HOME; the install line is checked for what it says (building a release binary again
/// here would cost minutes and test cargo, not us).
#[test]
fn the_readme_laptop_commands_store_the_key_and_install_the_service() {
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let section = readme
        .split("\n## On a laptop\n")
        .nth(1)
        .expect("README has an \"On a laptop\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a sh block");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        commands,
        [
            "cargo install --locked --path .",
            "smallest-proxy key set",
            "smallest-proxy service install"
        ]
    );

    let session = KeyringSession::start();
    let home = tempfile::tempdir().unwrap();
    let bin = home.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(binary(), bin.join("smallest-proxy")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    for (command, input) in [(commands[1], "sk-readme-Kd2Vx9\n"), (commands[2], "")] {
        let mut child = session
            .command("sh")
            .args(["-c", command])
            .env("PATH", &path)
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{command}: {}", text(&out.stderr));
    }
    assert_eq!(
        text(&session.lookup("smallest-proxy", "default").stdout),
        "sk-readme-Kd2Vx9"
    );
    assert!(home.path().join(".config/systemd/user/smallest-proxy.service").exists());
    assert!(home.path().join(".config/systemd/user/smallest-proxy.socket").exists());
}
