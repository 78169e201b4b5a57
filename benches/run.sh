#!/usr/bin/env bash
# The benchmark (README "Benchmark"): smallest-proxy against nginx doing the same job,
# in the same run, alternating A/B pairs. One command:
#
#   benches/run.sh [--quick] [--write-results] [--pairs N]
#
#   --quick          one pair, short runs (a smoke run; figures are noisy)
#   --write-results  also rewrite benches/RESULTS.md from this run
#   BENCH_ALLOW_BUSY=1  run even when the 1-minute load average is above 0.5
#   BENCH_HOLD=1        start everything, print the pids and ports, and wait 10 minutes (profiling)
#   BENCH_UPSTREAM_H2=1 let the upstream nginx offer HTTP/2 (ALPN h2): smallest-proxy then
#                       multiplexes over h2 while nginx (which proxies in HTTP/1.1 only) does not
#
# What it starts, all on 127.0.0.1 and all killed on exit: a TLS 1.3 upstream nginx (small JSON,
# a 1 MiB body, an upload sink that reads every byte), a TLS SSE + WebSocket echo upstream
# (examples/bench_tool.rs), the release proxy and an nginx configured to do the same job.
# Placement: load generators and upstreams on CPU 0, each proxy on CPU 1.
# Figures: CPU µs per request (sum of the first field of /proc/PID/task/*/schedstat before and
# after each run), req/s, p50/p99, RSS idle and peak (VmRSS, VmHWM), SSE lag, WebSocket round
# trip, RSS per idle keep-alive connection; JSON lines in benches/results/, a Markdown table on
# stdout. Installs what it needs when missing: nginx, wrk (Debian), oha (crates.io, into
# benches/.tools).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

quick=0
write_results=0
pairs=3
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; pairs=1 ;;
    --write-results) write_results=1 ;;
    --pairs) pairs=$2; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$quick" = 1 ]; then secs=2; serial_secs=1; big_n=40; ws_n=1000; sse_streams=2; idle_n=300
else secs=5; serial_secs=3; big_n=200; ws_n=5000; sse_streams=5; idle_n=1000; fi

# ---- a quiet machine, or the numbers mean nothing ----
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN { exit !(l > 0.5) }'; then
  if [ "${BENCH_ALLOW_BUSY:-0}" = 1 ]; then
    echo "warning: load average $load > 0.5; running anyway (BENCH_ALLOW_BUSY=1): figures are not reliable" >&2
  else
    echo "refusing to run: the 1-minute load average is $load (> 0.5); wait for a quiet machine or set BENCH_ALLOW_BUSY=1" >&2
    exit 1
  fi
fi
if [ "$(nproc)" -lt 2 ]; then
  echo "the benchmark needs 2 CPUs (load on CPU 0, the proxy on CPU 1); this machine has $(nproc)" >&2
  exit 1
fi

# ---- tools ----
need_apt=()
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v taskset >/dev/null 2>&1 || need_apt+=(util-linux)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if command -v oha >/dev/null 2>&1; then
  oha=$(command -v oha)
else
  oha="$root/benches/.tools/bin/oha"
  if [ ! -x "$oha" ]; then
    echo "==> installing oha from crates.io into benches/.tools (once)"
    cargo install oha --locked --quiet --root "$root/benches/.tools"
  fi
fi
if "$oha" --help 2>&1 | grep -q -- '--output-format'; then oha_json=(--output-format json); else oha_json=(-j); fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
echo "==> building the release proxy and the bench tool"
cargo build --release --quiet --bin smallest-proxy --example bench_tool
proxy_bin="$CARGO_TARGET_DIR/release/smallest-proxy"
tool="$CARGO_TARGET_DIR/release/examples/bench_tool"

