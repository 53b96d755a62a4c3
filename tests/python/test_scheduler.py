"""Continuous batching: the scheduler may batch, chunk, preempt and share cached prefixes, and none
of it may change what a request produces.

The reference for every request is that request run alone on a default engine (and, for the
stories260K golden prompts, reference_outputs.json): token ids, log-probabilities, prompt
log-probabilities and finish reasons must be bit-identical however the requests are scheduled.
"""

from __future__ import annotations

import queue
import random
import threading
import time

import numpy as np
import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams

METRIC_KEYS = {
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "num_cached_tokens",
    "num_preemptions",
    "num_steps",
    "num_draft_tokens",
    "num_accepted_draft_tokens",
}
PREFIX_LEN = 40
MAX_TOKENS = (24, 17, 30, 9, 1, 20, 28, 12)


# ---------------------------------------------------------------------------------------------
# Workloads and references


def _params(i: int, max_tokens: int) -> SamplingParams:
    """Four kinds in turn: greedy, seeded top-k/top-p sampling, and each with prompt logprobs."""
    kind = i % 4
    if kind == 0:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2)
    if kind == 1:
        return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=40, top_p=0.9, seed=500 + i, logprobs=1)
    if kind == 2:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=2)
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.8, seed=900 + i, logprobs=0, prompt_logprobs=1)


def _workload(vocab: int, golden=None):
    """[(prompt ids, params)]: prompts sharing a 40-token prefix (one repeated exactly), unrelated
    prompts, and (stories260K) the golden prompts with their greedy 64-token continuations."""
    rng = np.random.default_rng(31)
    prefix = [1] + rng.integers(3, vocab, size=PREFIX_LEN - 1).tolist()
    prompts = [prefix + rng.integers(3, vocab, size=k).tolist() for k in (1, 6, 9, 24)]
    prompts.append(list(prompts[1]))  # an exact repeat: a hit on every full block but the last
    prompts += tu.random_prompts(vocab, (3, 13, 33), seed=8)
    reqs = [(p, _params(i, MAX_TOKENS[i])) for i, p in enumerate(prompts)]
    if golden is not None:
        for e in golden["max_new_tokens_64"]:
            reqs.append((e["prompt_ids"], SamplingParams(max_tokens=64, temperature=0.0)))
    return reqs


def _new_result():
    return dict(tokens=[], logprobs=[], prompt_logprobs=None, prompt_logprobs_outputs=0, finished=False,
                finish_reason=None, metrics=None, error=None, num_outputs=0)


def _record(res, out) -> None:
    """Adds one low-level (C++) output to a request's result; checks the output protocol."""
    assert not res["finished"], f"request {out.request_id}: output after its finished output"
    res["num_outputs"] += 1
    res["tokens"].extend(out.new_token_ids)
    assert len(out.new_logprobs) in (0, len(out.new_token_ids))
    res["logprobs"].extend(dict(lp) for lp in out.new_logprobs)
    if out.prompt_logprobs is not None:
        res["prompt_logprobs_outputs"] += 1
        res["prompt_logprobs"] = [dict(lp) for lp in out.prompt_logprobs]
    if out.finished:
        assert out.finish_reason in ("stop", "length", "abort", "error"), out.finish_reason
        res["finished"] = True
        res["finish_reason"] = out.finish_reason
        res["error"] = out.error
        m = out.metrics
        res["metrics"] = {k: getattr(m, k) for k in METRIC_KEYS}
    else:
        assert out.finish_reason is None and out.new_token_ids, "an unfinished output carries tokens"


def _check_stats_invariants(engine, max_num_seqs=None) -> None:
    s = engine.stats()
    assert 0 <= s["num_free_blocks"] <= s["num_total_blocks"], s
    assert s["num_cached_blocks"] <= s["num_total_blocks"], s
    assert s["prefix_cache_hit_tokens"] <= s["prefix_cache_query_tokens"], s
    if max_num_seqs is not None:
        assert s["num_running"] <= max_num_seqs, s


