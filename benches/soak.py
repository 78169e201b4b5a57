#!/usr/bin/env python3
"""Fault soak: steady load through the proxy while keys rotate, the config reloads, Redis and the
upstream restart.

Parts: the stand-in upstream (standin_upstream.py, --allow syntheses in flight, 100 ms each,
accepting only the keys in its keys file), a redis-server on a free port, the release proxy with
no limits config but `[limits.shared] redis_url` (so the built-in profile's auto `tts` class,
shared through Redis) and a file key source. Load: 4 workers posting /waves/v1/tts, one posting
the deprecated /waves/v1/lightning/get_speech, one posting /waves/v1/tts/live (SSE), one getting
/waves/v1/lightning/get_voices (50 ms apart); a worker waits 50 ms after an error, as an app
would, rather than spinning on 502s; every request carries X-Bench-Id and X-Bench-Sent so the
stand-in logs when it arrived. Faults, each kind spread evenly over the run:
  key rotations   the stand-in's keys file gets the new key beside the old one, then the proxy's
                  key file is replaced (rename), then after --grace the old key is removed;
  reloads         SIGHUP to the proxy;
  Redis restarts  SIGTERM redis-server, --redis-down seconds, start it again;
  upstream restarts SIGKILL the stand-in, 0.5 s, start it again.
Reported: client errors outside upstream outages (an outage window runs from the kill to 1 s
after the stand-in listens again; a request overlapping it is excused), queue wait (stand-in
arrival minus client send, first arrival of each TTS request) during Redis outages vs otherwise,
requests overtaken (arrived after one sent >= 20 ms later), 401 resends (the proxy's log line and
the stand-in's 401 count), and the learned limit seen on /ready over time.
Usage: benches/soak.sh [--seconds 180] (builds, then runs this).
"""
import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter

import httpx

from benchlib import free_port, percentile, start_proxy, start_standin, wait_port, write_atomic

TTS_BODY = {"text": "The quick brown fox jumps over the lazy dog.", "voice_id": "emily"}


