#!/usr/bin/env python3
"""Fine-tuning silero_vad after lossy presets (BENCHMARKS.md section 8).

silero ships one 60 s clip (eval.npz, fed whole). This script cuts it in two, each half
from the zero state: the first 1,250 chunks (40 s) are the training data, the last 625
(20 s) a case folder evaluate.py scores. For each preset it runs `modelpress compress`
without and with a `finetune` block (under /usr/bin/time) and scores both model.onnx files
on the held-out 20 s with the cases' evaluate.py (onnxruntime). The original agrees with
itself: 1.0.

usage: python3 benches/finetune_silero.py target/debug/modelpress OUTDIR
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CASE = os.path.join(HERE, "..", "..", "shared", "cases", "silero_vad")
MODEL = os.path.join(CASE, "silero_vad_16k_sequence.onnx")
EVALUATE = os.path.join(CASE, "..", "evaluate.py")
CUT = 1250
FINETUNE = {"seed": 3, "epochs": 60, "learning_rate": 0.001, "patience": 20, "validation": 0.2}
PRESETS = ["int4", "ternary", "lowrank-90"]


def halves(out):
    d = np.load(os.path.join(CASE, "eval.npz"))
    case = os.path.join(out, "case")
    os.makedirs(case, exist_ok=True)
    train = os.path.join(out, "train.npz")
    np.savez_compressed(train, input=d["input"][:CUT], h=d["h"], c=d["c"])
    np.savez_compressed(os.path.join(case, "eval.npz"), input=d["input"][CUT:], h=d["h"], c=d["c"])
    for f in ("case.json", "silero_vad_16k_sequence.onnx"):
        shutil.copy(os.path.join(CASE, f), os.path.join(case, f))
    return train, case


def run(binary, out, spec, train):
    os.makedirs(out, exist_ok=True)
    spec_path = os.path.join(out, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = ["/usr/bin/time", "-v", binary, "compress", MODEL, "--spec", spec_path, "-o", out, "--quiet"]
    if "finetune" in spec:
        cmd[-3:-3] = ["--finetune-data", train]
    started = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.time() - started
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return seconds, rss // 1024


def score(case, onnx):
    return json.loads(subprocess.run(
        [sys.executable, EVALUATE, case, onnx, "--json"],
        capture_output=True, text=True, check=True).stdout)


def main():
    binary, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    train, case = halves(out)
    print("| preset | `model.onnx` | agreement before | agreement after | epochs (best) | training s | time | peak RSS |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for preset in PRESETS:
        plain = os.path.join(out, preset, "plain")
        tuned = os.path.join(out, preset, "tuned")
        run(binary, plain, {"preset": preset}, train)
        block = dict(FINETUNE, dataset_id="00000000-0000-0000-0000-000000000000")
        seconds, rss = run(binary, tuned, {"preset": preset, "finetune": block}, train)
        before = score(case, os.path.join(plain, "model.onnx"))
        after = score(case, os.path.join(tuned, "model.onnx"))
        log = json.load(open(os.path.join(tuned, "training.json")))
        print(f"| `{preset}` | {after['candidate_bytes']:,} B | {before['decision_agreement']:.4f} "
              f"| **{after['decision_agreement']:.4f}** | {len(log['epochs'])} ({log['best_epoch']}) "
              f"| {log['seconds']:.1f} | {seconds:.1f} s | {rss} MiB |")


if __name__ == "__main__":
    main()
