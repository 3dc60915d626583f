"""Files of many empty tensors against a running server (issue 30 item 2).

python3 benches/header_amplification.py BIN [TENSORS ...]

Starts `BIN serve`, then for each count (default 999000, 100001, 100000) uploads a safetensors
file of that many empty tensors (every entry costs memory, none costs bytes) three times at
once, and reads back one page of the inventory of an accepted one. Prints per count: the file's
size, the status codes, the seconds the uploads took, the inventory page's seconds and size,
and the server's peak RSS (VmHWM) so far and its RSS after.
"""
import concurrent.futures
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from _serve import rss_mib, start  # noqa: E402

binary = sys.argv[1]
counts = [int(c) for c in sys.argv[2:]] or [999_000, 100_001, 100_000]


def empty_tensors(n):
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    header = ("{" + entries + "}").encode()
    return len(header).to_bytes(8, "little") + header


def upload(base, body):
    r = urllib.request.Request(base + "/v1/models?name=many.safetensors", data=body, method="POST")
    try:
        with urllib.request.urlopen(r, timeout=600) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def peak_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


with tempfile.TemporaryDirectory() as d:
    proc, base = start(binary, d, 0)
    try:
        print(f"idle: rss {rss_mib(proc.pid):.0f} MiB")
        for n in counts:
            body = empty_tensors(n)
            t0 = time.time()
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda _: upload(base, body), range(3)))
            took = time.time() - t0
            codes = [a[0] for a in answers]
            line = f"{n} tensors ({len(body) / 2**20:.1f} MiB): {codes} in {took:.1f} s"
            accepted = [a[1] for a in answers if a[0] == 201]
            if accepted:
                t0 = time.time()
                with urllib.request.urlopen(f"{base}/v1/models/{accepted[0]['id']}/tensors", timeout=600) as r:
                    page = r.read()
                line += f"; a page of the inventory {time.time() - t0:.2f} s, {len(page) / 1024:.0f} KiB"
            else:
                line += f"; {answers[0][1]['error']['message'][:80]!r}"
            print(f"{line}; peak rss {peak_mib(proc.pid):.0f} MiB, rss now {rss_mib(proc.pid):.0f} MiB", flush=True)
    finally:
        proc.terminate()
        proc.wait()
