"""On-the-fly 4-bit weight quantization (quantization="w4a8": the linear layers' weights in 4 bits,
their inputs in 8 bits per token and group; "w4a16": the same weights, float inputs). The quantized
engine keeps the exactness properties of the float one (float32 CPU): a request's output is the
same alone or batched, with speculation on or off, with or without preemption. Its predictions
stay close to the float model's: teacher-forced on stories sampled from the float model, GPTQ
with calibration meets the issue's accuracy bars for w4a16kv16, w4a8kv8 and w4a8kv4 (with the
quantized KV cache of test_kv_quantization.py) and beats round to nearest; 8-bit KV alone meets
the 98% bar; keys quantized per token (the bad scheme) fail every bar.
"""
from __future__ import annotations

import math

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams

QUANT = {"quantization": "w4a8", "quant_group_size": 32}
SCHEMES = [{"quantization": q, "quant_group_size": 32} for q in ("w4a8", "w4a16", "w4a4")]


@pytest.fixture(scope="module")
def workload(golden):
    g256 = golden["max_new_tokens_256"]
    prompts = [e["prompt"] for e in g256] + ["Lily and Ben went to the park. Lily and Ben", "The little dog was sad because"]
    params = [SamplingParams(max_tokens=120, temperature=0.0, logprobs=2) for _ in g256] + [
        SamplingParams(max_tokens=100, temperature=0.8, seed=7, logprobs=1),
        SamplingParams(max_tokens=90, temperature=1.0, top_k=5, top_p=0.9, seed=8),
    ]
    return prompts, params


@pytest.mark.parametrize("quant", SCHEMES, ids=lambda q: q["quantization"])
def test_alone_equals_batched(stories_dir, workload, quant):
    prompts, params = workload
    engine = Engine(str(stories_dir), num_threads=2, **quant)
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    tu.assert_same_outputs(alone, batched, "alone vs batched")
    tu.assert_idle(engine)
    # And it is a different model from the float one (the weights really are quantized).
    floats = Engine(str(stories_dir), num_threads=2).generate(prompts, params)
    assert any(q.token_ids != f.token_ids or q.logprobs != f.logprobs for q, f in zip(batched, floats))


@pytest.mark.parametrize("quant", SCHEMES, ids=lambda q: q["quantization"])
def test_speculation_and_preemption_do_not_change_outputs(stories_dir, workload, quant):
    prompts, params = workload
    ref = Engine(str(stories_dir), num_threads=2, **quant).generate(prompts, params)
    spec_engine = Engine(str(stories_dir), num_threads=2, speculation="lookahead", spec_policy="fixed", **quant)
    spec = spec_engine.generate(prompts, params)
    tu.assert_same_outputs(spec, ref, "speculation")
    assert sum(o.num_accepted_draft_tokens for o in spec) > 0
    tight = Engine(str(stories_dir), num_threads=2, block_size=4, num_kv_blocks=90, **quant)
    tu.assert_same_outputs(tight.generate(prompts, params), ref, "preemption")
    assert tight.stats()["num_preemptions"] > 0


def _sampled_stories(engine, count, seed):
    bos = engine.model_info.bos_token_id or 1
    params = [SamplingParams(max_tokens=255, temperature=1.0, seed=seed + i, ignore_eos=True) for i in range(count)]
    return [[bos] + o.token_ids for o in engine.generate([[bos]] * count, params)]


def _teacher_forced(engine, stories):
    # Every position's full next-token distribution (prompt_logprobs over the whole vocabulary).
    vocab = engine.model_info.vocab_size
    outs = engine.generate(stories, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=vocab))
    return [lp for o in outs for lp in o.prompt_logprobs[1:]]


def _agreement_and_kl(ref, got):
    agree = sum(max(a, key=a.get) == max(b, key=b.get) for a, b in zip(ref, got)) / len(ref)
    kl = sum(sum(math.exp(a[t]) * (a[t] - b[t]) for t in a) for a, b in zip(ref, got)) / len(ref)
    return agree, kl