def drive(engine, reqs, add_at=None, max_num_seqs=None, max_steps=50_000):
    """Runs `reqs` through the low-level loop; request i is added before step add_at[i] (all
    before the first step by default). Returns one result dict per request, in order."""
    n = len(reqs)
    add_at = list(add_at) if add_at is not None else [0] * n
    order = sorted(range(n), key=lambda i: add_at[i])
    results = [None] * n
    index_of = {}
    k = step = 0
    while k < n or engine.has_unfinished_requests():
        while k < n and add_at[order[k]] <= step:
            i = order[k]
            rid = engine.add_request(*reqs[i])
            assert rid not in index_of
            index_of[rid] = i
            results[i] = _new_result()
            k += 1
        for out in engine.step():
            _record(results[index_of[out.request_id]], out)
        _check_stats_invariants(engine, max_num_seqs)
        step += 1
        assert step < max_steps, "the engine did not drain"
    assert all(r["finished"] for r in results)
    return results


def assert_same(got, ref, label) -> None:
    assert got["finish_reason"] == ref["finish_reason"], label
    assert got["tokens"] == ref["tokens"], label
    assert got["logprobs"] == ref["logprobs"], label  # bit-identical, not merely close
    assert got["prompt_logprobs_outputs"] == ref["prompt_logprobs_outputs"], f"{label}: prompt logprobs sent once"
    assert got["prompt_logprobs"] == ref["prompt_logprobs"], label
    assert got["error"] == "", label


MODELS = ("stories", "random")


@pytest.fixture(scope="module")
def model_dirs(stories_dir, small_llama):
    return {"stories": str(stories_dir), "random": str(small_llama)}


@pytest.fixture(scope="module")
def workloads(golden):
    return {"stories": _workload(512, golden), "random": _workload(384)}


@pytest.fixture(scope="module")
def solo(model_dirs, workloads, golden):
    """model -> each request of the workload run alone on a default engine."""
    out = {}
    for name in MODELS:
        engine = Engine(model_dirs[name], num_threads=2)
        out[name] = [drive(engine, [r])[0] for r in workloads[name]]
        tu.assert_idle(engine)
    # The independent check of the solo runs themselves: the goldens.
    gold = golden["max_new_tokens_64"]
    for res, e in zip(out["stories"][-len(gold):], gold):
        assert res["tokens"] == e["new_ids"]
    for res, (prompt, sp) in zip(out["random"], workloads["random"]):
        assert res["finish_reason"] == "length" and len(res["tokens"]) == sp.max_tokens  # no EOS
    for name in MODELS:
        for res, (prompt, sp) in zip(out[name], workloads[name]):
            if sp.prompt_logprobs is None:
                assert res["prompt_logprobs_outputs"] == 0 and res["prompt_logprobs"] is None
            else:  # sent once, one entry per prompt token (the first empty)
                assert res["prompt_logprobs_outputs"] == 1 and len(res["prompt_logprobs"]) == len(prompt)
                assert res["prompt_logprobs"][0] == {} and all(res["prompt_logprobs"][1:])
    # Sampled requests must not be greedy in disguise.
    for name in MODELS:
        sampled = [i for i, (_, sp) in enumerate(workloads[name]) if sp.temperature > 0 and sp.max_tokens > 5]
        greedy_like = 0
        for i in sampled:
            p, sp = workloads[name][i]
            g = drive(Engine(model_dirs[name], num_threads=2),
                      [(p, SamplingParams(max_tokens=sp.max_tokens, temperature=0.0))])[0]
            greedy_like += g["tokens"] == out[name][i]["tokens"]
        assert greedy_like < len(sampled)
    return out


# Per model: block size, the tiny pool (the largest request needs 6 blocks of 16, 24 of 4: at most
# one or two requests fit at a time, so preemption is certain with several decoding at once).
MODEL_OPTIONS = {
    "stories": dict(block_size=16, tiny_pool=7),
    "random": dict(block_size=4, tiny_pool=26),
}


