#!/usr/bin/env bash
# What a remote cache costs: push every current result of a pipeline from a
# finished cache to a remote, then pull them all into an empty cache, timing
# both with peak memory (/usr/bin/time -v). Prints a table per remote URL.
#   bench/remote_cost.sh PIPELINE CACHE URL…
# e.g., after bench/three_executors.sh:
#   bench/remote_cost.sh pipelines/reward-sweep.yaml target/three-executors/local/cache \
#     file:///tmp/r1pipe-remote http://127.0.0.1:8089/cache/bench
set -euo pipefail
cd "$(dirname "$0")/.."
pipe=$1 cache=$2
shift 2
cargo build --release --locked >&2
bin=$PWD/target/release/r1pipe
bytes=$(du -sb "$cache/objects" | cut -f1)
printf '| remote | artifacts | push s | push peak RSS | pull s | pull peak RSS |\n| --- | --- | --- | --- | --- | --- |\n'
for url in "$@"; do
  fresh=$(mktemp -d)
  stat() { awk -F': ' -v k="$1" '$1 ~ k {print $2}' "$2"; }
  /usr/bin/time -v "$bin" push "$pipe" --cache "$cache" --remote "$url" -q > /dev/null 2> "$fresh/push.time"
  /usr/bin/time -v "$bin" pull "$pipe" --cache "$fresh/cache" --remote "$url" -q > /dev/null 2> "$fresh/pull.time"
  echo "| $url | $((bytes >> 20)) MiB | $(stat 'Elapsed' "$fresh/push.time") | $(( $(stat 'Maximum resident' "$fresh/push.time") >> 10 )) MiB | $(stat 'Elapsed' "$fresh/pull.time") | $(( $(stat 'Maximum resident' "$fresh/pull.time") >> 10 )) MiB |"
  rm -rf "$fresh"
done
