#!/usr/bin/env python3
"""Turn one benches/run.sh JSON-lines file into the Markdown table of benches/RESULTS.md.

Each figure is the median over the A/B pairs with the min-max beside it; the ratio is
smallest-proxy's median over nginx's; the target column is the
project's performance target (at or below nginx, SSE and idle-memory bounds).
"""
import argparse
import json
import statistics
import sys

p = argparse.ArgumentParser()
p.add_argument("jsonl")
p.add_argument("--machine", default="")
p.add_argument("--load", default="")
p.add_argument("--command", default="benches/run.sh")
p.add_argument("--upstream-h2", default="0")
a = p.parse_args()

rows = [json.loads(line) for line in open(a.jsonl) if line.strip()]


def values(scenario, arm, figure):
    out = []
    for r in rows:
        if r["scenario"] != scenario or r["arm"] != arm:
            continue
        if figure == "cpu_us":
            done = r["ok"] * (r["mib_per_req"] if r["unit"] == "mib" else 1)
            if done:
                out.append(r["cpu_ns"] / 1e3 / done)
        elif figure == "rss_mib":
            out.append(r["rss_kib"] / 1024)
        elif figure == "anon_mib" and "anon_kib" in r:
            out.append(r["anon_kib"] / 1024)
        elif figure == "peak_mib":
            out.append(r["rss_peak_kib"] / 1024)
        elif figure in r:
            out.append(float(r[figure]))
    return out


def fmt(v):
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def cell(vs):
    if not vs:
        return "–"
    m = statistics.median(vs)
    if len(vs) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(min(vs))}–{fmt(max(vs))})"


# (scenario, figure, label, target kind, target value)
# target kinds: "le_nginx" ours <= nginx; "le" ours <= value; None
LINES = [
    ("rate1000", "cpu_us", "1000 req/s: CPU µs per request", "le_nginx", None),
    ("rate1000", "p50_ms", "1000 req/s: p50 ms", "le_nginx", None),
    ("rate1000", "p99_ms", "1000 req/s: p99 ms", None, None),
    ("rate5000", "cpu_us", "5000 req/s: CPU µs per request", "le_nginx", None),
    ("rate5000", "p50_ms", "5000 req/s: p50 ms", "le_nginx", None),
    ("rate5000", "p99_ms", "5000 req/s: p99 ms", None, None),
    ("rate5000", "rps", "5000 req/s: achieved req/s", None, None),
    ("saturated", "cpu_us", "saturated (32 conns): CPU µs per request", "le_nginx", None),
    # Reported, not a target: saturated, the load generator and the
    # upstream share CPU 0, so the rate measures that CPU as much as the proxy.
    ("saturated", "rps", "saturated (32 conns): req/s", None, None),
    ("saturated", "p50_ms", "saturated (32 conns): p50 ms", "le_nginx", None),
    ("saturated", "p99_ms", "saturated (32 conns): p99 ms", None, None),
    ("saturated", "peak_mib", "saturated (32 conns): peak RSS MiB", None, None),
    ("serial", "cpu_us", "serial (1 conn): CPU µs per request", "le_nginx", None),
    ("serial", "p50_ms", "serial (1 conn): p50 ms", "le_nginx", None),
    ("serial", "p99_ms", "serial (1 conn): p99 ms", None, None),
    ("upload_1mib", "cpu_us", "1 MiB upload: CPU µs per MiB", "le_nginx", None),
    ("download_1mib", "cpu_us", "1 MiB download: CPU µs per MiB", "le_nginx", None),
    ("download_1mib", "peak_mib", "1 MiB down/upload: peak RSS MiB", None, None),
    ("sse", "first_event_ms", "SSE: first event ms", "le", 5.0),
    ("sse", "lag_median_ms", "SSE: median lag ms", "le", 1.0),
    ("sse", "lag_max_ms", "SSE: max lag ms", None, None),
    ("websocket", "rtt_median_us", "WebSocket echo: median round trip µs", "le_nginx", None),
    ("websocket", "rtt_p99_us", "WebSocket echo: p99 round trip µs", None, None),
    ("idle", "rss_mib", "idle RSS MiB", "le", 10.0 * 1000 * 1000 / 1024 / 1024),
    ("idle", "anon_mib", "idle RSS MiB, anonymous part (the rest is code pages)", None, None),
    ("idle_connections", "bytes_per_connection", "idle keep-alive connection: bytes each", "le", 8000.0),
]

out = []
pairs = max((r.get("pair", 0) for r in rows), default=0)
out.append("# Benchmark results: smallest-proxy vs nginx doing the same job\n")
out.append(f"Command: `{a.command}` (regenerate this file with `benches/run.sh --write-results`).  ")
busy = ""
try:
    if float(a.load) > 0.5:
        busy = (" **The machine was busy (run with BENCH_ALLOW_BUSY=1): other processes shared both "
                "CPUs, so CPU and latency figures are inflated and noisy; rerun on a quiet machine.**")
except ValueError:
    pass
out.append(f"Machine: {a.machine}; 1-minute load average at start: {a.load}.{busy}  ")
out.append(
    "Placement: load generators (oha, wrk, bench_tool) and upstreams (nginx TLS 1.3, bench_tool "
    "SSE/WebSocket) on CPU 0; each proxy on CPU 1 (taskset). "
    f"{pairs} alternating A/B pair(s); each cell is the median (min–max) over the pairs.  "
)
out.append(
    "Upstream protocol: "
    + ("HTTP/2 offered by the upstream (smallest-proxy uses h2, nginx HTTP/1.1)" if a.upstream_h2 == "1"
       else "HTTP/1.1 for both (the upstream does not offer h2)")
    + ". CPU is the sum of /proc/PID/task/*/schedstat over each run (nginx: master + worker); "
    "RSS is VmRSS (nginx: its worker only), peak is VmHWM reset before each run. Both compare "
    "p50s on the same path, so the p50 difference is the difference in added latency. "
    "nginx touches its whole connection table (worker_connections 8192) at start, so its idle "
    "RSS already holds what its idle connections use; smallest-proxy's idle connections are "
    "measured on a freshly started proxy, so memory freed by the earlier runs is not counted "
    "as free. See benches/PROFILE.md for what was changed and what is left.\n"
)
out.append("| Figure | smallest-proxy | nginx | ours ÷ nginx | Target | Met |")
out.append("|---|---|---|---|---|---|")
for scenario, figure, label, kind, target in LINES:
    ours = values(scenario, "ours", figure)
    ngx = values(scenario, "nginx", figure)
    if not ours and not ngx:
        continue
    ratio = (
        f"{statistics.median(ours) / statistics.median(ngx):.2f}"
        if ours and ngx and statistics.median(ngx) > 0 else "–"
    )
    met, tgt = "", ""
    if ours:
        m = statistics.median(ours)
        if kind == "le_nginx" and ngx:
            tgt, met = "≤ nginx", "yes" if m <= statistics.median(ngx) else "**no**"
        elif kind == "le":
            tgt, met = f"≤ {fmt(target)}", "yes" if m <= target else "**no**"
    out.append(f"| {label} | {cell(ours)} | {cell(ngx)} | {ratio} | {tgt} | {met} |")

failed = [r for r in rows if r.get("failed")]
if failed:
    out.append("")
    out.append("Failed requests (counted out of the per-request figures):")
    for r in failed:
        out.append(f"- {r['scenario']} {r['arm']} pair {r.get('pair')}: {r['failed']}")
print("\n".join(out))
sys.exit(0)
