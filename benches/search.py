#!/usr/bin/env python3
"""The accuracy-constrained search (preset auto / constraints) on the shared cases, through the
real server (release build): wall time of the job, the chosen model.onnx's size and ratio, the
metric modelpress measured, and ../shared/cases/evaluate.py's figure on the downloaded file
(onnxruntime), beside onnxruntime's quantize_dynamic file size from the cases' README.

usage: benches/search.py BIN OUT_DIR [CASE...]
  (CASE: mnist8 silero_vad minilm_l3, and with calibration data: mnist8+gptq, and
  minilm_l3-split / minilm_l3-split+gptq, which search on rows 100-199 of minilm's eval.npz
  and calibrate on rows 0-99)
minilm_l3 needs the model downloaded first: bash ../shared/cases/minilm_l3/get.sh /work/minilm
(or set MINILM=path/to/paraphrase-MiniLM-L3-v2.onnx).
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN, OUT = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(ROOT, "..", "shared", "cases")
MINILM = os.environ.get("MINILM", "/work/minilm/paraphrase-MiniLM-L3-v2.onnx")

# case: model, search data, metric block, constraints, the data evaluate.py scores on.
RUNS = {
    # mnist8 searches on train.npz (labels, never seen by the scoring) and is scored on eval.npz.
    "mnist8": (
        os.path.join(CASES, "mnist8", "mnist-8.onnx"),
        os.path.join(CASES, "mnist8", "train.npz"),
        {"metric": "top1"},
        {"max_metric_drop": 0.005},
    ),
    # silero_vad and minilm_l3 ship one data file: the search selects on the data it reports.
    "silero_vad": (
        os.path.join(CASES, "silero_vad", "silero_vad_16k_sequence.onnx"),
        os.path.join(CASES, "silero_vad", "eval.npz"),
        {"metric": "decision_agreement", "output": "speech_probs", "threshold": 0.5},
        {"max_metric_drop": 0.01},
    ),
    "minilm_l3": (
        MINILM,
        os.path.join(CASES, "minilm_l3", "eval.npz"),
        {"metric": "cosine", "output": "461"},
        {"max_metric_drop": 0.01},
    ),
}


# The same searches with a calibration block (every quantize setting then GPTQ): (base run,
# calibration data); minilm's split runs search on rows 100-199 only, with and without.
SPLIT_EVAL = os.path.join(OUT, "minilm-rows-100-199.npz")
SPLIT_CALIB = os.path.join(OUT, "minilm-rows-0-99.npz")
CALIBRATED = {
    "mnist8+gptq": ("mnist8", os.path.join(CASES, "mnist8", "calib.npz")),
    "minilm_l3-split": ("minilm_l3", None),
    "minilm_l3-split+gptq": ("minilm_l3", SPLIT_CALIB),
}


def split_minilm():
    import numpy as np

    full = np.load(os.path.join(CASES, "minilm_l3", "eval.npz"))
    np.savez(SPLIT_CALIB, **{k: full[k][:100] for k in full.files})
    np.savez(SPLIT_EVAL, **{k: full[k][100:] for k in full.files})


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def call(url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def main():
    cases = sys.argv[3:] or list(RUNS)
    os.makedirs(OUT, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="mp-search-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [BIN, "serve", "--addr", f"127.0.0.1:{port}", "--data-dir", data_dir, "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                call(base + "/healthz")
                break
            except Exception:
                time.sleep(0.1)
        rows = []
        for case in cases:
            base_case, calibration = CALIBRATED.get(case, (case, None))
            model, data, metric, constraints = RUNS[base_case]
            if case.startswith("minilm_l3-split"):
                split_minilm()
                data = SPLIT_EVAL
            m = json.loads(call(base + "/v1/models", open(model, "rb").read()))
            d = json.loads(call(base + "/v1/datasets", open(data, "rb").read()))
            spec = {
                "model_id": m["id"],
                "constraints": constraints,
                "eval": dict(metric, dataset_id=d["id"]),
                "latency": False,
                "outputs": ["model", "report"],
            }
            if calibration:
                c = json.loads(call(base + "/v1/datasets", open(calibration, "rb").read()))
                spec["calibration"] = {"dataset_id": c["id"]}
            t0 = time.perf_counter()
            job = json.loads(
                call(base + "/v1/jobs", json.dumps(spec).encode(), {"content-type": "application/json"})
            )
            while True:
                job = json.loads(call(f"{base}/v1/jobs/{job['id']}"))
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            wall = time.perf_counter() - t0
            if job["state"] != "succeeded":
                raise SystemExit(f"{case}: {job['state']} {job['error']}")
            d_out = os.path.join(OUT, case)
            os.makedirs(d_out, exist_ok=True)
            for name in ("model.onnx", "search.json", "sensitivity.json"):
                with open(os.path.join(d_out, name), "wb") as f:
                    f.write(call(f"{base}/v1/jobs/{job['id']}/artifacts/{name}"))
            ev = subprocess.run(
                [sys.executable, os.path.join(CASES, "evaluate.py"), os.path.join(CASES, base_case), os.path.join(d_out, "model.onnx"), "--json"]
                + ([] if base_case != "minilm_l3" else ["--original", model]),
                capture_output=True,
                text=True,
            )
            theirs = ev.stdout.strip() or ev.stderr.strip()
            s = job["summary"]
            doc = json.load(open(os.path.join(d_out, "search.json")))
            rejected = [c["name"] for c in doc["candidates"] if not c["meets"]]
            rows.append(
                {
                    "case": case,
                    "calibrated": bool(calibration),
                    "constraints": constraints,
                    "wall_s": round(wall, 1),
                    "search_s": round(s["search"]["seconds"], 1),
                    "verdict": s["search"]["verdict"],
                    "trials": s["search"]["trials"],
                    "bytes": s["deployable_bytes"],
                    "original_bytes": s["original_bytes"],
                    "ratio": round(s["ratio"], 2),
                    "ours": s["evaluation"],
                    "evaluate_py": theirs,
                    "rejected": rejected,
                    "pipeline": doc["pipeline"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