class Soak:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.up_port = free_port()
        self.redis_port = free_port()
        self.proxy_port = free_port()
        self.keys_file = os.path.join(work, "accepted.json")
        self.key_file = os.path.join(work, "key")
        self.upstream_log = os.path.join(work, "upstream.jsonl")
        self.proxy_log = os.path.join(work, "proxy.log")
        self.records = []  # (id, kind, start, end, status, detail)
        self.upstream_outages = []  # [down, up+1s]
        self.redis_outages = []  # [down, up]
        self.ready_samples = []  # (t, concurrency, learned)
        self.events = Counter()
        self.seq = 0
        self.stop = False

    # ---- parts -------------------------------------------------------------------------
    def start_redis(self):
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.work], stdout=subprocess.DEVNULL)
        wait_port(self.redis_port)

    def start_upstream(self):
        self.standin = start_standin(self.up_port, self.args.allow, log=self.upstream_log,
                                     keys_file=self.keys_file)

    def setup(self):
        self.key = "sk-soak-0"
        write_atomic(self.keys_file, json.dumps({"keys": [self.key]}))
        write_atomic(self.key_file, self.key + "\n")
        self.start_redis()
        self.start_upstream()
        self.config = os.path.join(self.work, "proxy.toml")
        with open(self.config, "w") as f:
            f.write(f'[listen]\naddress = "127.0.0.1:{self.proxy_port}"\n'
                    f'[upstream]\nurl = "http://127.0.0.1:{self.up_port}"\n'
                    f'[key]\nsource = "file"\nfile = "{self.key_file}"\n'
                    f'[limits.shared]\nredis_url = "redis://127.0.0.1:{self.redis_port}"\n'
                    f'[log]\nlevel = "info"\n')
        self.proxy = start_proxy(self.args.proxy, self.config, self.proxy_log)
        wait_port(self.proxy_port)

    def teardown(self):
        for p in (self.proxy, self.standin, self.redis):
            if p.poll() is None:
                p.terminate()
                p.wait()

    # ---- load --------------------------------------------------------------------------
    async def worker(self, client, kind, method, path, body=None, pause=0.0):
        while not self.stop:
            self.seq += 1
            rid = f"{kind}-{self.seq}"
            start = time.time()
            headers = {"X-Bench-Id": rid, "X-Bench-Sent": repr(start)}
            try:
                r = await client.request(method, path, json=body, headers=headers)
                status, detail = r.status_code, (r.text[:160] if r.status_code != 200 else "")
            except httpx.HTTPError as e:
                status, detail = "exception", f"{type(e).__name__}: {e}"
            self.records.append((rid, kind, start, time.time(), status, detail))
            if pause or status != 200:
                # An app backs off a little after an error rather than spinning on 502s.
                await asyncio.sleep(max(pause, 0.05))

    async def ready_poller(self, client):
        while not self.stop:
            try:
                tts = (await client.get("/ready")).json()["limits"]["tts"]
                self.ready_samples.append((time.time(), tts.get("concurrency"), tts.get("learned")))
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            await asyncio.sleep(1.0)

    # ---- faults ------------------------------------------------------------------------
    async def spread(self, count, action, offset):
        """Run `action` `count` times, evenly over the run, starting `offset` into each gap."""
        gap = self.args.seconds / count
        t0 = self.t0
        for i in range(count):
            at = t0 + gap * (i + offset)
            await asyncio.sleep(max(0.0, at - time.time()))
            if self.stop:
                return
            await action(i)
            self.events[action.__name__] += 1

    async def rotate(self, i):
        old, new = self.key, f"sk-soak-{i + 1}-{random.getrandbits(32):08x}"
        write_atomic(self.keys_file, json.dumps({"keys": [new, old]}))
        write_atomic(self.key_file, new + "\n")
        self.key = new
        await asyncio.sleep(self.args.grace)
        write_atomic(self.keys_file, json.dumps({"keys": [new]}))

    async def reload(self, i):
        self.proxy.send_signal(signal.SIGHUP)

    async def redis_restart(self, i):
        down = time.time()
        self.redis.terminate()
        await asyncio.get_running_loop().run_in_executor(None, self.redis.wait)
        await asyncio.sleep(self.args.redis_down)
        await asyncio.get_running_loop().run_in_executor(None, self.start_redis)
        self.redis_outages.append((down, time.time()))

    async def upstream_restart(self, i):
        down = time.time()
        self.standin.kill()
        await asyncio.get_running_loop().run_in_executor(None, self.standin.wait)
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, self.start_upstream)
        self.upstream_outages.append((down, time.time() + 1.0))

    async def run(self):
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        base = f"http://127.0.0.1:{self.proxy_port}"
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            self.t0 = time.time()
            load = [asyncio.create_task(self.worker(client, "tts", "POST", "/waves/v1/tts", TTS_BODY))
                    for _ in range(4)]
            load.append(asyncio.create_task(
                self.worker(client, "get_speech", "POST", "/waves/v1/lightning/get_speech", TTS_BODY)))
            load.append(asyncio.create_task(self.worker(client, "sse", "POST", "/waves/v1/tts/live", TTS_BODY)))
            load.append(asyncio.create_task(
                self.worker(client, "voices", "GET", "/waves/v1/lightning/get_voices", pause=0.05)))
            load.append(asyncio.create_task(self.ready_poller(client)))
            faults = [
                self.spread(25, self.rotate, 0.3),
                self.spread(16, self.reload, 0.6),
                self.spread(10, self.redis_restart, 0.45),
                self.spread(7, self.upstream_restart, 0.8),
            ]
            await asyncio.gather(*faults)
            await asyncio.sleep(max(0.0, self.t0 + self.args.seconds - time.time()))
            self.stop = True
            await asyncio.gather(*load)

    # ---- report ------------------------------------------------------------------------
    def report(self):
        def overlaps(a, b, windows):
            return any(a <= hi and b >= lo for lo, hi in windows)

        errors = [r for r in self.records if r[4] != 200]
        excused = [r for r in errors if overlaps(r[2], r[3], self.upstream_outages)]
        unexcused = [r for r in errors if not overlaps(r[2], r[3], self.upstream_outages)]

        with open(self.upstream_log) as f:
            upstream = [json.loads(line) for line in f]
        first = {}
        for u in upstream:
            if u["id"] and u["id"] not in first and not u["id"].startswith("voices"):
                first[u["id"]] = u
        arrivals = sorted(first.values(), key=lambda u: u["arrived"])
        # Local limits are in force from the fallback (logged) until the proxy logs Redis as
        # reachable again (its probe runs every second), not just while redis-server is down.
        local_windows = []
        with open(self.proxy_log, errors="replace") as f:
            lines = f.readlines()
        downs = [log_time(x) for x in lines if "redis unavailable: using local limits" in x]
        ups = [log_time(x) for x in lines if "redis reachable: shared limits in effect" in x]
        for d in downs:
            later = [u for u in ups if u > d]
            local_windows.append((d, later[0] if later else d + self.args.redis_down + 1.0))
        windows = [(lo, hi) for lo, hi in self.redis_outages] + local_windows
        waits = {"redis_down": [], "redis_up": []}
        overtaken = Counter()
        latest_sent = 0.0
        for u in arrivals:
            phase = "redis_down" if overlaps(u["sent"], u["arrived"], windows) else "redis_up"
            if overlaps(u["sent"], u["arrived"], self.upstream_outages):
                continue
            waits[phase].append(u["arrived"] - u["sent"])
            if latest_sent - u["sent"] >= 0.020:
                overtaken[phase] += 1
            latest_sent = max(latest_sent, u["sent"])
        resend_lines = 0
        fallbacks, returns = [], []
        with open(self.proxy_log, errors="replace") as f:
            for line in f:
                if "resending with the refreshed key" in line:
                    resend_lines += 1
                elif "redis unavailable: using local limits" in line:
                    fallbacks.append(log_time(line))
                elif "redis reachable: shared limits in effect" in line:
                    returns.append(log_time(line))
        switches = fallbacks + returns[1:]  # the first "reachable" is the start
        throttled_at_switch = sum(
            1 for u in upstream if u["status"] == 429 and any(0 <= u["arrived"] - t <= 1.5 for t in switches))
        concurrencies = Counter(c for _, c, _ in self.ready_samples)
        ms = lambda v: round(v * 1000, 1)  # noqa: E731
        summary = {
            "seconds": self.args.seconds,
            "faults": dict(self.events),
            "requests": len(self.records),
            "by_kind": dict(Counter(r[1] for r in self.records)),
            "client_errors_total": len(errors),
            "client_errors_in_upstream_outages": len(excused),
            "client_errors_outside_upstream_outages": len(unexcused),
            "unexcused_examples": [r[1:] for r in unexcused[:10]],
            "unexcused_by_status": dict(Counter(str(r[4]) for r in unexcused)),
            "queue_wait_ms": {
                phase: {"n": len(v), "p50": ms(percentile(v, 50)), "p99": ms(percentile(v, 99)),
                        "max": ms(max(v)) if v else None}
                for phase, v in waits.items()
            },
            "overtaken_20ms": dict(overtaken),
            "upstream_401": sum(1 for u in upstream if u["status"] == 401),
            "upstream_429": sum(1 for u in upstream if u["status"] == 429),
            "upstream_429_within_1.5s_of_a_mode_switch": throttled_at_switch,
            "mode_switches": len(switches),
            "proxy_401_resends_logged": resend_lines,
            "ready_concurrency_samples": dict(concurrencies),
        }
        return summary


