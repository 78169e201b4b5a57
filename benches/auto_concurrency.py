#!/usr/bin/env python3
"""How much the learned TTS concurrency (`max_concurrent = "auto"`) buys, with no limits config.

For each stand-in (one allowing 1 synthesis in flight, one allowing 3; each synthesis takes
--service-ms), a fresh proxy with only [listen], [upstream] and [key] (so the built-in `smallest`
profile and its auto `tts` class) and a client sending --requests POST /waves/v1/tts with
--concurrency in flight. Reports wall time, the learned limit from /ready once the first half
has completed, throttled answers the upstream gave (absorbed by the proxy) and throttled answers
that reached the client. Usage: benches/auto_concurrency.sh (builds, then runs this).
"""
import argparse
import asyncio
import json
import os
import tempfile
import time

import httpx

from benchlib import free_port, start_proxy, start_standin, wait_port


async def run_client(proxy_port, requests, concurrency):
    base = f"http://127.0.0.1:{proxy_port}"
    statuses = []
    learned = {}
    done = 0
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one(i):
            nonlocal done
            async with sem:
                r = await client.post("/waves/v1/tts", json={"text": f"Hello number {i}.", "voice_id": "emily"})
                statuses.append((r.status_code, r.text[:120] if r.status_code != 200 else ""))
                done += 1
                if done == requests // 2:
                    ready = (await client.get("/ready")).json()
                    learned.update(ready["limits"]["tts"])

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.monotonic() - started
        final = (await client.get("/ready")).json()["limits"]["tts"]
    return wall, statuses, learned, final


def arm(binary, allow, args, work, round_no):
    up = free_port()
    log = os.path.join(work, f"upstream-{allow}-{round_no}.jsonl")
    standin = start_standin(up, allow, log=log, service_ms=args.service_ms)
    key = os.path.join(work, "key")
    with open(key, "w") as f:
        f.write("sk-bench-key\n")
    port = free_port()
    config = os.path.join(work, f"proxy-{allow}.toml")
    with open(config, "w") as f:
        f.write(f'[listen]\naddress = "127.0.0.1:{port}"\n[upstream]\nurl = "http://127.0.0.1:{up}"\n'
                f'[key]\nsource = "file"\nfile = "{key}"\n[log]\nlevel = "warn"\n')
    proxy = start_proxy(binary, config, os.path.join(work, f"proxy-{allow}.log"))
    try:
        wait_port(port)
        wall, statuses, learned, final = asyncio.run(run_client(port, args.requests, args.concurrency))
    finally:
        proxy.terminate()
        proxy.wait()
        standin.terminate()
        standin.wait()
    with open(log) as f:
        upstream = [json.loads(line) for line in f]
    return {
        "allow": allow,
        "wall_s": round(wall, 3),
        "ok": sum(1 for s, _ in statuses if s == 200),
        "client_429": sum(1 for s, _ in statuses if s == 429),
        "client_other_errors": [s for s in statuses if s[0] not in (200, 429)],
        "upstream_429": sum(1 for r in upstream if r["status"] == 429),
        # The longest time the upstream had a free slot and nothing arrived (after the first).
        "upstream_idle_max_s": idle_max(upstream, allow, args.service_ms / 1000),
        "upstream_peak_in_flight": max((r["in_flight"] or 0) for r in upstream if r["status"] == 200),
        f"learned_after_{args.requests // 2}": learned.get("concurrency"),
        "learned_at_end": final.get("concurrency"),
        "learned": final.get("learned"),
    }


def idle_max(upstream, allow, service):
    """Longest stretch with fewer than `allow` syntheses running at the stand-in (a slot idle)."""
    edges = sorted([(r["arrived"], 1) for r in upstream if r["status"] == 200]
                   + [(r["arrived"] + service, -1) for r in upstream if r["status"] == 200])
    running, idle_from, longest = 0, None, 0.0
    for t, d in edges[:-1]:
        running += d
        if running < allow and idle_from is None:
            idle_from = t
        elif running >= allow and idle_from is not None:
            longest = max(longest, t - idle_from)
            idle_from = None
    return round(longest, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                    "target", "release", "smallest-proxy"))
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--service-ms", type=float, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = []
        for r in range(args.rounds):
            for allow in (1, 3):
                res = arm(args.proxy, allow, args, work, r)
                res["round"] = r + 1
                results.append(res)
                print(json.dumps(res), flush=True)
    walls = {a: sorted(x["wall_s"] for x in results if x["allow"] == a) for a in (1, 3)}
    med = {a: w[len(w) // 2] for a, w in walls.items()}
    print(f"median wall: allow-1 {med[1]:.3f} s, allow-3 {med[3]:.3f} s, ratio {med[1] / med[3]:.2f}x; "
          f"client 429s: {sum(x['client_429'] for x in results)}; "
          f"other client errors: {sum(len(x['client_other_errors']) for x in results)}")


if __name__ == "__main__":
    main()
