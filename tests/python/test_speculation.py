"""Lookahead speculation is lossless: with speculation="lookahead" every request produces exactly
the token ids, log-probabilities, prompt log-probabilities and finish reasons it produces with
speculation off (float32 CPU), whatever the batching, preemption, prefix caching, token budget,
stop tokens, max_tokens or speculation options.

Per-request counters: every step that samples for a request appends the sampled root token plus
the draft tokens it accepted (Engine::Impl::process: `accepted = appended - 1`, so a stop inside an
accepted draft path counts only the tokens kept), and a step that samples nothing appends nothing.
Hence, for every finished request, len(token_ids) == num_steps + num_accepted_draft_tokens exactly,
with 0 <= num_accepted_draft_tokens <= num_draft_tokens (and no drafts with speculation off).
"""

from __future__ import annotations

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams

# The fixed policy drafts whenever the trie has something: it exercises verification hardest.
SPEC = {"speculation": "lookahead", "spec_policy": "fixed"}


def _run(model, prompts, params, **options):
    engine = Engine(str(model), num_threads=2, **options)
    outs = engine.generate(prompts, params)
    tu.assert_idle(engine)
    return outs, engine


def _assert_same(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        where = f"{what}: request {i}"
        assert g.token_ids == w.token_ids, where
        assert g.finish_reason == w.finish_reason, where
        assert g.logprobs == w.logprobs, where  # exact floats
        assert g.prompt_logprobs == w.prompt_logprobs, where


def _check_counters(outs, spec, what):
    for i, o in enumerate(outs):
        where = f"{what}: request {i}"
        assert o.finished and o.finish_reason in ("stop", "length"), where
        assert len(o.token_ids) == o.num_steps + o.num_accepted_draft_tokens, (
            f"{where}: {len(o.token_ids)} tokens, {o.num_steps} steps, {o.num_accepted_draft_tokens} accepted"
        )
        assert 0 <= o.num_accepted_draft_tokens <= o.num_draft_tokens, where
        if not spec:
            assert o.num_draft_tokens == 0, where


def _compare(model, prompts, params, what, spec_options=None, **options):
    """Runs the workload with speculation off and on (same engine options); returns both."""
    ref, ref_engine = _run(model, prompts, params, **options)
    got, engine = _run(model, prompts, params, **options, **{**SPEC, **(spec_options or {})})
    _assert_same(got, ref, what)
    _check_counters(ref, False, what + " (off)")
    _check_counters(got, True, what)
    return ref, got, ref_engine, engine


# ---------------------------------------------------------------------------------------------
# stories260K


@pytest.fixture(scope="module")
def stories_workload(golden):
    """Nine prompts with mixed sampling: the 256-token goldens (greedy), seeded temperature /
    top-k / top-p sampling, log-probabilities, tiny max_tokens, stop tokens."""
    g256 = golden["max_new_tokens_256"]
    prompts = [e["prompt"] for e in g256] + [
        "Lily and Ben went to the park. Lily and Ben",
        "Once upon a time, there was a little girl named Lily. She liked to play",
        "The little dog was sad because",
        "Tom had a big red ball",
        "Once upon a time",
        "Lily and Ben went to the park",
        "The sun was hot",
    ]
    params = [SamplingParams(max_tokens=256, temperature=0.0) for _ in g256] + [
        SamplingParams(max_tokens=120, temperature=0.8, seed=7, logprobs=2),
        SamplingParams(max_tokens=100, temperature=1.0, top_k=5, seed=8),
        SamplingParams(max_tokens=100, temperature=0.9, top_p=0.9, seed=9, logprobs=3),
        SamplingParams(max_tokens=90, temperature=0.7, top_k=20, top_p=0.8, seed=10),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=2, temperature=0.0, logprobs=1),
        SamplingParams(max_tokens=80, temperature=0.0, logprobs=2, prompt_logprobs=2),
    ]
    return prompts, params


