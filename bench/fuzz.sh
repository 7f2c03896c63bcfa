#!/usr/bin/env bash
# A longer fuzzing run of every parser a user's file or a server's reply reaches
# (r1pipe::fuzzing's harnesses on tests/fuzz/corpus, mutated), each target on its
# own, bounded in time and in memory, so that an abort on memory or a stack
# overflow is a finding (that target's row says so) and never takes the machine:
#   bench/fuzz.sh [CASES_PER_TARGET] [SECONDS_PER_TARGET] [MEMORY_MIB]
#   (defaults 5000, 300, 4096; the test suite runs 64 cases per target)
# Prints a table: target, cases, result, wall time, peak memory. Exits non-zero
# when any target panicked, aborted or ran out of time, with its last lines (add
# the input it prints to the corpus once fixed).
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-5000}
seconds=${2:-300}
mib=${3:-4096}
cargo build --release --features test-kinds --tests >/dev/null 2>&1 || cargo build --release --features test-kinds --tests
bin=$(ls -t target/release/deps/fuzz-* | grep -v '\.d$' | head -1)
targets=$(grep -o 'Target { name: "[a-z_]*"' src/fuzzing.rs | sed 's/.*"\(.*\)"/\1/')
log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
printf "| target | cases | result | wall | peak MiB |\n|---|---:|---|---:|---:|\n"
for t in $targets; do
  set +e
  (
    ulimit -v $((mib * 1024))
    R1PIPE_FUZZ_TARGET=$t R1PIPE_FUZZ_CASES=$cases timeout "$seconds" \
      /usr/bin/time -v "$bin" --exact no_parser_panics_on_mutated_seeds_or_arbitrary_bytes --nocapture
  ) >"$log" 2>&1
  rc=$?
  set -e
  case $rc in
    0) result="no panic" ;;
    124) result="TIMED OUT (${seconds} s)"; failed=1 ;;
    *) result="FAILED (exit $rc)"; failed=1 ;;
  esac
  wall=$(grep "Elapsed (wall clock)" "$log" | awk '{print $NF}' || true)
  rss=$(grep "Maximum resident set size" "$log" | awk '{print $NF}' || true)
  printf "| %s | %s | %s | %s | %s |\n" "$t" "$cases" "$result" "${wall:-?}" "$(( ${rss:-0} / 1024 ))"
  if [ "$rc" != 0 ]; then
    tail -20 "$log" | sed 's/^/    /' >&2
  fi
done
exit $failed
