#!/usr/bin/env python3
"""kill -9 in rounds: ROUNDS × JOBS jobs, the server SIGKILLed mid-work after each round.

    python3 benches/kill9_rounds.py target/debug/modelpress [ROUNDS] [JOBS]

One data directory throughout. Each round starts the server (2 workers, a 2 s lease so that a
dead process's jobs come back quickly), submits JOBS small jobs (mnist-8 Deep Compression), waits
a random 0.05-0.8 s while they run, and kills the process with SIGKILL. A last start lets every job end.
Then it checks, through the API and in the SQLite file:
- lost: jobs accepted (202) but not listed, or not terminal;
- duplicated: ids listed twice, a job with two artifacts of one name, artifact rows or blob
  files of any attempt but the one that finished;
- every succeeded job's artifacts download with the sha256 the job lists;
- `PRAGMA integrity_check` on the database.
Prints one JSON object (the outcome counts, attempts histogram, wall time).
"""
import collections
import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import time

import _serve
from _serve import all_jobs, call

BIN = sys.argv[1]
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
JOBS = int(sys.argv[3]) if len(sys.argv) > 3 else 50
CASES = os.environ.get("MODELPRESS_CASES", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "cases"))
random.seed(20261205)


def start(data):
    # A 2 s lease: a dead process's jobs come back quickly.
    return _serve.start(BIN, data, 2, MODELPRESS_LEASE_MS="2000")


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "data")
        model = open(os.path.join(CASES, "mnist8", "mnist-8.onnx"), "rb").read()
        accepted = []
        model_id = None
        for r in range(ROUNDS):
            p, base = start(data)
            if model_id is None:
                model_id = call(base, "/v1/models?name=mnist-8.onnx", data=model)["id"]
            spec = json.dumps({"model_id": model_id, "preset": "deep-compression", "latency": False}).encode()
            for _ in range(JOBS):
                accepted.append(call(base, "/v1/jobs", data=spec, ctype="application/json")["id"])
            time.sleep(random.uniform(0.05, 0.8))
            p.send_signal(signal.SIGKILL)
            p.wait()
        p, base = start(data)
        deadline = time.time() + 1800
        while True:
            jobs = all_jobs(base)
            if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs) or time.time() > deadline:
                break
            time.sleep(1)
        ids = [j["id"] for j in jobs]
        listed = set(ids)
        states = collections.Counter(j["state"] for j in jobs)
        attempts = collections.Counter(j["attempts"] for j in jobs)
        errors = collections.Counter((j["error"] or {}).get("code") for j in jobs if j["state"] == "failed")
        lost = [i for i in accepted if i not in listed] + [j["id"] for j in jobs if j["state"] in ("queued", "running")]
        duplicated = len(ids) - len(listed)
        dup_artifacts = sum(1 for j in jobs if len({a["name"] for a in j["artifacts"]}) != len(j["artifacts"]))
        bad_sha = 0
        sample = [j for j in jobs if j["state"] == "succeeded"][:: max(1, len(jobs) // 100)]
        for j in sample:
            for a in j["artifacts"]:
                if hashlib.sha256(call(base, a["url"], raw=True)).hexdigest() != a["sha256"]:
                    bad_sha += 1
        p.send_signal(signal.SIGTERM)
        p.wait()
        db = sqlite3.connect(os.path.join(data, "modelpress.db"))
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        # Artifact rows of an attempt other than the one that finished, and blob files of any
        # attempt with no row (a dead attempt's leftovers).
        stray_rows = db.execute(
            "SELECT COUNT(*) FROM artifacts a JOIN jobs j ON j.id = a.job_id "
            "WHERE a.blob_key NOT LIKE 'artifacts/' || j.id || '/' || j.attempts || '/%'").fetchone()[0]
        keys = {r[0] for r in db.execute("SELECT blob_key FROM artifacts")}
        root = os.path.join(data, "blobs")
        files = set()
        for dirpath, _, names in os.walk(os.path.join(root, "artifacts")):
            for n in names:
                files.add(os.path.relpath(os.path.join(dirpath, n), root))
        stray_files = len(files - keys)
        print(json.dumps({
            "rounds": ROUNDS, "jobs_per_round": JOBS, "accepted": len(accepted), "listed": len(jobs),
            "states": states, "failed_codes": errors, "attempts_histogram": dict(sorted(attempts.items())),
            "lost": len(lost), "duplicated_ids": duplicated, "jobs_with_duplicate_artifacts": dup_artifacts,
            "artifact_rows_of_other_attempts": stray_rows, "blob_files_without_a_row": stray_files,
            "downloads_checked": sum(len(j["artifacts"]) for j in sample), "sha256_mismatches": bad_sha,
            "integrity_check": integrity, "wall_seconds": round(time.time() - t0, 1),
        }, indent=1))


main()
