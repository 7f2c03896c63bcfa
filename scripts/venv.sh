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

# Whether the server answering on 127.0.0.1:PORT is this checkout's, judged
# by its command line naming DIR (a venv or config folder of ours). Another
# checkout's test server (or that of one since deleted) answers on the same
# port, and using it would test that checkout's code and files: such a server
# (its command names DIR's basename under another path) is stopped, and the
# caller starts its own. Anything else on the port is refused, never killed.
#   claim_port PORT DIR NAME
#   0: ours, or cannot tell (said): use it   2: another checkout's, stopped: start ours
#   1: someone else's (said): refuse
claim_port() {
  local port=$1 dir=$2 name=$3 pids pid cmd
  # Every process holding the socket (a web server's workers share it with their parent).
  pids=$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -oE 'pid=[0-9]+' | cut -d= -f2 | sort -un || true)
  pid=$(echo "$pids" | head -n1)
  if [ -z "$pid" ] || [ ! -r "/proc/$pid/cmdline" ]; then
    echo "$name: cannot see which process listens on port $port; taking it as this checkout's" >&2
    return 0
  fi
  cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline")
  case "$cmd" in
    *"$dir/"*) return 0 ;;
    *"/$(basename "$dir")/"*)
      echo "$name: port $port is served from another checkout (pid $pid: ${cmd:0:160}); stopping it" >&2
      # shellcheck disable=SC2086
      kill $pids 2>/dev/null || true
      for _ in $(seq 1 40); do
        # shellcheck disable=SC2086
        kill -0 $pids 2>/dev/null || break
        sleep 0.25
      done
      # shellcheck disable=SC2086
      kill -9 $pids 2>/dev/null || true
      return 2 ;;
  esac
  echo "$name: port $port is taken by pid $pid (${cmd:0:160}), which is not a test server of r1pipe's;" >&2
  echo "$name: stop it or choose another port" >&2
  return 1
}
