#!/usr/bin/env bash
# The project's test command (README "Two commands"): builds r1pipe, finds the
# shared folder the tests read (R1PIPE_SHARED or ../shared, offline; otherwise
# made from the Hugging Face Hub, scripts/lib.sh), fetches the test model,
# runs every test, then runs the model, checkpointing, LoRA, GRPO, SFT and
# evaluation tests again with the portable kernels (R1PIPE_KERNELS=portable):
# the op sequence CUDA runs, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
cargo build --locked --features test-kinds
export R1PIPE_BIN=${R1PIPE_BIN:-$PWD/target/debug/r1pipe}
if ! R1PIPE_SHARED=$(shared_dir); then
  R1PIPE_SHARED=$(shared_from_hub "$R1PIPE_BIN" test)
fi
export R1PIPE_SHARED
echo "== data and model files from $R1PIPE_SHARED"
scripts/fetch-smollm2.sh
cargo test --locked --features test-kinds "$@"
echo "== the same model and training tests on the portable kernels (R1PIPE_KERNELS=portable)"
R1PIPE_KERNELS=portable cargo test --locked --features test-kinds --lib \
  --test model_numerics --test lora --test grpo --test sft --test model_stages --test reference_fixtures \
  --test transfers --test batching "$@"
