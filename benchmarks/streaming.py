#!/usr/bin/env python3
"""What streaming costs: the same request generated with `generate` (the baseline, in the same run)
and with `generate_stream`, which also turns every step's tokens into text, for several prompt
lengths. The difference is the per-step detokenization.

    python benchmarks/streaming.py --model ../shared/models/stories260K
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    from accelcore import Engine, SamplingParams, cpu_isa

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("ACCELCORE_TEST_MODEL", "../shared/models/stories260K"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[10, 100, 300])
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="best of N per configuration")
    args = ap.parse_args()

    engine = Engine(args.model, num_threads=args.threads)
    text = "Once upon a time there was a little girl named Lily. She loved to play outside in the park. "
    base = engine.encode(text)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for plen in args.prompt_lens:
        prompt = (base * (plen // len(base) + 1))[:plen]
        gen = stream = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            want = engine.generate([prompt], params)[0]
            t1 = time.perf_counter()
            got = ""
            for item in engine.generate_stream(prompt, params):
                got += item.new_text
            t2 = time.perf_counter()
            if got != want.text:
                print(f"streamed text differs from generate()'s (prompt {plen})", file=sys.stderr)
                return 1
            gen, stream = min(gen, t1 - t0), min(stream, t2 - t1)
        rows.append((plen, gen, stream, len(want.token_ids)))
        print(f"prompt {plen}: generate {gen * 1e3:.1f} ms, generate_stream {stream * 1e3:.1f} ms", flush=True)

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, threads={args.threads}, accelcore ISA={cpu_isa()}")
    print(f"model: {args.model}, {args.max_tokens} new tokens, greedy, best of {args.repeats}")
    print("| prompt tokens | generate ms | generate_stream ms | streaming's cost, us per token |")
    print("|---|---|---|---|")
    for plen, gen, stream, n in rows:
        print(f"| {plen} | {gen * 1e3:.1f} | {stream * 1e3:.1f} | {(stream - gen) / max(n, 1) * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
