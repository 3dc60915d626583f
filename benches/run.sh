#!/usr/bin/env bash
# Produces the figures in BENCHMARKS.md: release build, core throughput, end-to-end runs.
# usage: benches/run.sh [OUT_DIR]   (default bench-out/; needs numpy, onnxruntime, curl)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out}
mkdir -p "$OUT"
cargo build --release
cargo bench --bench core | tee "$OUT/core.md"
python3 benches/e2e.py target/release/modelpress "$OUT"
