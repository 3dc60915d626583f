#!/usr/bin/env python3
"""API latency while the workers are busy, and how fast a submitted job starts.

    python3 benches/load_latency.py target/debug/modelpress [MB] [CLIENTS]

Starts the server (2 workers) on a fresh data directory, uploads two MB-megabyte safetensors
models (random float32, 200 MB by default) and runs int8 on both at once. While both run,
CLIENTS threads (8 by default) GET /v1/jobs/{id} as fast as they can: p50, p99 and max latency, and the
count. Then, with the workers idle, 30 small jobs (mnist-8 int8) one at a time: the time from
the submit's answer to the job's started_at, and from created_at to started_at (both stamped
by the server, ms). Prints one JSON object.
"""
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime

import numpy as np

from _serve import call, start

BIN = sys.argv[1]
MB = int(sys.argv[2]) if len(sys.argv) > 2 else 200
CLIENTS = int(sys.argv[3]) if len(sys.argv) > 3 else 8
CASES = os.environ.get("MODELPRESS_CASES", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "cases"))


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    with tempfile.TemporaryDirectory() as d:
        p, base = start(BIN, os.path.join(d, "data"), 2)
        from safetensors.numpy import save_file
        rng = np.random.default_rng(0)
        big = []
        for i in range(2):
            path = os.path.join(d, f"big{i}.safetensors")
            n = MB * (1 << 20) // 4 // 4
            save_file({f"layer{k}.weight": rng.standard_normal((n // 1024, 1024), dtype=np.float32) for k in range(4)}, path)
            with open(path, "rb") as f:
                big.append(call(base, f"/v1/models?name=big{i}.safetensors", data=f.read())["id"])
        jobs = [call(base, "/v1/jobs", data=json.dumps({"model_id": m, "preset": "int8"}).encode(),
                     ctype="application/json")["id"] for m in big]
        while call(base, f"/v1/jobs/{jobs[1]}")["state"] == "queued":
            time.sleep(0.01)
        lat, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                t = time.perf_counter()
                j = call(base, f"/v1/jobs/{jobs[0]}")
                lat.append((time.perf_counter() - t) * 1000)
                if j["state"] != "running":
                    stop.set()

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy_s = time.time() - t0
        while any(call(base, f"/v1/jobs/{j}")["state"] in ("queued", "running") for j in jobs):
            time.sleep(0.2)
        states = [call(base, f"/v1/jobs/{j}")["state"] for j in jobs]
        small = call(base, "/v1/models?name=mnist-8.onnx", data=open(os.path.join(CASES, "mnist8", "mnist-8.onnx"), "rb").read())["id"]
        start_ms, created_ms = [], []
        for _ in range(30):
            t = time.time()
            j = call(base, "/v1/jobs", data=json.dumps({"model_id": small, "preset": "int8", "latency": False}).encode(),
                     ctype="application/json")
            answered = time.time()
            while True:
                v = call(base, f"/v1/jobs/{j['id']}")
                if v["started_at"]:
                    break
                time.sleep(0.002)
            start_ms.append((ts(v["started_at"]) - answered) * 1000)
            created_ms.append((ts(v["started_at"]) - ts(v["created_at"])) * 1000)
            while call(base, f"/v1/jobs/{j['id']}")["state"] in ("queued", "running"):
                time.sleep(0.01)
        p.terminate()
        p.wait()
        print(json.dumps({
            "big_models_mb": MB, "big_job_states": states,
            "get_job_while_two_big_jobs_run": {"clients": CLIENTS, "requests": len(lat), "seconds": round(busy_s, 1),
                                               "p50_ms": round(statistics.median(lat), 2), "p99_ms": round(pct(lat, 0.99), 2),
                                               "max_ms": round(max(lat), 2)},
            "created_to_started_ms": {"median": round(statistics.median(created_ms), 1), "p90": round(pct(created_ms, 0.9), 1),
                                      "max": round(max(created_ms), 1)},
            "submit_answered_to_started_ms": {"median": round(statistics.median(start_ms), 1)},
        }, indent=1))


main()