def _engine(model_dirs, name, pool, chunk, caching, **extra):
    mo = MODEL_OPTIONS[name]
    options = dict(num_threads=2, block_size=mo["block_size"], enable_prefix_caching=caching, **extra)
    if pool == "tiny":
        options["num_kv_blocks"] = mo["tiny_pool"]
    if chunk is not None:
        options["max_num_batched_tokens"] = chunk
    return Engine(model_dirs[name], **options)


# ---------------------------------------------------------------------------------------------
# 1. Same outputs however the requests are batched, chunked, preempted and cached


@pytest.mark.parametrize("caching", [False, True], ids=["nocache", "prefixcache"])
@pytest.mark.parametrize("pool", ["default", "tiny"])
@pytest.mark.parametrize("chunk", [1, 3, 16, 64, None], ids=lambda c: f"chunk{c or 'default'}")
@pytest.mark.parametrize("name", MODELS)
def test_batched_equals_solo(model_dirs, workloads, solo, name, chunk, pool, caching):
    engine = _engine(model_dirs, name, pool, chunk, caching)
    reqs = workloads[name]
    bs = MODEL_OPTIONS[name]["block_size"]
    # Two waves on the same engine: the second finds the first's blocks in the prefix cache.
    waves = [drive(engine, reqs), drive(engine, reqs)]
    for w, results in enumerate(waves):
        for i, (res, ref) in enumerate(zip(results, solo[name])):
            label = f"wave {w} request {i}"
            assert_same(res, ref, label)
            m = res["metrics"]
            assert set(m) == METRIC_KEYS
            assert 0 < m["ttft_s"] <= m["e2e_s"], label
            assert (m["tpot_s"] == 0) == (len(res["tokens"]) < 2), label
            assert m["num_cached_tokens"] % bs == 0 and m["num_cached_tokens"] <= len(reqs[i][0]) - 1, label
            if not caching or reqs[i][1].prompt_logprobs is not None:
                assert m["num_cached_tokens"] == 0, label  # prompt logprobs need every prompt row
    s = engine.stats()
    tu.assert_idle(engine)
    if pool == "tiny" and chunk != 1:  # with a 1-token budget only one request ever runs
        assert s["num_preemptions"] > 0
        assert any(r["metrics"]["num_preemptions"] > 0 for results in waves for r in results)
    if pool == "default":
        assert s["num_preemptions"] == 0
        assert all(r["metrics"]["num_preemptions"] == 0 for results in waves for r in results)
    if not caching:
        assert s["prefix_cache_hit_tokens"] == 0 and s["num_cached_blocks"] == 0
    else:
        assert s["prefix_cache_query_tokens"] >= sum(len(p) for p, _ in reqs)
        assert s["num_cached_blocks"] > 0
        # (A tiny pool may evict the shared blocks before any reuse: hits are not guaranteed there.)
        if pool == "default":
            assert s["prefix_cache_hit_tokens"] > 0
            # Nothing was evicted: in wave 2 every request that may use the cache finds all of
            # its full prompt blocks but the one holding its last token.
            for i, ((p, sp), res) in enumerate(zip(reqs, waves[1])):
                want = 0 if sp.prompt_logprobs is not None else (len(p) - 1) // bs * bs
                assert res["metrics"]["num_cached_tokens"] == want, f"request {i}"


def test_max_num_seqs_limits_running(model_dirs, workloads, solo):
    engine = Engine(model_dirs["stories"], num_threads=2, max_num_seqs=2, enable_prefix_caching=True)
    results = drive(engine, workloads["stories"], max_num_seqs=2)
    for i, (res, ref) in enumerate(zip(results, solo["stories"])):
        assert_same(res, ref, f"request {i}")
    tu.assert_idle(engine)


