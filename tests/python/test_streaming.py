"""Engine.generate_stream: tokens arrive step by step, add up to exactly what generate() returns
(and to the stories260K goldens), streams interleave with each other and with generate(), and a
stream closed early aborts its request and leaves the engine clean."""

from __future__ import annotations

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams, StreamOutput

GREEDY_64 = SamplingParams(max_tokens=64, temperature=0.0)
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


def check_stream(items, token_ids, text, finish_reason="length"):
    """A complete stream: incremental, consistent with its cumulative fields, ending in one
    finished item with metrics; its tokens and text are `token_ids` and `text`."""
    assert items and all(isinstance(it, StreamOutput) for it in items)
    assert len({it.request_id for it in items}) == 1
    toks, txt = [], ""
    for it in items:
        toks.extend(it.new_token_ids)
        txt += it.new_text
        assert it.token_ids == toks
        assert it.text == txt
        assert text.startswith(it.text)
    for it in items[:-1]:
        assert not it.finished and it.finish_reason is None and it.metrics is None
        assert it.new_token_ids  # an unfinished item always brings tokens
    last = items[-1]
    assert last.finished and last.finish_reason == finish_reason
    assert toks == token_ids
    assert txt == last.text == text
    m = last.metrics
    assert set(m) == METRIC_KEYS
    if token_ids:
        assert 0 < m["ttft_s"] <= m["e2e_s"]
    assert (m["tpot_s"] > 0) == (len(token_ids) > 1)
    return last


def test_stream_equals_golden_and_generate(stories_engine, golden):
    for key in ("max_new_tokens_64", "max_new_tokens_256"):
        for e in golden[key][: 3 if key.endswith("64") else 1]:
            sp = SamplingParams(max_tokens=len(e["new_ids"]), temperature=0.0)
            items = list(stories_engine.generate_stream(e["prompt"], sp))
            assert len(items) == len(e["new_ids"])  # one token per step, one item per token
            check_stream(items, e["new_ids"], e["continuation_text"])
            (gen,) = stories_engine.generate([e["prompt"]], sp)
            assert gen.token_ids == e["new_ids"] and gen.text == e["continuation_text"]
            tu.assert_idle(stories_engine)


def test_stream_of_token_ids_and_sampling(stories_engine, golden):
    e = golden["max_new_tokens_64"][1]
    sp = SamplingParams(max_tokens=32, temperature=0.9, top_k=50, top_p=0.95, seed=4242)
    items = list(stories_engine.generate_stream(e["prompt_ids"], sp))  # a token-id prompt
    assert len(items) > 1
    (gen,) = stories_engine.generate([e["prompt_ids"]], sp)
    check_stream(items, gen.token_ids, gen.text, gen.finish_reason)
    assert gen.token_ids != e["new_ids"][:32]  # sampled, not greedy
    # A stop token: the stream ends with "stop" on it, like generate().
    stop_tok = e["new_ids"][9]
    sp = SamplingParams(max_tokens=64, temperature=0.0, stop_token_ids=[stop_tok])
    items = list(stories_engine.generate_stream(e["prompt"], sp))
    want = e["new_ids"][: e["new_ids"].index(stop_tok) + 1]
    (gen,) = stories_engine.generate([e["prompt"]], sp)
    assert gen.token_ids == want and gen.finish_reason == "stop"
    check_stream(items, want, gen.text, "stop")
    tu.assert_idle(stories_engine)


def test_single_token_and_empty_streams(stories_engine, golden):
    e = golden["max_new_tokens_64"][0]
    (item,) = stories_engine.generate_stream(e["prompt"], SamplingParams(max_tokens=1, temperature=0.0))
    check_stream([item], e["new_ids"][:1], stories_engine.generate([e["prompt"]], SamplingParams(max_tokens=1, temperature=0.0))[0].text)
    assert item.metrics["tpot_s"] == 0
    (item,) = stories_engine.generate_stream(e["prompt"], SamplingParams(max_tokens=0))
    assert item.finished and item.finish_reason == "length" and item.token_ids == [] and item.text == ""
    tu.assert_idle(stories_engine)


