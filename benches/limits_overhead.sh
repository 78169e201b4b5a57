#!/usr/bin/env bash
# What configured-but-unreached limits cost per request: the same release proxy, same load,
# with and without a [limits] block, alternating runs; CPU from /proc/PID/stat (utime+stime).
# Upstream is nginx over plain HTTP on loopback so the difference is the limits path alone.
# Arms: `off` (profile = "none", no classes), `profile` (no [limits] at all: the built-in
# `smallest` profile's tts class is matched against every path; the load's path is not a TTS
# path), `limits` (a configured class, a rate and a concurrency limit, never reached).
# Usage: benches/limits_overhead.sh [seconds-per-run] (needs nginx and wrk from Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
work=$(mktemp -d)
trap 'kill $(cat "$work"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
cargo build --release --quiet
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port)
cat > "$work/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $work/nginx.pid; error_log /dev/null;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$up; location / { return 200 '{"ok":true}'; } } }
NGINX
nginx -c "$work/nginx.conf" -p "$work" & echo $! > "$work/nginx.pid"
echo sk-bench-key > "$work/key"
hz=$(getconf CLK_TCK)
run() { # $1 = arm name, $2 = extra toml
  local p; p=$(port)
  printf '[listen]\naddress = "127.0.0.1:%s"\n[upstream]\nurl = "http://127.0.0.1:%s"\n[key]\nsource = "file"\nfile = "%s"\n[log]\nlevel = "warn"\n%s\n' "$p" "$up" "$work/key" "$2" > "$work/$1.toml"
  ./target/release/smallest-proxy --config "$work/$1.toml" 2>/dev/null & local pid=$!; echo $pid > "$work/proxy.pid"
  until curl -sf "http://127.0.0.1:$p/health" >/dev/null; do sleep 0.05; done
  wrk -t1 -c8 -d1s "http://127.0.0.1:$p/waves/v1/lightning/get_voices" >/dev/null
  local before; before=$(awk '{print $14+$15}' /proc/$pid/stat)
  local reqs; reqs=$(wrk -t1 -c8 -d"${secs}s" "http://127.0.0.1:$p/waves/v1/lightning/get_voices" | awk '/requests in/ {print $1}')
  local after; after=$(awk '{print $14+$15}' /proc/$pid/stat)
  kill $pid; wait $pid 2>/dev/null || true
  awk -v t=$((after-before)) -v r="$reqs" -v hz="$hz" -v arm="$1" 'BEGIN { printf "%-8s %8d req  %6.1f us CPU/req\n", arm, r, t/hz*1e6/r }'
}
limits='[limits]
max_concurrent = 512
rate = 1000000
per = "1s"
burst = 100000
[[limits.class]]
name = "tts"
paths = ["/waves/v1/lightning", "/waves/v1/tts"]
max_concurrent = 256
max_websockets = 5'
for round in 1 2 3; do
  run off '[limits]
profile = "none"'
  run profile ""
  run limits "$limits"
done
