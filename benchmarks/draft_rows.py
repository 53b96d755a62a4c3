#!/usr/bin/env python3
"""What draft rows cost: one request at a long context, verified with drafts of 0 to K nodes.

A prompt that repeats a passage gives the draft store matches, so Lookahead (`spec_policy="fixed"`)
drafts most steps; each decode step is timed and grouped by its number of draft nodes. Prints,
per scheme, the median step time by draft size and the added time per draft row, and the prompt's
prefill rate. This is the cost SmartSpec's step-time model has to learn, and the one a quantized
KV cache must not inflate (every draft row reads the whole context).

    python benchmarks/draft_rows.py --scheme w4a8,w4a8kv4 --context 1024
    python benchmarks/draft_rows.py --model ../shared/models/stories260K --context 200 --scheme float32,w4a8kv4
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR  # noqa: E402
from decode import build_random_model  # noqa: E402


def measure(model: str, scheme: str, context: int, max_draft: int, new_tokens: int, threads: int, group: int):
    from accelcore import Engine, SamplingParams
    from accelcore.quantize import scheme_options

    engine = Engine(model, num_threads=threads, speculation="lookahead", spec_policy="fixed",
                    spec_max_draft=max_draft, **scheme_options(scheme), quant_group_size=group)
    rng = random.Random(0)
    passage = [rng.randrange(3, engine.model_info.vocab_size) for _ in range(64)]
    prompt = [1] + (passage * (context // 64 + 1))[: context - 1]
    engine.generate([prompt[:32]], SamplingParams(max_tokens=4))  # warm-up
    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    generated = engine.stats()["num_generated_tokens"]  # the warm-up's
    t0 = time.perf_counter()
    while engine.stats()["num_generated_tokens"] == generated:  # the prompt, in as many chunks as it takes
        engine.step()
    prefill_s = time.perf_counter() - t0
    by_nodes: dict[int, list[float]] = {}
    done = False
    while not done:
        drafted = engine.stats()["num_draft_tokens"]
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        by_nodes.setdefault(engine.stats()["num_draft_tokens"] - drafted, []).append(dt)
        done = any(o.finished for o in outs)
    return context / prefill_s, {k: (statistics.median(v), len(v)) for k, v in sorted(by_nodes.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: random TinyLlama-shaped model)")
    ap.add_argument("--scheme", default="w4a8,w4a8kv4", help="comma list: float32, w4a8, w4a8kv4, ...")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--max-draft", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    model = args.model or build_random_model(os.path.join(RESULTS_DIR, "tinyllama-random"))
    print(f"model: {model}, context {args.context}, drafts up to {args.max_draft}, {args.threads} threads")
    print("| scheme | prefill tok/s | step µs by draft nodes (steps) | µs per draft row |")
    print("|---|---|---|---|")
    for scheme in args.scheme.split(","):
        prefill, steps = measure(model, scheme, args.context, args.max_draft, args.new_tokens, args.threads,
                                 args.group_size)
        cells = ", ".join(f"{k}: {1e6 * t:.0f} ({n})" for k, (t, n) in steps.items())
        # The added time per row: a least-squares slope over the draft sizes seen, each size once.
        xs = list(steps)
        ys = [steps[k][0] for k in xs]
        slope = float("nan")
        if len(xs) > 1:
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        print(f"| {scheme} | {prefill:.1f} | {cells} | {1e6 * slope:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
