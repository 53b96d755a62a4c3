"""Batch invariance: a request's tokens do not depend on what else runs, how prompts are chunked,
how the KV cache is laid out, or how many threads compute.

The reference for every prompt is the engine run on that prompt alone; the golden/transformers
tests establish that those solo runs are right.
"""

from __future__ import annotations

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams

MAX_TOKENS = 20
LENGTHS = (1, 2, 5, 8, 13, 16, 17, 24, 31, 40)  # crosses block boundaries (16) and includes 1


@pytest.fixture(scope="module")
def prompts():
    return tu.random_prompts(512, LENGTHS, seed=2024)


def _params(kind, i):
    if kind == "greedy":
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_k=40, top_p=0.95, seed=1000 + i, logprobs=2)


@pytest.fixture(scope="module")
def solo(stories_dir, prompts):
    """kind -> list of (tokens, logprobs) with each prompt run alone on a default engine."""
    engine = Engine(str(stories_dir), num_threads=2)
    result = {}
    for kind in ("greedy", "sampled"):
        result[kind] = []
        for i, p in enumerate(prompts):
            (out,) = engine.generate([p], _params(kind, i))
            assert out.finish_reason == "length" and len(out.token_ids) == MAX_TOKENS
            result[kind].append((out.token_ids, out.logprobs))
    # The sampled runs must not be greedy in disguise, or the "sampled" cases prove nothing new.
    assert sum(a[0] != b[0] for a, b in zip(result["greedy"], result["sampled"])) >= len(prompts) // 2
    return result


ENGINE_OPTIONS = {
    "default": dict(),
    "one_thread": dict(num_threads=1),
    "more_threads_than_cores": dict(num_threads=5),
    "chunked_prefill_7": dict(max_num_batched_tokens=7),
    "chunked_prefill_1": dict(max_num_batched_tokens=1, num_threads=1),
    "block_size_1": dict(block_size=1),
    "block_size_5": dict(block_size=5),
    "max_num_seqs_3": dict(max_num_seqs=3),
    # 12 blocks of 16 hold about 3 requests at a time (each needs up to 4 blocks): the rest wait.
    "tight_kv_pool": dict(num_kv_blocks=12, max_num_batched_tokens=32),
}


@pytest.mark.parametrize("kind", ["greedy", "sampled"])
@pytest.mark.parametrize("option", list(ENGINE_OPTIONS))
def test_batch_equals_solo(stories_dir, prompts, solo, kind, option):
    engine = Engine(str(stories_dir), **{"num_threads": 2, **ENGINE_OPTIONS[option]})
    outs = engine.generate(prompts, [_params(kind, i) for i in range(len(prompts))])
    for i, out in enumerate(outs):
        tokens, logprobs = solo[kind][i]
        assert out.token_ids == tokens, f"prompt {i} (length {LENGTHS[i]})"
        assert out.finish_reason == "length"
        # Not just the same tokens: bit-identical log-probabilities (the kernels are batch invariant).
        assert out.logprobs == logprobs
    tu.assert_idle(engine)


def test_reversed_and_mixed_order(stories_engine, prompts, solo):
    """Reordered prompts with mixed greedy/sampled params in one call."""
    order = list(reversed(range(len(prompts))))
    kinds = ["greedy" if i % 2 else "sampled" for i in order]
    outs = stories_engine.generate([prompts[i] for i in order], [_params(k, i) for k, i in zip(kinds, order)])
    for out, i, k in zip(outs, order, kinds):
        assert out.token_ids == solo[k][i][0]
    tu.assert_idle(stories_engine)


def test_duplicate_prompts_in_one_batch(stories_engine, prompts, solo):
    """The same prompt many times: greedy copies agree, seeded copies follow their own seeds."""
    p = prompts[6]
    params = [_params("greedy", 6)] * 4 + [_params("sampled", 6)] * 4
    outs = stories_engine.generate([p] * 8, params)
    for out in outs[:4]:
        assert out.token_ids == solo["greedy"][6][0]
    for out in outs[4:]:
        assert out.token_ids == solo["sampled"][6][0]
    tu.assert_idle(stories_engine)


def test_random_model_batch_equals_solo_with_prompt_logprobs(small_llama):
    """A GQA random model: prompt logprobs too are independent of batching and chunking."""
    prompts = tu.random_prompts(384, (3, 11, 19, 26, 7), seed=77)
    params = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=3)
    ref_engine = Engine(str(small_llama), num_threads=1)
    solo = [ref_engine.generate([p], params)[0] for p in prompts]
    engine = Engine(str(small_llama), num_threads=2, max_num_batched_tokens=7, block_size=4)
    outs = engine.generate(prompts, params)
    for a, b in zip(outs, solo):
        assert a.token_ids == b.token_ids
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_token_ids)
        assert a.prompt_logprobs == b.prompt_logprobs  # bit-identical
    tu.assert_idle(engine)
