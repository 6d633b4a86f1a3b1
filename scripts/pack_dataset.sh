#!/usr/bin/env bash
# Packs a dataset folder, laid out as its loader reads it, into the files of
# a Hugging Face hub dataset repository, and writes the manifest that
# `fewshot data fetch` checks them against.
#
#   scripts/pack_dataset.sh omniglot|cifar100|cub SRC OUT [REPO] [REVISION]
#
# SRC is the dataset folder (e.g. $FEWSHOT_DATA_DIR/omniglot), OUT an empty
# folder for the repository's files; the manifest goes to OUT/manifest.json.
# The archives are plain tar files made byte for byte reproducibly (names
# sorted, times, owners and modes fixed, GNU format), so packing the same
# files again gives the same checksums.
#
# To publish: `huggingface-cli upload --repo-type dataset REPO OUT .` (without
# manifest.json), then pack again with REVISION set to the commit the upload
# made and copy OUT/manifest.json to crates/fewshot-data/sources/<dataset>.json.
set -euo pipefail

usage="usage: pack_dataset.sh omniglot|cifar100|cub SRC OUT [REPO] [REVISION]"
dataset=${1:?$usage}
src=${2:?$usage}
out=${3:?$usage}
repo=${4:-fewshot-rs/$dataset}
revision=${5:-main}

case $dataset in
  omniglot)
    archives=(images_background images_evaluation)
    files=(LICENSE splits/vinyals/train.txt splits/vinyals/val.txt splits/vinyals/test.txt
      splits/vinyals/trainval.txt splits/vinyals/LICENSE)
    ;;
  cifar100)
    archives=()
    files=(train.bin test.bin fine_label_names.txt coarse_label_names.txt)
    ;;
  cub)
    archives=(images)
    files=(images.txt bounding_boxes.txt)
    ;;
  *)
    echo "pack_dataset.sh: no packing rule for $dataset (known: omniglot, cifar100, cub)" >&2
    exit 2
    ;;
esac

mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "$(ls -A "$out")" ]; then
  echo "pack_dataset.sh: $out is not empty" >&2
  exit 2
fi

entries=()
add_entry() { # path unpack
  local size sha
  size=$(stat -c %s "$out/$1")
  sha=$(sha256sum "$out/$1" | cut -d' ' -f1)
  entries+=("    {\"path\": \"$1\", \"size\": $size, \"sha256\": \"$sha\", \"unpack\": \"$2\"}")
}

for folder in ${archives[@]+"${archives[@]}"}; do
  test -d "$src/$folder" || { echo "pack_dataset.sh: $src/$folder is missing" >&2; exit 1; }
  (cd "$src" && LC_ALL=C tar --sort=name --format=gnu --mtime=@0 --owner=0 --group=0 \
    --numeric-owner --mode='u+rwX,go+rX,go-w' -cf "$out/$folder.tar" "$folder")
  add_entry "$folder.tar" tar
done
for file in "${files[@]}"; do
  test -f "$src/$file" || { echo "pack_dataset.sh: $src/$file is missing" >&2; exit 1; }
  mkdir -p "$out/$(dirname "$file")"
  cp "$src/$file" "$out/$file"
  add_entry "$file" file
done

{
  echo "{"
  echo "  \"dataset\": \"$dataset\","
  echo "  \"repo\": \"$repo\","
  echo "  \"revision\": \"$revision\","
  echo "  \"files\": ["
  last=$((${#entries[@]} - 1))
  for i in "${!entries[@]}"; do
    if [ "$i" -lt "$last" ]; then echo "${entries[$i]},"; else echo "${entries[$i]}"; fi
  done
  echo "  ]"
  echo "}"
} > "$out/manifest.json"
echo "packed $dataset into $out; manifest: $out/manifest.json"