@pytest.fixture(scope="module")
def sampled(stories_dir):
    # The protocol: 64 stories of 256 tokens sampled from the float model (temperature 1,
    # from BOS), 16 to calibrate, 48 to evaluate; the float model's distributions on the latter.
    base = Engine(str(stories_dir), num_threads=2)
    stories = _sampled_stories(base, 64, seed=500)
    ref = _teacher_forced(base, stories[16:])
    assert len(ref) == 48 * 255
    return stories[:16], stories[16:], ref


# The bars (top-1 agreement at least, mean KL at most): w4a16kv16 87.5% / 0.060, w4a8kv8
# 87.0% / 0.065, w4a8kv4 86.5% / 0.070, w4a4kv4 85.5% / 0.090. Measured with GPTQ (sequential,
# layer by layer, act-order, clip-searched groups): w4a16 0.883 / 0.0568, w4a8kv8 0.885 / 0.0573,
# w4a8kv4 0.881 / 0.0599, w4a4kv4 (FMPQ, 8-bit fraction 0.4) 0.865 / 0.0789 (0.856-0.865 over six
# evaluation seeds); round to nearest: 0.860 / 0.086 for the first. FMPQ is compared with all
# activations in 4 bits (the same channel order and GPTQ): 0.844 / 0.104.
@pytest.mark.parametrize(
    "scheme, kv, min_agree, max_kl",
    [
        ("w4a16", "float32", 0.875, 0.060),
        ("w4a8", "int8", 0.870, 0.065),
        ("w4a8", "int4", 0.865, 0.070),
        ("w4a4", "int4", 0.855, 0.090),
    ],
)
def test_gptq_accuracy_on_sampled_stories(stories_dir, sampled, scheme, kv, min_agree, max_kl):
    calibration, evaluation, ref = sampled
    options = {"quantization": scheme, "quant_group_size": 32, "kv_cache_dtype": kv}
    gptq = Engine(str(stories_dir), num_threads=2, quant_calibration=calibration, **options)
    if scheme == "w4a4":
        weaker = Engine(str(stories_dir), num_threads=2, quant_calibration=calibration, quant_a8_fraction=0.0, **options)
    else:
        weaker = Engine(str(stories_dir), num_threads=2, **options)  # round to nearest
    g_agree, g_kl = _agreement_and_kl(ref, _teacher_forced(gptq, evaluation))
    w_agree, w_kl = _agreement_and_kl(ref, _teacher_forced(weaker, evaluation))
    assert g_agree >= min_agree and g_kl <= max_kl, (g_agree, g_kl)
    assert g_agree > w_agree and g_kl < w_kl, ((g_agree, g_kl), (w_agree, w_kl))


# 8-bit KV alone: the bar for any 8-bit scheme alone is 98% (measured 0.998 / 1.1e-5).
# 4-bit KV alone, keys per channel over each 16-token block: 0.976 / 0.0024 (the float
# simulation: 97%).
@pytest.mark.parametrize("kv, min_agree, max_kl", [("int8", 0.98, 0.001), ("int4", 0.965, 0.005)])
def test_kv_cache_accuracy_on_sampled_stories(stories_dir, sampled, kv, min_agree, max_kl):
    _, evaluation, ref = sampled
    agree, kl = _agreement_and_kl(ref, _teacher_forced(Engine(str(stories_dir), num_threads=2, kv_cache_dtype=kv), evaluation))
    assert agree >= min_agree and kl <= max_kl, (agree, kl)


def _hf_teacher_forced(hf, stories, vocab):
    import torch

    out = []
    with torch.no_grad():
        for story in stories:
            logits = hf(torch.tensor([story])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).tolist()
            out += [dict(zip(range(vocab), row)) for row in lp]
    return out


