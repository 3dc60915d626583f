"""Calibrated quantization against its peers, on the shared cases (BENCHMARKS.md section 7).

usage: python3 benches/calibrated.py MODELPRESS_BIN OUT_DIR [MINILM_ONNX]

1. GPTQ (`"calibrated": true`) against round to nearest at the same bits and group size,
   on the same bytes: mnist8 (calibrated on calib.npz) and minilm_l3 (calibrated on rows
   0-99 of its eval.npz, scored on rows 100-199: the case ships no other sentences).
2. Static int8 (weights and activations): modelpress `int8-static` and its three range
   methods against onnxruntime's `quantize_static` (QDQ, per channel, uint8 activations, int8
   weights) with each of its calibration methods on the same calibration rows, and
   `quantize_dynamic` per channel; metric on the eval rows and onnxruntime latency (1 thread,
   median of repeated runs) against the original.

Every metric is computed with onnxruntime and the case's evaluate.py `metrics()` on the
eval rows only. Prints one JSON object per line.
"""
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_dynamic, quantize_static)

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "..", "..", "shared", "cases")
spec = importlib.util.spec_from_file_location("evaluate", os.path.join(CASES, "evaluate.py"))
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

BIN, OUT = sys.argv[1], sys.argv[2]
MINILM = sys.argv[3] if len(sys.argv) > 3 else os.environ.get("MINILM")
os.makedirs(OUT, exist_ok=True)


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def outputs(path, data, output, batch):
    s = session(path)
    names = [i.name for i in s.get_inputs()]
    n = data[names[0]].shape[0]
    return np.concatenate([s.run([output], {k: data[k][i:i + batch] for k in names})[0]
                           for i in range(0, n, batch)])


def latency_ms(path, data, batch, runs):
    s = session(path)
    names = [i.name for i in s.get_inputs()]
    feed = {k: data[k][:batch] for k in names}
    for _ in range(5):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def fused_ops(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    out = tempfile.mktemp(suffix=".onnx")
    so.optimized_model_filepath = out
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    m = onnx.load(out)
    os.remove(out)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    return {k: ops[k] for k in ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat",
                                "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")
            if ops[k]}


