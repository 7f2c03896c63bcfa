#!/usr/bin/env bash
# The GPU check: the one way to run r1pipe's CUDA checks and benchmarks on a
# lent GPU machine (the device tool), in as few calls as its limits allow
# (64 MiB carried per call, 10 minutes a call, the machine warm for 30 s after
# a call, files outside the repo kept only while warm).
#
#   scripts/gpu-check.sh prepare      here: build r1pipe with --features cuda
#                                     (scripts/cuda-env.sh), strip and gzip it
#                                     (~19 MB), and split what must travel into
#                                     two carries under 64 MiB each:
#                                       gpu-check/carry-1: the binary, the model
#                                         configs, the first 40 MB of SmolLM2's
#                                         Q4_1 GGUF (98 MB: the smallest faithful
#                                         form of its real weights);
#                                       gpu-check/carry-2: the rest of the GGUF.
#   device run, carry [gpu-check/carry-1], command "scripts/gpu-check.sh stash 1"
#   device run, carry [gpu-check/carry-2], command "scripts/gpu-check.sh run"
#                                     (within 30 s of the first, so the machine is
#                                     still warm): the parts are reassembled under
#                                     /root/r1pipe-gpu, checked against their
#                                     blake3-free sha256 sums, and the checks run.
#                                     Results land in $OUT/gpu-bench.txt for
#                                     bench/RESULTS.md.
#
# `run` does: CUDA f32 and bf16 logits against the CPU's (r1pipe bench --check)
# for the SmolLM2 weights and the Qwen2.5-0.5B shape, then prefill/decode
# tokens/s at batch 1/8/32/64 with the roofline and a training step, for the
# Qwen2.5-0.5B, Qwen3-0.6B and SmolLM2 shapes in bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
stash=/root/r1pipe-gpu
case "${1:-}" in
  prepare)
    # shellcheck disable=SC1091
    . scripts/cuda-env.sh
    CARGO_TARGET_DIR="$R1PIPE_CUDA_TARGET" cargo build --release --locked --features cuda
    scripts/fetch-smollm2.sh
    rm -rf gpu-check && mkdir -p gpu-check/carry-1 gpu-check/carry-2
    cp "$R1PIPE_CUDA_TARGET/release/r1pipe" gpu-check/carry-1/r1pipe
    strip gpu-check/carry-1/r1pipe
    gzip -9 -f gpu-check/carry-1/r1pipe
    shared=${R1PIPE_SHARED:-../shared}
    cp "$shared/models/qwen2.5-0.5b-instruct/config.json" gpu-check/carry-1/qwen2.5-0.5b.json
    cp tests/fixtures/qwen3-0.6b-config.json gpu-check/carry-1/qwen3-0.6b.json
    smol=models/smollm2-135m-instruct
    cp "$smol"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} gpu-check/carry-1/
    split -b 40M "$smol/SmolLM2-135M-Instruct.Q4_1.gguf" gpu-check/gguf.part-
    mv gpu-check/gguf.part-aa gpu-check/carry-1/
    mv gpu-check/gguf.part-a[b-z] gpu-check/carry-2/
    sha256sum "$smol/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1 > gpu-check/carry-1/gguf.sha256
    git rev-parse HEAD > gpu-check/carry-1/commit
    du -sh gpu-check/carry-*
    ;;
  stash)
    # On the device: keep this call's carry outside the repo for the next call.
    mkdir -p "$stash"
    cp -r "gpu-check/carry-${2:?which carry}/." "$stash/"
    ls -la "$stash"
    ;;
  run)
    mkdir -p "$stash"
    cp -r gpu-check/carry-2/. "$stash/"
    cd "$stash"
    [ -f r1pipe.gz ] || { echo "the first carry is missing: run 'scripts/gpu-check.sh stash 1' first, within 30 s" >&2; exit 1; }
    cat gguf.part-* > SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$(cat gguf.sha256)  SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
    mkdir -p smollm2 && mv SmolLM2-135M-Instruct.Q4_1.gguf ./*.json smollm2/ 2>/dev/null || true
    mv smollm2/qwen2.5-0.5b.json smollm2/qwen3-0.6b.json . 2>/dev/null || true
    gunzip -c r1pipe.gz > r1pipe && chmod +x r1pipe
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
      echo "date $(date -u +%F), device $gpu (roofline bandwidth $bw GB/s), commit $(cat commit 2>/dev/null)"
      for dtype in f32 bf16; do
        ./r1pipe bench --model smollm2 --device cuda --dtype "$dtype" --batches 1 --decode-steps 8 --train-batch 0 --check
      done
      for shape in qwen2.5-0.5b qwen3-0.6b; do
        ./r1pipe bench --config "$shape.json" --device cuda --dtype bf16 \
          --batches 1,8,32,64 --prompt-len 256 --decode-steps 64 --train-batch 8 --train-seq 512 --bandwidth "$bw" --check
      done
      ./r1pipe bench --model smollm2 --device cuda --dtype bf16 \
        --batches 1,8,32,64 --prompt-len 256 --decode-steps 64 --train-batch 8 --train-seq 512 --bandwidth "$bw"
    } 2>&1 | tee "$out"
    ;;
  *)
    echo "usage: scripts/gpu-check.sh prepare | stash 1 | run" >&2
    exit 2
    ;;
esac
