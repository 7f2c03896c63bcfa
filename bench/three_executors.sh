#!/usr/bin/env bash
# The same sweep run three ways: pipelines/reward-sweep.yaml (SFT, then three
# GRPO members with different reward sets, then one evaluation of the three)
# here with `--jobs 2`, as Slurm jobs and as Ray jobs, each into a cache of its
# own. Prints the sha256 of every model each way left, each way's wall time,
# and whether the three `r1pipe exp show` tables are the same text.
# Needs the shared folder (or the hub), and a Slurm and a Ray to submit to:
#   scripts/slurm-local.sh up && scripts/ray-local.sh up && bench/three_executors.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked >&2
bin=$PWD/target/release/r1pipe
pipe=pipelines/reward-sweep.yaml
out=${R1PIPE_BENCH_OUT:-target/three-executors}
models=(sft.model grpo@r1.model grpo@format.model grpo@building.model)
# R1PIPE_BENCH_WAYS="ray" reruns one way, keeping the others' results.
for way in ${R1PIPE_BENCH_WAYS:-local slurm ray}; do
  rm -rf "${out:?}/$way" && mkdir -p "$out/$way"
  cache="$PWD/$out/$way/cache"
  case $way in
    local) flags=(--executor local --jobs 2) ;;
    *) flags=(--executor "$way") ;;
  esac
  start=$(date +%s)
  "$bin" run "$pipe" --cache "$cache" -q "${flags[@]}" > "$out/$way/run.log" 2>&1 \
    || { echo "the $way run failed: $out/$way/run.log" >&2; tail -20 "$out/$way/run.log" >&2; exit 1; }
  echo "$(( $(date +%s) - start ))" > "$out/$way/seconds"
  for m in "${models[@]}"; do
    dir=$("$bin" show "$m" -p "$pipe" --cache "$cache")
    echo "$m $(cat "$dir"/model.safetensors | sha256sum | cut -c1-16)"
  done > "$out/$way/models.txt"
  "$bin" exp show "$pipe" --cache "$cache" > "$out/$way/exp-show.txt"
done
printf '| model | local --jobs 2 | slurm | ray |\n| --- | --- | --- | --- |\n'
for i in "${!models[@]}"; do
  row="| ${models[$i]} |"
  for way in local slurm ray; do row="$row $(sed -n "$((i + 1))p" "$out/$way/models.txt" | cut -d' ' -f2) |"; done
  echo "$row"
done
echo "| wall time (s) | $(cat "$out/local/seconds") | $(cat "$out/slurm/seconds") | $(cat "$out/ray/seconds") |"
same=yes
for way in slurm ray; do
  cmp -s "$out/local/models.txt" "$out/$way/models.txt" || same=no
  cmp -s "$out/local/exp-show.txt" "$out/$way/exp-show.txt" || { same=no; diff "$out/local/exp-show.txt" "$out/$way/exp-show.txt" >&2 || true; }
done
echo
echo "models and exp show tables identical three ways: $same"
cat "$out/local/exp-show.txt"
[ "$same" = yes ]
