#!/usr/bin/env python3
"""k-means inertia and time: modelpress against scikit-learn, on the same weights, same run.

scikit-learn: KMeans(n_clusters=k, init=linspace(min, max, k), n_init=1, max_iter=300,
random_state=0) on the flattened weight as float64 -- the shared cases' reference recipe.
modelpress: `benches/kmeans.rs` (exact DP or sorted Lloyd, chosen by `auto`).
Both inertias are float64 sums of squared distances to the nearest centroid.

usage: benches/kmeans_vs_sklearn.py KMEANS_BIN OUT_DIR [MINILM_ONNX]
"""
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

BIN, OUT = sys.argv[1], sys.argv[2]
MINILM = sys.argv[3] if len(sys.argv) > 3 else None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(ROOT, "..", "shared", "cases")
KS = [16, 32, 256]
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def largest_weight(path, name=None):
    m = onnx.load(path)
    best = None
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype != np.float32 or a.ndim < 2:
            continue
        if name is not None and init.name != name:
            continue
        if best is None or a.size > best[1].size:
            best = (init.name, a)
    return best


def sklearn_fit(x, k, runs):
    x = x.reshape(-1, 1).astype(np.float64)
    k = min(k, len(np.unique(x)))
    init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)
    times, km = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=300, random_state=0).fit(x)
        times.append(time.perf_counter() - t0)
    return float(km.inertia_), statistics.median(times), int(km.n_iter_)


def ours(path, tensor, ks, algorithm="auto"):
    p = subprocess.run([BIN, path, tensor, ",".join(map(str, ks)), algorithm], capture_output=True, text=True, check=True)
    return {r["k"]: r for r in map(json.loads, p.stdout.split("\n")[:-1])}


targets = [
    ("mnist8", os.path.join(CASES, "mnist8", "mnist-8.onnx"), None),
    ("silero_vad", os.path.join(CASES, "silero_vad", "silero_vad_16k_sequence.onnx"), None),
    ("digits_mlp_control", os.path.join(CASES, "digits_mlp_control", "digits_mlp.onnx"), None),
]
if MINILM:
    targets.append(("minilm_l3 (384×1536 FFN)", MINILM, "onnx::MatMul_481"))
    if not os.environ.get("KMEANS_SKIP_EMBEDDING"):
        # The largest weight of the case: 11.7 M values; scikit-learn runs once here.
        targets.append(("minilm_l3 (embedding)", MINILM, None))

rows = []
for case, path, name in targets:
    tname, x = largest_weight(path, name)
    mine = ours(path, tname, KS)
    lloyd = ours(path, tname, KS, "lloyd")
    for k in KS:
        sk_inertia, sk_time, sk_iter = sklearn_fit(x, k, 1 if x.size > 5_000_000 else RUNS)
        r = mine[k]
        rows.append({
            "case": case, "tensor": tname, "shape": list(x.shape), "k": k,
            "sklearn_inertia": sk_inertia, "sklearn_seconds": sk_time, "sklearn_iterations": sk_iter,
            "modelpress_inertia": r["inertia"], "modelpress_seconds": r["seconds"],
            "algorithm": r["algorithm"],
            "lloyd_inertia": lloyd[k]["inertia"], "lloyd_seconds": lloyd[k]["seconds"],
        })
        print(json.dumps(rows[-1]), flush=True)

with open(os.path.join(OUT, "kmeans.json"), "w") as f:
    json.dump(rows, f, indent=1)
print("\n| case | tensor | values | k | sklearn inertia | modelpress `auto` inertia (ratio) | sorted Lloyd inertia (ratio) | sklearn s | `auto` s (speed-up) | Lloyd s (speed-up) | `auto` picked |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    n = int(np.prod(r["shape"]))
    sk = r["sklearn_inertia"]
    print(f"| {r['case']} | `{r['tensor']}` {r['shape']} | {n:,} | {r['k']} | {sk:.6g} | "
          f"{r['modelpress_inertia']:.6g} ({r['modelpress_inertia'] / sk:.3f}) | "
          f"{r['lloyd_inertia']:.6g} ({r['lloyd_inertia'] / sk:.3f}) | {r['sklearn_seconds']:.3f} | "
          f"{r['modelpress_seconds']:.4f} ({r['sklearn_seconds'] / r['modelpress_seconds']:.1f}×) | "
          f"{r['lloyd_seconds']:.4f} ({r['sklearn_seconds'] / r['lloyd_seconds']:.0f}×) | {r['algorithm']} |")