def test_shared_prefix_hits(model_dirs, workloads, solo):
    """A 40-token shared prefix: later requests reuse its two full 16-token blocks."""
    reqs = [(p, SamplingParams(max_tokens=8, temperature=0.0, logprobs=1)) for p, _ in workloads["stories"][:4]]
    assert all(p[:PREFIX_LEN] == reqs[0][0][:PREFIX_LEN] for p, _ in reqs)
    ref_engine = Engine(model_dirs["stories"], num_threads=2)
    ref = [drive(ref_engine, [r])[0] for r in reqs]
    engine = Engine(model_dirs["stories"], num_threads=2, enable_prefix_caching=True)
    first = drive(engine, reqs[:1])[0]
    assert first["metrics"]["num_cached_tokens"] == 0  # nothing cached yet
    rest = drive(engine, reqs[1:])  # all admitted in one step, after the first one finished
    for res, r in zip([first] + rest, ref):
        assert_same(res, r, "shared prefix")
    for res in rest:
        assert res["metrics"]["num_cached_tokens"] == 32  # tokens 0-31; block 2 holds suffix tokens
    s = engine.stats()
    assert s["prefix_cache_hit_tokens"] == 3 * 32
    assert s["prefix_cache_query_tokens"] == sum(len(p) for p, _ in reqs)
    assert s["num_cached_blocks"] >= 2
    tu.assert_idle(engine)


def test_prompt_of_exact_blocks_recomputes_last_block(model_dirs):
    """A prompt of exactly 3 blocks seen before: 2 blocks are reused, the last is recomputed (its
    final row gives the next token's logits)."""
    prompt = tu.random_prompts(512, (48,), seed=3)[0]
    sp = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3)
    ref = drive(Engine(model_dirs["stories"], num_threads=2), [(prompt, sp)])[0]
    engine = Engine(model_dirs["stories"], num_threads=2, enable_prefix_caching=True)
    a, b = drive(engine, [(prompt, sp)])[0], drive(engine, [(prompt, sp)])[0]
    assert_same(a, ref, "first")
    assert_same(b, ref, "repeat")
    assert (a["metrics"]["num_cached_tokens"], b["metrics"]["num_cached_tokens"]) == (0, 32)
    tu.assert_idle(engine)


def test_prompt_logprobs_with_preemption_mid_prompt(model_dirs):
    """Prompt log-probabilities of requests preempted while their prompt is still being prefilled
    (small chunks, tiny pool) are returned once and equal the solo ones."""
    prompts = tu.random_prompts(512, (40, 35, 50, 30), seed=5)
    sp = SamplingParams(max_tokens=30, temperature=0.0, prompt_logprobs=2, logprobs=1)
    ref_engine = Engine(model_dirs["stories"], num_threads=2)
    ref = [drive(ref_engine, [(p, sp)])[0] for p in prompts]
    for chunk in (3, 16, 64):
        engine = Engine(model_dirs["stories"], num_threads=2, num_kv_blocks=6, max_num_batched_tokens=chunk,
                        enable_prefix_caching=True)
        results = drive(engine, [(p, sp) for p in prompts])
        for i, (res, r) in enumerate(zip(results, ref)):
            assert_same(res, r, f"chunk {chunk} request {i}")
            assert len(res["prompt_logprobs"]) == len(prompts[i])
        assert engine.stats()["num_preemptions"] > 0
        tu.assert_idle(engine)


# ---------------------------------------------------------------------------------------------
# 2. Requests arriving at different times


@pytest.mark.parametrize(
    "name,pool,chunk,caching,seed",
    [
        ("stories", "default", None, False, 1),
        ("stories", "tiny", 16, True, 2),
        ("stories", "tiny", 3, True, 3),
        ("random", "tiny", 64, True, 4),
        ("random", "default", 5, True, 5),
    ],
)
def test_staggered_arrivals(model_dirs, workloads, solo, name, pool, chunk, caching, seed):
    rng = random.Random(seed)
    reqs = workloads[name]
    add_at = [rng.randrange(0, 60) for _ in reqs]
    engine = _engine(model_dirs, name, pool, chunk, caching)
    results = drive(engine, reqs, add_at=add_at)
    for i, (res, ref) in enumerate(zip(results, solo[name])):
        assert_same(res, ref, f"request {i} added at step {add_at[i]}")
    tu.assert_idle(engine)