def test_goldens_greedy_with_acceptance(stories_dir, golden):
    g256 = golden["max_new_tokens_256"]
    params = SamplingParams(max_tokens=256, temperature=0.0, logprobs=3)
    ref, got, _, _ = _compare(stories_dir, [e["prompt"] for e in g256], params, "goldens")
    for entry, out in zip(g256, got):
        assert out.token_ids == entry["new_ids"]
    lily = got[[e["prompt"] for e in g256].index("Lily and Ben went to the park")]
    assert lily.num_accepted_draft_tokens > 0  # the repetitive story really exercises acceptance
    assert sum(o.num_steps for o in got) < sum(o.num_steps for o in ref)


def test_batched_mixed_sampling(stories_dir, stories_workload):
    prompts, params = stories_workload
    ref, got, _, engine = _compare(stories_dir, prompts, params, "batched")
    assert sum(o.num_accepted_draft_tokens for o in got) > 0
    assert sum(o.num_accepted_draft_tokens for o in got[3:7]) > 0  # sampled requests accept drafts too
    assert [len(o.token_ids) for o in got[7:9]] == [1, 2]
    assert engine.stats()["num_steps"] < _run(stories_dir, prompts, params)[1].stats()["num_steps"]


def test_preemption(stories_dir, stories_workload):
    prompts, params = stories_workload
    _, got, ref_engine, engine = _compare(
        stories_dir, prompts, params, "tiny pool", block_size=4, num_kv_blocks=90
    )
    assert engine.stats()["num_preemptions"] > 0
    assert ref_engine.stats()["num_preemptions"] > 0
    assert sum(o.metrics["num_preemptions"] for o in got) > 0
    assert sum(o.num_accepted_draft_tokens for o in got) > 0


def test_prefix_caching(stories_dir, stories_workload, golden):
    prompts, params = stories_workload
    # Prompts sharing long prefixes with each other, and (second round) with the first round.
    story = golden["max_new_tokens_256"][1]["full_text"][:300]
    prompts = prompts + [story, story + " Then", story[:200]]
    params = params + [SamplingParams(max_tokens=60, temperature=0.0)] * 2 + [SamplingParams(max_tokens=60, seed=3)]
    opts = dict(enable_prefix_caching=True, block_size=8)
    ref, ref_engine = _run(stories_dir, prompts, params, **opts)
    engine = Engine(str(stories_dir), num_threads=2, **opts, **SPEC)
    for round_ in range(2):
        got = engine.generate(prompts, params)
        _assert_same(got, ref, f"prefix caching, round {round_}")
        _check_counters(got, True, f"prefix caching, round {round_}")
    assert engine.stats()["prefix_cache_hit_tokens"] > 0
    assert sum(o.num_accepted_draft_tokens for o in got) > 0
    tu.assert_idle(engine)


def test_small_token_budget(stories_dir, stories_workload):
    prompts, params = stories_workload
    prompts, params = prompts[1:6] + prompts[7:9], params[1:6] + params[7:9]
    _, got, _, _ = _compare(stories_dir, prompts, params, "budget 5", max_num_batched_tokens=5)
    assert sum(o.num_accepted_draft_tokens for o in got) > 0


@pytest.mark.parametrize("budget", [2, 3, 5])
def test_drafts_respect_the_token_budget(stories_dir, golden, budget):
    # A request alone: a step's tokens are its root and its draft nodes, so it can append at most
    # `budget` tokens (root + accepted); unbounded, this story accepts up to 8 at once.
    entry = golden["max_new_tokens_256"][1]
    params = SamplingParams(max_tokens=256, temperature=0.0)
    engine = Engine(str(stories_dir), num_threads=2, max_num_batched_tokens=budget, spec_max_draft=16, **SPEC)
    sizes = [len(s.new_token_ids) for s in engine.generate_stream(entry["prompt"], params)]
    assert sum(sizes) == 256
    assert max(sizes) == budget
    tu.assert_idle(engine)


