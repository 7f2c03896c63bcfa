#!/usr/bin/env bash
# The tracking tools the `report_to` tests read r1pipe's output back with, in
# a private venv (.venv-tracking/, made once): TensorBoard's own event-file
# reader and an MLflow tracking server. Prints the venv's python on success.
#   scripts/tracking-venv.sh            # make it (or say it is there)
# Pinned so a test run reads with the versions the tests were written against.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-tracking"
# shellcheck source=scripts/venv.sh
. "$root/scripts/venv.sh"
pinned_venv "$venv" tracking-venv "tensorboard==2.21.0" "mlflow==3.17.2"
echo "$venv/bin/python"