# ---------------------------------------------------------------------------------------------
# 3. Random add / abort / step through the Python engine


def test_random_add_abort_step_stress(model_dirs, workloads, solo):
    name = "random"
    reqs, refs = workloads[name], solo[name]
    engine = _engine(model_dirs, name, "tiny", 16, True)
    rng = random.Random(20240607)
    results, which, aborted = {}, {}, set()
    aborted_at_add, aborted_mid_decode = 0, 0

    def step():
        for out in engine.step():
            _record(results[out.request_id], out)

    for _ in range(400):
        x = rng.random()
        live = [rid for rid, r in results.items() if not r["finished"] and rid not in aborted]
        if x < 0.2:
            i = rng.randrange(len(reqs))
            rid = engine.add_request(*reqs[i])
            results[rid], which[rid] = _new_result(), i
            if rng.random() < 0.15:  # immediately, before any step saw it
                engine.abort(rid)
                aborted.add(rid)
                aborted_at_add += 1
        elif x < 0.27 and live:
            rid = rng.choice(live)
            aborted_mid_decode += bool(results[rid]["tokens"])
            engine.abort(rid)
            aborted.add(rid)
            if rng.random() < 0.3:
                engine.abort(rid)  # twice: a no-op
        else:
            step()
        _check_stats_invariants(engine)
    for _ in range(5000):
        if not engine.has_unfinished_requests():
            break
        step()
    assert len(results) > 50 and aborted_at_add > 0 and aborted_mid_decode > 0
    for rid, res in results.items():
        ref = refs[which[rid]]
        assert res["finished"], rid
        if rid in aborted:
            assert res["finish_reason"] == "abort", rid
            assert res["tokens"] == ref["tokens"][: len(res["tokens"])]  # right up to the abort
            assert res["logprobs"] == ref["logprobs"][: len(res["logprobs"])]
        else:
            assert res["finish_reason"] in ("stop", "length")
            assert_same(res, ref, f"request {rid} ({which[rid]})")
    s = engine.stats()
    assert s["num_preemptions"] > 0 and s["prefix_cache_hit_tokens"] > 0
    tu.assert_idle(engine)
    assert engine.step() == []


# ---------------------------------------------------------------------------------------------
# 4. Unservable requests fail at add; the others go on


