"""Quantization schemes by name, as the issue and COMET write them: weights, activations, KV cache.

    w4a8kv4  -> 4-bit weights, 8-bit activations, 4-bit KV cache
    w4a16    -> 4-bit weights, float activations, float KV cache (kv16 is the default)
    kv8      -> float weights and activations, 8-bit KV cache
    float32  -> nothing quantized
"""

from __future__ import annotations

import re
from typing import Dict

_SCHEME = re.compile(r"^(?:(?P<w>w4a16|w4a8|w4a4)|float32)?(?:kv(?P<kv>4|8|16))?$")
_KV = {"4": "int4", "8": "int8", "16": "float32", None: "float32"}


def scheme_options(scheme: str) -> Dict[str, str]:
    """Engine options for a scheme name: {"quantization": ..., "kv_cache_dtype": ...}."""
    m = _SCHEME.match(scheme or "")
    if not scheme or not m:
        raise ValueError(
            f"unknown quantization scheme {scheme!r}: expected w4a16, w4a8 or w4a4 (or float32), "
            "optionally followed by kv4, kv8 or kv16, e.g. w4a8kv4; or kv4 / kv8 alone"
        )
    return {"quantization": m.group("w") or "none", "kv_cache_dtype": _KV[m.group("kv")]}


def sample_calibration(model: str, count: int = 16, length: int = 256, seed: int = 0, num_threads=None):
    """Calibration text sampled from the float model itself: `count` sequences of `length` tokens from
    BOS at temperature 1, seeded (what FMPQ and GPTQ use when no calibration file is given)."""
    from accelcore import Engine, SamplingParams

    engine = Engine(model, num_threads=num_threads)
    bos = engine.model_info.bos_token_id
    bos = 1 if bos is None else bos
    length = max(2, min(length, engine.model_info.max_model_len))
    params = [SamplingParams(max_tokens=length - 1, temperature=1.0, seed=seed + i, ignore_eos=True) for i in range(count)]
    return [[bos] + out.token_ids for out in engine.generate([[bos]] * count, params)]
