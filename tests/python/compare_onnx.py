"""Runs pairs of ONNX files on a shared case's eval data with onnxruntime and compares them.

usage: python3 compare_onnx.py CASES_DIR PAIRS.json
PAIRS.json: [{"case": "mnist8", "candidate": PATH, "reference": PATH, "rows": N?}, ...]

Prints one JSON list: for each pair, evaluate.py's metrics of the candidate against the
reference (the job's restored.onnx), plus the relative L2 error of the scored output. Every
candidate is loaded by onnxruntime as it is: a file it refuses fails the whole run.

Sessions use onnxruntime's basic graph optimizations (constant folding, which rebuilds the
weights once): the extended ones may fuse a DequantizeLinear into its MatMul and run it in
integer arithmetic (MatMulNBits), which is a faster execution of the same file, not a check
that the graph rebuilds the restored weights.
"""
import json
import os
import sys

import numpy as np

cases_dir, pairs_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, cases_dir)
import evaluate  # noqa: E402  (the shared cases' own scorer)
import onnxruntime as ort  # noqa: E402


def basic_session(path, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


evaluate.session = basic_session

out = []
loaded = {}
for p in json.load(open(pairs_file)):
    case_dir = os.path.join(cases_dir, p["case"])
    if p["case"] not in loaded:
        case = evaluate.load_case(case_dir)
        data = evaluate.load_eval(case_dir, case)
        labels = data.pop("labels", None)
        rows = p.get("rows")
        if rows and case["eval"]["feed"] != "whole":
            data = {k: v[:rows] for k, v in data.items()}
            labels = None if labels is None else labels[:rows]
        loaded[p["case"]] = (case, data, labels)
    case, data, labels = loaded[p["case"]]
    ref = evaluate.run(p["reference"], case, data)
    cand = evaluate.run(p["candidate"], case, data)
    d = evaluate.metrics(case, ref, cand, labels)
    r, c = np.asarray(ref, np.float64).ravel(), np.asarray(cand, np.float64).ravel()
    d["output_rel_l2"] = float(np.linalg.norm(c - r) / max(np.linalg.norm(r), 1e-30))
    d["candidate"] = p["candidate"]
    out.append(d)
print(json.dumps(out))
