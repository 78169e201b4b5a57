"""Helpers shared by the Python benches: free ports, starting the stand-in and the proxy."""
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_standin(port, allow, log=None, keys_file=None, service_ms=100):
    cmd = [sys.executable, os.path.join(HERE, "standin_upstream.py"), "--port", str(port),
           "--allow", str(allow), "--service-ms", str(service_ms)]
    if log:
        cmd += ["--log", log]
    if keys_file:
        cmd += ["--keys-file", keys_file]
    proc = subprocess.Popen(cmd)
    wait_port(port)
    return proc


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def start_proxy(binary, config_path, stderr_path=None):
    err = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL
    return subprocess.Popen([binary, "--config", config_path], stderr=err, stdout=subprocess.DEVNULL)


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * (len(values) - 1)))))
    return values[k]
