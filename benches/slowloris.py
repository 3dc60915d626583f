"""Slow-header connections against a running server (issue 30 item 1).

python3 benches/slowloris.py BIN [CONNECTIONS] [SECONDS] [NOFILE]

Starts `BIN serve` (open-files soft limit NOFILE, default 1024, as a default Linux shell
gives), opens CONNECTIONS (default 2000) connections that each send a request's headers one
byte a second and never end them, and probes /healthz on a fresh connection every 0.5 s for
SECONDS (default 45). Prints: connections held at each second, how many the server closed
and when, the probes' median and worst latency and how many failed, and the server's RSS.
"""
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from _serve import rss_mib, start  # noqa: E402

binary = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 45
nofile = int(sys.argv[4]) if len(sys.argv) > 4 else 1024

# This process needs a descriptor per connection; the server gets `nofile` as its hard limit.
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 512), hard))


def limit_server():
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


with tempfile.TemporaryDirectory() as d:
    import subprocess
    import _serve
    real_popen = subprocess.Popen
    subprocess.Popen = lambda *a, **k: real_popen(*a, preexec_fn=limit_server, **k)
    proc, base = start(binary, d, 0)
    subprocess.Popen = real_popen
    host, port = base.rsplit(":", 1)[0].split("//")[1], int(base.rsplit(":", 1)[1])
    socks, opened_fail = [], 0
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            opened_fail += 1
            continue
        socks.append([s, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", None])
    t0 = time.time()
    probes, failed, held, closed_at, failed_at = [], 0, [], [], []
    next_byte = t0
    while time.time() - t0 < seconds:
        now = time.time()
        if now >= next_byte:
            next_byte += 1.0
            alive = 0
            for entry in socks:
                s, pending, gone = entry
                if gone is not None:
                    continue
                try:
                    s.send(pending if pending else b"a")
                    entry[1] = b""
                    alive += 1
                except BlockingIOError:
                    alive += 1
                except OSError:
                    entry[2] = now - t0
                    closed_at.append(now - t0)
            held.append(alive)
        p0 = time.time()
        try:
            urllib.request.urlopen(base + "/healthz", timeout=5).read()
            probes.append((time.time() - p0) * 1000)
        except Exception:
            failed += 1
            failed_at.append(round(p0 - t0, 1))
        time.sleep(0.5)
    rss = rss_mib(proc.pid)
    proc.terminate()
    proc.wait()
    for s, _, _ in socks:
        s.close()
print(json.dumps({
    "connections": n,
    "connect_failed": opened_fail,
    "server_nofile": nofile,
    "held_per_second": held[:: max(1, len(held) // 15)],
    "closed_by_server": len(closed_at),
    "first_closed_s": round(min(closed_at), 1) if closed_at else None,
    "last_closed_s": round(max(closed_at), 1) if closed_at else None,
    "healthz_probes": len(probes) + failed,
    "healthz_failed": failed,
    "healthz_failed_at_s": failed_at,
    "healthz_median_ms": round(statistics.median(probes), 1) if probes else None,
    "healthz_max_ms": round(max(probes), 1) if probes else None,
    "server_rss_mib": rss,
}, indent=1))
