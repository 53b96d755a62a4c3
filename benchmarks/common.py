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


def build_wide_stories(src: str, path: str, hidden: int = 1024, layers: int = 8, intermediate: int = 2816,
                       seed: int = 0) -> str:
    """A larger model that writes what stories260K writes: stories260K's weights embedded in a wider,
    deeper Llama (once, to `path`). Speculation benchmarks need a model whose step time is that of
    a bigger network (reading weights, not per-row arithmetic) but whose text the draft store can
    predict as well as stories260K's; a random model's text cannot be predicted like that.

    The embedding keeps the original weights exactly:
      - hidden channels beyond the original 64 stay zero in the residual stream (zero rows in every
        output projection); RMSNorm's mean over more channels is undone by scaling the norm weights
        by sqrt(64 / hidden) and eps by 64 / hidden;
      - heads grow from head_dim 8 to 64: original channel i sits at 8 i and i + 4 at 8 i + 32, which
        keeps RoPE's frequency for each pair, and q is scaled by sqrt(64 / 8) for the softmax scale;
        heads beyond the original ones (and their KV heads) have zero output columns;
      - extra layers and MLP channels are random but have zero output projections.
    Greedy text matches stories260K's up to float rounding."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    print(f"building {path} from {src} ...", file=sys.stderr)
    cfg = json.load(open(os.path.join(src, "config.json")))
    w = load_file(os.path.join(src, "model.safetensors"))
    h0, nh, nkv, hd0 = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    i0, l0 = cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = 64
    heads = hidden // hd
    kv_heads = heads // (nh // nkv)  # same GQA group size
    assert hidden % hd == 0 and heads >= nh and intermediate >= i0 and layers >= l0 and hidden >= h0
    half0 = hd0 // 2
    chan = [(hd // hd0) * i for i in range(half0)] + [(hd // hd0) * i + hd // 2 for i in range(half0)]
    rng = np.random.default_rng(seed)
    norm_scale = np.float32(np.sqrt(h0 / hidden))

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def heads_rows(src_w, n, dst_rows, scale=1.0):
        """Output rows of a q/k/v projection: head h channel c -> row h * hd + chan[c]."""
        out = np.zeros((dst_rows, hidden), np.float32)
        for h in range(n):
            for c in range(hd0):
                out[h * hd + chan[c], :h0] = src_w[h * hd0 + c] * np.float32(scale)
        return out

    out = {"model.embed_tokens.weight": np.zeros((cfg["vocab_size"], hidden), np.float32)}
    out["model.embed_tokens.weight"][:, :h0] = w["model.embed_tokens.weight"]
    out["model.norm.weight"] = np.zeros(hidden, np.float32)
    out["model.norm.weight"][:h0] = w["model.norm.weight"] * norm_scale
    for l in range(layers):
        p = f"model.layers.{l}."
        if l < l0:
            for n in ("input_layernorm", "post_attention_layernorm"):
                out[p + n + ".weight"] = np.zeros(hidden, np.float32)
                out[p + n + ".weight"][:h0] = w[p + n + ".weight"] * norm_scale
            out[p + "self_attn.q_proj.weight"] = heads_rows(w[p + "self_attn.q_proj.weight"], nh, heads * hd, np.sqrt(hd / hd0))
            out[p + "self_attn.k_proj.weight"] = heads_rows(w[p + "self_attn.k_proj.weight"], nkv, kv_heads * hd)
            out[p + "self_attn.v_proj.weight"] = heads_rows(w[p + "self_attn.v_proj.weight"], nkv, kv_heads * hd)
            o = np.zeros((hidden, heads * hd), np.float32)
            for h in range(nh):
                for c in range(hd0):
                    o[:h0, h * hd + chan[c]] = w[p + "self_attn.o_proj.weight"][:, h * hd0 + c]
            out[p + "self_attn.o_proj.weight"] = o
            for n in ("gate_proj", "up_proj"):
                m = np.zeros((intermediate, hidden), np.float32)
                m[:i0, :h0] = w[p + "mlp." + n + ".weight"]
                out[p + "mlp." + n + ".weight"] = m
            d = np.zeros((hidden, intermediate), np.float32)
            d[:h0, :i0] = w[p + "mlp.down_proj.weight"]
            out[p + "mlp.down_proj.weight"] = d
        else:  # a layer that computes but adds nothing to the residual stream
            for n in ("input_layernorm", "post_attention_layernorm"):
                out[p + n + ".weight"] = np.ones(hidden, np.float32)
            out[p + "self_attn.q_proj.weight"] = rand(heads * hd, hidden)
            out[p + "self_attn.k_proj.weight"] = rand(kv_heads * hd, hidden)
            out[p + "self_attn.v_proj.weight"] = rand(kv_heads * hd, hidden)
            out[p + "self_attn.o_proj.weight"] = np.zeros((hidden, heads * hd), np.float32)
            out[p + "mlp.gate_proj.weight"] = rand(intermediate, hidden)
            out[p + "mlp.up_proj.weight"] = rand(intermediate, hidden)
            out[p + "mlp.down_proj.weight"] = np.zeros((hidden, intermediate), np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, "model.safetensors"))
    cfg.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=hd, rms_norm_eps=cfg["rms_norm_eps"] * h0 / hidden)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(os.path.join(src, name), os.path.join(path, name))
    return path
