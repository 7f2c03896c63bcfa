#!/usr/bin/env bash
# One command on a fresh machine: build r1pipe and run pipelines/quickstart.yaml
# (offline, CPU). Needs a Rust toolchain (rustup) and the GSM8K copy in ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
./target/release/r1pipe run pipelines/quickstart.yaml "$@"