def test_unservable_requests_fail_fast(model_dirs, workloads, solo):
    # 6 blocks of 16 = 96 tokens in the whole pool.
    engine = Engine(model_dirs["stories"], num_threads=2, num_kv_blocks=6, enable_prefix_caching=True)
    golden_reqs = workloads["stories"][-3:]
    golden_refs = solo["stories"][-3:]
    results, index_of = {}, {}
    for i in range(2):
        rid = engine.add_request(*golden_reqs[i])
        results[rid], index_of[rid] = _new_result(), i
    for _ in range(5):
        for out in engine.step():
            _record(results[out.request_id], out)

    ten = list(range(3, 13))
    with pytest.raises(ValueError, match="needs more KV blocks than the whole pool holds"):
        engine.add_request(ten, SamplingParams(max_tokens=87))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(list(range(3, 100)), SamplingParams(max_tokens=1))
    # generate() with one bad prompt after a good one: raises, and the good one is withdrawn.
    with pytest.raises(ValueError, match="KV blocks"):
        engine.generate([ten, list(range(3, 103))], SamplingParams(max_tokens=4, temperature=0.0))
    s = engine.stats()
    assert s["num_running"] + s["num_waiting"] == 2
    rid = engine.add_request(*golden_reqs[2])
    results[rid], index_of[rid] = _new_result(), 2
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            _record(results[out.request_id], out)
    for rid, res in results.items():
        assert_same(res, golden_refs[index_of[rid]], f"golden {index_of[rid]}")
    # Exactly the capacity is fine: 10 + 86 = 96 tokens.
    full = engine.generate([ten], SamplingParams(max_tokens=86, temperature=0.0, ignore_eos=True))[0]
    assert len(full.token_ids) == 86 and full.finish_reason == "length"
    tu.assert_idle(engine)

    # Beyond max_model_len (the pool is big enough).
    engine = Engine(model_dirs["stories"], num_threads=2, max_model_len=64)
    keep = engine.add_request(golden_reqs[0][0], SamplingParams(max_tokens=40, temperature=0.0))
    got = []
    for out in engine.step():
        got.extend(out.new_token_ids)
    with pytest.raises(ValueError, match="exceeds the maximum model length 64"):
        engine.add_request(ten, SamplingParams(max_tokens=55))
    with pytest.raises(ValueError, match="maximum model length"):
        engine.generate(["Once upon a time"], SamplingParams(max_tokens=60))
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == keep
            got.extend(out.new_token_ids)
    assert got == golden_refs[0]["tokens"][:40]
    assert len(engine.generate([ten], SamplingParams(max_tokens=54, ignore_eos=True))[0].token_ids) == 54
    tu.assert_idle(engine)


# ---------------------------------------------------------------------------------------------
# 5. A server: one thread steps, client threads add and abort


def test_server_pattern(model_dirs, workloads, solo):
    name = "stories"
    reqs, refs = workloads[name], solo[name]
    engine = Engine(model_dirs[name], num_threads=2, num_kv_blocks=12, max_num_batched_tokens=32,
                    enable_prefix_caching=True)
    queues, qlock = {}, threading.Lock()
    stop = threading.Event()
    errors = []

    def inbox(rid):
        with qlock:
            return queues.setdefault(rid, queue.Queue())

    peak = [0]

    def server():
        try:
            while not stop.is_set():
                outs = engine.step()
                peak[0] = max(peak[0], engine.stats()["num_running"])
                for out in outs:
                    inbox(out.request_id).put(out)
                if not outs and not engine.has_unfinished_requests():
                    time.sleep(0.0005)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # (client, request index, abort mode): None, "at_add" or a token count to abort after.
    plan = {c: [] for c in range(5)}
    rng = random.Random(77)
    for c in range(5):
        for _ in range(4):
            mode = rng.choice([None, None, None, "at_add", 3])
            plan[c].append((rng.randrange(len(reqs)), mode))
    finals = {}

    def client(c):
        try:
            mine = []
            for i, mode in plan[c]:
                rid = engine.add_request(*reqs[i])
                if mode == "at_add":
                    engine.abort(rid)
                mine.append((rid, i, mode))
                time.sleep(rng.random() * 0.002)
            for rid, i, mode in mine:
                res = _new_result()
                q = inbox(rid)
                while not res["finished"]:
                    _record(res, q.get(timeout=60))
                    if isinstance(mode, int) and len(res["tokens"]) >= mode and not res["finished"]:
                        engine.abort(rid)
                        mode = "sent"
                finals[rid] = (res, i, mode)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t_server = threading.Thread(target=server)
    t_server.start()
    clients = [threading.Thread(target=client, args=(c,)) for c in plan]
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    stop.set()
    t_server.join(60)
    assert not errors, errors
    assert len(finals) == sum(len(v) for v in plan.values())
    n_aborted = 0
    for rid, (res, i, mode) in finals.items():
        ref = refs[i]
        if res["finish_reason"] == "abort":
            assert mode in ("at_add", "sent"), rid
            n_aborted += 1
            assert res["tokens"] == ref["tokens"][: len(res["tokens"])]
            if mode == "at_add":
                assert len(res["tokens"]) <= 1  # at most the token of the step it was admitted in
        else:
            assert mode != "at_add", rid
            assert_same(res, ref, f"request {rid} ({i})")
    assert n_aborted > 0 and peak[0] > 1
    with qlock:
        assert all(q.empty() for q in queues.values())  # nothing after the finished outputs
    tu.assert_idle(engine)


