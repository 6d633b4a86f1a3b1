#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, within 8 minutes (each step
# has a time limit; together they add up to 8 minutes),
#   1. `fewshot check-device --device cuda`: what `auto` opens, second order
#      on the device, every op's value and gradients to second order against
#      the CPU kernels, MAML's exact meta-gradient against the CPU's (and
#      against first order, so second order cannot be lost in silence), three
#      training steps of every learner against the CPU's;
#   2. `fewshot bench --suite kernels --device cuda` and the same cases in
#      PyTorch on the same GPU (scripts/pytorch_kernels.py --device cuda);
#   3. meta-training step times on the GPU: MAML Omniglot 5-way 1-shot and
#      20-way 1-shot (the paper's settings), Meta Networks 5-way 1-shot, on the
#      built-in synthetic glyphs (same shapes as Omniglot at 28x28, no dataset
#      needed);
# then prints one summary. Nothing here needs Rust or a network: the binary
# comes from scripts/build_cuda.sh, PyTorch from the machine (skipped if absent).
#
# Usage: [DEVICE=cuda:N] scripts/gpu_check.sh [FEWSHOT_BINARY [OUT_DIR]]
#   FEWSHOT_BINARY  default target/cuda/fewshot; a .xz of it is unpacked first
#   OUT_DIR         default runs/gpu-check: logs and JSON of every step, summary.txt
#   DEVICE          default cuda; DEVICE=cpu rehearses the script anywhere (the
#                   portable path against the kernels)
#   TRAIN_EPISODES  episodes each training benchmark times (default 320)
set -uo pipefail
cd "$(dirname "$0")/.."
fewshot="${1:-target/cuda/fewshot}"
out="${2:-runs/gpu-check}"
device="${DEVICE:-cuda}"
train_episodes="${TRAIN_EPISODES:-320}"
mkdir -p "$out"
say() { echo "gpu_check: $*" >&2; }

[ -f "$fewshot" ] || { say "no binary at $fewshot: build it with scripts/build_cuda.sh"; exit 1; }
if [[ "$fewshot" == *.xz ]]; then
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$fewshot" "$out/fewshot"
  chmod +x "$out/fewshot"
  fewshot="$out/fewshot"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader >"$out/gpu.txt" 2>&1
say "GPU: $(cat "$out/gpu.txt" 2>/dev/null || echo 'nvidia-smi not found')"

# CUDA's libraries: the binary links cuBLAS, cuBLASLt, cuRAND, NVRTC and the
# runtime by their versioned names. Where the loader cannot find them, look in
# the usual CUDA folders and in Python's NVIDIA wheels (PyTorch's copies).
missing() { ldd "$fewshot" | grep -c "not found"; }
if [ "$(missing)" -gt 0 ]; then
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import glob, site
print(" ".join(d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib")))' 2>/dev/null); do
    [ -d "$dir" ] && LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  export LD_LIBRARY_PATH
fi
if [ "$(missing)" -gt 0 ]; then
  say "libraries the binary needs that are not found:"
  ldd "$fewshot" | grep "not found" >&2
  exit 1
fi

status=0
step() { # step NAME TIMEOUT COMMAND...: runs it, its stdout to NAME.json, stderr to NAME.log
  local name=$1 limit=$2
  shift 2
  say "$name"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.json" 2>"$out/$name.log"
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$out/steps.txt"
  [ $rc -eq 0 ] || { say "$name failed (exit $rc): $(tail -3 "$out/$name.log")"; status=1; }
}
: >"$out/steps.txt"

step check-device 120 "$fewshot" check-device --device "$device" --json
step kernels-ours 90 "$fewshot" bench --suite kernels --device "$device" --repeats 20 --json
if python3 -c 'import sys, torch; torch.zeros(1, device=sys.argv[1])' "$device" 2>/dev/null; then
  step kernels-pytorch 90 python3 scripts/pytorch_kernels.py --device "$device" --repeats 20
else
  say "no PyTorch for $device here: the PyTorch cases are skipped"
fi

# Meta-training steps: each config with the synthetic glyphs in place of Omniglot.
for config in maml-omniglot-5w1s maml-omniglot-20w1s metanet-original-omniglot-5w1s; do
  python3 - "configs/$config.json" "$out/$config.config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["data"] = {"dataset": "synthetic", "image_size": config.get("data", {}).get("image_size", 28)}
json.dump(config, open(sys.argv[2], "w"), indent=1)
PY
  step "train-$config" 60 "$fewshot" bench --suite train --config "$out/$config.config.json" \
    --device "$device" --episodes "$train_episodes" --json
done

python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except (OSError, ValueError):
        return None
print("GPU:", open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else "?")
for line in open(os.path.join(out, "steps.txt")):
    name, rc, seconds = line.split()
    print(f"  {name:<40} {'ok' if rc == '0' else 'FAILED (exit ' + rc + ')'}  {seconds} s")
check = load("check-device")
if check:
    failing = [o for o in check["ops"] if o["max_relative_difference"] > check["tolerance"]]
    worst = max(check["ops"], key=lambda o: o["max_relative_difference"])
    print(f"check-device: auto opens {check['auto']}; {len(check['ops'])} op quantities, "
          f"{len(failing)} beyond {check['tolerance']:.0e} (largest {worst['max_relative_difference']:.1e}: "
          f"{worst['op']}, {worst['quantity']}); MAML meta-gradient {check['maml']['second_order']:.1e} "
          f"from the CPU's, first order {check['maml']['second_order_terms']:.1e} from it")
    for l in check["learners"]:
        print(f"  {l['learner']:<18} first loss {l['first_loss']:.1e}, losses {l['losses']:.1e}, logits {l['logits']:.1e}")
ours, theirs = load("kernels-ours"), load("kernels-pytorch")
if ours:
    torch_cases = {c["name"]: c for c in (theirs or {"cases": []})["cases"]}
    print(f"{'case':<18} {'ours ms':>9} {'pytorch ms':>11} {'ratio':>6} {'GFLOP/s':>8} {'pytorch MiB':>12}")
    for c in ours["cases"]:
        t = torch_cases.get(c["name"])
        ratio = f"{c['median_ms'] / t['median_ms']:6.2f}" if t else "     -"
        tms = f"{t['median_ms']:11.2f}" if t else "          -"
        tmem = f"{t.get('peak_device_mib', 0):12.0f}" if t else "           -"
        print(f"{c['name']:<18} {c['median_ms']:9.2f} {tms} {ratio} {c['gflops']:8.1f} {tmem}")
for config in ["maml-omniglot-5w1s", "maml-omniglot-20w1s", "metanet-original-omniglot-5w1s"]:
    r = load("train-" + config)
    if r:
        line = f"train {config}: {r['median_step_ms']:.1f} ms/step ({r['meta_batch']} x {r['episode']})"
        if config == "maml-omniglot-20w1s":
            hours = r['median_step_ms'] / 3.6e6
            line += f"; 40,000 steps (the reference's) {hours * 40000:.2f} h, 60,000 {hours * 60000:.2f} h"
        print(line)
PY
exit $status