# ---- workspace, and everything we start is killed on exit ----
work=$(mktemp -d /tmp/smallest-bench.XXXXXX)
started=()
cleanup() {
  for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${started[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Wait (bounded) until a TCP port accepts connections.
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1 after 10 s; logs in $work:" >&2
  tail -n 20 "$work"/*.log >&2 || true
  exit 1
}

# ---- certificates: a CA, and a leaf for localhost / 127.0.0.1 signed by it ----
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$work/ca.key" -out "$work/ca.pem" -subj "/CN=smallest-proxy bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$work/leaf.key" -out "$work/leaf.csr" -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' > "$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 2 -extfile "$work/leaf.ext" -out "$work/leaf.pem" 2>/dev/null
head -c 1048576 /dev/urandom > "$work/1mib.bin"
printf '{"text":"Hello from the benchmark","voice_id":"emily","sample_rate":24000}' > "$work/small.json"
key="sk-bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# ---- upstreams (CPU 0) ----
up_port=$(free_port); sink_port=$(free_port)
http2=""; [ "${BENCH_UPSTREAM_H2:-0}" = 1 ] && http2="http2 on;"
user_line="user $(id -un) $(id -gn);"; [ "$(id -u)" -eq 0 ] || user_line=""
mkdir -p "$work/up" "$work/np"
cat > "$work/up/nginx.conf" <<NGINX
$user_line
worker_processes 1; daemon off; pid $work/up/nginx.pid; error_log $work/up.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000; keepalive_timeout 300s;
  client_max_body_size 0;
  upstream sink { server 127.0.0.1:$sink_port; keepalive 16; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$up_port ssl;
    $http2
    ssl_protocols TLSv1.3;
    ssl_certificate $work/leaf.pem; ssl_certificate_key $work/leaf.key;
    ssl_session_cache shared:bench:1m;
    location / { default_type application/json; return 200 '{"voices":["emily","jasmine","arman"],"ok":true}'; }
    location = /big { alias $work/1mib.bin; default_type application/octet-stream; }
    # The upload sink reads every byte: nginx buffers the whole body (proxy_request_buffering
    # is on by default) before handing it to an internal server that answers 204.
    location = /upload {
      client_body_buffer_size 2m;
      proxy_pass http://sink; proxy_http_version 1.1; proxy_set_header Connection "";
    }
  }
  server { listen 127.0.0.1:$sink_port; location / { return 204; } }
}
NGINX
taskset -c 0 nginx -e "$work/up.log" -p "$work/up" -c "$work/up/nginx.conf" & started+=($!)
streams_port_file="$work/streams.port"
taskset -c 0 "$tool" upstream "$work/leaf.pem" "$work/leaf.key" "$streams_port_file" 2> "$work/streams.log" & started+=($!)
wait_port "$up_port"
for _ in $(seq 1 200); do [ -s "$streams_port_file" ] && break; sleep 0.05; done
streams_port=$(cat "$streams_port_file")
wait_port "$streams_port"

# ---- the two proxies under test (CPU 1) ----
# nginx doing the same job: inject the key, keep-alive TLS pool, verified certificate, no
# buffering either way, WebSocket upgrades passed through.
np_api=$(free_port); np_streams=$(free_port)
cat > "$work/np/nginx.conf" <<NGINX
$user_line
worker_processes 1; daemon off; pid $work/np/nginx.pid; error_log $work/np.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000; keepalive_timeout 300s;
  client_max_body_size 0;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  upstream api { server 127.0.0.1:$up_port; keepalive 64; keepalive_requests 1000000; keepalive_timeout 300s; }
  upstream streams { server 127.0.0.1:$streams_port; keepalive 64; keepalive_timeout 300s; }
  proxy_http_version 1.1;
  proxy_buffering off;
  proxy_request_buffering off;
  proxy_read_timeout 300s;
  proxy_set_header Authorization "Bearer $key";
  proxy_set_header Upgrade \$http_upgrade;
  proxy_set_header Connection \$connection_upgrade;
  proxy_ssl_verify on;
  proxy_ssl_trusted_certificate $work/ca.pem;
  proxy_ssl_name localhost;
  proxy_ssl_server_name on;
  proxy_ssl_session_reuse on;
  proxy_ssl_protocols TLSv1.3;
  server { listen 127.0.0.1:$np_api; location / { proxy_pass https://api; } }
  server { listen 127.0.0.1:$np_streams; location / { proxy_pass https://streams; } }
}
NGINX
taskset -c 1 nginx -e "$work/np.log" -p "$work/np" -c "$work/np/nginx.conf" & nginx_master=$!; started+=($nginx_master)

# smallest-proxy: one process per upstream (it has one upstream by design); the key from env.
start_ours() { # $1 = name, $2 = upstream port; sets ours_pid and ours_port
  ours_port=$(free_port)
  cat > "$work/$1.toml" <<TOML
[listen]
address = "127.0.0.1:$ours_port"
max_connections = 4096
[upstream]
url = "https://127.0.0.1:$2"
ca_file = "$work/ca.pem"
[key]
source = "env"
env = "BENCH_SMALLEST_KEY"
[log]
level = "warn"
# Same job as nginx's access_log off.
access = false
TOML
  BENCH_SMALLEST_KEY="$key" taskset -c 1 "$proxy_bin" --config "$work/$1.toml" > "$work/$1.log" 2>&1 &
  ours_pid=$!; started+=($ours_pid)
}
# The release binary was just written by the linker, so all of it is in the page cache, and the
# kernel maps up to 64 KiB of cached neighbours around every code page a process touches: a
# freshly linked proxy shows ~1 MiB more RSS than the same binary started from disk. Drop it
# from the cache first (written back, then evicted), so its RSS is what a reboot or a fresh
# container start shows. nginx's binary was not just written; the upstream nginx (CPU 0) has
# already mapped what it uses.
python3 - "$proxy_bin" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
PY
start_ours ours-api "$up_port"; ours_api=$ours_pid; ours_api_port=$ours_port
start_ours ours-streams "$streams_port"; ours_streams=$ours_pid; ours_streams_port=$ours_port
for p in "$np_api" "$np_streams" "$ours_api_port" "$ours_streams_port"; do wait_port "$p"; done
nginx_worker=""
for _ in $(seq 1 100); do nginx_worker=$(pgrep -P "$nginx_master" | head -n1 || true); [ -n "$nginx_worker" ] && break; sleep 0.05; done
[ -n "$nginx_worker" ] || { echo "the nginx proxy has no worker process" >&2; exit 1; }

# One request through each, so both have their upstream connection before anything is measured.
for url in "http://127.0.0.1:$ours_api_port/" "http://127.0.0.1:$np_api/"; do
  curl -sf -o /dev/null "$url" || { echo "warm-up request to $url failed; logs in $work" >&2; tail -n 20 "$work"/*.log >&2; exit 1; }
done

# For profiling (perf, strace): keep everything up for up to 10 minutes and print where it is.
if [ "${BENCH_HOLD:-0}" = 1 ]; then
  echo "holding: ours pid $ours_api http://127.0.0.1:$ours_api_port ; nginx worker $nginx_worker http://127.0.0.1:$np_api ; oha $oha ; work $work"
  sleep 600 || true
  exit 0
fi

# ---- measurement helpers ----
cpu_ns() { local s=0 p v; for p in "$@"; do for v in $(cut -d' ' -f1 /proc/"$p"/task/*/schedstat 2>/dev/null); do s=$((s+v)); done; done; echo "$s"; }
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
reset_peak() { echo 5 > "/proc/$1/clear_refs" 2>/dev/null || true; }

results_dir="$root/benches/results"; mkdir -p "$results_dir"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
jsonl="$results_dir/$stamp.jsonl"
: > "$jsonl"
emit() { echo "$1" >> "$jsonl"; }

# Idle RSS of each proxy (nginx: the worker, which does all the work; its master is not counted).
# RssAnon is the process's own memory; the rest of VmRSS is file pages (code, shared libraries).
emit "{\"scenario\":\"idle\",\"arm\":\"ours\",\"rss_kib\":$(status_kib "$ours_api" VmRSS),\"anon_kib\":$(status_kib "$ours_api" RssAnon)}"
emit "{\"scenario\":\"idle\",\"arm\":\"nginx\",\"rss_kib\":$(status_kib "$nginx_worker" VmRSS),\"anon_kib\":$(status_kib "$nginx_worker" RssAnon)}"

post_lua="$work/post.lua"
printf 'wrk.method = "POST"\nwrk.body = [[%s]]\nwrk.headers["Content-Type"] = "application/json"\n' "$(cat "$work/small.json")" > "$post_lua"

# Turn oha's JSON into our fields. $1 = file.
oha_fields() {
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ok = sum(v for k, v in d.get("statusCodeDistribution", {}).items() if k.startswith("2"))
bad = sum(v for k, v in d.get("statusCodeDistribution", {}).items() if not k.startswith("2"))
errors = sum(d.get("errorDistribution", {}).values())
p = d.get("latencyPercentiles", {})
print(json.dumps({"ok": ok, "failed": bad + errors, "rps": d["summary"]["requestsPerSec"],
                  "p50_ms": (p.get("p50") or 0) * 1e3, "p99_ms": (p.get("p99") or 0) * 1e3})[1:-1])
PY
}
wrk_fields() {
  python3 - "$1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(s):
    v, u = re.match(r"([\d.]+)(us|ms|s)", s).groups()
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[u]
ok = int(re.search(r"(\d+) requests in", t).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
failed = (int(bad.group(1)) if bad else 0) + (sum(map(int, errs.groups())) if errs else 0)
p50 = ms(re.search(r"\s50%\s+(\S+)", t).group(1)); p99 = ms(re.search(r"\s99%\s+(\S+)", t).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
print('"ok": %d, "failed": %d, "rps": %.1f, "p50_ms": %.4f, "p99_ms": %.4f' % (ok - failed, failed, rps, p50, p99))
PY
}

# Run one load scenario against one arm. $1 scenario, $2 arm, $3 pair, $4 unit divisor name
# ("req" or "mib"), $5 MiB per request; the rest is the load command (URL placeholder @URL@).
run_load() {
  local scenario=$1 arm=$2 pair=$3 unit=$4 mib=$5; shift 5
  local port pids
  if [ "$arm" = ours ]; then port=$ours_api_port; pids=("$ours_api"); else port=$np_api; pids=("$nginx_master" "$nginx_worker"); fi
  local rss_pid=${pids[-1]}
  local args=("${@//@PORT@/$port}")
  local out="$work/out.txt"
  reset_peak "$rss_pid"
  local before after fields
  before=$(cpu_ns "${pids[@]}")
  taskset -c 0 "${args[@]}" > "$out" 2> "$work/load.err" || { echo "load command failed: ${args[*]}" >&2; cat "$work/load.err" >&2; exit 1; }
  after=$(cpu_ns "${pids[@]}")
  if [ "${args[0]}" = wrk ]; then fields=$(wrk_fields "$out"); else fields=$(oha_fields "$out"); fi
  local line="{\"scenario\":\"$scenario\",\"arm\":\"$arm\",\"pair\":$pair,$fields,\"cpu_ns\":$((after-before)),\"unit\":\"$unit\",\"mib_per_req\":$mib,\"rss_peak_kib\":$(status_kib "$rss_pid" VmHWM)}"
  emit "$line"
  echo "  $line"
}
run_tool() { # $1 scenario, $2 arm, $3 pair, then the bench_tool arguments (@PORT@ = the arm's stream port)
  local scenario=$1 arm=$2 pair=$3; shift 3
  local port; if [ "$arm" = ours ]; then port=$ours_streams_port; else port=$np_streams; fi
  local args=("${@//@PORT@/$port}")
  local fields; fields=$(taskset -c 0 "$tool" "${args[@]}")
  local line="{\"scenario\":\"$scenario\",\"arm\":\"$arm\",\"pair\":$pair,${fields:1}"
  emit "$line"
  echo "  $line"
}

scenarios() { # $1 arm, $2 pair
  local a=$1 i=$2
  local url="http://127.0.0.1:@PORT@/waves/v1/lightning/get_speech"
  run_load rate1000 "$a" "$i" req 0 "$oha" --no-tui "${oha_json[@]}" -z "${secs}s" -w -c 16 -q 1000 --latency-correction -m POST -T application/json -D "$work/small.json" "$url"
  run_load rate5000 "$a" "$i" req 0 "$oha" --no-tui "${oha_json[@]}" -z "${secs}s" -w -c 32 -q 5000 --latency-correction -m POST -T application/json -D "$work/small.json" "$url"
  run_load saturated "$a" "$i" req 0 wrk -t1 -c32 -d"${secs}s" --latency -s "$post_lua" "$url"
  run_load serial "$a" "$i" req 0 wrk -t1 -c1 -d"${serial_secs}s" --latency -s "$post_lua" "$url"
  run_load upload_1mib "$a" "$i" mib 1 "$oha" --no-tui "${oha_json[@]}" -n "$big_n" -c 4 -m POST -T application/octet-stream -D "$work/1mib.bin" "http://127.0.0.1:@PORT@/upload"
  run_load download_1mib "$a" "$i" mib 1 "$oha" --no-tui "${oha_json[@]}" -n "$big_n" -c 4 "http://127.0.0.1:@PORT@/big"
  run_tool sse "$a" "$i" sse "http://127.0.0.1:@PORT@/sse" "$sse_streams"
  run_tool websocket "$a" "$i" ws "ws://127.0.0.1:@PORT@/ws" "$ws_n"
}

echo "==> warming up both proxies"
for port in "$ours_api_port" "$np_api"; do
  taskset -c 0 wrk -t1 -c32 -d1s -s "$post_lua" "http://127.0.0.1:$port/" > /dev/null
done

for i in $(seq 1 "$pairs"); do
  # Alternate which arm goes first, so drift on the machine does not favour one side.
  if [ $((i % 2)) = 1 ]; then order=(ours nginx); else order=(nginx ours); fi
  for arm in "${order[@]}"; do
    echo "==> pair $i/$pairs: $arm"
    scenarios "$arm" "$i"
  done
done

echo "==> $idle_n idle keep-alive connections"
# On a fresh proxy: the one that just ran the scenarios keeps freed memory resident (mimalloc
# purges after a delay, glibc trims only the top of its heap), and new connections reusing it
# would look free. nginx preallocates its connection table, so its worker is measured as is.
start_ours ours-idle "$up_port"; ours_idle=$ours_pid; wait_port "$ours_port"
emit "{\"scenario\":\"idle_connections\",\"arm\":\"ours\",$(taskset -c 0 "$tool" idle "127.0.0.1:$ours_port" / "$idle_n" "$ours_idle" | cut -c2-)"
emit "{\"scenario\":\"idle_connections\",\"arm\":\"nginx\",$(taskset -c 0 "$tool" idle "127.0.0.1:$np_api" / "$idle_n" "$nginx_worker" | cut -c2-)"

machine="$(nproc) CPUs, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), Linux $(uname -r)"
command_line="benches/run.sh"
if [ "$quick" = 1 ]; then command_line+=" --quick"; elif [ "$pairs" != 3 ]; then command_line+=" --pairs $pairs"; fi
python3 "$root/benches/summarize.py" "$jsonl" --machine "$machine" --load "$load" --command "$command_line" \
  --upstream-h2 "${BENCH_UPSTREAM_H2:-0}" > "$work/table.md"
cat "$work/table.md"
echo "JSON lines: $jsonl"
if [ "$write_results" = 1 ]; then
  # Sections below the marker come from other benches (benches/synthesis_tunnel.sh): kept.
  kept=$(sed -n '/^<!-- kept by run.sh -->$/,$p' "$root/benches/RESULTS.md" 2>/dev/null || true)
  cp "$work/table.md" "$root/benches/RESULTS.md"
  if [ -n "$kept" ]; then printf '\n%s\n' "$kept" >> "$root/benches/RESULTS.md"; fi
  echo "wrote benches/RESULTS.md"
fi
