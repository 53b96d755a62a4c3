#!/usr/bin/env python3
"""Online serving: requests arrive as a Poisson process; report latency and throughput.

One thread drives the engine: it adds each request when its arrival time comes and steps the
engine while anything is in flight. Times are measured from each request's scheduled arrival, so
queueing delay counts. Prints a table and (with --json) writes mean_latency_s, p99_latency_s,
mean_ttft_s, p99_ttft_s, mean_tpot_s, p99_tpot_s, throughput_tok_s and per-request records.

    python benchmarks/serving.py --model ../shared/models/stories260K --rate 20 --num-requests 200

Speculation policies (SmartSpec): `--speculation off,fixed:4,fixed:8,smartspec --rate 0.5,2,8`
runs every policy at every rate, each on a fresh engine that first generates `--warmup` sampled
stories (identical for every policy, "off" included: they warm the draft store, and every engine
starts from the same earlier traffic),
and prints latency per policy and rate (`--plot FILE.png` draws latency against rate;
`--repeat N` runs each N times, interleaved, and reports medians).
`--model wide-stories` is stories260K embedded in a larger network (benchmarks/common.py:
build_wide_stories): the step time of a bigger model, stories260K's text and acceptance.
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
from common import RESULTS_DIR, build_wide_stories, percentile  # noqa: E402

STORIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models", "stories260K")

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


SPIN_S = 0.0005  # the client spins through the last 0.5 ms before an arrival


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
                # Sleep to just before the next arrival, then spin: time.sleep woke 140-180 us
                # late here, and that lateness would count in the request's latency (it is
                # measured from the scheduled arrival) though no engine caused it.
                wait = pending[-1][1][0] - (time.perf_counter() - t0) - SPIN_S
                if wait > 0:
                    time.sleep(wait)
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


def policy_options(policy: str) -> dict:
    """Engine options for off | fixed:K | smartspec[:K]."""
    if policy == "off":
        return {}
    name, _, k = policy.partition(":")
    if name not in ("fixed", "smartspec") or (name == "fixed" and not k):
        raise SystemExit(f"--speculation: expected off, fixed:K or smartspec[:K], got {policy!r}")
    opts = {"speculation": "lookahead", "spec_policy": name}
    if k:
        opts["spec_max_draft"] = int(k)
    return opts


def run_one(args, model: str, policy: str, rate: float):
    from accelcore import Engine, SamplingParams

    engine = Engine(
        model,
        num_threads=args.threads,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=args.enable_prefix_caching,
        **policy_options(policy),
    )
    # Every engine serves the same earlier traffic, "off" too: it warms the draft store, and it
    # leaves the KV pool and the allocator as a server's would be (a fresh engine's first requests
    # ran at a different speed, faster or slower, enough to move the comparison by 5-15%).
    if args.warmup:
        bos = engine.model_info.bos_token_id or 1
        engine.generate([[bos]] * args.warmup,
                        [SamplingParams(max_tokens=args.warmup_len, temperature=1.0, seed=10_000 + i) for i in range(args.warmup)])
        # A step from an idle engine first indexes what the background thread has not yet (here,
        # the end of the warm-up): take that step now, so the timed run starts from the store a
        # server would have after its earlier traffic, not with a long first step.
        engine.generate([[bos]], SamplingParams(max_tokens=1))
    work = make_workload(engine, args.num_requests, rate, args.seed, tuple(args.output_len), tuple(args.prompt_len))
    s0 = engine.stats()
    records, wall = run(engine, work, args.temperature, args.seed)
    summary = summarize(records, wall)
    s1 = engine.stats()
    summary.update(rate=rate, policy=policy, model=os.path.abspath(model), seed=args.seed,
                   steps=s1["num_steps"] - s0["num_steps"])
    # Where the steps' time went: the scheduler (drafting included), the forward pass, in all.
    for key in ("schedule_time_s", "forward_time_s", "step_time_s"):
        summary[key] = s1[key] - s0[key]
    if policy != "off":
        summary["draft_tokens"] = s1["num_draft_tokens"] - s0["num_draft_tokens"]
        summary["accepted_draft_tokens"] = s1["num_accepted_draft_tokens"] - s0["num_accepted_draft_tokens"]
        summary["step_time_coefficients"] = s1["step_time_coefficients"]
        if s1["spec_policy"] == "smartspec":  # the controller's state at the end
            summary["guard_plain_tok_s"] = s1["spec_guard_plain_tok_s"]
            summary["guard_drafted_tok_s"] = s1["spec_guard_drafted_tok_s"]
            summary["lookup_cost_s"] = s1["spec_lookup_cost_s"]
            mode = "_sampled" if args.temperature > 0 else ""  # the statistics of the run's requests
            summary["acceptance"] = s1["spec_acceptance" + mode]
            summary["calibration"] = s1["spec_calibration" + mode]
    summary["tokens_per_step"] = summary["output_tokens"] / max(summary["steps"], 1)
    return summary, records


def median_summary(runs):
    """One summary from repeated runs: the median of every number (the runs' mean latencies kept)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("rate", "seed"):
            out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    out["mean_latency_s_runs"] = [r["mean_latency_s"] for r in runs]
    return out


def plot(results, path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy in dict.fromkeys(r["policy"] for r in results):
        rows = sorted((r for r in results if r["policy"] == policy), key=lambda r: r["rate"])
        ax.plot([r["rate"] for r in rows], [1e3 * r["mean_latency_s"] for r in rows], marker="o", label=policy)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("request rate (req/s, Poisson)")
    ax.set_ylabel("mean request latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=STORIES, help="a model directory, or wide-stories (built once under results/)")
    ap.add_argument("--rate", default="20", help="mean arrivals per second (0: all at once); a comma list sweeps")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--output-len", type=int, nargs=2, default=[32, 256])
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64], help="for models without a tokenizer")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--enable-prefix-caching", action="store_true")
    ap.add_argument("--speculation", default="off", help="off | fixed:K | smartspec[:K]; a comma list compares them")
    ap.add_argument("--warmup", type=int, default=100, help="stories every engine generates first (they warm the draft store)")
    ap.add_argument("--warmup-len", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the summaries (and per-request records) here")
    ap.add_argument("--plot", default=None, help="PNG of mean latency against rate per policy")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per (rate, policy), policies interleaved in rotating order; the table gives medians")
    args = ap.parse_args()

    model = args.model
    if model == "wide-stories":
        model = build_wide_stories(STORIES, os.path.join(RESULTS_DIR, "stories-wide-h1024-l8"))
    rates = [float(x) for x in args.rate.split(",")]
    policies = args.speculation.split(",")
    results, all_records = [], []
    for rate in rates:
        runs = {p: [] for p in policies}
        for rep in range(args.repeat):
            # Rotate the order each repeat, so that drift of a shared machine hits every policy alike.
            for policy in policies[rep % len(policies):] + policies[:rep % len(policies)]:
                summary, records = run_one(args, model, policy, rate)
                runs[policy].append(summary)
                all_records.append({"rate": rate, "policy": policy, "repeat": rep, "summary": summary, "requests": records})
                print(f"rate {rate} req/s, {policy}: {summary['num_requests']} requests, {summary['output_tokens']} tokens in "
                      f"{summary['wall_s']:.2f} s; mean latency {1e3 * summary['mean_latency_s']:.1f} ms, "
                      f"{summary['tokens_per_step']:.2f} tokens/step, {summary['steps']} steps", flush=True)
        results.extend(median_summary(runs[p]) for p in policies)

    print()
    print(f"model {os.path.abspath(model)}")
    if args.repeat > 1:
        print(f"medians of {args.repeat} runs per row")
    print("| rate (req/s) | policy | mean latency (ms) | p99 latency (ms) | mean TTFT (ms) | mean TPOT (ms) | throughput (tok/s) | tokens/step | latency vs off | vs best other |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same_rate = [o for o in results if o["rate"] == r["rate"]]
        off = next((o for o in same_rate if o["policy"] == "off"), None)
        rel = f"{off['mean_latency_s'] / r['mean_latency_s']:.2f}x" if off else "-"
        others = [o["mean_latency_s"] for o in same_rate if o is not r]
        # Latency over the best other policy's: below 1.00 means faster than all of them.
        vs_best = f"{r['mean_latency_s'] / min(others):.3f}" if others else "-"
        print(f"| {r['rate']:g} | {r['policy']} | {1e3 * r['mean_latency_s']:.1f} | {1e3 * r['p99_latency_s']:.1f} | "
              f"{1e3 * r['mean_ttft_s']:.1f} | {1e3 * r['mean_tpot_s']:.2f} | {r['throughput_tok_s']:.1f} | "
              f"{r['tokens_per_step']:.2f} | {rel} | {vs_best} |")
    if args.json:
        with open(args.json, "w") as f:
            # One summary per (rate, policy); "summary" too when there is only one.
            doc = {"results": results, "runs": all_records}
            if len(results) == 1:
                doc["summary"] = results[0]
            json.dump(doc, f, indent=2)
    if args.plot:
        plot(results, args.plot, os.path.basename(os.path.abspath(model)))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
