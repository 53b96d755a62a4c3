"""stories260K against its reference_outputs.json (transformers greedy, checked against llama2.c)."""

from __future__ import annotations

import pytest

import accel_testutil as tu
from accelcore import SamplingParams


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


@pytest.mark.parametrize("key", ["max_new_tokens_64", "max_new_tokens_256"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_golden_from_text(stories_engine, golden, key, index):
    entry = golden[key][index]
    n = len(entry["new_ids"])
    out = stories_engine.generate([entry["prompt"]], _greedy(n))[0]
    assert out.prompt_token_ids == entry["prompt_ids"]  # tokenizer adds BOS like transformers
    assert out.token_ids == entry["new_ids"]
    assert out.text == entry["continuation_text"]
    assert out.finish_reason == "length"
    assert out.prompt == entry["prompt"]
    tu.assert_idle(stories_engine)


@pytest.mark.parametrize("key", ["max_new_tokens_64", "max_new_tokens_256"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_golden_from_token_ids(stories_engine, golden, key, index):
    entry = golden[key][index]
    n = len(entry["new_ids"])
    out = stories_engine.generate([entry["prompt_ids"]], _greedy(n))[0]
    assert out.token_ids == entry["new_ids"]
    assert out.text == entry["continuation_text"]
    assert out.finish_reason == "length"
    assert out.prompt is None
    tu.assert_idle(stories_engine)


def test_golden_single_prompt_not_in_list(stories_engine, golden):
    """A bare string and a bare token-id list are each one prompt."""
    entry = golden["max_new_tokens_64"][1]
    (a,) = stories_engine.generate(entry["prompt"], _greedy(64))
    (b,) = stories_engine.generate(entry["prompt_ids"], _greedy(64))
    assert a.token_ids == entry["new_ids"] == b.token_ids


def test_golden_all_in_one_batch(stories_engine, golden_cases):
    prompts = [e["prompt"] if i % 2 == 0 else e["prompt_ids"] for i, (_, e) in enumerate(golden_cases)]
    params = [_greedy(n) for n, _ in golden_cases]
    outs = stories_engine.generate(prompts, params)
    assert len(outs) == 6
    for out, (n, entry) in zip(outs, golden_cases):
        assert out.token_ids == entry["new_ids"]
        assert out.text == entry["continuation_text"]
        assert out.finish_reason == "length"
    tu.assert_idle(stories_engine)


def test_golden_all_in_one_batch_small_engine(stories_dir, golden_cases):
    """The same with chunked prefill, a tiny KV pool (requests queue for blocks) and one thread."""
    from accelcore import Engine

    # 256 + 13 tokens need 17 blocks of 16; 40 blocks hold two such requests at a time.
    engine = Engine(str(stories_dir), num_threads=1, max_num_batched_tokens=5, num_kv_blocks=40, max_num_seqs=4)
    outs = engine.generate([e["prompt_ids"] for _, e in golden_cases], [_greedy(n) for n, _ in golden_cases])
    for out, (n, entry) in zip(outs, golden_cases):
        assert out.token_ids == entry["new_ids"]
    tu.assert_idle(engine)


def test_golden_dtype_auto(stories_dir, golden):
    from accelcore import Engine

    engine = Engine(str(stories_dir), dtype="auto", num_threads=1)
    entries = golden["max_new_tokens_64"]
    outs = engine.generate([e["prompt"] for e in entries], _greedy(64))
    assert [o.token_ids for o in outs] == [e["new_ids"] for e in entries]


def test_golden_logprobs_match_transformers(stories_engine, hf_stories, golden):
    """Prompt and sampled-token log-probabilities of the golden path agree with transformers."""
    entry = golden["max_new_tokens_64"][2]
    out = stories_engine.generate(
        [entry["prompt_ids"]], SamplingParams(max_tokens=64, temperature=0.0, logprobs=3, prompt_logprobs=4)
    )[0]
    assert out.token_ids == entry["new_ids"]
    ids = entry["prompt_ids"] + entry["new_ids"]
    ref = tu.hf_logprobs(hf_stories, ids)
    np_ = len(entry["prompt_ids"])
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == np_
    for i in range(1, np_):
        tu.check_logprob_dict(out.prompt_logprobs[i], ref[i - 1], 4, ids[i])
    assert len(out.logprobs) == 64
    for j, tok in enumerate(entry["new_ids"]):
        tu.check_logprob_dict(out.logprobs[j], ref[np_ - 1 + j], 3, tok)


def test_model_info(stories_engine, stories_dir):
    info = stories_engine.model_info
    assert info.architecture == "LlamaForCausalLM"
    assert (info.vocab_size, info.hidden_size, info.num_layers, info.max_model_len) == (512, 64, 5, 512)
    assert list(info.eos_token_ids) == [2]
    assert info.bos_token_id == 1
