#!/usr/bin/env python3
"""The fleet as separate OS processes: one API process, worker processes, PostgreSQL and S3.

    python3 benches/fleet.py kill BINARY [JOBS]        # default 60 jobs
    python3 benches/fleet.py throughput BINARY [JOBS]  # default 40 jobs per run
    python3 benches/fleet.py upload BINARY             # 1 GiB upload into S3

BINARY is a modelpress built with the `failpoints` feature (the `cargo test --all-features`
build, target/debug/modelpress) for `kill`; any build for `throughput`. Each run makes its own
PostgreSQL database on MODELPRESS_TEST_POSTGRES_URL's server (default
postgres://postgres@127.0.0.1:5432/test, via psql) and starts moto's S3 server on a free port.
No directory is shared between processes but the manifest signing key file.

kill: 1 API (`serve --workers 0`) and 3 `worker --workers 1` processes, a 2 s lease, each
tensor slowed by 40 ms so jobs are mid-run when: worker 1 is SIGKILLed 2 s after the jobs
are submitted, and worker 2 is stopped (SIGTERM, its job goes back to the queue) and
restarted 1 s later. Then it waits for every job to end, restarts worker 1 (as a supervisor
would), and checks: each accepted job listed once and terminal; each artifact downloads
through the API with the sha256 the job lists; no artifact row of an attempt other than the
finishing one; every worker's scratch directory empty once the workers have stopped (the
killed worker's job copy stays until it starts again). Prints one JSON object.

throughput: JOBS small jobs (mnist-8 int8), all queued before 1 and then 2 worker processes
(one worker each) start; jobs per minute from the first job's start to the last job's end,
as the database recorded them. Prints one JSON object.

upload: the API process alone on PostgreSQL + S3; a 1 GiB float32 .npy uploaded with
`curl -T` while the process's RSS is sampled every 20 ms (as benches/e2e.py does on the local
store); then the bucket's objects and the API's scratch directory are listed. Prints one JSON
object.
"""
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import _serve
from _serve import all_jobs, call

MODE, BIN = sys.argv[1], sys.argv[2]
JOBS = int(sys.argv[3]) if len(sys.argv) > 3 else (60 if MODE == "kill" else 40)
ADMIN = os.environ.get("MODELPRESS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
CASES = os.environ.get("MODELPRESS_CASES", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "cases"))


def psql(sql, url=ADMIN):
    return subprocess.run(["psql", url, "-tAc", sql], check=True, capture_output=True, text=True).stdout


