"""Quantized KV cache (kv_cache_dtype "int8" / "int4": keys per channel over each full block,
values per token and head, the block being filled in float32). A token reads every block before
its own quantized, so the engine keeps all its exactness properties (float32 CPU): a request's
output is the same alone or batched, with or without speculation, preemption and prefix caching.
Every float staging block is given back once requests finish. Accuracy against the float model
is in test_quantization.py.
"""
from __future__ import annotations

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams

SCHEMES = [
    {"kv_cache_dtype": "int4"},
    {"kv_cache_dtype": "int8"},
    {"kv_cache_dtype": "int4", "quantization": "w4a8", "quant_group_size": 32},
]


def _id(opts):
    return "-".join(str(v) for v in opts.values())


@pytest.fixture(scope="module")
def workload(golden):
    g256 = golden["max_new_tokens_256"]
    story = g256[1]["full_text"][:300]
    prompts = [e["prompt"] for e in g256] + [story, story + " Then", story[:200], "The little dog was sad because"]
    params = [SamplingParams(max_tokens=120, temperature=0.0, logprobs=2) for _ in g256] + [
        SamplingParams(max_tokens=60, temperature=0.0),
        SamplingParams(max_tokens=60, temperature=0.0, logprobs=1),
        SamplingParams(max_tokens=60, temperature=0.8, seed=3),
        SamplingParams(max_tokens=90, temperature=1.0, top_k=5, top_p=0.9, seed=8),
    ]
    return prompts, params


def _idle(engine):
    tu.assert_idle(engine)
    assert engine.stats()["num_staged_blocks"] == 0  # every float staging block was given back


@pytest.mark.parametrize("kv", SCHEMES, ids=_id)
def test_alone_equals_batched(stories_dir, workload, kv):
    prompts, params = workload
    engine = Engine(str(stories_dir), num_threads=2, **kv)
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    tu.assert_same_outputs(alone, batched, "alone vs batched")
    _idle(engine)
    # A different model from the float-KV one: the cache really is quantized.
    plain = {k: v for k, v in kv.items() if k != "kv_cache_dtype"}
    floats = Engine(str(stories_dir), num_threads=2, **plain).generate(prompts, params)
    assert any(q.token_ids != f.token_ids or q.logprobs != f.logprobs for q, f in zip(batched, floats))


@pytest.mark.parametrize("kv", SCHEMES, ids=_id)
def test_speculation_preemption_and_prefix_caching_do_not_change_outputs(stories_dir, workload, kv):
    # The block size is part of the scheme (keys are quantized per block): each variant is
    # compared with plain decoding at its own block size.
    prompts, params = workload

    def ref(block_size):
        return Engine(str(stories_dir), num_threads=2, block_size=block_size, **kv).generate(prompts, params)

    spec = dict(speculation="lookahead", spec_policy="fixed", spec_max_draft=16)
    engine = Engine(str(stories_dir), num_threads=2, **spec, **kv)
    got = engine.generate(prompts, params)
    tu.assert_same_outputs(got, ref(16), "speculation")
    assert sum(o.num_accepted_draft_tokens for o in got) > 0
    _idle(engine)
    # SmartSpec (its start-up profile runs on the quantized cache too).
    smart = Engine(str(stories_dir), num_threads=2, speculation="lookahead", **kv)
    tu.assert_same_outputs(smart.generate(prompts, params), ref(16), "smartspec")
    _idle(smart)

    tight = Engine(str(stories_dir), num_threads=2, block_size=4, num_kv_blocks=90, **kv)
    tu.assert_same_outputs(tight.generate(prompts, params), ref(4), "preemption")
    assert tight.stats()["num_preemptions"] > 0
    _idle(tight)

    # Prefix caching (the shared story prefix, and every prompt again in round 2), with and
    # without speculation; small blocks, so that hits span several quantized blocks.
    want = ref(8)
    for extra in ({}, spec):
        cached = Engine(str(stories_dir), num_threads=2, enable_prefix_caching=True, block_size=8, **extra, **kv)
        for round_ in range(2):
            tu.assert_same_outputs(cached.generate(prompts, params), want, f"prefix caching {extra}, round {round_}")
        assert cached.stats()["prefix_cache_hit_tokens"] > 100
        _idle(cached)


