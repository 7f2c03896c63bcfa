# Sourced by the scripts: where the data and the small model come from.
#
# The "shared folder" holds GSM8K as JSONL (data/gsm8k/{train,test}.jsonl) and
# the Hugging Face config and tokenizer files of SmolLM2-135M-Instruct and
# Qwen2.5-0.5B-Instruct (models/<name>/). It is, in this order:
#   1. $R1PIPE_SHARED, when set;
#   2. ../shared beside the clone (offline: no hub needed);
#   3. made from the Hugging Face Hub into scripts/.cache/shared by `r1pipe fetch`
#      (HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE are honoured).

# The r1pipe binary to call: $R1PIPE_BIN, or a release build of this checkout.
r1pipe_bin() {
  if [ -n "${R1PIPE_BIN:-}" ]; then
    echo "$R1PIPE_BIN"
  else
    cargo build --release --locked >&2
    echo "$PWD/target/release/r1pipe"
  fi
}

# The shared folder as an absolute path, if there is one (1 or 2 above); fails otherwise.
shared_dir() {
  if [ -n "${R1PIPE_SHARED:-}" ]; then
    [ -d "$R1PIPE_SHARED" ] || { echo "R1PIPE_SHARED=$R1PIPE_SHARED is not a folder" >&2; return 2; }
    (cd "$R1PIPE_SHARED" && pwd)
  elif [ -d ../shared/data/gsm8k ]; then
    (cd ../shared && pwd)
  else
    return 1
  fi
}

# What to do when neither the shared folder nor the hub is there: both ways, once.
no_source_message() {
  cat >&2 <<MSG
$1: neither a shared folder nor the Hugging Face Hub is available.
  - offline: put the shared folder beside the clone (../shared, with data/gsm8k/{train,test}.jsonl
    and models/smollm2-135m-instruct/{config.json,tokenizer.json,...}) or point R1PIPE_SHARED at it;
  - online: make ${HF_ENDPOINT:-https://huggingface.co} reachable, or set HF_ENDPOINT to a mirror
    (HF_HUB_OFFLINE=1 uses only what the hub cache in HF_HOME already holds).
MSG
}

# Make the shared folder from the hub (3 above), idempotently, and print its path.
shared_from_hub() {
  local bin=$1 dest=$PWD/scripts/.cache/shared
  if [ -f "$dest/.complete" ]; then
    echo "$dest"
    return 0
  fi
  echo "$2: no shared folder (R1PIPE_SHARED or ../shared): fetching GSM8K and the models' config and tokenizer files from the hub at ${HF_ENDPOINT:-https://huggingface.co} into $dest" >&2
  mkdir -p "$dest"
  if "$bin" fetch dataset openai/gsm8k --out "$dest/data/gsm8k" >/dev/null \
    && "$bin" fetch model HuggingFaceTB/SmolLM2-135M-Instruct --no-weights --out "$dest/models/smollm2-135m-instruct" >/dev/null \
    && "$bin" fetch model Qwen/Qwen2.5-0.5B-Instruct --no-weights --out "$dest/models/qwen2.5-0.5b-instruct" >/dev/null; then
    touch "$dest/.complete"
    echo "$dest"
  else
    no_source_message "$2"
    return 1
  fi
}
