#!/usr/bin/env bash
# Times every case of `fewshot bench --suite kernels` against the PyTorch CPU
# reference (scripts/pytorch_kernels.py, 2 threads), alternating ours and
# PyTorch case by case, ROUNDS times, each case in its own process (so that
# its peak memory is its own). Prints each case's median time over the rounds,
# the ratio ours/PyTorch, our achieved GFLOP/s and both peak memories, and
# writes the rows as JSON to OUT. Installs PyTorch into scripts/.venv on first use.
#
# Usage: [CASES="case ..."] [FEWSHOT=BINARY] scripts/compare_kernels_speed.sh [ROUNDS] [REPEATS] [OUT]
# FEWSHOT times another build (scripts/build_patched_candle.sh's, say) instead
# of building target/release/fewshot.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
repeats=${2:-20}
out=${3:-runs/kernel-comparison.json}
venv=scripts/.venv
cases=${CASES:-"train-conv4-28 train-conv4-84 train-conv4-105 train-conv5-128-56 protonet-60way-28 maml2-1step-28 maml2-5step-28 maml2-5step-84 maml2-batch32-28 eval-conv4-28"}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.15.0 numpy
fi
if [ -n "${FEWSHOT:-}" ]; then
  fewshot=$FEWSHOT
else
  cargo build --release -p bench-runner
  fewshot=target/release/fewshot
fi
mkdir -p "$(dirname "$out")"

results=$(mktemp)
for round in $(seq "$rounds"); do
  for case in $cases; do
    echo "round $round/$rounds: $case" >&2
    "$fewshot" bench --suite kernels --case "$case" --repeats "$repeats" --json \
      | python3 -c 'import json,sys; d=json.load(sys.stdin); c=d["cases"][0]; print("ours", c["name"], c["median_ms"], c["gflops"], d["peak_rss_mib"])' >> "$results"
    "$venv/bin/python" scripts/pytorch_kernels.py --case "$case" --repeats "$repeats" --threads 2 2>/dev/null \
      | python3 -c 'import json,sys; d=json.load(sys.stdin); c=d["cases"][0]; print("pytorch", c["name"], c["median_ms"], 0, d["peak_rss_mib"])' >> "$results"
  done
done
python3 - "$results" "$out" <<'PY'
import json, statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def col(side, case, i):
    return statistics.median(float(r[i]) for r in rows if r[0] == side and r[1] == case)
table = []
print(f"{'case':<16} {'ours ms':>9} {'pytorch ms':>11} {'ratio':>6} {'GFLOP/s':>8} {'ours MiB':>9} {'pytorch MiB':>12}")
for case in dict.fromkeys(r[1] for r in rows):
    ours, torch = col("ours", case, 2), col("pytorch", case, 2)
    row = {"name": case, "ours_median_ms": ours, "pytorch_median_ms": torch, "ratio": ours / torch,
           "ours_gflops": col("ours", case, 3), "ours_peak_mib": col("ours", case, 4),
           "pytorch_peak_mib": col("pytorch", case, 4)}
    table.append(row)
    print(f"{case:<16} {ours:9.1f} {torch:11.1f} {ours / torch:6.2f} {row['ours_gflops']:8.1f} "
          f"{row['ours_peak_mib']:9.0f} {row['pytorch_peak_mib']:12.0f}")
json.dump({"cases": table}, open(sys.argv[2], "w"), indent=2)
PY
rm -f "$results"
