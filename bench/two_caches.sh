#!/usr/bin/env bash
# Two caches sharing one remote: a pipeline runs in cache A with `--remote URL`
# (every finished stage is pushed), then in an empty cache B with the same
# remote. Prints, per stage, what cache B's run did (pulled or ran) and whether
# each output's bytes are the same in both caches, with both runs' times.
#   bench/two_caches.sh PIPELINE URL [-S key=value …]
# e.g. bench/two_caches.sh pipelines/quickstart.yaml file:///tmp/r1pipe-remote \
#        -S vars.gsm8k=../shared/data/gsm8k -S vars.model=models/smollm2-135m-instruct
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,8p "$0" >&2; exit 2; }
pipe=$1 url=$2
shift 2
cargo build --release --locked -q
bin=$PWD/target/release/r1pipe
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for c in a b; do
  start=$(date +%s)
  "$bin" run "$pipe" --cache "$work/$c" --remote "$url" "$@" > "$work/$c.out" 2>&1 \
    || { tail -20 "$work/$c.out" >&2; exit 1; }
  echo "cache $c: run took $(( $(date +%s) - start )) s"
done
# Cache B's lines name what it pulled; its objects (content-addressed by
# blake3) must all be cache A's, byte for byte.
grep -E ": pulled from" "$work/b.out" || true
ran=$(grep -cE ": done in " "$work/b.out" || true)
python3 - "$work" <<'PY'
import hashlib, os, sys
work = sys.argv[1]
def files(c):
    root = os.path.join(work, c, "objects")
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
a, b = files("a"), files("b")
same = sum(1 for k, v in b.items() if a.get(k) == v)
print(f"objects: cache A {len(a)}, cache B {len(b)}, of B's identical in A: {same}")
sys.exit(0 if b and same == len(b) else 1)
PY
echo "stages cache B ran itself: $ran"
