#!/usr/bin/env python3
"""A Smallest-like stand-in upstream for the benches: plain HTTP/1.1 on loopback.

It enforces the account rule the limits exist for: at most `--allow` syntheses in flight across
every TTS path (sync POST, SSE); one more gets 429 {"code":"RATE_LIMIT_EXCEEDED"}. Each synthesis
takes `--service-ms`. Keys: with `--keys-file` (JSON {"keys": [...]}, re-read per request) only
those Bearer keys are accepted, anything else gets 401; without it any Bearer key passes.
Every request is logged as one JSON line to `--log`: path, the client's X-Bench-Id and
X-Bench-Sent (epoch seconds), arrival time, status, in-flight count.
The slot is freed before the response is written (the synthesis is over when its answer starts),
so a client that sends its next request as soon as it has read an answer never meets a 429.
"""
import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TTS_PREFIXES = ("/waves/v1/tts", "/waves/v1/streaming-tts/")
TTS_SUFFIXES = ("/get_speech", "/get_speech/stream", "/stream")


def is_tts(path):
    path = path.split("?", 1)[0]
    return path.startswith(TTS_PREFIXES) or (path.startswith("/waves/v1/") and path.endswith(TTS_SUFFIXES))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--allow", type=int, default=1)
    ap.add_argument("--service-ms", type=float, default=100)
    ap.add_argument("--keys-file")
    ap.add_argument("--log")
    args = ap.parse_args()

    lock = threading.Lock()
    state = {"in_flight": 0, "peak": 0}
    log = open(args.log, "a", buffering=1) if args.log else None
    audio = b"RIFF" + b"\0" * 4092

    def accepted(auth):
        if not auth.startswith("Bearer "):
            return False
        if not args.keys_file:
            return True
        try:
            with open(args.keys_file) as f:
                keys = json.load(f)["keys"]
        except (OSError, ValueError, KeyError):
            return False
        return auth[len("Bearer "):] in keys

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def read_body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def answer(self, status, body, ctype="application/json", extra=()):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def record(self, arrived, status, in_flight):
            if log:
                line = {
                    "path": self.path, "id": self.headers.get("X-Bench-Id"),
                    "sent": float(self.headers.get("X-Bench-Sent") or 0), "arrived": arrived,
                    "status": status, "in_flight": in_flight,
                }
                with lock:
                    log.write(json.dumps(line) + "\n")

        def handle_any(self):
            arrived = time.time()
            self.read_body()
            if not accepted(self.headers.get("Authorization", "")):
                self.record(arrived, 401, None)
                return self.answer(401, b'{"message":"Invalid API key"}')
            if not is_tts(self.path):
                self.record(arrived, 200, None)
                return self.answer(200, b'{"voices":[]}')
            with lock:
                if state["in_flight"] >= args.allow:
                    over = state["in_flight"] + 1
                    admitted = False
                else:
                    state["in_flight"] += 1
                    state["peak"] = max(state["peak"], state["in_flight"])
                    over = state["in_flight"]
                    admitted = True
            if not admitted:
                self.record(arrived, 429, over)
                return self.answer(429, b'{"code":"RATE_LIMIT_EXCEEDED","message":"Too many requests"}')
            try:
                time.sleep(args.service_ms / 1000)
            finally:
                with lock:
                    state["in_flight"] -= 1
            self.record(arrived, 200, over)
            if self.path.startswith("/waves/v1/tts/live"):
                body = b'data: {"status":"chunk","data":"AAAA"}\n\ndata: {"status":"complete"}\n\n'
                return self.answer(200, body, "text/event-stream")
            return self.answer(200, audio, "audio/wav")

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            # A proxy closing a pooled connection mid-read is routine here, not worth a trace.
            pass

    server = Server(("127.0.0.1", args.port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
