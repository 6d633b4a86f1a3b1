#!/usr/bin/env bash
# Lays out one Omniglot alphabet the way `fewshot predict` reads a user's own
# symbols (a support folder with one sub-folder per class holding one
# drawing, and a folder of query drawings by another person), runs predict
# and counts how many queries it names right. Lake et al.'s one-shot task
# in miniature: 20 characters of one alphabet, one drawing each.
#
# Usage: scripts/predict_omniglot_alphabet.sh CHECKPOINT ALPHABET [OUT_DIR [FLAGS...]]
#   ALPHABET: a folder name under omniglot/images_evaluation (or
#   images_background), e.g. Kannada. The first 20 characters are used;
#   drawer 1 gives the support image, drawer 2 the query. FLAGS go to
#   `fewshot predict`, e.g. --support-copies 16.
# Needs FEWSHOT_DATA_DIR (the folder holding omniglot/).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n 2,14p "$0" >&2
  exit 2
fi
checkpoint=$(realpath "$1")
alphabet=$2
out=$(realpath -m "${3:-runs/predict-$alphabet}")
shift $(($# < 3 ? $# : 3))
: "${FEWSHOT_DATA_DIR:?set FEWSHOT_DATA_DIR to the folder holding omniglot/}"
source_dir=""
for set in images_evaluation images_background; do
  if [ -d "$FEWSHOT_DATA_DIR/omniglot/$set/$alphabet" ]; then
    source_dir="$FEWSHOT_DATA_DIR/omniglot/$set/$alphabet"
  fi
done
if [ -z "$source_dir" ]; then
  echo "no alphabet $alphabet under $FEWSHOT_DATA_DIR/omniglot/images_{evaluation,background}" >&2
  exit 1
fi

cd "$(dirname "$0")/.."
rm -rf "$out"
mkdir -p "$out/support" "$out/query"
for character_dir in $(ls -d "$source_dir"/character* | sort | head -20); do
  character=$(basename "$character_dir")
  mkdir -p "$out/support/$character"
  # Files are named IMAGE_DRAWER.png: drawer 01 for support, 02 for query.
  cp "$(ls "$character_dir"/*_01.png)" "$out/support/$character/"
  cp "$(ls "$character_dir"/*_02.png)" "$out/query/$character.png"
done

cargo build --release -q -p bench-runner
target/release/fewshot predict --checkpoint "$checkpoint" \
  --support "$out/support" --query "$out/query" "$@" | tee "$out/predictions.tsv"
# A query is right when its predicted class is the character it was drawn as.
awk -F'\t' '{ n++; split($1, parts, "/"); file = parts[length(parts)];
  sub(/\.png$/, "", file); if (file == $2) right++ }
  END { printf "%d of %d queries right (%.1f%%)\n", right, n, 100 * right / n }' \
  "$out/predictions.tsv"
