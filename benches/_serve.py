"""What the benchmark scripts share: a free port, a JSON call, a server started on a data
directory and waited for."""
import json
import os
import socket
import subprocess
import time
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def call(base, path, data=None, ctype=None, method=None, raw=False, timeout=600):
    """One request; the JSON answer (or the raw bytes)."""
    r = urllib.request.Request(base + path, data=data, method=method)
    if ctype:
        r.add_header("content-type", ctype)
    with urllib.request.urlopen(r, timeout=timeout) as resp:
        body = resp.read()
        return body if raw else json.loads(body)


def start(binary, data_dir, workers, **env):
    """`binary serve` on a free port (extra environment in `env`); returns (process, base URL)
    once /healthz answers."""
    port = free_port()
    p = subprocess.Popen([binary, "serve", "--addr", f"127.0.0.1:{port}", "--data-dir", data_dir,
                          "--workers", str(workers)], env=dict(os.environ, RUST_LOG="warn", **env),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            call(base, "/healthz", timeout=5)
            return p, base
        except Exception:
            time.sleep(0.05)
    raise SystemExit("the server did not start")


def all_jobs(base):
    """Every job the server lists, following the cursor."""
    out, cursor = [], None
    while True:
        page = call(base, "/v1/jobs?limit=500" + (f"&cursor={cursor}" if cursor else ""))
        out += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return out
