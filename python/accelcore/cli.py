"""Command line: `accelcore generate --model DIR "prompt" ...` and `accelcore quantize --model DIR --out DIR --scheme S`."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from accelcore import Engine, SamplingParams

    engine = Engine(
        args.model,
        dtype=args.dtype,
        num_threads=args.num_threads,
        speculation=args.speculation,
        spec_policy=args.spec_policy,
        enable_prefix_caching=args.enable_prefix_caching,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    t0 = time.perf_counter()
    ntok = steps = 0
    if args.stream:  # one prompt after another, the text printed as it comes
        for prompt in args.prompts:
            print(prompt, end="", flush=True)
            for item in engine.generate_stream(prompt, params):
                print(item.new_text, end="", flush=True)
                if item.finished:
                    ntok += len(item.token_ids)
                    steps += int(item.metrics["num_steps"])
            print()
            print()
    else:
        for out in engine.generate(args.prompts, params):
            ntok += len(out.token_ids)
            steps += out.num_steps
            print(f"{out.prompt}{out.text}")
            print()
    dt = time.perf_counter() - t0
    print(
        f"[{len(args.prompts)} prompt(s), {ntok} tokens in {dt:.3f} s, {ntok / max(dt, 1e-9):.1f} tokens/s, "
        f"{ntok / max(steps, 1):.2f} tokens per forward pass]",
        file=sys.stderr,
    )
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from accelcore.quantize import quantize

    summary = quantize(
        args.model,
        args.out,
        args.scheme,
        group_size=args.group_size,
        calibration=args.calibration,
        method=args.method,
        a8_fraction=args.a8_fraction,
        num_samples=args.num_samples,
        sample_len=args.sample_len,
        seed=args.seed,
        num_threads=args.num_threads,
    )
    ratio = summary["ratio"]
    print(
        f"wrote {summary['out']} ({summary['scheme']}): {summary['bytes'] / 1e6:.2f} MB of tensors"
        + (f", {ratio:.1%} of the model in float16 ({summary['float16_bytes'] / 1e6:.2f} MB)" if ratio else "")
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="accelcore", description="accelcore LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from one or more prompts")
    g.add_argument("prompts", nargs="+", help="prompt text(s)")
    g.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--num-threads", type=int, default=None)
    g.add_argument("--stream", action="store_true",
                   help="print each prompt's text as it is generated (the prompts one after another)")
    g.add_argument("--speculation", choices=["off", "lookahead"], default="off",
                   help="lookahead: lossless multi-branch drafts from a token trie")
    g.add_argument("--spec-policy", choices=["smartspec", "fixed", "off"], default="smartspec",
                   help="draft sizes: smartspec (per request, where they pay), fixed (always the maximum) or off")
    g.add_argument("--enable-prefix-caching", action="store_true")
    g.add_argument("--quantization", choices=["none", "w4a16", "w4a8", "w4a4"], default="none",
                   help="linear weights quantized to 4 bits at load; activations float (w4a16), 8-bit (w4a8) "
                        "or FMPQ's mixed 4/8-bit (w4a4, calibrated on text sampled from the model)")
    g.add_argument("--kv-cache-dtype", choices=["auto", "float32", "int8", "int4"], default="auto",
                   help="KV cache storage: keys per channel over each full block, values per token and head "
                        "(auto: a quantized checkpoint's own, else float32)")
    qz = sub.add_parser("quantize", help="write a 4-bit checkpoint (COMET's W4Ax + KV4) that `generate` and Engine load")
    qz.add_argument("--model", required=True, help="Hugging Face model directory or hub id (float weights)")
    qz.add_argument("--out", required=True, help="output directory (new or empty)")
    qz.add_argument("--scheme", required=True,
                    help="w4a16, w4a8 or w4a4 (FMPQ: 4-bit activations but for calibrated outlier channels), "
                         "each with kv4, kv8 or kv16 (the KV cache engines loading it default to), e.g. w4a4kv4")
    qz.add_argument("--group-size", type=int, default=128, help="weight group size along the input (multiple of 32)")
    qz.add_argument("--calibration", default=None,
                    help="calibration text: a .jsonl file (a string, token ids, or {\"text\": ...} per line) or plain "
                         "text (one sequence per paragraph); default: sampled from the model itself, seeded")
    qz.add_argument("--method", choices=["gptq", "rtn"], default="gptq",
                    help="gptq (error-compensating rounding on the calibration activations) or rtn (round to nearest "
                         "with a clip search: fast; w4a4 still calibrates its channel order)")
    qz.add_argument("--a8-fraction", type=float, default=None,
                    help="w4a4: share of each linear's input channels (the largest) kept in 8 bits (default 0.4)")
    qz.add_argument("--num-samples", type=int, default=16, help="sampled calibration sequences (no --calibration)")
    qz.add_argument("--sample-len", type=int, default=256, help="tokens per sampled calibration sequence")
    qz.add_argument("--seed", type=int, default=0, help="seed of the sampled calibration text")
    qz.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "quantize":
            return _quantize(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"accelcore: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
