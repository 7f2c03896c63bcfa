"""transformers' batched greedy `generate` on GSM8K test questions, the way
r1pipe's evaluate stage asks them: the same chat template and system prompt,
greedy, the same token limit, `batch` questions at a time (left padding).
Prints one JSON line: questions, generated tokens, wall seconds, tokens/s.
Used by bench/eval_vs_transformers.sh; not a project dependency."""
import argparse, json, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SYSTEM = "Respond in the following format:\n<think>\n...\n</think>\n<answer>\n...\n</answer>\n"

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--test", required=True, help="GSM8K test.jsonl")
ap.add_argument("--questions", type=int, default=128)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--max-new-tokens", type=int, default=256)
ap.add_argument("--out", help="write the completions here as JSONL")
a = ap.parse_args()

torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a.model)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
model.eval()
rows = [json.loads(l) for l in open(a.test)][: a.questions]
prompts = [
    tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["question"].strip()}],
        tokenize=False,
        add_generation_prompt=True,
    )
    for r in rows
]
eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])
generated, outputs = 0, []
t0 = time.time()
with torch.inference_mode():
    for i in range(0, len(prompts), a.batch):
        enc = tok(prompts[i : i + a.batch], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            n = next((k for k, t in enumerate(row) if t in eos), len(row))
            generated += n
            outputs.append(tok.decode(row[:n], skip_special_tokens=True))
wall = time.time() - t0
if a.out:
    with open(a.out, "w") as f:
        for r, o in zip(rows, outputs):
            f.write(json.dumps({"question": r["question"], "completion": o}) + "\n")
print(json.dumps({"questions": len(rows), "generated_tokens": generated, "wall_s": wall, "tokens_per_s": generated / wall}))
