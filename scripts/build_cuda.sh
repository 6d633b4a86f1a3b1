#!/usr/bin/env bash
# Builds the `fewshot` binary with CUDA support on a machine that has neither
# a GPU nor a CUDA installation: CUDA's compiler, headers and libraries come
# from NVIDIA's wheels on the Python package registry, installed into a
# virtual environment under target/ (about 1.2 GB, downloaded once).
#
#   scripts/build_cuda.sh            # -> target/cuda/fewshot (stripped)
#                                    #    and target/cuda/fewshot.xz (a seventh of its size)
#
# The binary runs on a Linux x86-64 machine with an NVIDIA driver for CUDA
# 13.0 or newer and CUDA's libraries (cuBLAS, cuBLASLt, cuRAND, NVRTC, the
# runtime; `scripts/gpu_check.sh` finds PyTorch's copies). Settings, by
# environment variable:
#   CUDA_TOOLKIT_VERSION  the cuda-toolkit wheels' version (13.0.2): keep it at
#                         or below the driver's CUDA version, or the driver
#                         refuses the kernels' PTX
#   CUDA_COMPUTE_CAP      the GPU's compute capability (90: H100/H200; 80: A100)
#   TARGET_CPU            the GPU machine's CPU baseline (x86-64-v3: AVX2)
#   OUT                   where the binary goes (target/cuda/fewshot)
# The first build compiles candle's CUDA kernels with nvcc: about half an
# hour on 2 cores; later builds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_TOOLKIT_VERSION="${CUDA_TOOLKIT_VERSION:-13.0.2}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
TARGET_CPU="${TARGET_CPU:-x86-64-v3}"
OUT="${OUT:-target/cuda/fewshot}"
TOOLKIT_DIR="$PWD/target/cuda-toolkit/$CUDA_TOOLKIT_VERSION"

say() { echo "build_cuda: $*" >&2; }

for tool in python3 cargo cc strip; do
  command -v "$tool" >/dev/null || { say "needs \`$tool\` on the PATH"; exit 1; }
done

# 1. The toolkit: nvcc and its back end, headers, and the libraries to link.
if [ ! -f "$TOOLKIT_DIR/installed" ]; then
  say "installing CUDA $CUDA_TOOLKIT_VERSION's wheels into $TOOLKIT_DIR"
  rm -rf "$TOOLKIT_DIR"
  python3 -m venv "$TOOLKIT_DIR"
  "$TOOLKIT_DIR/bin/pip" install --quiet --disable-pip-version-check \
    "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,cublas,curand,nvrtc]==$CUDA_TOOLKIT_VERSION"
  touch "$TOOLKIT_DIR/installed"
fi
CUDA_ROOT="$(echo "$TOOLKIT_DIR"/lib/python3*/site-packages/nvidia/cu1*)"
[ -x "$CUDA_ROOT/bin/nvcc" ] || { say "no nvcc under $CUDA_ROOT"; exit 1; }

# The wheels carry each library under its versioned name only (libcublas.so.13);
# the linker looks for the plain one. lib64 is where candle-kernels' builder
# looks for the libraries beside nvcc.
for lib in "$CUDA_ROOT"/lib/lib*.so.*; do
  name="$(basename "$lib")"
  ln -sf "$name" "$CUDA_ROOT/lib/${name%%.so.*}.so"
done
ln -sfn lib "$CUDA_ROOT/lib64"

# 2. libcuda.so is the driver's, absent on a machine without a GPU: link
# against a stub that defines every driver function cudarc may call, named
# libcuda.so.1 as the driver's library is, so the binary loads the real one.
cargo fetch --quiet
CUDARC_DIR="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(
  grep -A1 '^name = "cudarc"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')" | head -1)"
[ -d "$CUDARC_DIR" ] || { say "cudarc's source not found in cargo's registry"; exit 1; }
mkdir -p "$CUDA_ROOT/lib/stubs"
grep -ohE '^ +fn cu[A-Za-z0-9_]+\(' "$CUDARC_DIR/src/driver/sys/mod.rs" |
  sed -E 's/^ +fn ([A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u >"$CUDA_ROOT/lib/stubs/libcuda.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_ROOT/lib/stubs/libcuda.so" \
  "$CUDA_ROOT/lib/stubs/libcuda.c"

# 3. The build: its own target folder, so the CPU build's stays as it is.
export PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_PATH="$CUDA_ROOT" CUDA_ROOT
export RUSTFLAGS="-C target-cpu=$TARGET_CPU"
say "building fewshot with --features cuda for compute capability $CUDA_COMPUTE_CAP ($(nvcc --version | tail -2 | head -1))"
cargo build --release -p bench-runner --features cuda --target-dir target/cuda/build
mkdir -p "$(dirname "$OUT")"
cp target/cuda/build/release/fewshot "$OUT.tmp"
strip "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
# Compressed for carrying to the GPU machine (scripts/gpu_check.sh takes either).
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], "rb"), lzma.open(sys.argv[2], "wb"))' \
  "$OUT" "$OUT.xz.tmp"
mv "$OUT.xz.tmp" "$OUT.xz"
say "wrote $OUT ($(du -h "$OUT" | cut -f1)) and $OUT.xz ($(du -h "$OUT.xz" | cut -f1)); it needs these libraries at run time:"
readelf -d "$OUT" | sed -n 's/.*Shared library: \[\(.*\)\]/  \1/p' >&2
