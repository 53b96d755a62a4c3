"""Helpers shared by the benchmark scripts: random models of a given shape, cached on disk."""

from __future__ import annotations

import os
import sys

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_random_llama(path: str, seed: int = 0, **shape) -> str:
    """Writes a random float32 LlamaForCausalLM of the given shape to `path` (once)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"building random model in {path} ...", file=sys.stderr)
    torch.manual_seed(seed)
    config = LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=False, **shape)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