class Fleet:
    def __init__(self, d, lease_ms, failpoint=None):
        self.d = d
        self.db = f"mp_fleet_{uuid.uuid4().hex}"
        self.s3, self.api, self.workers = None, None, {}
        try:
            self._start(d, lease_ms, failpoint)
        except BaseException:
            self.stop()
            raise

    def _start(self, d, lease_ms, failpoint):
        psql(f"CREATE DATABASE {self.db}")
        self.db_url = ADMIN.rsplit("/", 1)[0] + "/" + self.db
        port = _serve.free_port()
        self.s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = self.endpoint = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(urllib.request.Request(endpoint + "/fleet", method="PUT"), timeout=2)
                break
            except Exception:
                time.sleep(0.1)
        self.env = dict(
            MODELPRESS_DATABASE_URL=self.db_url, MODELPRESS_BLOB_URL="s3://fleet/run",
            MODELPRESS_BLOB_OPTIONS=f"aws_endpoint={endpoint},aws_allow_http=true,aws_region=us-east-1,"
                                    "aws_access_key_id=test,aws_secret_access_key=test",
            MODELPRESS_SIGNING_KEY_FILE=os.path.join(d, "fleet.key"), MODELPRESS_LEASE_MS=str(lease_ms))
        if failpoint:
            self.env["MODELPRESS_FAILPOINT"] = failpoint
        self.api, self.base = _serve.start(BIN, os.path.join(d, "api"), 0, **self.env)

    def start_worker(self, name):
        port = _serve.free_port()
        data = os.path.join(self.d, name)
        p = subprocess.Popen([BIN, "worker", "--addr", f"127.0.0.1:{port}", "--data-dir", data, "--workers", "1"],
                             env=dict(os.environ, RUST_LOG="warn", **self.env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                call(f"http://127.0.0.1:{port}", "/healthz", timeout=5)
                break
            except Exception:
                time.sleep(0.05)
        self.workers[name] = p
        return p

    def stop(self):
        for p in list(self.workers.values()) + [self.api]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait()
        if self.s3 is not None:
            self.s3.kill()
            self.s3.wait()
        psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")


def submit(base, n, preset):
    model = open(os.path.join(CASES, "mnist8", "mnist-8.onnx"), "rb").read()
    model_id = call(base, "/v1/models?name=mnist-8.onnx", data=model)["id"]
    spec = json.dumps({"model_id": model_id, "preset": preset, "latency": False}).encode()
    return [call(base, "/v1/jobs", data=spec, ctype="application/json")["id"] for _ in range(n)]


def wait_all(base, deadline_s=1800):
    deadline = time.time() + deadline_s
    while True:
        jobs = all_jobs(base)
        if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs) or time.time() > deadline:
            return jobs
        time.sleep(0.2)


def kill():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        f = Fleet(d, lease_ms=2000, failpoint="tensor-delay-ms=40")
        for w in ("w1", "w2", "w3"):
            f.start_worker(w)
        accepted = submit(f.base, JOBS, "int8")
        time.sleep(2)
        running_before = sum(1 for j in all_jobs(f.base) if j["state"] == "running")
        f.workers["w1"].send_signal(signal.SIGKILL)
        f.workers["w1"].wait()
        f.workers["w2"].send_signal(signal.SIGTERM)
        f.workers["w2"].wait()
        time.sleep(1)
        f.start_worker("w2")
        jobs = wait_all(f.base)
        ids = [j["id"] for j in jobs]
        states = {}
        for j in jobs:
            states[j["state"]] = states.get(j["state"], 0) + 1
        attempts = {}
        for j in jobs:
            attempts[j["attempts"]] = attempts.get(j["attempts"], 0) + 1
        bad_sha, checked = 0, 0
        for j in jobs:
            for a in j["artifacts"]:
                checked += 1
                if hashlib.sha256(call(f.base, a["url"], raw=True)).hexdigest() != a["sha256"]:
                    bad_sha += 1
        # A SIGKILLed process cannot clean up: its job's scratch copy stays until that worker
        # starts again (as a supervisor restarts it), which empties its scratch directory.
        killed_left = len(os.listdir(os.path.join(d, "w1", "tmp")))
        f.start_worker("w1")
        stray_rows = int(psql(
            "SELECT COUNT(*) FROM artifacts a JOIN jobs j ON j.id = a.job_id "
            "WHERE a.blob_key NOT LIKE 'artifacts/' || j.id || '/' || j.attempts || '/%'", f.db_url))
        f.stop()
        scratch = {w: len(os.listdir(os.path.join(d, w, "tmp"))) for w in ("w1", "w2", "w3")}
        print(json.dumps({
            "jobs": JOBS, "accepted": len(accepted), "listed": len(jobs), "listed_once": len(ids) == len(set(ids)),
            "running_when_killed": running_before, "states": states,
            "attempts_histogram": dict(sorted(attempts.items())),
            "not_terminal": sum(1 for j in jobs if j["state"] in ("queued", "running")),
            "lost": len(set(accepted) - set(ids)), "artifacts_downloaded": checked, "sha256_mismatches": bad_sha,
            "artifact_rows_of_other_attempts": stray_rows,
            "scratch_entries_of_the_killed_worker_before_its_restart": killed_left,
            "scratch_entries_left": scratch, "wall_seconds": round(time.time() - t0, 1),
        }, indent=1))


def stamp(t):
    """Seconds since the epoch of an RFC 3339 time the API returned."""
    return datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()


def throughput():
    out = {"jobs": JOBS, "preset": "int8", "jobs_per_minute": {}}
    for n in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            f = Fleet(d, lease_ms=30000)
            # Everything queued first, then the workers start: the figure is the workers'
            # pace, not the pace of submission.
            submit(f.base, JOBS, "int8")
            for w in range(n):
                f.start_worker(f"w{w + 1}")
            jobs = wait_all(f.base)
            f.stop()
            ok = sum(1 for j in jobs if j["state"] == "succeeded")
            # From the first claim to the last end, as the database recorded them.
            elapsed = max(stamp(j["finished_at"]) for j in jobs) - min(stamp(j["started_at"]) for j in jobs)
            out["jobs_per_minute"][f"{n}_worker_processes"] = {"succeeded": ok, "seconds": round(elapsed, 2),
                                                               "jobs_per_minute": round(ok / elapsed * 60, 1)}
    print(json.dumps(out, indent=1))


def upload():
    with tempfile.TemporaryDirectory() as d:
        f = Fleet(d, lease_ms=30000)
        try:
            out = _serve.upload_1gib(f.api.pid, f.base, d)
            model = out.pop("response")
            # The object in the bucket (boto3 comes with moto), against what the API answered.
            import boto3
            s3 = boto3.client("s3", endpoint_url=f.endpoint, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
            objects = s3.list_objects_v2(Bucket="fleet", Prefix="run/").get("Contents", [])
            out["size_bytes"] = model["size_bytes"]
            out["bucket_objects"] = [{"key": o["Key"], "size": o["Size"]} for o in objects]
            out["scratch_entries_left"] = os.listdir(os.path.join(d, "api", "tmp"))
            print(json.dumps(out, indent=1))
        finally:
            f.stop()


{"kill": kill, "throughput": throughput, "upload": upload}[MODE]()