@pytest.mark.parametrize("max_draft", [1, 4, 16])
@pytest.mark.parametrize("max_depth", [1, 3, 8])
def test_spec_options(stories_dir, stories_workload, max_draft, max_depth):
    prompts, params = stories_workload
    prompts, params = prompts[:7], params[:7]
    opts = dict(spec_max_draft=max_draft, spec_max_depth=max_depth)
    _, got, _, _ = _compare(stories_dir, prompts, params, f"draft {max_draft} depth {max_depth}", spec_options=opts)
    assert sum(o.num_accepted_draft_tokens for o in got) > 0
    for o in got:
        # A step accepts at most min(max_draft, max_depth) tokens: fewer steps than that allows
        # would mean a draft beyond the options.
        assert o.num_accepted_draft_tokens <= o.num_steps * min(max_draft, max_depth)


def test_spec_max_match_and_memory(stories_dir, stories_workload):
    prompts, params = stories_workload
    prompts, params = prompts[:7], params[:7]
    for opts in (dict(spec_max_match=1), dict(spec_max_match=3, spec_memory_mb=1)):
        _compare(stories_dir, prompts, params, f"options {opts}", spec_options=opts)


def _draft_chunks(stories_dir, prompt, max_tokens):
    """The per-step token chunks of a greedy request alone on a fresh speculative engine."""
    engine = Engine(str(stories_dir), num_threads=2, **SPEC)
    chunks = [so.new_token_ids for so in engine.generate_stream(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))]
    return [c for c in chunks if c]


def test_stop_inside_an_accepted_draft_path(stories_dir, golden):
    entry = golden["max_new_tokens_256"][1]
    # The prompt carries the first 100 generated tokens, so drafts (from the prompt) hold tokens
    # the output has not produced yet: a stop token can first appear inside an accepted path.
    prompt = entry["prompt_ids"] + entry["new_ids"][:100]
    chunks = _draft_chunks(stories_dir, prompt, 150)
    full = [t for c in chunks for t in c]
    assert full == entry["new_ids"][100:250]
    # (position in the output, token): an accepted draft token (not a step's first), not the step's
    # last (so accepted tokens after it must be cut), and the token's first occurrence.
    cands, pos = [], 0
    for c in chunks:
        for k in range(1, len(c) - 1):
            if full.index(c[k]) == pos + k:
                cands.append((pos + k, c[k]))
        pos += len(c)
    assert cands, "no accepted draft path holds a first occurrence"
    cands = cands[:4]
    params = [SamplingParams(max_tokens=150, temperature=0.0, stop_token_ids=[t], logprobs=1) for _, t in cands]
    ref, got, _, _ = _compare(stories_dir, [prompt] * len(cands), params, "stop in a draft")
    for (p, t), o in zip(cands, got):
        assert o.finish_reason == "stop"
        assert o.token_ids == full[: p + 1]
    # Alone, the stop really lands inside a multi-token step.
    p, t = cands[0]
    engine = Engine(str(stories_dir), num_threads=2, **SPEC)
    steps = list(engine.generate_stream(prompt, SamplingParams(max_tokens=150, temperature=0.0, stop_token_ids=[t])))
    assert steps[-1].finish_reason == "stop" and steps[-1].token_ids == full[: p + 1]
    last = [s for s in steps if s.new_token_ids][-1]
    assert len(last.new_token_ids) >= 2 and last.new_token_ids[-1] == t
    assert steps[-1].metrics["num_accepted_draft_tokens"] > 0


