"""Quantization: scheme names (weights, activations, KV cache, as COMET writes them), calibration
text, and `quantize`, behind `accelcore quantize` (the work itself is the C++ engine's).

    w4a8kv4  -> 4-bit weights, 8-bit activations, 4-bit KV cache
    w4a16    -> 4-bit weights, float activations, float KV cache (kv16 is the default)
    kv8      -> float weights and activations, 8-bit KV cache
    float32  -> nothing quantized
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from typing import Dict, List, Optional, Union

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


def read_calibration(path: str) -> List[Union[str, List[int]]]:
    """Calibration sequences from a file: JSONL (one per line: a string, a list of token ids, or an
    object with "text" or "input_ids"), else plain text with one sequence per paragraph (blank-line
    separated)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seqs: List[Union[str, List[int]]] = []
    if path.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
            if isinstance(rec, dict):
                rec = rec.get("text", rec.get("input_ids"))
            if not (isinstance(rec, str) or (isinstance(rec, list) and all(isinstance(t, int) for t in rec))):
                raise ValueError(f'{path}:{n}: expected a string, a token id list, or an object with "text" or "input_ids"')
            seqs.append(rec)
    else:
        seqs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not seqs:
        raise ValueError(f"calibration file {path!r} holds no text")
    return seqs


def _float16_bytes(model_dir: str) -> int:
    """What the checkpoint's tensors take in float16: 2 bytes per element (from safetensors headers)."""
    total = 0
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            with open(os.path.join(model_dir, name), "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            for key, t in header.items():
                if key != "__metadata__":
                    total += 2 * math.prod(t["shape"])
    return total


def quantize(
    model: str,
    out: str,
    scheme: str,
    group_size: int = 128,
    calibration: Optional[str] = None,
    method: str = "gptq",
    a8_fraction: Optional[float] = None,
    num_samples: int = 16,
    sample_len: int = 256,
    seed: int = 0,
    num_threads: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, object]:
    """Quantizes a Hugging Face checkpoint into `out` (a new or empty directory) and returns a
    summary (scheme, bytes written, the float16 size of the source and their ratio)."""
    from accelcore import Engine
    from accelcore.engine import resolve_model_path

    opts = scheme_options(scheme)
    if opts["quantization"] == "none":
        raise ValueError(f"scheme {scheme!r} quantizes no weights: a checkpoint needs w4a16, w4a8 or w4a4")
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    fmpq = opts["quantization"] == "w4a4"
    if method == "rtn" and calibration is not None and not fmpq:
        raise ValueError("a calibration file was given with method 'rtn' (round to nearest uses none; w4a4 uses it "
                         "for its channel order)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"output directory {out!r} exists and is not empty")
    path = resolve_model_path(model)
    calib = None
    if method == "gptq" or fmpq:  # w4a4 orders its channels by calibration magnitudes either way
        if calibration is not None:
            calib = read_calibration(calibration)
        else:
            calib = sample_calibration(path, num_samples, sample_len, seed, num_threads)
    options = dict(opts, quant_group_size=group_size, quant_method=method)
    if a8_fraction is not None:
        options["quant_a8_fraction"] = a8_fraction
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"quantizing ({scheme}, {method})", unit="layer", file=sys.stderr)

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        options["quant_progress"] = report
    try:
        engine = Engine(path, num_threads=num_threads, quant_calibration=calib, **options)
    finally:
        if bar is not None:
            bar.close()
    engine.save_quantized(out)
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    fp16 = _float16_bytes(path)
    return {"scheme": scheme, "out": out, "bytes": written, "float16_bytes": fp16, "ratio": written / fp16 if fp16 else None}
