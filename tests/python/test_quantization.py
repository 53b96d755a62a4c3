"""On-the-fly W4A8 quantization (quantization="w4a8": the linear layers' weights in 4 bits, their
inputs in 8 bits per token and group). The quantized engine keeps the exactness properties of the
float one (float32 CPU): a request's output is the same alone or batched, with speculation on or
off, with or without preemption. Its predictions stay close to the float model's (a sanity bound
here: the issue's accuracy figures are for the calibrated quantizer, which is not built yet).
"""
from __future__ import annotations

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams

QUANT = {"quantization": "w4a8", "quant_group_size": 32}


@pytest.fixture(scope="module")
def workload(golden):
    g256 = golden["max_new_tokens_256"]
    prompts = [e["prompt"] for e in g256] + ["Lily and Ben went to the park. Lily and Ben", "The little dog was sad because"]
    params = [SamplingParams(max_tokens=120, temperature=0.0, logprobs=2) for _ in g256] + [
        SamplingParams(max_tokens=100, temperature=0.8, seed=7, logprobs=1),
        SamplingParams(max_tokens=90, temperature=1.0, top_k=5, top_p=0.9, seed=8),
    ]
    return prompts, params


def _same(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, f"{what}: request {i}"
        assert g.logprobs == w.logprobs, f"{what}: request {i}"  # exact floats


def test_alone_equals_batched(stories_dir, workload):
    prompts, params = workload
    engine = Engine(str(stories_dir), num_threads=2, **QUANT)
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    _same(alone, batched, "alone vs batched")
    tu.assert_idle(engine)
    # And it is a different model from the float one (the weights really are quantized).
    floats = Engine(str(stories_dir), num_threads=2).generate(prompts, params)
    assert any(q.token_ids != f.token_ids or q.logprobs != f.logprobs for q, f in zip(batched, floats))


def test_speculation_and_preemption_do_not_change_outputs(stories_dir, workload):
    prompts, params = workload
    ref = Engine(str(stories_dir), num_threads=2, **QUANT).generate(prompts, params)
    spec_engine = Engine(str(stories_dir), num_threads=2, speculation="lookahead", spec_policy="fixed", **QUANT)
    spec = spec_engine.generate(prompts, params)
    _same(spec, ref, "speculation")
    assert sum(o.num_accepted_draft_tokens for o in spec) > 0
    tight = Engine(str(stories_dir), num_threads=2, block_size=4, num_kv_blocks=90, **QUANT)
    _same(tight.generate(prompts, params), ref, "preemption")
    assert tight.stats()["num_preemptions"] > 0


def test_predictions_stay_close_to_float(stories_dir, golden):
    # Teacher-forced on the golden stories: the next-token argmax of the quantized model against
    # the float model's, position by position.
    texts = [e["full_text"] for e in golden["max_new_tokens_256"]]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)

    def top1(engine):
        out = []
        for o in engine.generate(texts, params):
            out += [max(lp, key=lp.get) for lp in o.prompt_logprobs[1:]]
        return out

    f = top1(Engine(str(stories_dir), num_threads=2))
    q = top1(Engine(str(stories_dir), num_threads=2, **QUANT))
    agree = sum(a == b for a, b in zip(f, q)) / len(f)
    assert len(f) > 500
    # Measured 0.887 (group 32, round to nearest); a broken kernel or format lands far below.
    assert agree >= 0.80, f"top-1 agreement {agree:.3f}"


def test_bad_quantization_options(stories_dir):
    with pytest.raises(ValueError, match="quantization must be"):
        Engine(str(stories_dir), quantization="w3a8")
    with pytest.raises(ValueError, match="quant_group_size"):
        Engine(str(stories_dir), quantization="w4a8", quant_group_size=48)
