#!/usr/bin/env bash
# Trains each given config (resuming a stopped run), then publishes its
# evaluated checkpoint into models/<config name>.safetensors.
#
# Usage: scripts/train_and_publish.sh configs/eb-metanet-omniglot-5w1s.json [more configs...]
# Needs FEWSHOT_DATA_DIR (or data.root in the configs) for real datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bench-runner
fewshot=target/release/fewshot
mkdir -p runs models
for config in "$@"; do
  name=$(basename "$config" .json)
  run="runs/$name"
  if [ -f "$run/results.json" ]; then
    echo "$name: already trained and evaluated"
  elif [ -f "$run/checkpoints/last.safetensors" ]; then
    "$fewshot" train "$config" --out "$run" --resume
  else
    "$fewshot" train "$config" --out "$run"
  fi
  "$fewshot" publish "$run" "models/$name.safetensors"
done