def log_time(line):
    """Epoch seconds of a text-format log line (it starts with an RFC 3339 UTC time)."""
    return datetime.datetime.fromisoformat(line.split(" ", 1)[0].strip()).timestamp()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                    "target", "release", "smallest-proxy"))
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--allow", type=int, default=2, help="syntheses the stand-in allows in flight")
    ap.add_argument("--grace", type=float, default=1.0,
                    help="seconds the stand-in still accepts the previous key after a rotation (0: only the current)")
    ap.add_argument("--redis-down", type=float, default=3.0)
    ap.add_argument("--keep", help="copy the logs here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        soak = Soak(args, work)
        soak.setup()
        try:
            asyncio.run(soak.run())
            # metrics before the proxy stops
            try:
                metrics = httpx.get(f"http://127.0.0.1:{soak.proxy_port}/metrics", timeout=5).text
            except httpx.HTTPError:
                metrics = ""
        finally:
            soak.teardown()
        summary = soak.report()
        summary["metrics"] = {
            line.split(" ")[0]: line.split(" ")[-1]
            for line in metrics.splitlines()
            if line.startswith(("smallest_proxy_upstream_auth_failures", "smallest_proxy_redis_fallbacks",
                                "smallest_proxy_upstream_retries", "smallest_proxy_key_rotations",
                                "smallest_proxy_config_reloads", "smallest_proxy_upstream_throttled",
                                "smallest_proxy_limit_shed"))
        }
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            for name in ("upstream.jsonl", "proxy.log"):
                subprocess.run(["cp", os.path.join(work, name), args.keep], check=False)
            with open(os.path.join(args.keep, "records.json"), "w") as f:
                json.dump({"records": soak.records, "redis_outages": soak.redis_outages,
                           "upstream_outages": soak.upstream_outages}, f)
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
