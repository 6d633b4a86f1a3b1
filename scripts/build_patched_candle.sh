#!/usr/bin/env bash
# Builds (or tests) the workspace against a copy of candle-core whose backward
# pass stores the first gradient reaching each op input instead of adding it
# to a fresh tensor of zeros (scripts/patch_candle_backprop.py says why). The
# CPU kernel cases with a backward run 14-25% faster with it and a MAML++
# training step 14% (docs/RESULTS.md); the default build keeps candle as published.
#
#   scripts/build_patched_candle.sh                 # -> target/patched-candle/fewshot
#   scripts/build_patched_candle.sh test --release -p fewshot-backbone -p maml
#
# Arguments, if any, replace `build --release -p bench-runner` as the cargo
# command. The copy of candle-core lives in target/patched-candle/ and the
# build in target/patched-candle/build/ (a first build: ~4 minutes on 2
# cores), so the default build in target/ is left alone. Cargo.lock is
# restored afterwards (cargo rewrites candle-core's entry for a patched build).
set -euo pipefail
cd "$(dirname "$0")/.."

work="$PWD/target/patched-candle"
crate="$work/candle-core-0.11.1"
say() { echo "build_patched_candle: $*" >&2; }

# 1. The copy: candle-core 0.11.1 from cargo's registry, patched once (a
# new copy would rebuild everything above candle).
if [ ! -f "$crate/.patched" ]; then
  mkdir -p "$work"
  python3 scripts/patch_candle_backprop.py "$crate"
  touch "$crate/.patched"
fi

# 2. The build, with Cargo.lock put back however it ends.
lock_backup=$(mktemp)
cp Cargo.lock "$lock_backup"
trap 'cp "$lock_backup" Cargo.lock; rm -f "$lock_backup"' EXIT
if [ $# -eq 0 ]; then
  set -- build --release -p bench-runner
fi
CARGO_TARGET_DIR="$work/build" cargo --config "patch.crates-io.candle-core.path=\"$crate\"" "$@"

if [ "$1" = build ] && [ -x "$work/build/release/fewshot" ]; then
  cp "$work/build/release/fewshot" "$work/fewshot"
  say "wrote $work/fewshot"
fi
