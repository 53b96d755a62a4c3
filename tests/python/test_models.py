"""Every supported architecture and config option against transformers (eager, float32).

Each case builds a small random checkpoint with transformers' own config and model classes, then
checks prompt log-probabilities, teacher-forced log-probabilities of the generated tokens, and the
greedy path itself (against transformers' generate, up to genuine near ties).
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

import accel_testutil as tu
from accelcore import Engine, SamplingParams

DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the three llama3 frequency bands (kept, smoothed, scaled) all occur at head_dim 16.
    "original_max_position_embeddings": 64,
}


def _legacy_rope(data):
    # The transformers 4 spelling: rope_theta at the top level and rope_scaling with "type".
    data.pop("rope_parameters", None)
    data["rope_theta"] = 500000.0
    data["rope_scaling"] = {"type": "linear", "factor": 2.0}


def _drop_layer_types(data):
    # Older Qwen2 configs have no layer_types: max_window_layers decides.
    data.pop("layer_types", None)


# name -> (architecture, build options, config overrides that turn the feature off in the reference)
CASES = {
    "llama_mha": ("LlamaForCausalLM", dict(num_key_value_heads=4), None),
    "llama_gqa": (
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        None,
    ),
    "llama_mqa": ("LlamaForCausalLM", dict(num_key_value_heads=1), None),
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True), None),
    "llama_head_dim": ("LlamaForCausalLM", dict(head_dim=32, num_key_value_heads=2), None),
    "llama_rope_llama3": (
        "LlamaForCausalLM",
        dict(rope_parameters=LLAMA3_ROPE),
        dict(rope_parameters=DEFAULT_ROPE),
    ),
    "llama_rope_linear": (
        "LlamaForCausalLM",
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        dict(rope_parameters=DEFAULT_ROPE),
    ),
    "llama_rope_legacy_spelling": (
        "LlamaForCausalLM",
        dict(edit_config=_legacy_rope),
        dict(rope_parameters=DEFAULT_ROPE),
    ),
    "llama_attention_bias": ("LlamaForCausalLM", dict(attention_bias=True), None),
    "llama_mlp_bias": ("LlamaForCausalLM", dict(mlp_bias=True), None),
    "mistral_sliding": ("MistralForCausalLM", dict(sliding_window=4), dict(sliding_window=None)),
    "qwen2": ("Qwen2ForCausalLM", dict(), None),
    "qwen2_sliding": (
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, max_window_layers=1, sliding_window=4),
        dict(use_sliding_window=False, layer_types=["full_attention", "full_attention"]),
    ),
    "qwen2_sliding_no_layer_types": (
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, max_window_layers=1, sliding_window=5, edit_config=_drop_layer_types),
        dict(use_sliding_window=False, layer_types=["full_attention", "full_attention"]),
    ),
    "llama_weights_fp16": ("LlamaForCausalLM", dict(save_dtype=torch.float16), None),
    "llama_weights_bf16": ("LlamaForCausalLM", dict(save_dtype=torch.bfloat16, tie_word_embeddings=True), None),
    "llama_sharded": ("LlamaForCausalLM", dict(max_shard_size="40KB"), None),
    # Sizes that are not multiples of any SIMD width: kernel tails everywhere.
    "llama_odd_sizes": (
        "LlamaForCausalLM",
        dict(vocab_size=997, hidden_size=72, intermediate_size=100, num_attention_heads=6, num_key_value_heads=3),
        None,
    ),
    "llama_wide": (
        "LlamaForCausalLM",
        dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, std=0.12),
        None,
    ),
    "mistral_head_dim_window_6": (
        "MistralForCausalLM",
        dict(head_dim=24, num_key_value_heads=1, sliding_window=6),
        dict(sliding_window=None),
    ),
}

PROMPT_LENGTHS = (12, 17, 20)  # all longer than the sliding windows
MAX_TOKENS = 16
K_PROMPT, K_GEN = 5, 3


@pytest.fixture(scope="module")
def case_model(model_factory):
    def get(name):
        arch, opts, _ = CASES[name]
        return model_factory(name, arch=arch, seed=zlib.crc32(name.encode()) % 1000, **opts)

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(name, case_model):
    arch, opts, neutral = CASES[name]
    path = case_model(name)
    cfg = json.loads((path / "config.json").read_text())
    if name == "llama_sharded":
        assert (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists()
        assert len(list(path.glob("model-*.safetensors"))) > 1
    if "save_dtype" in opts:
        header = (path / "model.safetensors").read_bytes()[8:2000]
        assert {torch.float16: b'"F16"', torch.bfloat16: b'"BF16"'}[opts["save_dtype"]] in header

    engine = Engine(str(path), num_threads=2)
    assert engine.model_info.architecture == arch
    vocab = cfg["vocab_size"]
    prompts = tu.random_prompts(vocab, PROMPT_LENGTHS, seed=len(name))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, prompt_logprobs=K_PROMPT, logprobs=K_GEN)
    outs = engine.generate(prompts, params)
    tu.assert_idle(engine)

    hf = tu.hf_model(path)
    hf_neutral = tu.hf_model(path, **neutral) if neutral else None
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length" and len(out.token_ids) == MAX_TOKENS
        ids = prompt + out.token_ids
        ref = tu.hf_logprobs(hf, ids)
        n = len(prompt)
        # Prompt log-probabilities: first entry None, then top-k + actual token at each position.
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
        for i in range(1, n):
            tu.check_logprob_dict(out.prompt_logprobs[i], ref[i - 1], K_PROMPT, ids[i])
        # Generated tokens: greedy under the reference, with matching log-probabilities.
        tu.check_greedy_path(out.token_ids, ref, n)
        assert len(out.logprobs) == MAX_TOKENS
        for j, tok in enumerate(out.token_ids):
            tu.check_logprob_dict(out.logprobs[j], ref[n - 1 + j], K_GEN, tok)
        if hf_neutral is not None:
            # The option under test must change the numbers, or this case proves nothing.
            ref_off = tu.hf_logprobs(hf_neutral, ids)
            assert np.abs(ref_off - ref).max() > 1e-2, "the feature does not affect this model"

    # Greedy generation against transformers' generate, token for token until a genuine near tie.
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt):].tolist()
        assert len(gen) == MAX_TOKENS
        for j, (a, b) in enumerate(zip(out.token_ids, gen)):
            if a != b:
                logits = tu.hf_logits(hf, prompt + gen[:j])[-1]
                assert tu.top2_margin(logits) < tu.TIE_MARGIN, f"step {j}: engine {a}, transformers {b}"
                break


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_sliding", "llama_rope_llama3"])
def test_full_context_matches_transformers(name, case_model):
    """A prompt of 110 tokens plus 18 generated fills max_position_embeddings (128) exactly:
    many KV blocks, chunked prefill, and positions past llama3's original_max_position_embeddings."""
    path = case_model(name)
    engine = Engine(str(path), num_threads=2, max_num_batched_tokens=48, block_size=8)
    prompt = tu.random_prompts(384, [110], seed=5)[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=18, temperature=0.0, prompt_logprobs=2, logprobs=2))[0]
    assert len(out.token_ids) == 18
    ids = prompt + out.token_ids
    assert len(ids) == 128 == engine.model_info.max_model_len
    ref = tu.hf_logprobs(tu.hf_model(path), ids)
    for i in range(1, len(prompt)):
        tu.check_logprob_dict(out.prompt_logprobs[i], ref[i - 1], 2, ids[i])
    tu.check_greedy_path(out.token_ids, ref, len(prompt))
    for j, tok in enumerate(out.token_ids):
        tu.check_logprob_dict(out.logprobs[j], ref[len(prompt) - 1 + j], 2, tok)
    with pytest.raises(ValueError, match="maximum model length"):
        engine.generate([prompt], SamplingParams(max_tokens=19))
    tu.assert_idle(engine)