def test_interleaved_streams(stories_engine, golden):
    g = golden["max_new_tokens_64"]
    sampled = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=7)
    ref_sampled = stories_engine.generate([g[2]["prompt"]], sampled)[0]
    streams = {0: stories_engine.generate_stream(g[0]["prompt"], GREEDY_64),
               1: stories_engine.generate_stream(g[1]["prompt"], GREEDY_64)}
    items = {0: [], 1: [], 2: []}
    turn = 0
    while streams:
        k = list(streams)[turn % len(streams)]
        turn += 1
        try:
            items[k].append(next(streams[k]))
        except StopIteration:
            del streams[k]
        if turn == 21:  # a third stream joins mid-way
            streams[2] = stories_engine.generate_stream(g[2]["prompt"], sampled)
    assert len({items[k][0].request_id for k in items}) == 3
    check_stream(items[0], g[0]["new_ids"], g[0]["continuation_text"])
    check_stream(items[1], g[1]["new_ids"], g[1]["continuation_text"])
    check_stream(items[2], ref_sampled.token_ids, ref_sampled.text)
    tu.assert_idle(stories_engine)


def test_closing_a_stream_early_aborts_it(stories_engine, golden, assert_engine_healthy):
    g = golden["max_new_tokens_64"]
    n = 0
    for item in stories_engine.generate_stream(g[0]["prompt"], GREEDY_64):
        n += 1
        assert item.token_ids == g[0]["new_ids"][:n]
        if n == 3:
            break
    tu.assert_idle(stories_engine)  # the dropped generator aborted its request

    # Explicit close() while another stream and a low-level request are in flight.
    low = stories_engine.add_request(g[2]["prompt_ids"], GREEDY_64)
    a = stories_engine.generate_stream(g[0]["prompt"], GREEDY_64)
    b = stories_engine.generate_stream(g[1]["prompt"], GREEDY_64)
    first_a = [next(a) for _ in range(5)]
    b_items = [next(b) for _ in range(2)]
    rid_a = first_a[0].request_id
    a.close()
    with pytest.raises(StopIteration):
        next(a)
    b_items += list(b)
    check_stream(b_items, g[1]["new_ids"], g[1]["continuation_text"])
    low_tokens = []
    while stories_engine.has_unfinished_requests():
        for out in stories_engine.step():
            assert out.request_id == low, "no output of the closed stream's request leaks to step()"
            low_tokens.extend(out.new_token_ids)
    assert low_tokens == g[2]["new_ids"]
    assert rid_a not in (o.request_id for o in stories_engine.step())
    tu.assert_idle(stories_engine)
    assert_engine_healthy(stories_engine)


def test_generate_while_a_stream_is_paused(stories_engine, golden):
    g = golden["max_new_tokens_64"]
    stream = stories_engine.generate_stream(g[0]["prompt"], GREEDY_64)
    items = [next(stream) for _ in range(5)]
    low = stories_engine.add_request(g[2]["prompt_ids"], SamplingParams(max_tokens=20, temperature=0.0))
    (out,) = stories_engine.generate([g[1]["prompt"]], GREEDY_64)  # steps the paused stream too
    assert out.token_ids == g[1]["new_ids"] and out.text == g[1]["continuation_text"]
    items += list(stream)  # resumes from what generate() stepped for it
    check_stream(items, g[0]["new_ids"], g[0]["continuation_text"])
    # The low-level request finished inside generate()'s and the stream's steps; its outputs wait
    # for step(), and has_unfinished_requests() says so.
    assert stories_engine.has_unfinished_requests()
    low_tokens = []
    while stories_engine.has_unfinished_requests():
        for o in stories_engine.step():
            assert o.request_id == low
            low_tokens.extend(o.new_token_ids)
    assert low_tokens == g[2]["new_ids"][:20]
    tu.assert_idle(stories_engine)


