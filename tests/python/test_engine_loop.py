"""The low-level loop: add_request / step / abort / stats, and a second thread adding requests."""

from __future__ import annotations

import threading
import time

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams


@pytest.fixture
def engine(stories_dir):
    return Engine(str(stories_dir), num_threads=2)


def _run_until_done(engine, results, finished, max_steps=10_000):
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        for out in engine.step():
            assert out.request_id not in finished, "output after the request finished"
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
    raise AssertionError("engine did not drain")


def test_step_loop_matches_generate(engine, golden):
    entries = golden["max_new_tokens_64"]
    ids = [engine.add_request(e["prompt_ids"], SamplingParams(max_tokens=64, temperature=0.0)) for e in entries]
    assert len(set(ids)) == 3 and ids == sorted(ids)
    s = engine.stats()
    assert s["num_waiting"] == 3 and s["num_running"] == 0
    results, finished = {}, {}
    outs = engine.step()  # prefill of all three, first token each
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all(len(o.new_token_ids) == 1 and not o.finished and o.finish_reason is None for o in outs)
    for o in outs:
        results.setdefault(o.request_id, []).extend(o.new_token_ids)
    s = engine.stats()
    assert s["num_running"] == 3 and s["num_waiting"] == 0 and s["num_free_blocks"] < s["num_total_blocks"]
    _run_until_done(engine, results, finished)
    for rid, e in zip(ids, entries):
        assert results[rid] == e["new_ids"]
        assert finished[rid] == "length"
    s = engine.stats()
    tu.assert_idle(engine)
    assert s["num_generated_tokens"] == 3 * 64
    assert s["num_prompt_tokens"] == sum(len(e["prompt_ids"]) for e in entries)
    assert s["num_steps"] == 64  # one prefill step plus 63 decode steps, all three batched
    assert engine.step() == []  # idle steps produce nothing


def test_abort_running_and_waiting(engine, golden):
    e = golden["max_new_tokens_256"]
    greedy = SamplingParams(max_tokens=256, temperature=0.0)
    a = engine.add_request(e[0]["prompt_ids"], greedy)
    b = engine.add_request(e[1]["prompt_ids"], greedy)
    results, finished = {}, {}
    for _ in range(10):
        for o in engine.step():
            results.setdefault(o.request_id, []).extend(o.new_token_ids)
    c = engine.add_request(e[2]["prompt_ids"], greedy)  # waiting: never stepped
    engine.abort(b)
    engine.abort(c)
    engine.abort(123456)  # unknown ids are ignored
    assert engine.stats()["num_waiting"] == 0 and engine.stats()["num_running"] == 1
    outs = engine.step()
    by_id = {o.request_id: o for o in outs}
    assert by_id[b].finished and by_id[b].finish_reason == "abort" and by_id[b].new_token_ids == []
    assert by_id[c].finished and by_id[c].finish_reason == "abort" and by_id[c].new_token_ids == []
    for o in outs:
        results.setdefault(o.request_id, []).extend(o.new_token_ids)
        if o.finished:
            finished[o.request_id] = o.finish_reason
    assert results[b] == e[1]["new_ids"][:10]  # what it produced before the abort was right
    _run_until_done(engine, results, finished)
    assert results[a] == e[0]["new_ids"] and finished[a] == "length"  # the survivor is unaffected
    assert c not in results or results[c] == []
    engine.abort(a)  # already finished: a no-op
    assert engine.step() == []
    tu.assert_idle(engine)


def test_abort_inside_generate_loop_keeps_engine_clean(engine, golden, assert_engine_healthy):
    """Aborting a request that generate() is waiting for ends it with finish_reason 'abort'."""
    e = golden["max_new_tokens_64"][0]
    rid_box = {}

    class Proxy:
        def __init__(self, inner):
            self._inner = inner
            self.calls = 0

        def step(self):
            self.calls += 1
            if self.calls == 5:
                self._inner.abort(rid_box["id"])
            return self._inner.step()

        def add_request(self, ids, params):
            rid = self._inner.add_request(ids, params)
            rid_box.setdefault("id", rid)
            return rid

        def __getattr__(self, name):
            return getattr(self._inner, name)

    inner = engine._engine
    engine._engine = Proxy(inner)
    try:
        outs = engine.generate([e["prompt"], e["prompt"]], SamplingParams(max_tokens=64, temperature=0.0))
    finally:
        engine._engine = inner
    assert outs[0].finish_reason == "abort" and outs[0].token_ids == e["new_ids"][:4]
    assert outs[1].finish_reason == "length" and outs[1].token_ids == e["new_ids"]
    assert_engine_healthy(engine)


