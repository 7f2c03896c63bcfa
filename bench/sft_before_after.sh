#!/usr/bin/env bash
# SFT on the Qwen2.5-0.5B shape (random weights from ../shared's config.json,
# SmolLM2's tokenizer), packed rows of ≤1024 tokens, 2 steps, with an older
# r1pipe binary ("before") and this one with and without gradient
# checkpointing. Prints peak RSS (/usr/bin/time -v) and the second step's
# time and tokens/s from each run's log.
#
#   git worktree add /tmp/r1pipe-before be79032 && (cd /tmp/r1pipe-before && cargo build --release)
#   cargo build --release
#   bench/sft_before_after.sh /tmp/r1pipe-before/target/release/r1pipe [EXAMPLES_PER_STEP ...]
#
# EXAMPLES_PER_STEP (default: 4 9 18) is per_device_train_batch_size: GSM8K SFT
# examples are ~200 tokens, so 18 fill about 4 rows of 1024 (≈3500 tokens).
set -euo pipefail
before=${1:?usage: bench/sft_before_after.sh OLD_R1PIPE [EXAMPLES_PER_STEP ...]}
shift
if [ $# -eq 0 ]; then sizes=(4 9 18); else sizes=("$@"); fi
root=$(cd "$(dirname "$0")/.." && pwd)
after=$root/target/release/r1pipe
shared=${R1PIPE_SHARED:-$root/../shared}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$after" convert --config "$shared/models/qwen2.5-0.5b-instruct/config.json" \
  --tokenizer "$root/models/smollm2-135m-instruct" --out "$work/qwen-shape" >/dev/null

printf '%-10s %-24s %12s %10s %10s\n' examples run "peak RSS GB" "step s" "tokens/s"
for n in "${sizes[@]}"; do
  for v in before after-ckpt after-no-ckpt; do
    dir=$work/$n-$v
    mkdir -p "$dir/stages"
    bin=$after; extra="      gradient_checkpointing: true"
    case $v in
      before) bin=$before; extra="" ;;  # the old version has no such key (and no checkpointing)
      after-no-ckpt) extra="      gradient_checkpointing: false" ;;
    esac
    cat >"$dir/pipe.yaml" <<EOF
device: cpu
stages:
  gsm8k: { kind: download, with: { path: "$shared/data/gsm8k" } }
  prompts: { kind: format, with: { data: "\${gsm8k.dataset}", limit: { train: 64, test: 1 }, shuffle_seed: 0 } }
  sft:
    kind: sft
    with:
      model: "$work/qwen-shape"
      train: \${prompts.sft}
      packing: true
      max_length: 1024
      per_device_train_batch_size: $n
      max_steps: 2
      save_steps: 1000
$extra
EOF
    status=0
    (cd "$dir" && env -u R1PIPE_CACHE /usr/bin/time -v "$bin" run pipe.yaml >run.out 2>run.err) || status=$?
    kb=$(grep 'Maximum resident' "$dir/run.err" | awk '{print $NF}')
    gb=$(awk "BEGIN {printf \"%.2f\", $kb / 1048576}")
    if [ $status -ne 0 ]; then
      printf '%-10s %-24s %12s %10s %10s\n' "$n" "$v" "$gb" "exit $status" "-"
      continue
    fi
    log=$(cd "$dir" && "$bin" show sft.log -p pipe.yaml)
    read -r s tps < <(python3 -c "import json,sys; d=[json.loads(l) for l in open(sys.argv[1])][-1]; print(round(d['step_time'],1), round(d['tokens_per_second'],1))" "$log")
    printf '%-10s %-24s %12s %10s %10s\n' "$n" "$v" "$gb" "$s" "$tps"
  done
done
