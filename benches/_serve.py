"""What the benchmark scripts share: a free port, a JSON call, a server started on a data
directory and waited for."""
import json
import os
import socket
import subprocess
import threading
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


def rss_mib(pid):
    """The resident set of process `pid`, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def upload_1gib(pid, base, out_dir):
    """Uploads a 1 GiB float32 .npy (written sparsely under `out_dir`) to the server at `base`
    with `curl -T`, sampling the RSS of process `pid` every 20 ms; returns idle and peak RSS,
    the time and the server's answer."""
    time.sleep(0.5)
    idle = rss_mib(pid)
    # A 1 GiB float32 .npy: header + 2^28 floats, written sparsely.
    path = os.path.join(out_dir, "big.npy")
    n = (1 << 30) // 4
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % n
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        f.truncate(f.tell() + n * 4)
    peak = [idle]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    t0 = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sS", "-T", path, "-X", "POST", "-H", "content-type: application/octet-stream",
         base + "/v1/models?name=big.npy"], capture_output=True, text=True, check=True)
    secs = time.perf_counter() - t0
    done.set()
    th.join()
    size = os.path.getsize(path)
    os.remove(path)
    body = json.loads(out.stdout)
    assert body.get("size_bytes") == size and body.get("format") == "npy", body
    return {"idle_rss_mib": idle, "peak_rss_mib": peak[0], "above_idle_mib": peak[0] - idle,
            "upload_s": secs, "throughput_mib_s": 1024 / secs, "response": body}
