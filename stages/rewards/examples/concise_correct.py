#!/usr/bin/env python3
"""A reward outside the r1pipe binary (docs/rewards.md, "Rewards from a program").

r1pipe starts this program once per stage run, writes one JSON line per batch,
{"samples": [{"prompt", "completion", "answer", "completion_tokens"}, ...]},
and reads one line back: {"rewards": [number or null, ...]}, one per sample.

This one pays a correct answer more the shorter its completion:
1 - completion_tokens / limit (at least 0.1); a wrong answer earns 0, and a
completion with no <answer> block gets null (the reward does not apply; the
weighted sum skips it, as TRL's None).

    - name: concise_correct
      command: [python3, stages/rewards/examples/concise_correct.py, --limit, "256"]
      weight: 0.5
"""
import argparse
import json
import re
import sys

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def number(text):
    text = text.strip().replace(",", "").replace("$", "")
    try:
        return float(text)
    except ValueError:
        return None


def reward(sample, limit):
    found = ANSWER.findall(sample["completion"])
    if not found:
        return None
    got, want = number(found[-1]), number(sample["answer"])
    if got is None or want is None or got != want:
        return 0.0
    return max(0.1, 1.0 - sample["completion_tokens"] / limit)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=float, default=256.0)
    limit = parser.parse_args().limit
    for line in sys.stdin:
        batch = json.loads(line)
        rewards = [reward(s, limit) for s in batch["samples"]]
        # One line per batch, flushed: r1pipe waits for it.
        print(json.dumps({"rewards": rewards}), flush=True)


if __name__ == "__main__":
    main()
