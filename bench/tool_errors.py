#!/usr/bin/env python3
"""Where a tool-using model's wrong GSM8K answers come from.

Reads an `evaluate` stage's samples.jsonl (every completion with its verdict
and its tool calls) and the GSM8K test file whose rationales carry the
calculator notes (`16-3-4=<<16-3-4=9>>9`), and sorts each wrong answer
(flexible metric) into the first of:

  truncated       the completion ran out of tokens before an answer
  no call         it never called the calculator
  failed call     a call came back as an error (malformed, division by zero, …)
  ignored result  the calculator produced the right final number, and the
                  answer is something else
  wrong setup     every call ran, none produced the right number: the model
                  asked the wrong questions (how many of the reference's own
                  intermediate results it reached is shown beside)

Usage: bench/tool_errors.py SAMPLES.jsonl TEST.jsonl [--model NAME]...
(`r1pipe show -p pipelines/smollm2-gsm8k-tools.yaml evaluate.samples`;
TEST.jsonl: ../shared/data/gsm8k/test.jsonl). Standard library only.
"""

import argparse
import json
import re
from collections import Counter, defaultdict

NOTE = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def number(text):
    """The value of a calculator result or an answer, or None."""
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    m = re.search(r"-?\d+(?:\.\d+)?(?:/\d+)?", t)
    if not m:
        return None
    s = m.group(0)
    try:
        if "/" in s:
            a, b = s.split("/")
            return float(a) / float(b)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def same(a, b):
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def categorize(sample):
    reference = number(sample["reference"])
    calls = sample.get("tool_calls", [])
    results = [number(c["result"]) for c in calls if not c.get("error")]
    if sample.get("finish_reason") == "length" and sample.get("extracted_flexible") is None:
        return "truncated"
    if not calls:
        return "no call"
    if any(c.get("error") for c in calls):
        return "failed call"
    if any(same(r, reference) for r in results):
        return "ignored result"
    return "wrong setup"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("samples")
    ap.add_argument("test")
    ap.add_argument("--model", action="append", help="only these models (default: all in the file)")
    args = ap.parse_args()

    # The reference's intermediate results, by question text.
    intermediates = {}
    with open(args.test) as f:
        for line in f:
            row = json.loads(line)
            intermediates[row["question"].strip()] = [number(r) for _, r in NOTE.findall(row["answer"])]

    by_model = defaultdict(list)
    with open(args.samples) as f:
        for line in f:
            s = json.loads(line)
            if args.model and s["model"] not in args.model:
                continue
            by_model[s["model"]].append(s)

    kinds = ["truncated", "no call", "failed call", "ignored result", "wrong setup"]
    print("| model | right | wrong | " + " | ".join(kinds) + " | reference steps reached (wrong setup) |")
    print("| --- |" + " ---: |" * (len(kinds) + 3))
    for model, samples in sorted(by_model.items()):
        wrong = [s for s in samples if not s.get("correct_flexible")]
        counts = Counter()
        reached, steps = 0, 0
        for s in wrong:
            inter = intermediates.get(s["question"].strip(), [])
            kind = categorize(s)
            counts[kind] += 1
            if kind == "wrong setup":
                results = [number(c["result"]) for c in s.get("tool_calls", []) if not c.get("error")]
                steps += len(inter)
                reached += sum(any(same(r, i) for r in results) for i in inter)
        share = lambda k: f"{counts[k]} ({100 * counts[k] / max(1, len(wrong)):.0f}%)"
        reach = f"{reached}/{steps} ({100 * reached / max(1, steps):.0f}%)" if steps else "-"
        print(
            f"| {model} | {len(samples) - len(wrong)} | {len(wrong)} | "
            + " | ".join(share(k) for k in kinds)
            + f" | {reach} |"
        )


if __name__ == "__main__":
    main()
