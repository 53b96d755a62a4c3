#!/usr/bin/env python3
"""Decode throughput: accelcore against transformers on the same model, in the same run.

Default: a random model of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000), float32, built once with transformers and cached on disk.
Reports decode tokens/s (prefill excluded) at batch 1 and 16, and the ratios; `--scheme
float32,w4a8,w4a8kv4,w4a16` measures each scheme in the same run.

    python benchmarks/decode.py --threads 2
    python benchmarks/decode.py --model ../shared/models/stories260K --batch-sizes 1 --new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, build_random_llama  # noqa: E402

TINYLLAMA_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def build_random_model(path: str, seed: int = 0) -> str:
    """Writes a random Llama of TinyLlama's shape to `path` (once)."""
    return build_random_llama(path, seed, **TINYLLAMA_SHAPE)


def prompts_for(batch: int, prompt_len: int, vocab: int, seed: int = 1):
    import random

    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(prompt_len - 1)] for _ in range(batch)]


def time_accelcore(engine, prompts, new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> float:
    """Decode tokens/s: time from the step that produced every request's first token to the end."""
    from accelcore import SamplingParams

    ids = [engine.add_request(p, SamplingParams(max_tokens=new_tokens, temperature=temperature, top_p=top_p,
                                                seed=k, ignore_eos=True))
           for k, p in enumerate(prompts)]
    got = {i: 0 for i in ids}
    t_first = None
    done = 0
    while done < len(ids):
        for out in engine.step():
            got[out.request_id] += len(out.new_token_ids)
            done += out.finished
        if t_first is None and all(v >= 1 for v in got.values()):
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return len(prompts) * (new_tokens - 1) / (t_end - t_first)


def time_prefill(engine, prompt_len: int, vocab: int) -> float:
    """Prefill tokens/s: one prompt of prompt_len tokens, to its first generated token."""
    from accelcore import SamplingParams

    prompt = prompts_for(1, prompt_len, vocab, seed=2)[0]
    t0 = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    return prompt_len / (time.perf_counter() - t0)


def time_transformers(model, prompts, new_tokens: int) -> float:
    """Decode tokens/s of a manual greedy loop with the KV cache (prefill excluded)."""
    import torch

    input_ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
    return len(prompts) * (new_tokens - 1) / (t1 - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: random TinyLlama-shaped model)")
    ap.add_argument("--cache-dir", default=os.path.join(RESULTS_DIR, "tinyllama-random"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per configuration")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="accelcore's decoding: 0 greedy (the default), else sampled (transformers' stays greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="accelcore's nucleus when sampling")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--scheme", default="float32",
                    help="comma list of schemes, each measured in the same run: float32, w4a8 (4-bit weights "
                         "quantized at load, 8-bit activations), w4a16 (float activations), each optionally "
                         "with kv4 or kv8 (the KV cache in 4 or 8 bits), e.g. w4a8kv4")
    ap.add_argument("--group-size", type=int, default=128, help="quantization group size (w4a8)")
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt length of the prefill measurement (0: skip)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model_dir = args.model or build_random_model(args.cache_dir)

    from accelcore import Engine, cpu_isa

    from accelcore.quantize import scheme_options

    schemes = args.scheme.split(",")
    for scheme in schemes:
        try:
            scheme_options(scheme)
        except ValueError as e:
            raise SystemExit(f"--scheme: {e}")
    hf = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()

    rows = []
    prefill = {}
    for scheme in schemes:
        quant = dict(scheme_options(scheme), quant_group_size=args.group_size)
        if quant["quantization"] == "w4a4":
            # FMPQ orders channels by calibration magnitudes: a few random sequences do for speed
            # (weights rounded to nearest; accuracy is tests/python/test_quantization.py's job).
            vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
            quant.update(quant_calibration=prompts_for(4, 128, vocab, seed=9), quant_method="rtn")
        engine = Engine(model_dir, num_threads=args.threads, max_num_seqs=max(args.batch_sizes), **quant)
        vocab = engine.model_info.vocab_size
        for bs in args.batch_sizes:
            prompts = prompts_for(bs, args.prompt_len, vocab)
            ours = max(time_accelcore(engine, prompts, args.new_tokens, args.temperature, args.top_p)
                       for _ in range(args.repeats))
            theirs = None
            if hf is not None and scheme == schemes[0]:
                theirs = max(time_transformers(hf, prompts, args.new_tokens) for _ in range(args.repeats))
            rows.append({"scheme": scheme, "batch": bs, "accelcore_tok_s": ours, "transformers_tok_s": theirs})
            print(f"{scheme} batch {bs:3d}: accelcore {ours:9.2f} tok/s"
                  + (f"   transformers {theirs:9.2f} tok/s   ratio {ours / theirs:5.2f}x" if theirs else ""), flush=True)
        if args.prefill_len:
            pre = max(time_prefill(engine, args.prefill_len, vocab) for _ in range(args.repeats))
            prefill[scheme] = pre
            print(f"{scheme} prefill of {args.prefill_len} tokens: {pre:.1f} tok/s", flush=True)
        del engine

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, threads={args.threads}, accelcore ISA={cpu_isa()}")
    print(f"model: {model_dir}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeats}"
          + (f", sampled at temperature {args.temperature}, top_p {args.top_p}" if args.temperature > 0 else ", greedy"))
    print("| scheme | batch | accelcore tok/s | transformers float32 tok/s | vs transformers | vs own batch 1 | vs float32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["transformers_tok_s"]
        base = next(b for b in rows if b["scheme"] == r["scheme"] and b["batch"] == min(args.batch_sizes))
        f32 = next((b for b in rows if b["scheme"] == "float32" and b["batch"] == r["batch"]), None)
        r["vs_own_first_batch"] = r["accelcore_tok_s"] / base["accelcore_tok_s"]
        if f32:
            r["vs_float32"] = r["accelcore_tok_s"] / f32["accelcore_tok_s"]
        print(f"| {r['scheme']} | {r['batch']} | {r['accelcore_tok_s']:.2f} | "
              + (f"{t:.2f} | {r['accelcore_tok_s'] / t:.2f}x | " if t else "- | - | ")
              + f"{r['vs_own_first_batch']:.2f}x | " + (f"{r['vs_float32']:.2f}x |" if f32 else "- |"))
    for scheme, pre in prefill.items():
        print(f"prefill, {args.prefill_len}-token prompt, {scheme}: {pre:.1f} tok/s"
              + (f" ({pre / prefill['float32']:.2f}x float32)" if "float32" in prefill and scheme != "float32" else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_dir, "threads": args.threads, "isa": cpu_isa(), "rows": rows, "prefill_tok_s": prefill}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
