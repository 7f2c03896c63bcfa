#!/usr/bin/env bash
# The project's test command (README "Two commands"): fetches the test model if
# a test needs it, runs every test, then runs the model, checkpointing, LoRA,
# GRPO, SFT and evaluation tests again with the portable kernels
# (R1PIPE_KERNELS=portable): the op sequence CUDA runs, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
cargo test --locked --features test-kinds "$@"
echo "== the same model and training tests on the portable kernels (R1PIPE_KERNELS=portable)"
R1PIPE_KERNELS=portable cargo test --locked --features test-kinds --lib \
  --test model_numerics --test lora --test grpo --test sft --test model_stages --test reference_fixtures \
  --test transfers --test batching "$@"
