#!/usr/bin/env bash
# Two r1pipe binaries side by side on one GRPO config: `cargo bench --bench
# grpo_step`'s (SmolLM2-135M-Instruct, 2 prompts × 4 generations × ≤128 tokens,
# β 0.04, 5 steps; R1PIPE_AB_STEPS), run alternately ROUNDS times each under /usr/bin/time -v, in
# one session so both see the same machine. Prints each run's median step time
# after the first, its phase split (medians) and peak RSS, then the medians of
# the runs per binary.
#
# Usage: bench/grpo_ab.sh BEFORE_BIN AFTER_BIN [ROUNDS]   (default 2)
#   R1PIPE_AB_GENERATIONS=8 R1PIPE_AB_MICRO=8: 2 prompts × 8 (16 rows decoding at once)
#   R1PIPE_AB_AFTER_WITH='rollout_dtype: bf16': one more grpo setting for the AFTER
#   runs only (the same binary twice then compares two settings)
#   e.g. git worktree add /tmp/before HEAD~1 && (cd /tmp/before && cargo build --release)
#        bench/grpo_ab.sh /tmp/before/target/release/r1pipe target/release/r1pipe
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,12p "$0" >&2; exit 2; }
before=$(realpath "$1") after=$(realpath "$2") rounds=${3:-2}
shared=$(realpath "${R1PIPE_SHARED:-../shared}")
scripts/fetch-smollm2.sh >/dev/null
model=$PWD/models/smollm2-135m-instruct rewards=$PWD/stages/rewards/r1-gsm8k.yaml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/before.yaml" <<YAML
name: bench
device: cpu
stages:
  gsm8k: { kind: download, with: { path: "$shared/data/gsm8k" } }
  prompts: { kind: format, with: { data: "\${gsm8k.dataset}", limit: { train: 16, test: 1 } } }
  grpo:
    kind: grpo
    with:
      model: "$model"
      train: \${prompts.train}
      rewards: "$rewards"
      per_device_train_batch_size: ${R1PIPE_AB_MICRO:-4}
      gradient_accumulation_steps: 2
      num_generations: ${R1PIPE_AB_GENERATIONS:-4}
      max_completion_length: 128
      beta: 0.04
      max_steps: ${R1PIPE_AB_STEPS:-5}
      save_steps: 100
YAML
{ cat "$work/before.yaml"; [ -z "${R1PIPE_AB_AFTER_WITH:-}" ] || echo "      $R1PIPE_AB_AFTER_WITH"; } > "$work/after.yaml"
results=$work/results.jsonl
for round in $(seq "$rounds"); do
  for which in before after; do
    bin=$before; [ "$which" = after ] && bin=$after
    rm -rf "$work/cache"
    (cd "$work" && /usr/bin/time -v "$bin" run "$which.yaml" --cache "$work/cache" >"$work/out" 2>"$work/time") \
      || { tail -20 "$work/time" >&2; exit 1; }
    log=$(cd "$work" && "$bin" show grpo.log -p "$which.yaml" --cache "$work/cache")
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.2f", $2 / 1048576}' "$work/time")
    python3 - "$which" "$round" "$log" "$rss" >>"$results" <<'PY'
import json, statistics, sys
which, rnd, log, rss = sys.argv[1:]
rows = [json.loads(l) for l in open(log)][1:]  # step 1 also pays first-touch allocation
med = lambda k: statistics.median(r.get(k, 0.0) or 0.0 for r in rows)
keys = ["step_time", "timing/generation", "timing/reference", "timing/policy_forward_backward",
        "generation_tokens_per_second", "completions/mean_length", "sampling/sampling_logp_difference/mean"]
print(json.dumps({"which": which, "round": int(rnd), "rss": float(rss), **{k: med(k) for k in keys}}))
PY
  done
done
python3 - "$results" "$before" "$after" "${R1PIPE_AB_AFTER_WITH:-}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cols = [("step_time", "step s"), ("timing/generation", "generation"), ("timing/reference", "reference"), ("timing/policy_forward_backward", "policy f+b"),
        ("generation_tokens_per_second", "gen tok/s"), ("completions/mean_length", "mean len"),
        ("sampling/sampling_logp_difference/mean", "logp gap"), ("rss", "peak GB")]
print(f"before: {sys.argv[2]}\nafter:  {sys.argv[3]} {sys.argv[4]}\n(medians of steps after the first, per run)")
print(f"| run | {' | '.join(c[1] for c in cols)} |")
print("| --- |" + " ---: |" * len(cols))
for r in rows:
    print(f"| {r['which']} {r['round']} | " + " | ".join(f"{r[k]:.4g}" for k, _ in cols) + " |")
for w in ["before", "after"]:
    rs = [r for r in rows if r["which"] == w]
    print(f"| **{w}, median** | " + " | ".join(f"{statistics.median(r[k] for r in rs):.4g}" for k, _ in cols) + " |")
PY