def modelpress(model, spec, calib, out_dir):
    path = os.path.join(OUT, "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    args = [BIN, "compress", model, "--spec", path, "-o", out_dir, "--quiet"]
    if calib:
        args += ["--calibration-data", calib]
    t = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t, os.path.join(out_dir, "model.onnx")


class Reader(CalibrationDataReader):
    def __init__(self, data, batch):
        names = [k for k in data.files if k != "labels"]
        n = data[names[0]].shape[0]
        self.it = iter([{k: data[k][i:i + batch] for k in names} for i in range(0, n, batch)])

    def get_next(self):
        return next(self.it, None)


def case(name, model, calib_path, eval_data, kind, output, batch, latency_batch, runs,
         calib_batch):
    calib = np.load(calib_path)
    reference = outputs(model, eval_data, output, batch)
    labels = eval_data["labels"] if "labels" in eval_data.files else None

    def score(path):
        m = evaluate.metrics({"kind": kind, "eval": {"threshold": 0.5}}, reference,
                             outputs(path, eval_data, output, batch), labels)
        key = "top1_accuracy" if kind == "classifier" else "cosine_mean"
        return {key: round(m[key], 5), **({"rel_l2_error": round(m["rel_l2_error"], 5)}
                                          if "rel_l2_error" in m else
                                          {"cosine_min": round(m["cosine_min"], 5)})}

    base_ms = latency_ms(model, eval_data, latency_batch, runs)
    print(json.dumps({"case": name, "variant": "original", "bytes": os.path.getsize(model),
                      "ort_ms": round(base_ms, 4), **score(model)}), flush=True)

    # 1. GPTQ against round to nearest, same grid.
    for group in (32, 128):
        for calibrated in (False, True):
            step = {"method": "quantize", "bits": 4, "scheme": "affine", "group_size": group,
                    "roles": ["weight"]}
            if calibrated:
                step["calibrated"] = True
            times = []
            for r in range(3):
                d = os.path.join(OUT, f"{name}-g{group}-{calibrated}-{r}")
                seconds, path = modelpress(model, {"pipeline": [step], "latency": False},
                                           calib_path if calibrated else None, d)
                times.append(seconds)
            print(json.dumps({"case": name, "variant": f"int4 g{group} weights, " +
                              ("gptq" if calibrated else "round to nearest"),
                              "bytes": os.path.getsize(path),
                              "compress_s": round(statistics.median(times), 2), **score(path)}),
                  flush=True)

    # 2. Static int8: ours, onnxruntime's, and onnxruntime's dynamic int8.
    variants = []
    for method in ("percentile", "minmax", "entropy"):
        spec = {"preset": "int8-static", "latency": False} if method == "percentile" else {
            "pipeline": [
                {"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "channel",
                 "roles": ["weight"], "activations": method, "min_params": 1},
                {"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "tensor",
                 "roles": ["embedding"]}], "latency": False}
        seconds, path = modelpress(model, spec, calib_path, os.path.join(OUT, f"{name}-static-{method}"))
        label = "modelpress int8-static" + ("" if method == "percentile" else f" ({method})")
        variants.append((label, path, seconds))
    src = model
    m = onnx.load(model)
    opset = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        # onnxruntime's per-channel QDQ is invalid below opset 13 (the cases' pitfall 1).
        src = os.path.join(OUT, f"{name}-opset13.onnx")
        onnx.save(onnx.version_converter.convert_version(m, 13), src)
    for method, cm in (("minmax", CalibrationMethod.MinMax),
                       ("percentile", CalibrationMethod.Percentile),
                       ("entropy", CalibrationMethod.Entropy)):
        path = os.path.join(OUT, f"{name}-ort-static-{method}.onnx")
        label = f"onnxruntime quantize_static ({method})"
        t = time.perf_counter()
        try:
            quantize_static(src, path, Reader(calib, calib_batch),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=cm)
        except Exception as e:  # the peer's failure is a result too
            print(json.dumps({"case": name, "variant": label,
                              "failed": f"{type(e).__name__}: {e}"[:300]}), flush=True)
            continue
        variants.append((label, path, time.perf_counter() - t))
    path = os.path.join(OUT, f"{name}-ort-dynamic.onnx")
    t = time.perf_counter()
    quantize_dynamic(model, path, per_channel=True, weight_type=QuantType.QInt8)
    variants.append(("onnxruntime quantize_dynamic (per channel)", path, time.perf_counter() - t))
    for label, path, seconds in variants:
        ms = latency_ms(path, eval_data, latency_batch, runs)
        print(json.dumps({"case": name, "variant": label, "bytes": os.path.getsize(path),
                          "compress_s": round(seconds, 2), "ort_ms": round(ms, 4),
                          "speedup": round(base_ms / ms, 3), "fused": fused_ops(path),
                          **score(path)}), flush=True)


mnist = os.path.join(CASES, "mnist8")
case("mnist8", os.path.join(mnist, "mnist-8.onnx"), os.path.join(mnist, "calib.npz"),
     np.load(os.path.join(mnist, "eval.npz")), "classifier", "Plus214_Output_0", 1, 1, 2000, 1)
if MINILM:
    full = np.load(os.path.join(CASES, "minilm_l3", "eval.npz"))
    calib = os.path.join(OUT, "minilm-calib.npz")
    np.savez(calib, **{k: full[k][:100] for k in full.files})
    rest = os.path.join(OUT, "minilm-eval.npz")
    np.savez(rest, **{k: full[k][100:] for k in full.files})
    # Calibration batches of 20 rows: onnxruntime's percentile calibrator needs equal batches.
    case("minilm_l3", MINILM, calib, np.load(rest), "embedding", "461", 64, 16, 60, 20)
