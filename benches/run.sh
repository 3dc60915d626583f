#!/usr/bin/env bash
# Produces the figures in BENCHMARKS.md: release build, core throughput, k-means against
# scikit-learn, end-to-end runs.
# usage: benches/run.sh [OUT_DIR]   (default bench-out/; needs numpy, onnx, onnx-ir, onnxruntime,
# scikit-learn and curl: pip install numpy onnx onnx-ir onnxruntime scikit-learn)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out}
mkdir -p "$OUT"
cargo build --release
cargo bench --bench core | tee "$OUT/core.md"
bash ../shared/cases/minilm_l3/get.sh "$OUT"
KMEANS_BIN=$(cargo bench --bench kmeans --no-run --message-format=json 2>/dev/null |
  python3 -c "import json,sys; [print(m['executable']) for m in map(json.loads, sys.stdin) if m.get('executable') and m['target']['name'] == 'kmeans']")
python3 benches/kmeans_vs_sklearn.py "$KMEANS_BIN" "$OUT" "$OUT/paraphrase-MiniLM-L3-v2.onnx" | tee "$OUT/kmeans.md"
python3 benches/kmeans_every_weight.py "$KMEANS_BIN" "$OUT/paraphrase-MiniLM-L3-v2.onnx" | tee "$OUT/kmeans-every-weight.txt"
python3 benches/e2e.py target/release/modelpress "$OUT"
python3 benches/deploy.py target/release/modelpress "$OUT" "$OUT/paraphrase-MiniLM-L3-v2.onnx" | tee "$OUT/deploy.md"
MINILM="$OUT/paraphrase-MiniLM-L3-v2.onnx" python3 benches/search.py target/release/modelpress "$OUT/search" | tee "$OUT/search.jsonl"
MINILM="$OUT/paraphrase-MiniLM-L3-v2.onnx" python3 benches/search.py target/release/modelpress "$OUT/search" \
  mnist8+gptq minilm_l3-split minilm_l3-split+gptq | tee "$OUT/search-calibrated.jsonl"
python3 benches/calibrated.py target/release/modelpress "$OUT/calibrated" "$OUT/paraphrase-MiniLM-L3-v2.onnx" | grep "^{" | tee "$OUT/calibrated.jsonl"
python3 benches/sse_clients.py target/release/modelpress 200 | tee "$OUT/sse-clients.json"
