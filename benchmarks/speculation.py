#!/usr/bin/env python3
"""Lookahead speculation on stories260K: tokens per forward pass and wall-clock speedup.

1. Warm the global draft store: generate --warmup stories (sampled, temperature 1, from BOS).
2. On other story prompts (greedy, one request at a time): tokens per forward pass and wall-clock
   time of the speculative engine against the same engine without speculation, in the same run
   (outputs are asserted identical), and against transformers' prompt lookup decoding
   (`prompt_lookup_num_tokens`) on the same prompts (its tokens per forward pass, counted with a
   forward hook; the prefill pass counts, as it does for ours).
3. A prompt-copy workload: a prompt holding a passage that the output largely repeats.

    python benchmarks/speculation.py --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "..", "shared", "models", "stories260K")

EVAL_OPENINGS = [
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
    "The old man had a garden",
    "Anna found a box in the attic",
]


def run_engine(engine, prompts, max_tokens: int):
    """One request at a time (the latency case); returns (outputs, seconds)."""
    from accelcore import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outs = []
    t0 = time.perf_counter()
    for p in prompts:
        outs.append(engine.generate([p], sp)[0])
    return outs, time.perf_counter() - t0


def prompt_lookup(model_dir: str, prompt_ids, max_tokens: int, num_tokens: int):
    """transformers prompt lookup decoding: (token ids per prompt, tokens per forward pass)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    total_new = 0
    outs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                prompt_lookup_num_tokens=num_tokens,
                pad_token_id=0,
            )
            new = y[0, len(ids) :].tolist()
            outs.append(new)
            total_new += len(new)
    return outs, total_new / calls[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--warmup", type=int, default=200, help="stories generated to warm the global store")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--spec-max-draft", type=int, default=16)
    ap.add_argument("--spec-max-depth", type=int, default=8)
    ap.add_argument("--spec-max-match", type=int, default=None, help="longest context suffix matched (engine default if unset)")
    ap.add_argument("--spec-policy", default="fixed", choices=["fixed", "smartspec"],
                    help="fixed: every request drafts spec-max-draft nodes (the drafting quality); smartspec: as many as pay")
    ap.add_argument("--prompt-lookup-tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from accelcore import Engine, SamplingParams

    spec = Engine(
        args.model,
        num_threads=args.threads,
        speculation="lookahead",
        spec_max_draft=args.spec_max_draft,
        spec_max_depth=args.spec_max_depth,
        **({} if args.spec_max_match is None else {"spec_max_match": args.spec_max_match}),
        spec_policy=args.spec_policy,
    )
    plain = Engine(args.model, num_threads=args.threads)

    # 1. Warm-up: sampled stories from BOS, all in one batch (their outputs feed the global store).
    t0 = time.perf_counter()
    bos = spec.model_info.bos_token_id or 1
    warm = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=10_000 + i) for i in range(args.warmup)]
    spec.generate([[bos]] * args.warmup, warm)
    # A step from an idle engine first indexes what the background thread has not yet (here,
    # most of the warm-up's outputs): take it now, so the timed run does not pay for the warm-up.
    spec.generate([[bos]], SamplingParams(max_tokens=1))
    print(f"warm-up: {args.warmup} stories in {time.perf_counter() - t0:.1f} s", flush=True)

    # 2. Evaluation prompts, greedy, one at a time; plain first and last to bracket drift.
    prompts = EVAL_OPENINGS
    plain_outs, t_plain_a = run_engine(plain, prompts, args.max_tokens)
    spec_outs, t_spec = run_engine(spec, prompts, args.max_tokens)
    _, t_plain_b = run_engine(plain, prompts, args.max_tokens)
    t_plain = min(t_plain_a, t_plain_b)
    assert [o.token_ids for o in spec_outs] == [o.token_ids for o in plain_outs], "speculation changed the output"
    tokens = sum(len(o.token_ids) for o in spec_outs)
    steps = sum(o.num_steps for o in spec_outs)
    drafted = sum(o.num_draft_tokens for o in spec_outs)
    accepted = sum(o.num_accepted_draft_tokens for o in spec_outs)
    result = {
        "tokens_per_pass": tokens / steps,
        "plain_tokens_per_pass": 1.0,
        "wall_clock_speedup": t_plain / t_spec,
        "spec_tok_s": tokens / t_spec,
        "plain_tok_s": tokens / t_plain,
        "draft_tokens": drafted,
        "accepted_draft_tokens": accepted,
        "acceptance_rate": accepted / max(drafted, 1),
    }

    if not args.skip_transformers:
        ids = [o.prompt_token_ids for o in plain_outs]
        hf_outs, hf_tpp = prompt_lookup(args.model, ids, args.max_tokens, args.prompt_lookup_tokens)
        result["prompt_lookup_tokens_per_pass"] = hf_tpp
        result["vs_prompt_lookup"] = result["tokens_per_pass"] / hf_tpp
        result["prompt_lookup_matches_ours"] = sum(a == o.token_ids for a, o in zip(hf_outs, plain_outs))

    # 3. Prompt copy: a story the model wrote, then BOS and its first words; the continuation
    # largely repeats the passage.
    rng = random.Random(0)
    copy_prompts = []
    for k in range(4):
        story = plain.generate([[bos]], SamplingParams(max_tokens=160, temperature=1.0, seed=rng.randrange(1 << 30)))[0]
        passage = [bos] + story.token_ids
        copy_prompts.append(passage + [bos] + story.token_ids[:4])
    c_plain, tc_plain = run_engine(plain, copy_prompts, 128)
    c_spec, tc_spec = run_engine(spec, copy_prompts, 128)
    assert [o.token_ids for o in c_spec] == [o.token_ids for o in c_plain]
    result["copy_tokens_per_pass"] = sum(len(o.token_ids) for o in c_spec) / sum(o.num_steps for o in c_spec)
    result["copy_wall_clock_speedup"] = tc_plain / tc_spec

    print()
    print(f"model {os.path.abspath(args.model)}; drafts up to {args.spec_max_draft} nodes, depth {args.spec_max_depth}, "
          f"policy {args.spec_policy}")
    print("| workload | tokens per pass | vs prompt lookup | wall-clock vs plain |")
    print("|---|---|---|---|")
    pl = result.get("prompt_lookup_tokens_per_pass")
    print(
        f"| stories after warm-up | {result['tokens_per_pass']:.2f} | "
        + (f"{result['vs_prompt_lookup']:.2f}x (prompt lookup: {pl:.2f})" if pl else "-")
        + f" | {result['wall_clock_speedup']:.2f}x ({result['spec_tok_s']:.0f} vs {result['plain_tok_s']:.0f} tok/s) |"
    )
    print(f"| prompt copy | {result['copy_tokens_per_pass']:.2f} | - | {result['copy_wall_clock_speedup']:.2f}x |")
    print(f"acceptance: {accepted} of {drafted} draft tokens ({100 * result['acceptance_rate']:.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