def test_8_bit_weights_or_activations_alone_pass_98_percent(sampled, hf_stories):
    # The "8-bit anything alone >= 98%", for the two 8-bit schemes the engine has no mode
    # for, simulated on transformers' float model (which agrees with the engine's, below): weights
    # to 8 bits per output channel (symmetric), or every linear's input to 8 bits per token.
    # Measured (16 of the 48 stories): w8 0.989 / 0.0006, a8 0.981 / 0.0010.
    import torch

    _, evaluation, ref = sampled
    vocab = len(ref[0])
    evaluation, ref = evaluation[:16], ref[: 16 * 255]

    def q8(x, dim):
        step = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-12) / 127
        return (x / step).round().clamp(-127, 127) * step

    linears = [m for m in hf_stories.modules() if isinstance(m, torch.nn.Linear)]
    saved = [m.weight.data.clone() for m in linears]
    try:
        for m in linears:
            m.weight.data = q8(m.weight.data, 1)
        w_agree, w_kl = _agreement_and_kl(ref, _hf_teacher_forced(hf_stories, evaluation, vocab))
    finally:
        for m, w in zip(linears, saved):
            m.weight.data = w
    hooks = [m.register_forward_pre_hook(lambda mod, args: (q8(args[0], -1),)) for m in linears]
    try:
        a_agree, a_kl = _agreement_and_kl(ref, _hf_teacher_forced(hf_stories, evaluation, vocab))
    finally:
        for h in hooks:
            h.remove()
    assert w_agree >= 0.98 and a_agree >= 0.98, ((w_agree, w_kl), (a_agree, a_kl))


def test_keys_per_token_in_4_bits_fail_the_bars(stories_dir, sampled, hf_stories, monkeypatch):
    # Why keys are quantized per channel: the same metrics on transformers' float model agree with
    # the engine's, and with its keys quantized per token and head in 4 bits after RoPE (asymmetric
    # min/max) fall below every 4-bit KV bar (the issue measured 74%).
    from transformers.models.llama import modeling_llama

    _, evaluation, ref = sampled
    vocab = len(ref[0])
    evaluation = evaluation[:16]
    ref = ref[: 16 * 255]
    agree, kl = _agreement_and_kl(ref, _hf_teacher_forced(hf_stories, evaluation, vocab))
    assert agree >= 0.999 and kl < 1e-6, (agree, kl)

    rope = modeling_llama.apply_rotary_pos_emb

    def rope_then_quantize_keys(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        lo, hi = k.amin(dim=-1, keepdim=True), k.amax(dim=-1, keepdim=True)
        step = (hi - lo).clamp_min(1e-8) / 15
        return q, ((k - lo) / step).round().clamp(0, 15) * step + lo

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rope_then_quantize_keys)
    agree, kl = _agreement_and_kl(ref, _hf_teacher_forced(hf_stories, evaluation, vocab))
    assert agree < 0.855 and kl > 0.09, (agree, kl)


def test_bad_calibration_is_refused(stories_dir):
    vocab = Engine(str(stories_dir)).model_info.vocab_size
    with pytest.raises(ValueError, match="quant_calibration sequence 1"):
        Engine(str(stories_dir), quant_calibration=[[1, 2, 3], [1, vocab]], **QUANT)
    with pytest.raises(ValueError, match="prompt"):
        Engine(str(stories_dir), quant_calibration=[[1, "x"]], **QUANT)
    with pytest.raises(ValueError, match="quantization is 'none'"):
        Engine(str(stories_dir), quant_calibration=[[1, 2, 3]])


def test_bad_quantization_options(stories_dir):
    with pytest.raises(ValueError, match="quantization must be"):
        Engine(str(stories_dir), quantization="w3a8")
    with pytest.raises(ValueError, match="quant_a8_fraction"):
        Engine(str(stories_dir), quantization="w4a4", quant_calibration=[[1, 2, 3]], quant_a8_fraction=1.5)
    with pytest.raises(ValueError, match="quant_group_size"):
        Engine(str(stories_dir), quantization="w4a8", quant_group_size=48)