def test_incremental_outputs_and_logprobs(engine, golden):
    e = golden["max_new_tokens_64"][2]
    rid = engine.add_request(e["prompt_ids"], SamplingParams(max_tokens=5, temperature=0.0, logprobs=1, prompt_logprobs=1))
    first = engine.step()
    assert len(first) == 1 and first[0].request_id == rid
    assert first[0].prompt_logprobs is not None and len(first[0].prompt_logprobs) == len(e["prompt_ids"])
    assert len(first[0].new_logprobs) == 1 and e["new_ids"][0] in first[0].new_logprobs[0]
    later = []
    while engine.has_unfinished_requests():
        later.extend(engine.step())
    assert all(o.prompt_logprobs is None for o in later)  # sent once
    assert [t for o in first + later for t in o.new_token_ids] == e["new_ids"][:5]
    assert later[-1].finished and later[-1].finish_reason == "length"
    tu.assert_idle(engine)


def test_add_request_from_another_thread(engine, golden):
    """One thread adds requests (and aborts one) while the main thread drives step()."""
    entries = golden["max_new_tokens_64"]
    params = SamplingParams(max_tokens=64, temperature=0.0)
    added, errors = [], []
    done = threading.Event()

    def producer():
        try:
            for i in range(9):
                added.append((engine.add_request(entries[i % 3]["prompt_ids"], params), i % 3))
                time.sleep(0.003)
            victim = engine.add_request(entries[0]["prompt_ids"], params)
            engine.abort(victim)
            added.append((victim, None))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    results, finished = {}, {}
    t = threading.Thread(target=producer)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
        if done.is_set() and len(finished) == len(added) and not engine.has_unfinished_requests():
            break
    t.join()
    assert not errors, errors
    assert len(added) == 10
    for rid, which in added:
        if which is None:
            assert finished[rid] == "abort"
        else:
            assert finished[rid] == "length"
            assert results[rid] == entries[which]["new_ids"]
    tu.assert_idle(engine)


def test_stats_counters(engine):
    before = engine.stats()
    assert before["num_total_blocks"] == before["num_free_blocks"] > 0
    assert before["block_size"] == 16
    engine.generate([[1, 5, 6, 7], [1, 9]], SamplingParams(max_tokens=3, temperature=0.0))
    after = engine.stats()
    assert after["num_prompt_tokens"] - before["num_prompt_tokens"] == 6
    assert after["num_generated_tokens"] - before["num_generated_tokens"] == 6
    assert after["num_steps"] - before["num_steps"] == 3
    tu.assert_idle(engine)


def test_kv_pool_size_options(stories_dir):
    e = Engine(str(stories_dir), num_kv_blocks=7, block_size=8)
    s = e.stats()
    assert (s["num_total_blocks"], s["block_size"]) == (7, 8)
    # 7 blocks of 8 = 56 tokens: a 5-token prompt plus 51 fits, plus 52 does not.
    assert len(e.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=51, temperature=0.0, ignore_eos=True))[0].token_ids) == 51
    with pytest.raises(ValueError, match="KV blocks"):
        e.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=52))
    tu.assert_idle(e)


def test_kv_pool_sizing(stories_dir):
    # stories260K: 5 layers x 4 KV heads x head_dim 8, K and V in float32 -> 10240 bytes per
    # 16-token block.
    per_block = 2 * 5 * 4 * 8 * 16 * 4
    e = Engine(str(stories_dir), kv_cache_memory_bytes=10 * per_block + 5)
    assert e.stats()["num_total_blocks"] == 10
    with pytest.raises(ValueError, match="less than one KV block"):
        Engine(str(stories_dir), kv_cache_memory_bytes=per_block - 1)
    # By default: room for max_num_seqs requests of the full length (512 tokens = 32 blocks).
    assert Engine(str(stories_dir), max_num_seqs=3).stats()["num_total_blocks"] == 3 * 32
    assert Engine(str(stories_dir), max_num_seqs=3, max_model_len=100).stats()["num_total_blocks"] == 3 * 7
