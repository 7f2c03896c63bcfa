#!/usr/bin/env bash
# Evaluation throughput, side by side on this machine: r1pipe's evaluate stage
# and transformers' batched greedy `generate` on the same GSM8K test questions,
# the same weights (SmolLM2-135M-Instruct, f32), chat template and system
# prompt, greedy, the same token limit and batch size, each a process of its
# own under /usr/bin/time -v (peak RSS). Prints a table: wall time, generated
# tokens/s and peak memory of each, the ratio, and how many completions agree.
#
# Needs a local PyTorch venv (not a project dependency):
#   python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers
# Usage: bench/eval_vs_transformers.sh [QUESTIONS [BATCH [MAX_NEW_TOKENS]]]   (128 32 256)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${R1PIPE_REF_VENV:-.venv-ref}
[ -x "$venv/bin/python" ] || { echo "eval_vs_transformers: no PyTorch venv at $venv (see the header of $0)" >&2; exit 1; }
n=${1:-128} batch=${2:-32} maxnew=${3:-256}
shared=${R1PIPE_SHARED:-../shared}
test=$(realpath "$shared/data/gsm8k/test.jsonl")
scripts/fetch-smollm2.sh
cargo build --release --locked -q
r1=$PWD/target/release/r1pipe
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$r1" convert --model models/smollm2-135m-instruct --out "$work/smollm2-hf" >/dev/null
rss_of() { awk -F': ' '/Maximum resident set size/ {printf "%.2f", $2 / 1048576}' "$1"; }

/usr/bin/time -v "$venv/bin/python" bench/hf_generate.py --model "$work/smollm2-hf" --test "$test" \
  --questions "$n" --batch "$batch" --max-new-tokens "$maxnew" --out "$work/hf.jsonl" \
  > "$work/hf.out" 2> "$work/hf.time" || { tail -20 "$work/hf.time" >&2; exit 1; }

mkdir -p "$work/stages" "$work/data"
head -n "$n" "$test" > "$work/data/test.jsonl"
head -n 8 "$(dirname "$test")/train.jsonl" > "$work/data/train.jsonl"
cat > "$work/eval.yaml" <<YAML
name: eval-bench
device: cpu
stages:
  gsm8k: { kind: download, with: { path: data } }
  prompts: { kind: format, with: { data: "\${gsm8k.dataset}" } }
  evaluate:
    kind: evaluate
    with:
      models: { smollm2: "$work/smollm2-hf" }
      test: \${prompts.test}
      batch_size: $batch
      max_new_tokens: $maxnew
YAML
(cd "$work" && /usr/bin/time -v "$r1" run eval.yaml --cache "$work/cache" > "$work/r1.out" 2> "$work/r1.time") \
  || { tail -20 "$work/r1.time" >&2; exit 1; }
samples=$(cd "$work" && "$r1" show evaluate.samples -p eval.yaml --cache "$work/cache")
wall_r1=$(awk '/evaluate: done in/ {print}' "$work/r1.out" | tail -1)
python3 - "$work/hf.out" "$(rss_of "$work/hf.time")" "$samples" "$(rss_of "$work/r1.time")" "$work/r1.out" "$work/hf.jsonl" <<'PY'
import json, re, sys
hf_out, hf_rss, samples, r1_rss, r1_out, hf_jsonl = sys.argv[1:]
hf = json.loads(open(hf_out).read().strip().splitlines()[-1])
rows = [json.loads(l) for l in open(samples)]
tokens = sum(r["tokens"] for r in rows)
# The evaluate stage's own wall time, as the runner printed it ("[3/3] evaluate: done in 1m02s").
m = re.search(r"evaluate: done in (?:(\d+)m)?([\d.]+)s", open(r1_out).read())
r1_wall = int(m.group(1) or 0) * 60 + float(m.group(2))
hf_rows = [json.loads(l) for l in open(hf_jsonl)]
same = sum(a["completion"].strip() == b["completion"].strip() for a, b in zip(sorted(rows, key=lambda r: r["index"]), hf_rows))
print(f"{'':<14} {'wall s':>8} {'tokens':>8} {'tokens/s':>9} {'peak RSS GB':>12}")
print(f"{'transformers':<14} {hf['wall_s']:8.1f} {hf['generated_tokens']:8d} {hf['tokens_per_s']:9.1f} {float(hf_rss):12.2f}")
print(f"{'r1pipe':<14} {r1_wall:8.1f} {tokens:8d} {tokens / r1_wall:9.1f} {float(r1_rss):12.2f}")
print(f"r1pipe / transformers throughput: {tokens / r1_wall / hf['tokens_per_s']:.2f}x; identical completions: {same} of {len(hf_rows)}")
PY