def test_generate_beside_a_server_step_loop(stories_dir, golden):
    """generate() in client threads while a server thread drives step(): both step the engine, and
    no output may be lost or reordered between them."""
    engine = Engine(stories_dir, num_threads=2, num_kv_blocks=12, max_num_batched_tokens=32,
                    enable_prefix_caching=True)
    cases = golden["max_new_tokens_64"]
    sp = SamplingParams(max_tokens=64, temperature=0.0)
    stop = threading.Event()
    got, errors = {}, []

    def server():
        try:
            while not stop.is_set():
                outs = engine.step()
                for out in outs:
                    got.setdefault(out.request_id, []).extend(out.new_token_ids)
                if not outs:
                    time.sleep(0.0002)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def client(k):
        try:
            out = engine.generate([cases[k]["prompt"]], sp)[0]
            if out.token_ids != cases[k]["new_ids"]:
                errors.append(("generate", k, out.token_ids))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=server)
    t.start()
    low = [(engine.add_request(cases[i % 3]["prompt_ids"], sp), i % 3) for i in range(4)]
    clients = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(60)
    deadline = time.time() + 60
    while time.time() < deadline and not all(len(got.get(r, [])) == 64 for r, _ in low):
        time.sleep(0.01)
    stop.set()
    t.join(60)
    assert not errors, errors[:3]
    for rid, k in low:
        assert got.get(rid) == cases[k]["new_ids"], rid
    tu.assert_idle(engine)


# ---------------------------------------------------------------------------------------------
# 7. Metrics and stats through the Python API


def test_request_metrics_and_stats(model_dirs, workloads):
    engine = Engine(model_dirs["stories"], num_threads=2, enable_prefix_caching=True)
    before = engine.stats()
    prompts = [p for p, _ in workloads["stories"][:3]]  # share the 40-token prefix
    one, many = engine.generate(prompts[:2], [SamplingParams(max_tokens=1), SamplingParams(max_tokens=12, ignore_eos=True)])
    assert set(one.metrics) == set(many.metrics) == METRIC_KEYS
    assert len(one.token_ids) == 1 and one.metrics["tpot_s"] == 0
    assert 0 < one.metrics["ttft_s"] <= one.metrics["e2e_s"]
    assert len(many.token_ids) == 12 and many.metrics["tpot_s"] > 0
    assert 0 < many.metrics["ttft_s"] <= many.metrics["e2e_s"]
    assert many.metrics["e2e_s"] >= many.metrics["ttft_s"] + 11 * many.metrics["tpot_s"] * 0.999
    assert one.metrics["num_preemptions"] == many.metrics["num_preemptions"] == 0
    (third,) = engine.generate([prompts[2]], SamplingParams(max_tokens=3))
    assert third.metrics["num_cached_tokens"] == 32  # a multiple of the block size
    zero = engine.generate([prompts[2]], SamplingParams(max_tokens=0))[0]
    assert zero.token_ids == [] and zero.finish_reason == "length"
    assert zero.metrics["ttft_s"] == zero.metrics["tpot_s"] == 0 and zero.metrics["e2e_s"] > 0
    s = engine.stats()
    assert s["num_generated_tokens"] - before["num_generated_tokens"] == 1 + 12 + 3
    assert s["prefix_cache_hit_tokens"] >= 32 and s["prefix_cache_query_tokens"] >= sum(map(len, prompts))
    assert s["step_time_s"] >= s["forward_time_s"] > 0
    assert s["num_steps"] > 0 and s["num_preemptions"] == 0 and s["num_cached_blocks"] > 0
    tu.assert_idle(engine)
