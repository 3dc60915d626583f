#!/usr/bin/env python3
"""Deployable model.onnx, every case x preset, against onnxruntime's own quantizers, one run.

For each shared case and preset: `modelpress compress` (the release binary), then
model.onnx bytes / original bytes, the case's metric from ../shared/cases/evaluate.py (on
eval.npz, model.onnx against the original), and onnxruntime latency (1 thread, median of
RUNS runs of one feed: one row for per_sample cases, eval.batch rows for batched ones, the
whole feed for silero) of the original and of model.onnx. Beside them, in the same run:
onnxruntime's quantize_dynamic (int8, per channel) and MatMulNBitsQuantizer (int4, block 32
and 128, symmetric) on the same case.

usage: benches/deploy.py BIN OUT_DIR MINILM.onnx   (run by benches/run.sh; needs numpy,
onnx, onnx-ir (for MatMulNBitsQuantizer), onnxruntime)
"""
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

BIN, OUT, MINILM = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(ROOT, "..", "shared", "cases")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
RUNS = int(os.environ.get("BENCH_RUNS", "20"))
sys.path.insert(0, CASES)
import evaluate  # noqa: E402

CASE_MODELS = [
    ("mnist8", os.path.join(CASES, "mnist8", "mnist-8.onnx")),
    ("silero_vad", os.path.join(CASES, "silero_vad", "silero_vad_16k_sequence.onnx")),
    ("digits_mlp_control", os.path.join(CASES, "digits_mlp_control", "digits_mlp.onnx")),
    ("minilm_l3", MINILM),
]
PRESETS = {
    "int8": {"preset": "int8"},
    "int8 (deploy: operators)": {"preset": "int8", "deploy": "operators"},
    "int4": {"preset": "int4"},
    "int4-g32": {"preset": "int4-g32"},
    "int4-g32 (deploy: folded)": {"preset": "int4-g32", "deploy": "folded"},
    "int4-g128": {"preset": "int4-g128"},
    "kmeans4": {"preset": "kmeans4"},
    "lowrank-90": {"preset": "lowrank-90"},
    "separable": {"preset": "separable"},
    "structured-25%": {"pipeline": [{"method": "prune", "structure": "output", "ratio": 0.25}]},
    "deep-compression": {"preset": "deep-compression"},
}
METRIC = {"classifier": "top1_accuracy", "detector": "decision_agreement", "embedding": "cosine_mean"}


def feed(case, data):
    ev = case["eval"]
    names = [k for k in data if k != "labels"]
    if ev["feed"] == "whole":
        return {n: data[n] for n in names}
    rows = 1 if ev["feed"] == "per_sample" else int(ev.get("batch", 64))
    return {n: data[n][:rows] for n in names}


def latency_pair_ms(original, candidate, inputs):
    """Median ms of the original and of the candidate, runs interleaved (the machine drifts)."""
    sessions = [evaluate.session(p) for p in (original, candidate)]
    feeds = [{i.name: inputs[i.name] for i in s.get_inputs()} for s in sessions]
    for s, x in zip(sessions, feeds):
        s.run(None, x)
    times = ([], [])
    for _ in range(RUNS):
        for k, (s, x) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def score(case_name, case, data, labels, original, candidate):
    ref = evaluate.run(original, case, data)
    cand = evaluate.run(candidate, case, data)
    m = evaluate.metrics(case, ref, cand, labels)
    return m[METRIC[case["kind"]]] if METRIC[case["kind"]] in m else m.get("top1_agreement")


def ort_peers(model, out_dir):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files = {}
    p = os.path.join(out_dir, "ort-dynamic-int8.onnx")
    quantize_dynamic(model, p, per_channel=True, weight_type=QuantType.QInt8)
    files["ort quantize_dynamic int8"] = p
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        for block in (32, 128):
            q = MatMulNBitsQuantizer(onnx.load(model), block_size=block, is_symmetric=True)
            q.process()
            p = os.path.join(out_dir, f"ort-matmulnbits-b{block}.onnx")
            q.model.save_model_to_file(p, use_external_data_format=False)
            files[f"ort MatMulNBits int4 block {block}"] = p
    except Exception as e:  # a model without MatMul weights gets no MatMulNBits file
        print(f"  MatMulNBitsQuantizer: {type(e).__name__}: {e}", file=sys.stderr)
    return files


def main():
    rows = []
    for case_name, model in CASE_MODELS:
        case_dir = os.path.join(CASES, case_name)
        case = evaluate.load_case(case_dir)
        data = evaluate.load_eval(case_dir, case)
        labels = data.pop("labels", None)
        inputs = feed(case, data)
        original_bytes = os.path.getsize(model)
        base_metric = score(case_name, case, data, labels, model, model)
        rows.append((case_name, "original", original_bytes, 1.0, base_metric, None, None, ""))
        out_dir = os.path.join(OUT, "deploy", case_name)
        os.makedirs(out_dir, exist_ok=True)
        for name, spec in PRESETS.items():
            d = os.path.join(out_dir, name)
            spec_path = os.path.join(out_dir, name + ".json")
            json.dump(dict(spec, latency=False), open(spec_path, "w"))
            subprocess.run([BIN, "compress", model, "--spec", spec_path, "--quiet", "-o", d],
                           env=ENV, check=True, capture_output=True)
            path = os.path.join(d, "model.onnx")
            if not os.path.exists(path):
                path = os.path.join(d, "restored.onnx")
            report = json.load(open(os.path.join(d, "report.json")))
            forms = sorted({t["form"] for t in (report.get("deployable") or {}).get("tensors", [])})
            size = os.path.getsize(path)
            rows.append((case_name, "modelpress " + name, size, original_bytes / size,
                         score(case_name, case, data, labels, model, path),
                         *latency_pair_ms(model, path, inputs), ", ".join(forms) or "dense"))
        for label, path in ort_peers(model, out_dir).items():
            size = os.path.getsize(path)
            rows.append((case_name, label, size, original_bytes / size,
                         score(case_name, case, data, labels, model, path),
                         *latency_pair_ms(model, path, inputs), ""))
        print(f"{case_name} done", file=sys.stderr)
    print("| case | variant | model.onnx bytes | ratio | metric | ort ms original | ort ms this | this / original | forms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ms = "| | |" if r[5] is None else f"| {r[5]:.3f} | {r[6]:.3f} | {r[6] / r[5]:.2f} |"
        print(f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]:.2f}x | {r[4]:.4f} {ms} {r[7]} |")


if __name__ == "__main__":
    main()
