#!/usr/bin/env bash
# The one test command (README "Test"; .ci/run calls exactly this). Idempotent: it installs
# what the tests need the first time and reuses it afterwards, then runs formatting, lints and
# every test. Tests find the tools on PATH; a test whose tool is missing fails saying how to get
# it (this script is that way).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
[ -x /usr/bin/redis-server ] || need_apt+=(redis-server)
command -v systemd-socket-activate >/dev/null 2>&1 || need_apt+=(systemd)
command -v musl-gcc >/dev/null 2>&1 || need_apt+=(musl-tools)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# tests/process.rs runs Debian's python3 and setpriv as uid 65534 (a pyenv python under /root is not readable there).
[ -x /usr/bin/python3 ] || need_apt+=(python3)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# tests/sdk.rs runs README.md's Node example with node and the `ws` package.
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Python tools for the tests (real clients, and later real servers), in a project-local venv
# so nothing global changes. Re-installed only when requirements change.
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want=$(sha256sum scripts/test-requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> preparing the Python test tools in .venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/test-requirements.txt
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"

# Node packages for README.md's Node example (tests/sdk.rs), from the committed lock file into
# tests/clients/node/node_modules; re-installed only when the lock file changes.
node_dir="$root/tests/clients/node"
node_stamp="$node_dir/node_modules/.lock.sha256"
node_want=$(sha256sum "$node_dir/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$node_stamp" 2>/dev/null)" != "$node_want" ]; then
  echo "==> npm ci in tests/clients/node"
  (cd "$node_dir" && npm ci --no-audit --no-fund --silent)
  echo "$node_want" > "$node_stamp"
fi

# The container image's static binary (contrib/docker/Dockerfile), built the same way so the
# tests can run it; there is no Docker engine on these machines.
echo "==> static musl build"
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
cargo build --release --quiet --target x86_64-unknown-linux-musl
export TEST_STATIC_PROXY_BINARY="${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-musl/release/smallest-proxy"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
# The cargo-fuzz targets (fuzz/, their own workspace) share the differential harness with
# tests/differential.rs: compile them so they cannot rot (running them needs cargo-fuzz).
echo "==> cargo check fuzz/"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}" cargo check --quiet --manifest-path fuzz/Cargo.toml --bins
echo "==> cargo test"
cargo test --all-targets
# Again with an upstream that offers only HTTP/1.1: the proxy's own HTTP/1.1 client
# (src/proxy/h1.rs) then carries what the first run sent over HTTP/2.
echo "==> cargo test, upstream HTTP/1.1 only"
TEST_UPSTREAM_HTTP1=1 cargo test --tests
