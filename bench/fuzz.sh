#!/usr/bin/env bash
# A longer fuzzing run of every parser a user's file or a server's reply reaches
# (r1pipe::fuzzing's harnesses on tests/fuzz/corpus, mutated), bounded in time:
#   bench/fuzz.sh [CASES_PER_TARGET]     (default 5000; the test suite runs 64)
# Prints the cases run, the wall time and the peak memory; exits non-zero on
# the first panic, with the input that caused it (add it to the corpus once fixed).
set -euo pipefail
cases=${1:-5000}
cargo build --release --features test-kinds --tests >/dev/null 2>&1 || cargo build --release --features test-kinds --tests
bin=$(ls -t target/release/deps/fuzz-* | grep -v '\.d$' | head -1)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
R1PIPE_FUZZ_CASES=$cases /usr/bin/time -v "$bin" --exact no_parser_panics_on_mutated_seeds_or_arbitrary_bytes --nocapture 2>"$log" \
  || { tail -40 "$log"; exit 1; }
wall=$(grep "Elapsed (wall clock)" "$log" | awk '{print $NF}')
rss=$(grep "Maximum resident set size" "$log" | awk '{print $NF}')
targets=$(grep -c 'Target { name' src/fuzzing.rs)
printf "| targets | cases per target | wall | peak MiB |\n|---|---|---|---|\n| %s | %s | %s | %s |\n" \
  "$targets" "$cases" "$wall" "$((rss / 1024))"
