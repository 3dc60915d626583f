#!/usr/bin/env python3
"""Two modelpress binaries on the same CLI runs: wall time (median of interleaved rounds) and
whether every artifact is byte for byte the same. Used to check that a restructuring changed
no output and no speed.

Usage: python3 benches/refactor_parity.py OLD_BIN NEW_BIN CASES_DIR [ROUNDS]
"""
import hashlib, os, statistics, subprocess, sys, tempfile, time

old, new, cases = sys.argv[1:4]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
runs = [
    ("mnist-8 int8", "mnist8/mnist-8.onnx", ["--preset", "int8"]),
    ("mnist-8 deep-compression", "mnist8/mnist-8.onnx", ["--preset", "deep-compression"]),
    ("mnist-8 int4-g32", "mnist8/mnist-8.onnx", ["--preset", "int4-g32"]),
    ("digits_mlp.onnx kmeans4", "digits_mlp_control/digits_mlp.onnx", ["--preset", "kmeans4"]),
    ("digits_mlp.safetensors int8", "digits_mlp_control/digits_mlp.safetensors", ["--preset", "int8"]),
    # Every other form's model.onnx lowering (moved into the forms' files at e2a5a56).
    ("mnist-8 int4", "mnist8/mnist-8.onnx", ["--preset", "int4"]),
    ("mnist-8 ternary", "mnist8/mnist-8.onnx", ["--preset", "ternary"]),
    ("mnist-8 binary", "mnist8/mnist-8.onnx", ["--preset", "binary"]),
    ("mnist-8 lowrank-90", "mnist8/mnist-8.onnx", ["--preset", "lowrank-90"]),
    ("mnist-8 separable", "mnist8/mnist-8.onnx", ["--preset", "separable"]),
    ("silero int4-g128", "silero_vad/silero_vad_16k_sequence.onnx", ["--preset", "int4-g128"]),
    ("silero fp16", "silero_vad/silero_vad_16k_sequence.onnx", ["--preset", "fp16"]),
    ("silero bf16", "silero_vad/silero_vad_16k_sequence.onnx", ["--preset", "bf16"]),
    ("silero kmeans4", "silero_vad/silero_vad_16k_sequence.onnx", ["--preset", "kmeans4"]),
]


def run(binary, model, args, out):
    t = time.perf_counter()
    subprocess.run([binary, "compress", os.path.join(cases, model), *args, "-o", out, "--quiet"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.perf_counter() - t
    mpz = os.path.join(out, "model.mpz")
    if os.path.exists(mpz):
        subprocess.run([binary, "decompress", mpz, "-o", os.path.join(out, "rebuilt")],
                       check=True, capture_output=True)
    digests = {}
    for name in sorted(os.listdir(out)):
        if name == "report.json":
            continue  # holds the measured latency, which differs run to run
        digests[name] = hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
    return took, digests


print("| run | old median s | new median s | new/old | artifacts identical |")
print("|---|---|---|---|---|")
for label, model, args in runs:
    times = {"old": [], "new": []}
    digests = {}
    for _ in range(rounds):
        for which, binary in (("old", old), ("new", new)):
            with tempfile.TemporaryDirectory() as d:
                took, dg = run(binary, model, args, d)
            times[which].append(took)
            digests.setdefault(which, dg)
            assert digests[which] == dg, f"{label}: {which} is not deterministic"
    o, n = statistics.median(times["old"]), statistics.median(times["new"])
    same = digests["old"] == digests["new"]
    print(f"| {label} | {o:.3f} | {n:.3f} | {n / o:.2f} | {'yes' if same else 'NO: ' + str(sorted(set(digests['old'].items()) ^ set(digests['new'].items())))} |")
