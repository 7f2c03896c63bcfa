#!/usr/bin/env bash
# The tracking tools the `report_to` tests read r1pipe's output back with, in
# a private venv (.venv-tracking/, made once): TensorBoard's own event-file
# reader and an MLflow tracking server. Prints the venv's python on success.
#   scripts/tracking-venv.sh            # make it (or say it is there)
# Pinned so a test run reads with the versions the tests were written against.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-tracking"
stamp="$venv/.r1pipe-tracking-1"
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  if ! "$venv/bin/pip" install -q --disable-pip-version-check "tensorboard==2.21.0" "mlflow==3.17.2" >&2; then
    rm -rf "$venv"  # never a half-made venv that the tests would take for one
    echo "tracking-venv: the install failed (above)" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "$venv/bin/python"
