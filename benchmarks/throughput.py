#!/usr/bin/env python3
"""Offline throughput: 64 requests of mixed prompt and output lengths, three ways, in one run.

1. accelcore with continuous batching (all requests handed over at once),
2. the same engine one request at a time,
3. transformers `generate` with padding-based static batches (left padding, each batch runs
   until its longest request is done; only the tokens each request asked for are counted).

Then the scheduler's overhead at 256 running requests: the time step() spends outside the model's
forward pass (planning, sampling, bookkeeping), and the planning alone, as fractions of step time.

    python benchmarks/throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, build_random_llama  # noqa: E402

SHAPE = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def make_requests(n: int, vocab: int, seed: int, prompt_range, output_range):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        reqs.append(([1] + [rng.randrange(3, vocab) for _ in range(plen - 1)], rng.randint(*output_range)))
    return reqs


def run_engine_batched(engine, reqs):
    from accelcore import SamplingParams

    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in reqs]
    t0 = time.perf_counter()
    outs = engine.generate([p for p, _ in reqs], params)
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs), dt, [o.token_ids for o in outs]


def run_engine_sequential(engine, reqs):
    from accelcore import SamplingParams

    t0 = time.perf_counter()
    tokens = []
    for p, m in reqs:
        tokens.append(engine.generate([p], SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))[0].token_ids)
    dt = time.perf_counter() - t0
    return sum(len(t) for t in tokens), dt, tokens


def run_transformers_static(model, reqs, batch_size: int):
    import torch

    useful = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(reqs), batch_size):
            batch = reqs[i : i + batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (p, _) in enumerate(batch):  # left padding
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            longest = max(m for _, m in batch)
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=0,
            )
            useful += sum(m for _, m in batch)
    return useful, time.perf_counter() - t0


def scheduler_overhead(engine, vocab: int, num_requests: int, new_tokens: int, seed: int):
    """Decode steps with `num_requests` running: fractions of step time outside the forward pass."""
    from accelcore import SamplingParams

    reqs = make_requests(num_requests, vocab, seed, (8, 32), (new_tokens, new_tokens))
    ids = [engine.add_request(p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)) for p, m in reqs]
    # Warm-up: prefill everything, so the measured steps all run num_requests decode tokens.
    got = {i: 0 for i in ids}
    while not all(v > 0 for v in got.values()):
        for out in engine.step():
            got[out.request_id] += len(out.new_token_ids)
    s0 = engine.stats()
    steps = 0
    while steps < new_tokens // 2:
        engine.step()
        steps += 1
    s1 = engine.stats()
    while engine.has_unfinished_requests():
        engine.step()
    step = s1["step_time_s"] - s0["step_time_s"]
    fwd = s1["forward_time_s"] - s0["forward_time_s"]
    sched = s1["schedule_time_s"] - s0["schedule_time_s"]
    return {
        "running": num_requests,
        "steps": steps,
        "step_ms": 1e3 * step / steps,
        "non_forward_fraction": (step - fwd) / step,
        "schedule_fraction": sched / step,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: random hidden-1024 8-layer model)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256])
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--overhead-requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model_dir = args.model or build_random_llama(os.path.join(RESULTS_DIR, "llama-h1024-l8"), **SHAPE)
    from accelcore import Engine, cpu_isa

    engine = Engine(model_dir, num_threads=args.threads, max_num_seqs=max(256, args.overhead_requests))
    vocab = engine.model_info.vocab_size
    reqs = make_requests(args.num_requests, vocab, args.seed, tuple(args.prompt_len), tuple(args.output_len))
    total_prompt = sum(len(p) for p, _ in reqs)
    total_out = sum(m for _, m in reqs)
    print(f"{len(reqs)} requests, {total_prompt} prompt tokens, {total_out} output tokens", flush=True)

    results = {}
    n, dt, batched_tokens = run_engine_batched(engine, reqs)
    results["accelcore_continuous"] = n / dt
    print(f"accelcore continuous batching: {n / dt:8.1f} output tok/s ({dt:.1f} s)", flush=True)
    if not args.skip_sequential:
        n, dt, seq_tokens = run_engine_sequential(engine, reqs)
        results["accelcore_one_at_a_time"] = n / dt
        print(f"accelcore one at a time:       {n / dt:8.1f} output tok/s ({dt:.1f} s)", flush=True)
        assert seq_tokens == batched_tokens, "batched outputs differ from one-at-a-time outputs"
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        n, dt = run_transformers_static(hf, reqs, args.hf_batch_size)
        results["transformers_static"] = n / dt
        print(f"transformers static batches:   {n / dt:8.1f} output tok/s ({dt:.1f} s, batch {args.hf_batch_size})", flush=True)
        del hf

    overhead = scheduler_overhead(engine, vocab, args.overhead_requests, 32, args.seed + 1)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, threads={args.threads}, ISA={cpu_isa()}; model {model_dir}")
    print("| engine | output tok/s | vs one at a time | vs transformers static |")
    print("|---|---|---|---|")
    base_seq = results.get("accelcore_one_at_a_time")
    base_hf = results.get("transformers_static")
    for name, v in results.items():
        a = f"{v / base_seq:.2f}x" if base_seq else "-"
        b = f"{v / base_hf:.2f}x" if base_hf else "-"
        print(f"| {name} | {v:.1f} | {a} | {b} |")
    print()
    print(
        f"scheduler overhead at {overhead['running']} running requests: step {overhead['step_ms']:.1f} ms, "
        f"outside the forward pass {100 * overhead['non_forward_fraction']:.2f}%, "
        f"planning (schedule) {100 * overhead['schedule_fraction']:.3f}%"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_dir, "threads": args.threads, "results": results, "overhead": overhead}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
