//! The container image's binary: the static musl build (scripts/test.sh builds it, as
//! contrib/docker/Dockerfile does), configured only by environment, with the `health`
//! subcommand the image's HEALTHCHECK runs. The Kubernetes manifest's sidecar wiring is checked
//! too.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

fn static_binary() -> String {
    let path = std::env::var("TEST_STATIC_PROXY_BINARY").unwrap_or_else(|_| {
        panic!("TEST_STATIC_PROXY_BINARY is not set: run ./scripts/test.sh, which builds the static musl binary")
    });
    assert!(
        std::path::Path::new(&path).is_file(),
        "{path} is missing: run ./scripts/test.sh"
    );
    path
}

/// True when the ELF file has no PT_INTERP program header (no dynamic loader).
fn is_static_elf(bytes: &[u8]) -> bool {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) != 3 // PT_INTERP
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_binary_runs_from_environment_alone_and_reports_health() {
    let binary = static_binary();
    assert!(
        is_static_elf(&std::fs::read(&binary).unwrap()),
        "{binary} needs a dynamic loader"
    );

    let upstream = TestUpstream::start().await;
    let port = support::servers::free_port();
    // 12-factor: no config file at all, everything from the environment, as in the image.
    let mut proxy = Command::new(&binary)
        .env_clear()
        .env("SMALLEST_API_KEY", TEST_KEY)
        .env("SMALLEST_PROXY_LISTEN_ADDRESS", format!("127.0.0.1:{port}"))
        .env("SMALLEST_PROXY_UPSTREAM_URL", upstream.url())
        .env("SMALLEST_PROXY_UPSTREAM_CA_FILE", &upstream.pki.ca_file)
        .env("SMALLEST_PROXY_LOG_FORMAT", "json")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let health = |expect_ok: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let status = Command::new(&binary)
                .args(["health", "--url", &format!("http://127.0.0.1:{port}/health")])
                .env_clear()
                .status()
                .unwrap();
            if status.success() == expect_ok {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "health never became {expect_ok}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    health(true);
    let (status, _, _) = get(&format!("http://127.0.0.1:{port}/waves/v1/lightning/get_voices")).await;
    assert_eq!(status, 200);
    assert_eq!(
        upstream.records()[0].headers["authorization"],
        format!("Bearer {TEST_KEY}").as_str()
    );
    let _ = proxy.kill();
    let _ = proxy.wait();
    health(false);
}

#[test]
fn the_kubernetes_manifest_is_a_native_sidecar_with_probes() {
    let script = r#"
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
pod = [d for d in docs if d["kind"] == "Deployment"][0]["spec"]["template"]["spec"]
sidecar = pod["initContainers"][0]
assert sidecar["restartPolicy"] == "Always", "not a native sidecar"
assert sidecar["readinessProbe"]["httpGet"]["path"] == "/ready"
assert sidecar["livenessProbe"]["httpGet"]["path"] == "/health"
env = {e["name"]: e["value"] for e in sidecar["env"]}
assert env["SMALLEST_PROXY_KEY_SOURCE"] == "vault" and env["SMALLEST_PROXY_KEY_VAULT_AUTH_METHOD"] == "kubernetes"
app = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
assert app["SMALLEST_BASE_URL"] == "http://127.0.0.1:8787"
print("ok")
"#;
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(
        std::path::Path::new(python).is_file(),
        "run ./scripts/test.sh (it creates .venv with PyYAML via moto)"
    );
    let output = Command::new(python)
        .args([
            "-c",
            script,
            concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/kubernetes/sidecar.yaml"),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
