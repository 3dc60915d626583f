#!/usr/bin/env python3
"""200 (or N) concurrent Server-Sent Event clients on one job, against a real server.

    python3 benches/sse_clients.py target/release/modelpress [N]

Starts the server on a free port with no worker (so the job stays queued and nothing but the
streams changes the server's memory), opens N streams to /v1/jobs/{id}/events and N more to
/v1/events, and reports:
- the server's resident memory before the streams, with them open, and per stream;
- /healthz and GET /v1/jobs/{id} latency while the 2N streams are open (median of 50);
- then cancels the job: the time from the cancel request to each job client's `done` event
  (median, p95, max), and that every client got it and the server stayed healthy.
Prints one JSON object.
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from _serve import free_port

BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200
CASES = os.environ.get("MODELPRESS_CASES", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "cases"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def req(base, path, data=None, ctype=None, method=None):
    r = urllib.request.Request(base + path, data=data, method=method)
    if ctype:
        r.add_header("content-type", ctype)
    with urllib.request.urlopen(r, timeout=120) as resp:
        return json.loads(resp.read())


def stream(port, path, until_done, out, ready):
    """Reads an event stream with a raw socket; records when `done` arrived."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    buf = b""
    got_first = False
    s.settimeout(300)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if not got_first and b"event:" in buf:
                got_first = True
                ready.release()
            if len(buf) > 1 << 20:
                buf = buf[-4096:]  # /v1/events never ends: keep only the tail
            if until_done and b"event: done" in buf:
                out.append(time.time())
                break
    finally:
        s.close()


def main():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="sse-bench-")
    env = dict(os.environ, RUST_LOG="warn")
    srv = subprocess.Popen([BIN, "serve", "--addr", f"127.0.0.1:{port}", "--data-dir", data, "--workers", "0"], env=env)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        mnist = open(os.path.join(CASES, "mnist8", "mnist-8.onnx"), "rb").read()
        small = req(base, "/v1/models?name=mnist.onnx", mnist)
        job = req(base, "/v1/jobs", json.dumps({"model_id": small["id"], "preset": "int8", "latency": False}).encode(), "application/json")
        time.sleep(0.3)
        rss0 = rss_kib(srv.pid)
        ready = threading.Semaphore(0)
        done_at = []
        all_out = []
        threads = []
        for _ in range(N):
            t = threading.Thread(target=stream, args=(port, f"/v1/jobs/{job['id']}/events", True, done_at, ready), daemon=True)
            t.start()
            threads.append(t)
        for _ in range(N):
            t = threading.Thread(target=stream, args=(port, "/v1/events", False, all_out, ready), daemon=True)
            t.start()
        for _ in range(2 * N):
            ready.acquire(timeout=60)
        rss1 = rss_kib(srv.pid)
        lat_h, lat_j = [], []
        for _ in range(50):
            t0 = time.perf_counter()
            urllib.request.urlopen(base + "/healthz", timeout=10).read()
            lat_h.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            req(base, f"/v1/jobs/{job['id']}")
            lat_j.append((time.perf_counter() - t0) * 1000)
        state_during = req(base, f"/v1/jobs/{job['id']}")["state"]
        finished = time.time()
        req(base, f"/v1/jobs/{job['id']}/cancel", b"", method="POST")
        for t in threads:
            t.join(timeout=600)
        final = req(base, f"/v1/jobs/{job['id']}")
        delays = sorted((t - finished) * 1000 for t in done_at)
        p95 = delays[int(0.95 * (len(delays) - 1))] if delays else None
        print(json.dumps({
            "clients_per_stream": N,
            "job_state_while_clients_connected": state_during,
            "job_final_state": final["state"],
            "clients_that_got_done": len(done_at),
            "rss_kib_before": rss0,
            "rss_kib_with_streams": rss1,
            "rss_kib_per_stream": round((rss1 - rss0) / (2 * N), 1),
            "done_delay_ms": {"median": round(statistics.median(delays), 1) if delays else None,
                              "p95": round(p95, 1) if p95 is not None else None,
                              "max": round(delays[-1], 1) if delays else None},
            "healthz_ms_median": round(statistics.median(lat_h), 2),
            "get_job_ms_median": round(statistics.median(lat_j), 2),
            "server_alive": srv.poll() is None,
        }, indent=2))
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=40)
        except subprocess.TimeoutExpired:
            srv.kill()


if __name__ == "__main__":
    main()
