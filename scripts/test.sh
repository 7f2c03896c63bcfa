#!/usr/bin/env bash
# The project's test command (README "Tests"): fetches the test model if a
# test needs it, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
cargo test --locked --features test-kinds "$@"
