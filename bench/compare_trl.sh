#!/usr/bin/env bash
# r1pipe's GRPO step and TRL's GRPOTrainer side by side, on this machine, on the
# same config, each a process of its own under /usr/bin/time -v (peak RSS):
#   smollm2  SmolLM2-135M-Instruct, 2 prompts × 4 completions × ≤128 tokens,
#            β 0.04, lr 3e-6, temperature 0.9, 3 steps (median after the first)
#   qwen     the Qwen2.5-0.5B shape (random weights, SmolLM2's tokenizer), the
#            seeds' shape: 2 prompts × 8 completions × ≤256 tokens (4 × 4), β 0.04, 1 step
# Both with gradient checkpointing (r1pipe's default; set explicitly for TRL).
#
# Needs a local PyTorch venv (not a project dependency):
#   python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers trl datasets
# Usage: bench/compare_trl.sh [smollm2|qwen|all]   (default smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${R1PIPE_REF_VENV:-.venv-ref}
[ -x "$venv/bin/python" ] || { echo "compare_trl: no PyTorch venv at $venv (see the header of $0)" >&2; exit 1; }
which=${1:-smollm2}
shared=${R1PIPE_SHARED:-../shared}
scripts/fetch-smollm2.sh
cargo build --release --locked -q
r1=$PWD/target/release/r1pipe
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$r1" convert --model models/smollm2-135m-instruct --out "$work/smollm2-hf" >/dev/null
mkdir -p "$work/stages"

# rss_of FILE: the peak RSS /usr/bin/time -v wrote, in GB.
rss_of() { awk -F': ' '/Maximum resident set size/ {printf "%.2f", $2 / 1048576}' "$1"; }

run_pair() { # name, model-or-config args for TRL, r1pipe model dir, prompts, gens, accum, max_completion, steps
  local name=$1 trl_model=$2 r1_model=$3 prompts=$4 gens=$5 accum=$6 maxc=$7 steps=$8
  local per=$(( prompts * gens / accum ))
  /usr/bin/time -v "$venv/bin/python" bench/trl_grpo.py $trl_model --data "$shared/data/gsm8k/train.jsonl" \
    --prompts "$prompts" --generations "$gens" --accumulation "$accum" --max-completion "$maxc" --beta 0.04 \
    --steps "$steps" > "$work/trl.out" 2> "$work/trl.time" || { tail -20 "$work/trl.time" >&2; exit 1; }
  cat > "$work/$name.yaml" <<YAML
name: compare-$name
device: cpu
stages:
  gsm8k: { kind: download, with: { path: "$(realpath "$shared/data/gsm8k")" } }
  prompts: { kind: format, with: { data: "\${gsm8k.dataset}", limit: { train: 64, test: 1 } } }
  grpo:
    kind: grpo
    with:
      model: "$r1_model"
      train: \${prompts.train}
      rewards: "$PWD/stages/rewards/r1-gsm8k.yaml"
      learning_rate: 3.0e-6
      temperature: 0.9
      beta: 0.04
      per_device_train_batch_size: $per
      gradient_accumulation_steps: $accum
      num_generations: $gens
      max_completion_length: $maxc
      max_steps: $steps
      save_steps: 1000
YAML
  (cd "$work" && /usr/bin/time -v "$r1" run "$name.yaml" --cache "$work/cache" > "$work/r1.out" 2> "$work/r1.time") \
    || { tail -20 "$work/r1.time" >&2; exit 1; }
  local log; log=$(cd "$work" && "$r1" show grpo.log -p "$name.yaml" --cache "$work/cache")
  python3 - "$name" "$work/trl.out" "$(rss_of "$work/trl.time")" "$log" "$(rss_of "$work/r1.time")" <<'PY'
import json, sys
name, trl_out, trl_rss, log, r1_rss = sys.argv[1:]
trl = json.loads([l for l in open(trl_out) if l.startswith("{")][-1])
times = [json.loads(l)["step_time"] for l in open(log)]
steady = sorted(times[1:] or times)
r1 = steady[len(steady) // 2]
t = trl["steady_step_s"]
print(f"{name:<8} r1pipe {r1:7.1f} s/step {float(r1_rss):6.2f} GB | TRL {t:7.1f} s/step {float(trl_rss):6.2f} GB | "
      f"r1pipe/TRL time {r1 / t:.2f}, memory {float(r1_rss) / float(trl_rss):.2f}")
PY
}

if [ "$which" = smollm2 ] || [ "$which" = all ]; then
  run_pair smollm2 "--model $work/smollm2-hf" "$work/smollm2-hf" 2 4 2 128 3
fi
if [ "$which" = qwen ] || [ "$which" = all ]; then
  # The same random weights on both sides: r1pipe writes them, TRL reads the folder.
  "$r1" convert --config "$shared/models/qwen2.5-0.5b-instruct/config.json" --tokenizer "$work/smollm2-hf" \
    --out "$work/qwen-hf" >/dev/null
  run_pair qwen "--model $work/qwen-hf" "$work/qwen-hf" 2 8 4 256 1
fi
