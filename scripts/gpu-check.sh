#!/usr/bin/env bash
# The GPU check, in two halves:
#
#   scripts/gpu-check.sh prepare   here: build r1pipe with --features cuda
#                                  (scripts/cuda-env.sh), strip it, and put it
#                                  with the model shapes into gpu-check/ (git-ignored,
#                                  well under the device tool's 64 MiB).
#   scripts/gpu-check.sh run       on the lent GPU machine, with gpu-check carried
#                                  (device tool: run, carry ["gpu-check"],
#                                  command "scripts/gpu-check.sh run"): CUDA logits
#                                  against the CPU, then prefill/decode tokens/s at
#                                  batch 1/8/32/64 with the roofline, and a training
#                                  step, for the Qwen2.5-0.5B and SmolLM2-135M shapes.
#                                  Results go to $OUT/gpu-bench.txt for bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    # shellcheck disable=SC1091
    . scripts/cuda-env.sh
    CARGO_TARGET_DIR=target/cuda cargo build --release --locked --features cuda
    mkdir -p gpu-check
    # The binary embeds candle's PTX kernels (~74 MB stripped): gzip brings it
    # well under the device tool's 64 MiB.
    cp target/cuda/release/r1pipe gpu-check/r1pipe
    strip gpu-check/r1pipe
    gzip -9 -f gpu-check/r1pipe
    shared=${R1PIPE_SHARED:-../shared}
    cp "$shared/models/qwen2.5-0.5b-instruct/config.json" gpu-check/qwen2.5-0.5b.json
    cp "$shared/models/smollm2-135m-instruct/config.json" gpu-check/smollm2-135m.json
    git rev-parse HEAD > gpu-check/commit
    ls -la gpu-check
    ;;
  run)
    [ -f gpu-check/r1pipe.gz ] || { echo "gpu-check/r1pipe.gz is missing: run 'scripts/gpu-check.sh prepare' here and carry gpu-check" >&2; exit 1; }
    gunzip -c gpu-check/r1pipe.gz > /tmp/r1pipe && chmod +x /tmp/r1pipe
    # The CUDA libraries (cuBLAS, cuRAND, NVRTC) live in the machine's PyTorch environment.
    libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for d in glob.glob(os.path.join(sp, "nvidia", "**", "lib"), recursive=True):
        dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
    export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$gpu" in
      *H200*) bw=4800 ;;
      *H100*) bw=3350 ;;
      *) bw=2000 ;;
    esac
    out=${OUT:-/tmp}/gpu-bench.txt
    {
      echo "date $(date -u +%F), device $gpu (roofline bandwidth $bw GB/s), commit $(cat gpu-check/commit 2>/dev/null)"
      for shape in qwen2.5-0.5b smollm2-135m; do
        /tmp/r1pipe bench --config "gpu-check/$shape.json" --device cuda --dtype bf16 \
          --batches 1,8,32,64 --prompt-len 256 --decode-steps 64 --train-batch 8 --train-seq 512 --bandwidth "$bw" --check
      done
    } 2>&1 | tee "$out"
    ;;
  *)
    echo "usage: scripts/gpu-check.sh prepare|run" >&2
    exit 2
    ;;
esac