def test_warm_global_store_drafts_for_a_new_request(stories_dir, golden):
    prompt = "Tom had a toy car"
    params = SamplingParams(max_tokens=3, temperature=0.0)
    cold_engine = Engine(str(stories_dir), num_threads=2, **SPEC)
    cold = cold_engine.generate([prompt], params)[0]
    ids = cold_engine.encode(prompt) + cold.token_ids[:1]
    # Only the step after the first token may draft (max_tokens 3); the context then has no
    # repeated token, so nothing of the request's own can be drafted.
    assert len(set(ids)) == len(ids)
    assert cold.num_draft_tokens == 0

    engine = Engine(str(stories_dir), num_threads=2, **SPEC)
    engine.generate([e["prompt"] for e in golden["max_new_tokens_256"]], SamplingParams(max_tokens=256, temperature=0.0))
    warm = engine.generate([prompt], params)[0]
    assert warm.num_draft_tokens > 0
    _assert_same([warm], [cold], "warm store")
    _check_counters([warm], True, "warm store")
    tu.assert_idle(engine)


# ---------------------------------------------------------------------------------------------
# A random model


def _repetitive_prompts(vocab, n, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        motif = rng.integers(3, vocab, size=3 + i % 4).tolist()
        prompts.append([1] + motif * (4 + i % 3) + rng.integers(3, vocab, size=2).tolist())
    return prompts


def test_random_model(small_llama):
    vocab = tu.BASE_CONFIG["vocab_size"]
    prompts = _repetitive_prompts(vocab, 10, seed=5)
    params = []
    for i in range(len(prompts)):
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=50, temperature=0.0, logprobs=2))
        elif i % 3 == 1:
            params.append(SamplingParams(max_tokens=50, temperature=0.9, top_k=8, seed=i))
        else:
            params.append(SamplingParams(max_tokens=50, temperature=1.0, top_p=0.8, seed=i, logprobs=1))
    params[-1] = SamplingParams(max_tokens=2, temperature=0.0)
    for what, opts in (
        ("default", {}),
        ("tiny pool", dict(block_size=4, num_kv_blocks=40)),
        ("budget 5", dict(max_num_batched_tokens=5)),
        ("prefix caching", dict(enable_prefix_caching=True, block_size=4)),
    ):
        _, got, _, engine = _compare(
            small_llama, prompts, params, f"random model, {what}", spec_options=dict(spec_max_draft=12), **opts
        )
        assert sum(o.num_draft_tokens for o in got) > 0, what
        if what == "tiny pool":
            assert engine.stats()["num_preemptions"] > 0


# ---------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    "options",
    [
        dict(speculation="foo"),
        dict(speculation="lookahead", spec_max_draft=-1),
        dict(spec_max_draft=-1),
        dict(speculation="lookahead", spec_max_depth=0),
        dict(speculation="lookahead", spec_max_match=0),
        dict(speculation="lookahead", spec_memory_mb=0),
        dict(speculation="lookahead", spec_policy="greedy"),
        dict(spec_policy=""),
    ],
)
def test_bad_options_raise(stories_dir, options):
    with pytest.raises(ValueError):
        Engine(str(stories_dir), **options)


def test_speculation_off_by_default_and_with_zero_drafts(stories_dir, golden):
    entry = golden["max_new_tokens_256"][1]
    for opts in (
        {},
        dict(speculation="off"),
        dict(speculation="lookahead", spec_max_draft=0),
        dict(speculation="lookahead", spec_policy="off"),
    ):
        out, _ = _run(stories_dir, [entry["prompt"]], SamplingParams(max_tokens=256, temperature=0.0), **opts)
        assert out[0].token_ids == entry["new_ids"]
        assert out[0].num_draft_tokens == 0 and out[0].num_steps == 256


# ---------------------------------------------------------------------------------------------
# SmartSpec (spec_policy="smartspec", the default): it only decides how many draft nodes each
# request gets, so every output is still exactly plain decoding's.


def test_smartspec_is_lossless_batched_with_sampling(stories_dir, stories_workload):
    prompts, params = stories_workload
    _, got, _, engine = _compare(stories_dir, prompts, params, "smartspec", spec_options={"spec_policy": "smartspec"})
    stats = engine.stats()
    assert stats["spec_policy"] == "smartspec"
    assert stats["num_draft_tokens"] == sum(o.num_draft_tokens for o in got)
    assert stats["num_accepted_draft_tokens"] == sum(o.num_accepted_draft_tokens for o in got)