def test_abort_of_a_streamed_request(stories_engine, golden):
    g = golden["max_new_tokens_64"][0]
    stream = stories_engine.generate_stream(g["prompt"], GREEDY_64)
    first = next(stream)
    stories_engine.abort(first.request_id)
    items = [first] + list(stream)
    last = items[-1]
    assert last.finished and last.finish_reason == "abort"
    assert last.token_ids == g["new_ids"][: len(last.token_ids)] and len(last.token_ids) < 64
    tu.assert_idle(stories_engine)


def test_streams_with_preemption_and_prefix_cache(stories_dir, golden):
    """Two interleaved streams on a pool that holds only one of them: preemption, same outputs."""
    g = golden["max_new_tokens_64"]
    engine = Engine(str(stories_dir), num_threads=2, num_kv_blocks=6, max_num_batched_tokens=8,
                    enable_prefix_caching=True)
    a = engine.generate_stream(g[0]["prompt"], GREEDY_64)
    b = engine.generate_stream(g[0]["prompt"] + " there", GREEDY_64)
    c = engine.generate_stream(g[1]["prompt"], GREEDY_64)
    ref_b = Engine(str(stories_dir), num_threads=2).generate([g[0]["prompt"] + " there"], GREEDY_64)[0]
    items = {"a": [], "b": [], "c": []}
    live = {"a": a, "b": b, "c": c}
    while live:
        for k in list(live):
            try:
                items[k].append(next(live[k]))
            except StopIteration:
                del live[k]
    check_stream(items["a"], g[0]["new_ids"], g[0]["continuation_text"])
    check_stream(items["b"], ref_b.token_ids, ref_b.text)
    check_stream(items["c"], g[1]["new_ids"], g[1]["continuation_text"])
    assert engine.stats()["num_preemptions"] > 0
    assert any(items[k][-1].metrics["num_preemptions"] > 0 for k in items)
    tu.assert_idle(engine)


def test_bad_stream_request_raises_on_first_next(stories_engine):
    stream = stories_engine.generate_stream(list(range(3, 500)), SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="maximum model length"):
        next(stream)
    tu.assert_idle(stories_engine)


def test_stream_text_is_never_taken_back(stories_engine):
    """A stream's text per step (generate_stream's `text`) for outputs split into steps anywhere:
    characters spelled by several byte-fallback tokens (emoji, CJK, accents) cut across steps,
    prompts ending inside one, any token ids, skipped special tokens. Every step's text extends the
    previous one, and the last is the whole decode that generate() returns. (Decoding the whole
    sequence at every step once showed "日" and then, when the first byte of the next character
    came, "����": the stream sent its whole text again.)"""
    import random

    from accelcore.engine import _IncrementalText

    eng = stories_engine
    vocab = eng.tokenizer.get_vocab_size()
    words = "Once upon a time there was a little girl named Lily . She loved to play , 😀 café naïve 日本 ü ß €".split()
    rng = random.Random(5)
    byte_runs_cut = 0
    for trial in range(600):
        if trial % 3 == 2:
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
            out = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        else:
            ids = eng.encode(" ".join(rng.choice(words) for _ in range(30)))
            cut = rng.randrange(1, len(ids))
            prompt, out = ids[:cut], ids[cut:]
        detok = _IncrementalText(eng, prompt)
        text, i = "", 0
        while i < len(out):
            k = rng.randrange(1, 5)
            i += k
            byte_runs_cut += eng.tokenizer.id_to_token(out[min(i, len(out)) - 1]).startswith("<0x")
            full = detok.text(out[:i], text, i >= len(out))
            assert full.startswith(text), (trial, prompt, out[:i], text, full)
            text = full
        assert text == eng._continuation_text(prompt, out), (trial, prompt, out)
    assert byte_runs_cut > 100  # steps that ended on a byte token


def test_stream_without_a_tokenizer(small_llama_engine):
    """A model directory without tokenizer.json streams token ids, with empty text, as
    generate() returns them."""
    eng = small_llama_engine
    assert eng.tokenizer is None
    params = SamplingParams(max_tokens=12, temperature=0.0)
    items = list(eng.generate_stream([1, 40, 50, 60], params))
    gen = eng.generate([[1, 40, 50, 60]], params)[0]
    check_stream(items, gen.token_ids, "")
