#!/usr/bin/env bash
# Times eb-metanet's meta-training step, ours against the PyTorch CPU reference
# (2 threads), alternating ROUNDS times in one run, and prints the medians and
# the ratio. Installs PyTorch into scripts/.venv on first use.
#
# Usage: scripts/compare_eb_metanet_speed.sh [CONFIG] [ROUNDS] [EPISODES]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/eb-metanet-omniglot-5w1s.json}
rounds=${2:-3}
episodes=${3:-40}
venv=scripts/.venv

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.15.0 numpy
fi
cargo build --release -p bench-runner
fewshot=target/release/fewshot

results=$(mktemp)
for round in $(seq "$rounds"); do
  echo "round $round/$rounds" >&2
  "$fewshot" bench --suite train --config "$config" --episodes "$episodes" --json 2>/dev/null \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print("ours", d["median_step_ms"], d["episodes_per_second"])' >> "$results"
  "$venv/bin/python" scripts/pytorch_eb_metanet.py "$config" --episodes "$episodes" --threads 2 \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print("pytorch", d["median_step_ms"], d["episodes_per_second"])' >> "$results"
done
python3 - "$results" "$config" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def median(name, column):
    return statistics.median(float(r[column]) for r in rows if r[0] == name)
ours, torch = median("ours", 1), median("pytorch", 1)
print(f"config {sys.argv[2]}")
print(f"ours     median {ours:8.1f} ms/step  {median('ours', 2):6.2f} episodes/s")
print(f"pytorch  median {torch:8.1f} ms/step  {median('pytorch', 2):6.2f} episodes/s")
print(f"ratio ours/pytorch (time) {ours / torch:.2f}")
PY
rm -f "$results"