def test_sliding_window_engine_equals_windowed_reference_only(case_model):
    """Mistral with a window of 4: a full-attention reference disagrees, the windowed one agrees."""
    path = case_model("mistral_sliding")
    engine = Engine(str(path), num_threads=1)
    prompt = tu.random_prompts(384, [20], seed=99)[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    ours = np.array([out.prompt_logprobs[i][prompt[i]] for i in range(1, 20)])
    windowed = tu.hf_logprobs(tu.hf_model(path), prompt)[np.arange(19), prompt[1:]]
    full = tu.hf_logprobs(tu.hf_model(path, sliding_window=None), prompt)[np.arange(19), prompt[1:]]
    assert np.abs(ours - windowed).max() < tu.LOGPROB_TOL
    # Positions inside the first window see the same keys either way; later ones must not.
    assert np.abs(ours[:3] - full[:3]).max() < tu.LOGPROB_TOL
    assert np.abs(ours[4:] - full[4:]).min() > 1e-4


def test_eos_list_from_generation_config(model_factory, tmp_path):
    """generation_config.json's eos_token_id (a list) overrides config.json's, as in transformers."""
    src = model_factory("llama_gqa_eos_src", seed=5)
    base = Engine(str(src), num_threads=1)
    prompt = tu.random_prompts(384, [9], seed=3)[0]
    free = base.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0].token_ids
    # Two tokens first seen late in the greedy path; config.json names the very first token, which
    # must be ignored because generation_config.json wins.
    late = [t for i, t in enumerate(free) if i >= 3 and free.index(t) == i and t != free[0]]
    assert len(late) >= 2, free
    a, b = late[1], late[0]
    stop_at = free.index(b)
    path = tu.copy_model_dir(src, tmp_path / "eos_model")
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = free[0]
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [a, b]}))
    engine = Engine(str(path), num_threads=1)
    assert sorted(engine.model_info.eos_token_ids) == sorted({a, b})
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert out.token_ids == free[: stop_at + 1]
    assert out.finish_reason == "stop"
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == free and out.finish_reason == "length"
