//! Process hardening, checked the way an attacker on the same account would try it: the real
//! binary runs as an unprivileged user (uid/gid 65534, via util-linux `setpriv`), and another
//! process of that same user tries to read the proxy's environment and memory and to attach
//! with ptrace. All must be refused, while the same reads of an ordinary process of that user
//! succeed (the control: it proves the hardening, not a blanket restriction of this machine).
//! Core dumps are off (RLIMIT_CORE 0). Root could read anything, so nothing here runs as root.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use support::*;

const NOBODY: &str = "65534";

/// `setpriv` with the arguments that make the rest run as uid/gid 65534 and no groups.
fn as_nobody() -> Command {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| panic!("setpriv is missing: install util-linux (apt-get install util-linux)"));
    let mut command = Command::new(setpriv);
    command.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
    ]);
    command
}

fn run_as_nobody(args: &[&str]) -> Output {
    as_nobody()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?} as {NOBODY}: {e}"))
}

/// A ptrace attach attempt (PTRACE_ATTACH, then detach), from a process of the given user.
const PTRACE_ATTACH: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
if libc.ptrace(16, pid, None, None) != 0:
    print("attach failed: " + os.strerror(ctypes.get_errno()))
    sys.exit(1)
os.waitpid(pid, 0)
libc.ptrace(17, pid, None, None)
print("attached")
"#;

fn python() -> &'static str {
    let python = "/usr/bin/python3";
    assert!(
        std::path::Path::new(python).exists(),
        "{python} is missing (it must be readable by uid {NOBODY}): apt-get install python3"
    );
    python
}

/// What uid 65534 can do to process `pid`: (environ readable, mem openable, ptrace attach).
fn probe(pid: u32) -> (Output, Output, Output) {
    let environ = run_as_nobody(&["cat", &format!("/proc/{pid}/environ")]);
    // Opening /proc/PID/mem is where the ptrace access check happens.
    let mem = run_as_nobody(&["sh", "-c", &format!("exec 3< /proc/{pid}/mem && echo opened")]);
    let ptrace = run_as_nobody(&[python(), "-c", PTRACE_ATTACH, &pid.to_string()]);
    (environ, mem, ptrace)
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}; stdout {:?}; stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_uid_process_cannot_read_the_proxys_environment_or_memory() {
    let upstream = TestUpstream::start().await;
    // Everything the proxy needs must be readable by uid 65534.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::copy(&upstream.pki.ca_file, &ca_file).unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, TEST_KEY).unwrap();
    let config_file = dir.path().join("proxy.toml");
    std::fs::write(
        &config_file,
        proxy_config_text(&upstream.url(), &ca_file, &key_file, ""),
    )
    .unwrap();
    for file in [&ca_file, &key_file, &config_file] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    // A marker in the environment: what an attacker reading environ would be after.
    let mut command = as_nobody();
    command
        .arg(binary())
        .arg("--config")
        .arg(&config_file)
        .env_clear()
        .env("PROXY_TEST_ENV_MARKER", "visible-only-to-the-proxy")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop(command.spawn().expect("spawn the proxy as uid 65534"));
    // Serving is the signal that main() (and its hardening) has run.
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("smallest-proxy serving") {
                let _ = tx.send(Ok(line.clone()));
            }
            log.push(line);
        }
        let _ = tx.send(Err(log.join("\n")));
    });
    let serving = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(line)) => line,
        Ok(Err(log)) => panic!("the proxy exited before serving:\n{log}"),
        Err(_) => panic!("the proxy did not start within 60 s"),
    };
    let pid = child.0.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(NOBODY)),
        "the proxy is not running as uid {NOBODY}:\n{status}"
    );

    let (environ, mem, ptrace) = probe(pid);
    assert!(!environ.status.success(), "environ was readable: {}", text(&environ));
    assert!(
        String::from_utf8_lossy(&environ.stderr).contains("Permission denied"),
        "{}",
        text(&environ)
    );
    assert!(!String::from_utf8_lossy(&environ.stdout).contains("visible-only-to-the-proxy"));
    assert!(!mem.status.success(), "mem could be opened: {}", text(&mem));
    assert!(
        String::from_utf8_lossy(&mem.stderr).contains("Permission denied"),
        "{}",
        text(&mem)
    );
    assert!(!ptrace.status.success(), "ptrace attached: {}", text(&ptrace));
    assert!(
        String::from_utf8_lossy(&ptrace.stdout).contains("Operation not permitted"),
        "{}",
        text(&ptrace)
    );

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit line");
    let values: Vec<&str> = core.split_whitespace().skip(4).take(2).collect();
    assert_eq!(values, vec!["0", "0"], "core dumps are not off: {core}");

    // Control: the very same probes against an ordinary process of the same user succeed.
    let sleeper = KillOnDrop(
        as_nobody()
            .args(["sleep", "600"])
            .env("PROXY_TEST_ENV_MARKER", "visible")
            .spawn()
            .unwrap(),
    );
    // Probed only once setpriv has exec'd `sleep`: before that, /proc shows the forked test
    // process's own environment, without the marker.
    let comm = format!("/proc/{}/comm", sleeper.0.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
        assert!(
            std::time::Instant::now() < deadline,
            "the control process never became sleep"
        );
        std::thread::yield_now();
    }
    let (environ, mem, ptrace) = probe(sleeper.0.id());
    assert!(environ.status.success(), "control environ: {}", text(&environ));
    assert!(String::from_utf8_lossy(&environ.stdout).contains("PROXY_TEST_ENV_MARKER=visible"));
    assert!(mem.status.success(), "control mem: {}", text(&mem));
    assert!(ptrace.status.success(), "control ptrace: {}", text(&ptrace));

    // And the hardened proxy still serves.
    let addr = serving
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| c == ',' || c.is_whitespace() || c == '"').next())
        .unwrap_or_else(|| panic!("no address in {serving:?}"));
    let (status, _, _) = get(&format!("http://{addr}/waves/v1/voices")).await;
    assert_eq!(status, 200);
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        format!("Bearer {TEST_KEY}").as_str()
    );
    drop(child);
}