def test_random_gqa_model(small_llama):
    # head_dim 16, 2 KV heads for 4 query heads; repetitive prompts so that drafts get accepted.
    prompts = [([1] + list(range(5, 5 + n)) * 5)[: 4 * n] for n in (3, 5, 7, 9)]
    params = SamplingParams(max_tokens=70, temperature=0.0, logprobs=1)
    for kv in ("int4", "int8"):
        ref = {
            bs: [Engine(str(small_llama), num_threads=2, block_size=bs, kv_cache_dtype=kv).generate([p], params)[0]
                 for p in prompts]
            for bs in (4, 16)
        }
        for opts in (
            dict(block_size=16),
            dict(block_size=16, speculation="lookahead", spec_policy="fixed", spec_max_draft=12),
            dict(block_size=4, num_kv_blocks=40, speculation="lookahead", spec_policy="fixed"),
            dict(block_size=4, enable_prefix_caching=True, speculation="lookahead", spec_policy="fixed"),
        ):
            engine = Engine(str(small_llama), num_threads=2, kv_cache_dtype=kv, **opts)
            for round_ in range(2 if opts.get("enable_prefix_caching") else 1):
                got = engine.generate(prompts, params)
                tu.assert_same_outputs(got, ref[opts["block_size"]], f"{kv} {opts} round {round_}")
            if "speculation" in opts:
                assert sum(o.num_accepted_draft_tokens for o in got) > 0
            if "num_kv_blocks" in opts:
                assert engine.stats()["num_preemptions"] > 0
            _idle(engine)


def test_odd_block_size_and_aborts(stories_dir):
    # Block size 5 (4-bit codes straddle bytes): still exact with drafts (bounded by the block),
    # prefix caching and preemption; aborted requests give back every block and stage.
    prompts = ["Once upon a time", "Lily and Ben went to the park. Lily and Ben", "The little dog was sad because"]
    params = SamplingParams(max_tokens=90, temperature=0.0, logprobs=1)
    ref = [Engine(str(stories_dir), num_threads=2, block_size=5, kv_cache_dtype="int4").generate([p], params)[0]
           for p in prompts]
    for opts in (dict(speculation="lookahead", spec_policy="fixed", spec_max_draft=12),
                 dict(enable_prefix_caching=True, speculation="lookahead", spec_policy="fixed"),
                 dict(num_kv_blocks=30)):
        engine = Engine(str(stories_dir), num_threads=2, block_size=5, kv_cache_dtype="int4", **opts)
        for round_ in range(2):
            tu.assert_same_outputs(engine.generate(prompts + prompts[:1], [params] * 4), ref + ref[:1], f"{opts} {round_}")
        _idle(engine)
    engine = Engine(str(stories_dir), num_threads=2, kv_cache_dtype="int4", enable_prefix_caching=True)
    ids = [engine.add_request(engine.encode(p), SamplingParams(max_tokens=200, temperature=0.0)) for p in prompts]
    for _ in range(20):
        engine.step()
    assert engine.stats()["num_staged_blocks"] > 0
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished_requests():
        engine.step()
    _idle(engine)


def test_kv4_bytes_per_token(model_factory):
    # The issue's bound: 4-bit KV costs at most 30% of float16's bytes per token, scales included,
    # at head_dim 64 (TinyLlama's); the engine reports one block's bytes across layers.
    path = model_factory("hd64", seed=3, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    layers, kv_heads, head_dim, bs = 2, 2, 64, 16
    fp16_block = 2 * layers * kv_heads * bs * head_dim * 2
    got = {kv: Engine(str(path), kv_cache_dtype=kv).stats()["kv_block_bytes"] for kv in ("float32", "int8", "int4")}
    assert got["float32"] == 2 * fp16_block
    assert got["int4"] / fp16_block <= 0.30, got
    assert got["int8"] / fp16_block <= 0.56, got


def test_bad_kv_cache_dtype(stories_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        Engine(str(stories_dir), kv_cache_dtype="fp8")
