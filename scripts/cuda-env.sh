#!/usr/bin/env bash
# Source this (`. scripts/cuda-env.sh`) to build r1pipe's `cuda` feature on a
# machine without a system CUDA toolkit, GPU or not: it installs NVIDIA's CUDA
# toolkit pieces from PyPI into .venv-cuda<major>/ (once) and exports what
# candle's build needs. cudarc loads the CUDA libraries at run time
# (dynamic-linking), so nothing links against a driver at build time.
#
#   . scripts/cuda-env.sh && cargo build --release --features cuda
#   CUDA_VERSION=12 . scripts/cuda-env.sh && CARGO_TARGET_DIR=$R1PIPE_CUDA_TARGET cargo build ...
#
# Which CUDA: $CUDA_VERSION (12 or 13) if set; else the one that matches the
# driver `nvidia-smi` reports ("CUDA Version: 12.x" → 12); else 13. The
# binary needs a driver at least as new as its toolkit, and that toolkit's
# libraries (libcublas.so.<major>, libnvrtc.so.<major>, libcurand) at run time:
#   13 → CUDA 13.0, driver ≥ 580;   12 → CUDA 12.4, driver ≥ 550.
# CUDA_COMPUTE_CAP defaults to 90 (Hopper: H100, H200). $R1PIPE_CUDA_TARGET is
# a target folder per major version (the CUDA bindings differ between them).
_r1pipe_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${CUDA_VERSION:-}" ]; then
  _driver_cuda=$(nvidia-smi 2>/dev/null | grep -oE 'CUDA Version: [0-9]+' | grep -oE '[0-9]+$' || true)
  CUDA_VERSION=${_driver_cuda:-13}
  [ "$CUDA_VERSION" -ge 13 ] 2>/dev/null && CUDA_VERSION=13
  unset _driver_cuda
fi
case "$CUDA_VERSION" in
  13|13.*)
    CUDA_VERSION=13
    _pins="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 \
      nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35"
    _stamp=13.0.88 ;;
  12|12.*)
    CUDA_VERSION=12
    _pins="nvidia-cuda-nvcc-cu12==12.4.131 nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-cccl-cu12==12.4.127.post1 \
      nvidia-cuda-nvrtc-cu12==12.4.127 nvidia-cublas-cu12==12.4.5.8 nvidia-curand-cu12==10.3.5.147"
    _stamp=12.4.131 ;;
  *)
    echo "cuda-env: CUDA_VERSION=$CUDA_VERSION: use 12 (driver ≥ 550) or 13 (driver ≥ 580)" >&2
    return 1 2>/dev/null || exit 1 ;;
esac
export CUDA_VERSION
export R1PIPE_CUDA_TARGET="$_r1pipe_root/target/cuda$([ "$CUDA_VERSION" = 13 ] || echo "-$CUDA_VERSION")"
_venv="$_r1pipe_root/.venv-cuda$([ "$CUDA_VERSION" = 13 ] || echo "-$CUDA_VERSION")"
if [ ! -x "$_venv/bin/python" ]; then
  python3 -m venv "$_venv" || return 1 2>/dev/null || exit 1
fi
if [ ! -f "$_venv/.r1pipe-cuda-$_stamp" ]; then
  # shellcheck disable=SC2086
  "$_venv/bin/pip" install --quiet $_pins \
    && touch "$_venv/.r1pipe-cuda-$_stamp" || { echo "cuda-env: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
unset _pins _stamp
if [ "$CUDA_VERSION" = 13 ]; then
  _cu=$(echo "$_venv"/lib/python3*/site-packages/nvidia/cu13)
else
  # CUDA 12's wheels each bring their own folder under nvidia/: gather them into one root.
  _cu="$_venv/cuda-root"
  if [ ! -d "$_cu/bin" ]; then
    mkdir -p "$_cu/bin" "$_cu/lib" "$_cu/include" "$_cu/nvvm"
    for d in "$_venv"/lib/python3*/site-packages/nvidia/*/; do
      [ -d "$d/bin" ] && cp -rs "$d/bin/." "$_cu/bin/"
      [ -d "$d/lib" ] && cp -rs "$d/lib/." "$_cu/lib/"
      [ -d "$d/include" ] && cp -rs "$d/include/." "$_cu/include/"
      [ -d "$d/nvvm" ] && cp -rs "$d/nvvm/." "$_cu/nvvm/"
    done
  fi
fi
[ -d "$_cu" ] || _cu=$(dirname "$(find "$_venv" -path '*nvidia*' -name nvcc -type f | head -1)")/..
export CUDA_ROOT="$(cd "$_cu" && pwd)"
export CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" CUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib64:${LD_LIBRARY_PATH:-}"
export LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib64:${LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "cuda-env: CUDA $CUDA_VERSION from $CUDA_ROOT (compute capability $CUDA_COMPUTE_CAP); target folder $R1PIPE_CUDA_TARGET" >&2
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
# The binary needs libcuda.so.1 to start (candle links the CUDA libraries):
# $R1PIPE_CUDA_STUB holds the stub under that name, for a test that starts a
# CUDA build where no driver is installed (every CUDA call then fails, as on a
# machine whose GPU does not answer). Never put it on a real GPU machine's path.
ln -sf libcuda.so "$_link/libcuda.so.1"
export R1PIPE_CUDA_STUB="$_link"
export LIBRARY_PATH="$_link:$LIBRARY_PATH"
unset _link _r1pipe_root _venv _cu
# Headers from the separate cccl package (thrust, cub, cuda/std) join the toolkit's include path.
export NVCC_PREPEND_FLAGS="${NVCC_PREPEND_FLAGS:-} -I$CUDA_ROOT/include"
