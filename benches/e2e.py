#!/usr/bin/env python3
"""End-to-end benchmarks for BENCHMARKS.md, each peer measured in the same run.

1. `modelpress compress --preset int8` on paraphrase-MiniLM-L3 against onnxruntime's
   quantize_dynamic(per_channel=True): wall time and peak RSS (GNU time), and quality
   (cosine of the sentence embedding via ../shared/cases/evaluate.py).
2. The server's RSS while it receives a 1 GiB upload, against its idle RSS.

usage: benches/e2e.py BIN OUT_DIR   (run by benches/run.sh)
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import _serve

BIN, OUT = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(ROOT, "..", "shared", "cases")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
RUNS = int(os.environ.get("BENCH_RUNS", "5"))


def timed(cmd):
    """Wall seconds and peak RSS (MiB) of one command, from GNU time."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{p.stdout}\n{p.stderr}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return wall, rss_kb / 1024


def evaluate(case, path, original=None):
    cmd = [sys.executable, os.path.join(CASES, "evaluate.py"), os.path.join(CASES, case), path, "--json"]
    if original:
        cmd += ["--original", original]
    return json.loads(subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=True).stdout)


def bench_minilm():
    model = os.path.join(OUT, "paraphrase-MiniLM-L3-v2.onnx")
    subprocess.run(["bash", os.path.join(CASES, "minilm_l3", "get.sh"), OUT], check=True)
    ort_script = ORT_DYNAMIC
    # The job's default also times both models in tract for the summary ("latency"); the
    # peer times nothing, so the like-for-like run leaves it out and the default is timed too.
    spec = os.path.join(OUT, "int8-no-latency.json")
    with open(spec, "w") as f:
        json.dump({"preset": "int8", "latency": False}, f)
    ours, peer, with_latency = [], [], []
    for i in range(RUNS):
        d = os.path.join(OUT, "mp-int8")
        ours.append(timed([BIN, "compress", model, "--spec", spec, "--quiet", "-o", d]))
        peer.append(timed([sys.executable, "-c", ort_script, model, os.path.join(OUT, "ort-int8-pc.onnx")]))
        with_latency.append(timed([BIN, "compress", model, "--preset", "int8", "--quiet", "-o", d + "-lat"]))
    q_ours = evaluate("minilm_l3", os.path.join(OUT, "mp-int8", "model.onnx"), model)
    q_peer = evaluate("minilm_l3", os.path.join(OUT, "ort-int8-pc.onnx"), model)
    report = json.load(open(os.path.join(OUT, "mp-int8", "report.json")))
    return {
        "runs": RUNS,
        "modelpress": {
            "wall_s_median": statistics.median(w for w, _ in ours),
            "peak_rss_mib_median": statistics.median(r for _, r in ours),
            "cosine_mean": q_ours["cosine_mean"],
            "cosine_min": q_ours["cosine_min"],
            "encoded_bytes": report["report"]["totals"]["bytes_after"],
            "model_onnx_bytes": os.path.getsize(os.path.join(OUT, "mp-int8", "model.onnx")),
            "wall_s_median_default_with_latency": statistics.median(w for w, _ in with_latency),
            "restored_onnx_bytes": os.path.getsize(os.path.join(OUT, "mp-int8", "restored.onnx")),
        },
        "onnxruntime_quantize_dynamic_per_channel": {
            "wall_s_median": statistics.median(w for w, _ in peer),
            "peak_rss_mib_median": statistics.median(r for _, r in peer),
            "cosine_mean": q_peer["cosine_mean"],
            "cosine_min": q_peer["cosine_min"],
            "file_bytes": os.path.getsize(os.path.join(OUT, "ort-int8-pc.onnx")),
        },
        "original_bytes": os.path.getsize(model),
    }


def bench_upload():
    data = tempfile.mkdtemp(prefix="mp-bench-", dir=OUT)
    port = 18000 + os.getpid() % 1000
    srv = subprocess.Popen(
        [BIN, "serve", "--addr", f"127.0.0.1:{port}", "--data-dir", data, "--workers", "1"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        return _serve.upload_1gib(srv.pid, base, OUT)
    finally:
        srv.terminate()
        srv.wait()


ORT_DYNAMIC = (
    "import sys\n"
    "from onnxruntime.quantization import quantize_dynamic, QuantType\n"
    "quantize_dynamic(sys.argv[1], sys.argv[2], per_channel=True, weight_type=QuantType.QInt8)\n"
)
PRESETS = ["int8", "int8-tensor", "int4", "kmeans4", "ternary", "prune50", "prune50-int8", "fp16",
           "lowrank-90", "separable", "deep-compression"]


def bench_quality(minilm):
    """Each preset on each ONNX case, scored by the case's own metric on the restored model;
    ratio = original file bytes / model.mpz bytes. onnxruntime's quantize_dynamic (per
    channel) runs beside them in the same run."""
    cases = {
        "mnist8": (os.path.join(CASES, "mnist8", "mnist-8.onnx"), "top1_accuracy"),
        "silero_vad": (os.path.join(CASES, "silero_vad", "silero_vad_16k_sequence.onnx"), "decision_agreement"),
        "digits_mlp_control": (os.path.join(CASES, "digits_mlp_control", "digits_mlp.onnx"), "top1_accuracy"),
        "minilm_l3": (minilm, "cosine_mean"),
    }
    rows = []
    for case, (path, metric) in cases.items():
        original = os.path.getsize(path)
        extra = [path] if case == "minilm_l3" else []
        ort = os.path.join(OUT, f"q-{case}-ort-dynamic-int8.onnx")
        wall, rss = timed([sys.executable, "-c", ORT_DYNAMIC, path, ort])
        score = evaluate(case, ort, *extra)
        rows.append({"case": case, "preset": "onnxruntime quantize_dynamic int8 (per channel)", "metric": metric,
                     "value": score[metric], "bytes": os.path.getsize(ort), "original_bytes": original,
                     "ratio": original / os.path.getsize(ort), "wall_s": wall, "peak_rss_mib": rss})
        presets = PRESETS if case != "minilm_l3" else ["int8", "int4", "kmeans4", "deep-compression", "lowrank-90", "separable"]
        for preset in presets:
            d = os.path.join(OUT, f"q-{case}-{preset}")
            wall, rss = timed([BIN, "compress", path, "--preset", preset, "--quiet", "-o", d])
            score = evaluate(case, os.path.join(d, "restored.onnx"), *extra)
            rep = json.load(open(os.path.join(d, "report.json")))
            archive = rep["summary"]["archive_bytes"]
            rows.append({"case": case, "preset": preset, "metric": metric, "value": score[metric],
                         "original_value": score.get("top1_accuracy_original", 1.0),
                         "bytes": archive, "original_bytes": original, "ratio": original / archive,
                         "wall_s": wall, "peak_rss_mib": rss,
                         "deep_compression": rep["report"]["deep_compression"],
                         "skipped": sum(1 for t in rep["report"]["tensors"] if t.get("skipped"))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    os.makedirs(OUT, exist_ok=True)
    minilm = os.path.join(OUT, "paraphrase-MiniLM-L3-v2.onnx")
    subprocess.run(["bash", os.path.join(CASES, "minilm_l3", "get.sh"), OUT], check=True)
    results = {"minilm_int8": bench_minilm(), "quality": bench_quality(minilm), "upload_1gib": bench_upload()}
    with open(os.path.join(OUT, "e2e.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
