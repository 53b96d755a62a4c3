#!/usr/bin/env python3
"""Online serving: requests arrive as a Poisson process; report latency and throughput.

One thread drives the engine: it adds each request when its arrival time comes and steps the
engine while anything is in flight. Times are measured from each request's scheduled arrival, so
queueing delay counts. Prints a table and (with --json) writes mean_latency_s, p99_latency_s,
mean_ttft_s, p99_ttft_s, mean_tpot_s, p99_tpot_s, throughput_tok_s and per-request records.

    python benchmarks/serving.py --model ../shared/models/stories260K --rate 20 --num-requests 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import percentile  # noqa: E402

STORY_OPENINGS = [
    "Once upon a time",
    "Lily and Ben went to the park",
    "The little dog was sad because",
    "One day, a boy named Tom",
    "There was a big red ball",
    "Sara loved to play with her cat",
    "The sun was shining and the birds",
    "Mom said it was time for bed",
    "A little bird found a shiny stone",
    "Tim wanted to build a tall tower",
]


def make_workload(engine, num_requests: int, rate: float, seed: int, out_range, prompt_range):
    """(arrival_time_s, prompt_ids, max_tokens) for each request, arrivals a Poisson process."""
    rng = random.Random(seed)
    vocab = engine.model_info.vocab_size
    t = 0.0
    work = []
    for _ in range(num_requests):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        if engine.tokenizer is not None:
            ids = engine.encode(rng.choice(STORY_OPENINGS))
        else:
            ids = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range) - 1)]
        work.append((t, ids, rng.randint(*out_range)))
    return work


def run(engine, work, temperature: float, seed: int):
    from accelcore import SamplingParams

    records = {}
    pending = list(enumerate(work))
    pending.reverse()
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and pending[-1][1][0] <= now:
            idx, (arrival, ids, max_tokens) = pending.pop()
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + idx, ignore_eos=True)
            rid = engine.add_request(ids, params)
            records[rid] = {"index": idx, "arrival": arrival, "first": None, "done": None, "tokens": 0}
        if not engine.has_unfinished_requests():
            if pending:
                time.sleep(max(0.0, pending[-1][1][0] - (time.perf_counter() - t0)))
            continue
        outs = engine.step()
        now = time.perf_counter() - t0
        for out in outs:
            rec = records[out.request_id]
            if out.new_token_ids and rec["first"] is None:
                rec["first"] = now
            rec["tokens"] += len(out.new_token_ids)
            if out.finished:
                rec["done"] = now
    wall = time.perf_counter() - t0
    return list(records.values()), wall


def summarize(records, wall: float):
    lat = [r["done"] - r["arrival"] for r in records]
    ttft = [r["first"] - r["arrival"] for r in records if r["first"] is not None]
    tpot = [(r["done"] - r["first"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in records)
    return {
        "num_requests": len(records),
        "mean_latency_s": statistics.fmean(lat),
        "p99_latency_s": percentile(lat, 99),
        "mean_ttft_s": statistics.fmean(ttft),
        "p99_ttft_s": percentile(ttft, 99),
        "mean_tpot_s": statistics.fmean(tpot) if tpot else 0.0,
        "p99_tpot_s": percentile(tpot, 99) if tpot else 0.0,
        "throughput_tok_s": tokens / wall,
        "wall_s": wall,
        "output_tokens": tokens,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models", "stories260K"))
    ap.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second (0: all at once)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--output-len", type=int, nargs=2, default=[32, 256])
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64], help="for models without a tokenizer")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--enable-prefix-caching", action="store_true")
    ap.add_argument("--json", default=None, help="write the summary and per-request records here")
    args = ap.parse_args()

    from accelcore import Engine

    engine = Engine(
        args.model,
        num_threads=args.threads,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    work = make_workload(engine, args.num_requests, args.rate, args.seed, tuple(args.output_len), tuple(args.prompt_len))
    records, wall = run(engine, work, args.temperature, args.seed)
    summary = summarize(records, wall)
    summary.update(rate=args.rate, model=os.path.abspath(args.model), seed=args.seed)
    print(f"rate {args.rate} req/s, {summary['num_requests']} requests, {summary['output_tokens']} tokens in {wall:.2f} s")
    print("| metric | mean | p99 |")
    print("|---|---|---|")
    for name in ("latency", "ttft", "tpot"):
        print(f"| {name} (ms) | {1e3 * summary[f'mean_{name}_s']:.2f} | {1e3 * summary[f'p99_{name}_s']:.2f} |")
    print(f"throughput: {summary['throughput_tok_s']:.1f} output tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "requests": records}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
