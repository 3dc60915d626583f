#!/usr/bin/env python3
"""k-means inertia ratio (modelpress / scikit-learn) on every 2-D float weight of one ONNX
model at k = 16, 32, 256 (weights above 5 M values are left to kmeans_vs_sklearn.py, which
times them). CI checks the same on mnist8, silero_vad and digits
(tests/api/archive.rs); this covers minilm_l3.

usage: benches/kmeans_every_weight.py KMEANS_BIN MODEL.onnx
"""
import json
import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper
from sklearn.cluster import KMeans
BIN, M = sys.argv[1], sys.argv[2]
m = onnx.load(M)
worst = 0; n = 0
for init in m.graph.initializer:
    a = numpy_helper.to_array(init)
    if a.dtype != np.float32 or a.ndim < 2 or a.size < 16 or a.size > 5_000_000:
        continue
    p = subprocess.run([BIN, M, init.name, "16,32,256"], capture_output=True, text=True, check=True)
    ours = {r["k"]: r["inertia"] for r in map(json.loads, p.stdout.split("\n")[:-1])}
    x = a.reshape(-1, 1).astype(np.float64)
    for k in (16, 32, 256):
        kk = min(k, len(np.unique(x)))
        km = KMeans(n_clusters=kk, init=np.linspace(x.min(), x.max(), kk).reshape(-1, 1), n_init=1, max_iter=300, random_state=0).fit(x)
        r = ours[k] / km.inertia_ if km.inertia_ > 0 else 0
        worst = max(worst, r); n += 1
        print(init.name, a.shape, k, round(r, 4), flush=True)
print("tensors x k:", n, "worst ratio:", worst)
