#!/usr/bin/env bash
# Source this (`. scripts/cuda-env.sh`) to build r1pipe's `cuda` feature on a
# machine without a system CUDA toolkit, GPU or not: it installs NVIDIA's
# CUDA 13.0 toolkit pieces from PyPI into .venv-cuda/ (once) and exports what
# candle's build needs. cudarc loads the CUDA libraries at run time
# (dynamic-linking), so nothing links against a driver at build time.
#
#   . scripts/cuda-env.sh && cargo build --release --features cuda
#
# CUDA 13.0 is pinned so the PTX that nvcc writes is accepted by any CUDA 13
# driver. CUDA_COMPUTE_CAP defaults to 90 (Hopper: H100, H200).
_r1pipe_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_venv="$_r1pipe_root/.venv-cuda"
if [ ! -x "$_venv/bin/python" ]; then
  python3 -m venv "$_venv" || return 1 2>/dev/null || exit 1
fi
if [ ! -f "$_venv/.r1pipe-cuda-13.0.88" ]; then
  "$_venv/bin/pip" install --quiet \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 \
    && touch "$_venv/.r1pipe-cuda-13.0.88" || { echo "cuda-env: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
_cu=$(echo "$_venv"/lib/python3*/site-packages/nvidia/cu13)
[ -d "$_cu" ] || _cu=$(dirname "$(find "$_venv" -path '*nvidia*' -name nvcc -type f | head -1)")/..
export CUDA_ROOT="$(cd "$_cu" && pwd)"
export CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" CUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib64:${LD_LIBRARY_PATH:-}"
export LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib64:${LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# The linker wants unversioned names (the wheels ship libcublas.so.13 only) and a
# libcuda.so, which only a driver install has. Link names point at the wheels'
# libraries; a stub libcuda.so.1 defines every driver function cudarc declares
# (each returns CUDA_ERROR_UNKNOWN) so the binary links. At run time the real
# driver's libcuda.so.1 is the one loaded.
_link="$_venv/link"
if [ ! -f "$_link/libcuda.so" ]; then
  mkdir -p "$_link"
  for lib in "$CUDA_ROOT"/lib/lib*.so.*; do
    base=$(basename "$lib"); name=${base%%.so.*}
    [ -e "$_link/$name.so" ] || ln -sf "$lib" "$_link/$name.so"
  done
  (cd "$_r1pipe_root" && cargo fetch --locked --quiet)
  _sys=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | head -1)
  [ -f "$_sys" ] || { echo "cuda-env: cudarc's driver bindings not found" >&2; return 1 2>/dev/null || exit 1; }
  grep -oE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$_sys" | grep -oE 'cu[A-Za-z0-9_]+' | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' > "$_link/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_link/libcuda.so" "$_link/stub.c"
  unset _sys
fi
export LIBRARY_PATH="$_link:$LIBRARY_PATH"
unset _link _r1pipe_root _venv _cu
# Headers from the separate cccl package (thrust, cub, cuda/std) join the toolkit's include path.
export NVCC_PREPEND_FLAGS="${NVCC_PREPEND_FLAGS:-} -I$CUDA_ROOT/include"
