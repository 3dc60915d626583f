#!/usr/bin/env python3
"""Distillation of the digits MLP (BENCHMARKS.md section 9).

For each student width, runs `modelpress compress --spec {"distill": ...} --distill-data
train.npz` under /usr/bin/time, scores model.onnx with the cases' evaluate.py on eval.npz,
and trains the peer in the same run: scikit-learn's MLPClassifier with the student's hidden
sizes, from scratch on train.npz's labels (the teacher's own recipe: max_iter 300,
random_state 0), scored on eval.npz.

usage: python3 benches/distill.py target/debug/modelpress OUTDIR
"""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
CASE = os.path.join(HERE, "..", "..", "shared", "cases", "digits_mlp_control")
MODEL = os.path.join(CASE, "digits_mlp.onnx")
EVALUATE = os.path.join(CASE, "..", "evaluate.py")

RUNS = [
    (0.5, None),
    (0.45, None),
    (0.25, None),
    (0.45, "int8"),
    (0.25, "int4"),
]


def run(binary, out, width, preset):
    spec = {"distill": {"student": {"width": width}}}
    if preset:
        spec["preset"] = preset
    os.makedirs(out, exist_ok=True)
    spec_path = os.path.join(out, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = ["/usr/bin/time", "-v", binary, "compress", MODEL, "--spec", spec_path,
           "--distill-data", os.path.join(CASE, "train.npz"), "-o", out, "--quiet"]
    started = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.time() - started
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    scored = json.loads(subprocess.run(
        [sys.executable, EVALUATE, CASE, os.path.join(out, "model.onnx"), "--json"],
        capture_output=True, text=True, check=True).stdout)
    log = json.load(open(os.path.join(out, "training.json")))
    hidden = [l["kept"] for l in log["student"]["layers"]]
    return {
        "width": width, "preset": preset or "-", "hidden": hidden,
        "bytes": scored["candidate_bytes"], "original_bytes": scored["original_bytes"],
        "top1": scored["top1_accuracy"], "original_top1": scored["top1_accuracy_original"],
        "before": log["validation_before"], "best_epoch": log["best_epoch"],
        "epochs": len(log["epochs"]), "train_seconds": log["seconds"],
        "seconds": seconds, "rss_mib": rss / 1024,
    }


def peer(hidden):
    train = np.load(os.path.join(CASE, "train.npz"))
    ev = np.load(os.path.join(CASE, "eval.npz"))
    started = time.time()
    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=300, random_state=0)
    clf.fit(train["X"], train["labels"])
    return float((clf.predict(ev["X"]) == ev["labels"]).mean()), time.time() - started


def main():
    binary, outdir = sys.argv[1], sys.argv[2]
    rows = []
    for width, preset in RUNS:
        r = run(binary, os.path.join(outdir, f"w{width}-{preset or 'float'}"), width, preset)
        r["peer_top1"], r["peer_seconds"] = peer(r["hidden"])
        rows.append(r)
        print(json.dumps(r), flush=True)
    print()
    print("| width | then | hidden | `model.onnx` | of original | top-1 untrained (val) | top-1 | "
          "epochs (best) | training | process | peak RSS | scikit-learn from scratch | its time |")
    print("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['width']} | {r['preset']} | {'-'.join(map(str, r['hidden']))} | "
              f"{r['bytes']:,} B | {100 * r['bytes'] / r['original_bytes']:.1f} % | "
              f"{r['before']:.4f} | {r['top1']:.4f} | {r['epochs']} ({r['best_epoch']}) | "
              f"{r['train_seconds']:.1f} s | {r['seconds']:.1f} s | {r['rss_mib']:.0f} MiB | "
              f"{r['peer_top1']:.4f} | {r['peer_seconds']:.1f} s |")


if __name__ == "__main__":
    main()
