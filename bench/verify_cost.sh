#!/usr/bin/env bash
# What checking stored artifacts costs next to loading a model, on one cache:
#   bench/verify_cost.sh CACHE STAGE.OUTPUT
# e.g. bench/verify_cost.sh runs/smollm2-cache sft.model
# Prints a table: a cheap check (`show`: size and mtime of each file against
# what was hashed), a full re-hash of every artifact (`verify`, every byte
# read), and loading the model to answer with one token (`infer`), each with
# its wall time and peak memory from /usr/bin/time -v. Run on a quiet machine;
# the second and later reads come from the page cache, as they do in a run.
set -euo pipefail
cache=${1:?usage: bench/verify_cost.sh CACHE STAGE.OUTPUT}
target=${2:?usage: bench/verify_cost.sh CACHE STAGE.OUTPUT}
bin=${R1PIPE_BIN:-target/release/r1pipe}
[ -x "$bin" ] || cargo build --release
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

measure() { # name, command...
  local name=$1; shift
  /usr/bin/time -v "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" || { cat "$tmp/$name.err" >&2; exit 1; }
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$tmp/$name.err" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$tmp/$name.err" | awk '{print $NF}')
  printf "| %-34s | %9s | %9.0f |\n" "$name" "$wall" "$((rss / 1024))"
}

model=$("$bin" show "$target" --cache "$cache")
bytes=$(du -sb "$cache/objects" | cut -f1)
mbytes=$(du -sb "$model" | cut -f1)
printf "cache %s: %.0f MiB of artifacts; %s is %.0f MiB\n\n" "$cache" "$((bytes / 1048576))" "$target" "$((mbytes / 1048576))"
cat "$model"/*.safetensors >/dev/null # warm the page cache, as a run that just wrote the model has it
printf "| %-34s | %9s | %9s |\n" "step" "wall" "peak MiB"
printf "|%s|%s|%s|\n" "------------------------------------" "-----------" "-----------"
measure "show $target (cheap check)" "$bin" show "$target" --cache "$cache"
measure "verify (every artifact, full)" "$bin" verify --cache "$cache"
measure "infer: load $target, 1 token" "$bin" infer --model "$model" --max-new-tokens 1 "What is 2 + 2?"
