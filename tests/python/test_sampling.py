"""Seeded sampling: reproducibility, degenerate settings that must equal greedy, and the sampled
distribution itself against transformers' logits and logits warpers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import accel_testutil as tu
from accelcore import Engine, SamplingParams

N_DRAWS = 4000


def _sp(**kw):
    base = dict(max_tokens=32, temperature=1.0)
    base.update(kw)
    return SamplingParams(**base)


def test_same_seed_same_tokens(stories_engine, stories_dir):
    p = _sp(seed=1234)
    a = stories_engine.generate(["Once upon a time"], p)[0].token_ids
    b = stories_engine.generate(["Once upon a time"], p)[0].token_ids
    c = Engine(str(stories_dir), num_threads=1, seed=99).generate(["Once upon a time"], p)[0].token_ids
    # Inside a batch of other work, at a different position.
    d = stories_engine.generate(
        ["Tom and", "Once upon a time", "She saw a"], [_sp(seed=1), p, _sp(seed=2, max_tokens=5)]
    )[1].token_ids
    assert len(a) == 32
    assert a == b == c == d
    tu.assert_idle(stories_engine)


def test_different_seeds_differ(stories_engine):
    outs = stories_engine.generate(["Once upon a time"] * 8, [_sp(seed=s) for s in range(8)])
    seqs = {tuple(o.token_ids) for o in outs}
    assert all(len(o.token_ids) == 32 for o in outs)
    assert len(seqs) >= 7, seqs


def test_unseeded_requests_follow_engine_seed(stories_dir):
    prompts = ["Once upon a time"] * 4
    p = _sp(max_tokens=24)
    a = [o.token_ids for o in Engine(str(stories_dir), num_threads=1, seed=5).generate(prompts, p)]
    b = [o.token_ids for o in Engine(str(stories_dir), num_threads=2, seed=5).generate(prompts, p)]
    c = [o.token_ids for o in Engine(str(stories_dir), num_threads=1, seed=6).generate(prompts, p)]
    assert a == b  # the same engine seed reproduces everything
    assert len({tuple(x) for x in a}) >= 3  # requests get distinct streams
    assert a != c


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_is_greedy(stories_engine, golden, temperature):
    entries = golden["max_new_tokens_64"]
    params = [_sp(max_tokens=64, temperature=temperature, top_k=1, seed=s) for s in range(3)]
    outs = stories_engine.generate([e["prompt"] for e in entries], params)
    for out, e in zip(outs, entries):
        assert out.token_ids == e["new_ids"]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_tiny_top_p_is_greedy(stories_engine, golden, temperature):
    entries = golden["max_new_tokens_64"]
    params = [_sp(max_tokens=64, temperature=temperature, top_p=1e-6, seed=s) for s in range(3)]
    outs = stories_engine.generate([e["prompt"] for e in entries], params)
    for out, e in zip(outs, entries):
        assert out.token_ids == e["new_ids"]


def _reference_probs(hf_stories, ids, temperature=1.0, top_k=None, top_p=None):
    """The distribution to sample from, built with transformers' own logits warpers."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.tensor(tu.hf_logits(hf_stories, ids)[-1:], dtype=torch.float32)
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores.to(torch.float64), dim=-1)[0].numpy()


def _draw(engine, prompt, n, max_tokens=1, **kw):
    params = [SamplingParams(max_tokens=max_tokens, seed=10_000 + s, **kw) for s in range(n)]
    outs = engine.generate([prompt] * n, params)
    return [o.token_ids for o in outs]


@pytest.mark.parametrize(
    "prompt, options",
    [
        ("She saw a", dict(temperature=1.0)),
        ("The little dog was sad because", dict(temperature=1.5)),
        ("One day, a", dict(temperature=0.8, top_k=6)),
        ("She saw a", dict(temperature=1.0, top_p=0.5)),
        ("Tom and", dict(temperature=1.2, top_k=20, top_p=0.8)),
    ],
)
def test_first_token_distribution(stories_engine, hf_stories, prompt, options):
    ids = stories_engine.encode(prompt)
    draws = _draw(stories_engine, prompt, N_DRAWS, **options)
    counts = Counter(t[0] for t in draws)
    probs = _reference_probs(hf_stories, ids, options["temperature"], options.get("top_k"), options.get("top_p"))
    # Nothing outside the support of the processed distribution.
    outside = {t: c for t, c in counts.items() if probs[t] == 0.0}
    assert not outside, f"sampled tokens the warpers remove: {outside}"
    stat, df = tu.chi_square(counts, probs)
    assert stat < tu.chi_square_bound(df), (stat, df)
    # Sensitivity: the same draws must reject a plausible wrong distribution.
    wrong = _reference_probs(hf_stories, ids, options["temperature"] * 1.5)
    wstat, wdf = tu.chi_square(counts, wrong)
    assert wstat > 3 * tu.chi_square_bound(wdf), (wstat, wdf)
    tu.assert_idle(stories_engine)


def test_second_token_distribution_given_first(stories_engine, hf_stories):
    """Later positions draw fresh, independent numbers: the second token's conditional frequencies
    (given the most common first token) follow transformers' next-token distribution."""
    prompt = "Lily and Ben went to the park"
    ids = stories_engine.encode(prompt)
    draws = _draw(stories_engine, prompt, N_DRAWS, max_tokens=2, temperature=1.5)
    first, n_first = Counter(t[0] for t in draws).most_common(1)[0]
    assert n_first > 1000
    counts = Counter(t[1] for t in draws if t[0] == first)
    probs = _reference_probs(hf_stories, ids + [first], 1.5)
    stat, df = tu.chi_square(counts, probs)
    assert stat < tu.chi_square_bound(df), (stat, df)
    tu.assert_idle(stories_engine)


def test_sampled_logprobs_are_raw_model_logprobs(stories_engine, hf_stories):
    """logprobs report the model's log_softmax (not the tempered/truncated one) for sampled tokens."""
    prompt = "Tom and"
    out = stories_engine.generate([prompt], _sp(max_tokens=10, temperature=1.7, top_k=30, seed=3, logprobs=4))[0]
    ids = out.prompt_token_ids + out.token_ids
    ref = tu.hf_logprobs(hf_stories, ids)
    n = len(out.prompt_token_ids)
    for j, tok in enumerate(out.token_ids):
        tu.check_logprob_dict(out.logprobs[j], ref[n - 1 + j], 4, tok)
        assert np.sort(ref[n - 1 + j])[::-1][29] <= ref[n - 1 + j][tok] + 1e-6  # within the top 30


def test_logprobs_zero_returns_only_taken_token(stories_engine, golden):
    e = golden["max_new_tokens_64"][0]
    out = stories_engine.generate([e["prompt"]], _sp(max_tokens=8, temperature=0.0, logprobs=0, prompt_logprobs=0))[0]
    assert out.token_ids == e["new_ids"][:8]
    assert [list(d) for d in out.logprobs] == [[t] for t in e["new_ids"][:8]]
    assert [list(d) for d in out.prompt_logprobs[1:]] == [[t] for t in e["prompt_ids"][1:]]