def test_smartspec_lossless_with_preemption_and_prefix_caching(stories_dir, stories_workload):
    prompts, params = stories_workload
    for options in (dict(num_kv_blocks=40), dict(enable_prefix_caching=True, max_num_batched_tokens=7)):
        _compare(stories_dir, prompts + prompts[:3], params + params[:3], f"smartspec {options}",
                 spec_options={"spec_policy": "smartspec"}, **options)


def test_smartspec_stats(stories_dir):
    engine = Engine(str(stories_dir), num_threads=2, speculation="lookahead", spec_max_depth=5)
    stats = engine.stats()
    # Seeded by the start-up profile: a fixed cost per step and a cost per token, all >= 0.
    coef = stats["step_time_coefficients"]
    assert len(coef) == 5 and all(c >= 0 for c in coef)
    assert coef[0] + coef[1] > 0
    assert stats["spec_policy"] == "smartspec"
    assert len(stats["spec_acceptance"]) == 5 and all(0 <= a <= 1 for a in stats["spec_acceptance"])
    # The calibration starts as the identity at the ranges' centres.
    assert stats["spec_calibration"] == pytest.approx([0.05 + 0.1 * b for b in range(10)], abs=1e-6)
    engine.generate(["Once upon a time"] * 3, SamplingParams(max_tokens=64, temperature=0.0))
    stats = engine.stats()
    assert 0 <= stats["last_step_drafted_seqs"] <= 3
    assert 0 <= stats["last_step_draft_tokens"] <= 3 * 8
    assert 0 <= stats["num_accepted_draft_tokens"] <= stats["num_draft_tokens"]
    # Lookups are timed apart from the fitted model. Whether any is made depends on the measured
    # step times (none where no draft could pay); drafts come only from lookups, so with drafts
    # their cost has been measured.
    assert 0 <= stats["spec_lookup_cost_s"] < 0.1
    if stats["num_draft_tokens"] > 0:
        assert stats["spec_lookup_cost_s"] > 0
    # Learned from the verifications, and never decreasing.
    cal = stats["spec_calibration"]
    assert len(cal) == 10 and all(0 <= c <= 1 for c in cal) and cal == sorted(cal)
    # Greedy and sampled requests' statistics are learned apart: these greedy requests left the
    # sampled ones at their prior.
    assert stats["spec_acceptance_sampled"] == pytest.approx([0.5] * 5)
    assert stats["spec_calibration_sampled"] == pytest.approx([0.05 + 0.1 * b for b in range(10)], abs=1e-6)
    if stats["num_draft_tokens"] > 0:
        assert stats["spec_acceptance"] != pytest.approx([0.5] * 5)
    # The goodput guard's measurements, per range of sequences in a step (1, 2-3, 4-7, ...): it
    # measures steps of 4 or more sequences only, each step on the side (drafted or not) it went.
    plain, drafted = stats["spec_guard_plain_tok_s"], stats["spec_guard_drafted_tok_s"]
    assert len(plain) == len(drafted) == 8 and all(v >= 0 for v in plain + drafted)
    assert plain[:2] == [0, 0] and drafted[:2] == [0, 0] and plain[2] + drafted[2] == 0
    engine.generate(["Once upon a time"] * 6, SamplingParams(max_tokens=64, temperature=0.0))
    stats = engine.stats()
    assert stats["spec_guard_plain_tok_s"][2] + stats["spec_guard_drafted_tok_s"][2] > 0
    fixed = Engine(str(stories_dir), speculation="lookahead", spec_policy="fixed").stats()
    assert fixed["spec_policy"] == "fixed"
    assert Engine(str(stories_dir)).stats()["spec_policy"] == ""
    assert Engine(str(stories_dir), speculation="lookahead", spec_policy="off").stats()["spec_policy"] == "off"
