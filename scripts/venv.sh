# Sourced by the scripts that bring up a test server from PyPI (Ray, moto,
# TensorBoard and MLflow): a private venv with pinned packages, made once.
#   pinned_venv DIR NAME PACKAGE==VERSION…   # exits 1, saying why, if pip fails
# A stamp naming the packages marks a finished venv, so a half-made one (an
# interrupted install) is never taken for one, and a new pin remakes it.
pinned_venv() {
  local venv=$1 name=$2
  shift 2
  local stamp
  stamp="$venv/.r1pipe-$(echo "$*" | tr ' =' '_-')"
  if [ -f "$stamp" ]; then return; fi
  echo "$name: installing $* into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  if ! "$venv/bin/pip" install -q --disable-pip-version-check "$@" >&2; then
    rm -rf "$venv"
    echo "$name: the install failed (above)" >&2
    exit 1
  fi
  touch "$stamp"
}
