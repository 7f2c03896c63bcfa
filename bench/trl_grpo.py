"""TRL's GRPOTrainer on the same config as r1pipe's GRPO benchmarks, on the CPU:
per-step time and peak RSS, printed as one line of JSON. Not a project
dependency: bench/compare_trl.sh runs it from a local venv (.venv-ref with
torch, transformers, trl, datasets) beside r1pipe, so the ratio is measured in
one run on one machine.

    python bench/trl_grpo.py --model DIR | --config config.json --tokenizer DIR
        --prompts 2 --generations 4 --accumulation 2 --max-completion 128 --beta 0.04 --steps 3
"""
import argparse, json, math, re, resource, sys, time

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

SYSTEM = "Respond in the following format:\n<think>\n...\n</think>\n<answer>\n...\n</answer>\n"


def text(c):
    return c[0]["content"] if isinstance(c, list) else c


def answer_of(c):
    m = re.findall(r"<answer>(.*?)</answer>", c, re.S)
    return m[-1].strip() if m else None


# The reward set of stages/rewards/r1-gsm8k.yaml, in Python (scoring is microseconds either way).
def correctness(completions, answer, **_):
    return [2.0 if answer_of(text(c)) == a else 0.0 for c, a in zip(completions, answer)]


def integer(completions, **_):
    return [0.5 if (answer_of(text(c)) or "").lstrip("-").isdigit() else 0.0 for c in completions]


def strict_format(completions, **_):
    p = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\n?$", re.S)
    return [0.5 if p.match(text(c)) else 0.0 for c in completions]


def soft_format(completions, **_):
    p = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)
    return [0.5 if p.search(text(c)) else 0.0 for c in completions]


def xml_count(completions, **_):
    out = []
    for c in map(text, completions):
        s = sum(0.125 for t in ["<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>"] if c.count(t) == 1)
        out.append(s - 0.001 * len(c.split("\n</answer>")[-1]) if "\n</answer>" in c else s)
    return out


def length(completions, completion_ids=None, **_):
    n = [len(i) for i in completion_ids] if completion_ids is not None else [len(text(c)) // 4 for c in completions]
    return [0.1 * math.log1p(min(k, 200)) / math.log1p(200) for k in n]


class StepTimes(TrainerCallback):
    def __init__(self):
        self.t, self.times = None, []

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.time()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.time() - self.t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--config")
    ap.add_argument("--tokenizer")
    ap.add_argument("--data", default="../shared/data/gsm8k/train.jsonl")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--max-completion", type=int, default=128)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model)
    if a.config:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.config), torch_dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    rows = [json.loads(l) for l in open(a.data)][: 64]
    ds = Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["question"]}],
         "answer": r["answer"].split("####")[-1].strip().replace(",", "")}
        for r in rows
    ])
    completions = a.prompts * a.generations
    cfg = GRPOConfig(
        output_dir="/tmp/trl-grpo-bench", per_device_train_batch_size=completions // a.accumulation,
        gradient_accumulation_steps=a.accumulation, num_generations=a.generations,
        max_completion_length=a.max_completion, beta=a.beta, learning_rate=3e-6, temperature=0.9,
        max_steps=a.steps, logging_steps=1, save_strategy="no", report_to=[], bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=bool(a.gradient_checkpointing), dataloader_num_workers=0,
    )
    times = StepTimes()
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[correctness, integer, strict_format,
                          soft_format, xml_count, length], args=cfg, train_dataset=ds, callbacks=[times])
    t0 = time.time()
    trainer.train()
    steady = sorted(times.times[1:] or times.times)
    print(json.dumps({"trl": True, "steps": len(times.times), "step_times": times.times,
                      "steady_step_s": steady[len(steady) // 2], "wall_s": time.time() - t0,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024}))


if __name__ == "__main__":
    sys.exit(main())
