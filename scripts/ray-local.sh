#!/usr/bin/env bash
# A one-node Ray cluster on this machine, for the Ray executor's tests and for
# trying it: `scripts/ray-local.sh up` makes a private venv with Ray from PyPI
# (.venv-ray/, once), starts a head whose dashboard (the Jobs API r1pipe
# submits to) listens on 127.0.0.1:${R1PIPE_RAY_PORT:-8265}, and waits until
# it runs a job. `down` stops it. Idempotent: `up` on a running head only
# checks it; a head another checkout started is stopped and replaced. Prints the Jobs API address on success.
set -euo pipefail
cmd=${1:-up}
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-ray"
# shellcheck source=scripts/venv.sh
. "$root/scripts/venv.sh"
port=${R1PIPE_RAY_PORT:-8265}
address="http://127.0.0.1:$port"

answers() { "$venv/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('$address/api/version', timeout=3)" 2>/dev/null; }

down() {
  if [ -x "$venv/bin/ray" ]; then "$venv/bin/ray" stop --force >/dev/null 2>&1 || true; fi
  echo "ray-local: stopped" >&2
}

up() {
  pinned_venv "$venv" ray-local "ray[default]==2.60.0"
  local claim=0
  if answers; then claim_port "$port" "$venv" ray-local || claim=$?; fi
  if [ "$claim" = 1 ]; then exit 1; fi
  if [ "$claim" = 0 ] && answers; then
    echo "ray-local: already up at $address" >&2
    echo "$address"
    return
  fi
  "$venv/bin/ray" stop --force >/dev/null 2>&1 || true
  # The head's object store is kept small: r1pipe's jobs pass files, not Ray objects.
  RAY_USAGE_STATS_ENABLED=0 "$venv/bin/ray" start --head --disable-usage-stats \
    --dashboard-host=127.0.0.1 --dashboard-port="$port" --num-cpus="$(nproc)" \
    --object-store-memory=$((256 << 20)) >&2
  for _ in $(seq 1 120); do answers && break; sleep 1; done
  if ! answers; then
    echo "ray-local: the head started, and its Jobs API at $address does not answer" >&2
    exit 1
  fi
  # Takes jobs: one that does nothing runs to SUCCEEDED (`ray job submit` waits for it).
  if ! "$venv/bin/ray" job submit --address "$address" -- true >/dev/null 2>&1; then
    echo "ray-local: the head at $address does not run jobs" >&2
    exit 1
  fi
  echo "ray-local: up at $address" >&2
  echo "$address"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: scripts/ray-local.sh up|down" >&2; exit 2 ;;
esac
