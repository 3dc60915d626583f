#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS (default 60) on a corpus seeded from
# ../shared/cases. Exits non-zero when a target crashes (a panic, a timeout, an RSS blow-up);
# the input that did it is kept under fuzz/artifacts/<target>/ to become a named regression
# test in tests/api/fuzz.rs. CI runs it with a bounded time after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
cases=../shared/cases
export CARGO_TERM_COLOR=never

RUSTC_WORKSPACE_WRAPPER="$PWD/fuzz/sancov-rustc" cargo build --quiet -p modelpress-fuzz --bins
[ -x target/debug/modelpress ] || cargo build --quiet --bin modelpress

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
seed() {
  local target=$1
  shift
  mkdir -p "$work/seeds_$target" "$work/corpus_$target"
  cp "$@" "$work/seeds_$target/"
}
seed onnx "$cases/mnist8/mnist-8.onnx" "$cases/digits_mlp_control/digits_mlp.onnx"
seed safetensors "$cases/digits_mlp_control/digits_mlp.safetensors"
seed npz "$cases/digits_mlp_control/eval.npz" "$cases/digits_mlp_control/digits_mlp_weights.npz"
# Small ones too (stored and deflated members, an .npy), which mutate faster.
python3 - "$work/seeds_npz" <<'PY'
import sys, numpy as np
d = sys.argv[1]
a = np.arange(12, dtype=np.float32).reshape(3, 4)
np.save(f"{d}/small.npy", a)
np.savez(f"{d}/stored.npz", w=a, b=np.ones(3, np.float16))
np.savez_compressed(f"{d}/deflated.npz", w=a, labels=np.arange(3, dtype=np.int64))
PY
# An archive to mutate: mnist-8 through Deep Compression.
target/debug/modelpress compress "$cases/mnist8/mnist-8.onnx" --preset deep-compression \
  -o "$work/mpz" >/dev/null
seed mpz "$work/mpz/model.mpz"

status=0
for t in onnx safetensors npz mpz; do
  mkdir -p "fuzz/artifacts/$t"
  echo "fuzz_$t: ${secs}s"
  if ! "target/debug/fuzz_$t" "$work/corpus_$t" "$work/seeds_$t" \
      -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -max_len=262144 \
      -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 \
      >"$work/$t.log" 2>&1; then
    status=1
    echo "fuzz_$t FAILED; the input is under fuzz/artifacts/$t/:"
    tail -n 40 "$work/$t.log"
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb|cov:" "$work/$t.log" | tail -n 3 || true
done
exit $status
