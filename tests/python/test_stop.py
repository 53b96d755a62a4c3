"""Stop conditions: stop_token_ids, EOS (and ignore_eos), max_tokens, and max_tokens=0."""

from __future__ import annotations

import json

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams


def _greedy(n=64, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_stop_token_ids(stories_engine, golden):
    e = golden["max_new_tokens_64"][0]
    path = e["new_ids"]
    tok = path[10]
    k = path.index(tok)
    out = stories_engine.generate([e["prompt"]], _greedy(stop_token_ids=[tok]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == path[: k + 1]  # the stop token is kept, last
    assert e["continuation_text"].startswith(out.text)
    tu.assert_idle(stories_engine)


def test_earliest_of_several_stop_tokens(stories_engine, golden):
    e = golden["max_new_tokens_64"][1]
    path = e["new_ids"]
    late, early = path[40], path[12]
    k = min(path.index(late), path.index(early))
    out = stories_engine.generate([e["prompt_ids"]], _greedy(stop_token_ids=[late, early]))[0]
    assert (out.token_ids, out.finish_reason) == (path[: k + 1], "stop")


def test_stop_on_first_token_and_per_request_stops(stories_engine, golden):
    e0, e1 = golden["max_new_tokens_64"][0], golden["max_new_tokens_64"][1]
    outs = stories_engine.generate(
        [e0["prompt"], e1["prompt"], e0["prompt"]],
        [_greedy(stop_token_ids=[e0["new_ids"][0]]), _greedy(), _greedy(5)],
    )
    assert (outs[0].token_ids, outs[0].finish_reason) == (e0["new_ids"][:1], "stop")
    assert (outs[1].token_ids, outs[1].finish_reason) == (e1["new_ids"], "length")  # unaffected neighbour
    assert (outs[2].token_ids, outs[2].finish_reason) == (e0["new_ids"][:5], "length")


def test_stop_token_that_never_appears(stories_engine, golden):
    e = golden["max_new_tokens_64"][2]
    absent = next(t for t in range(3, 512) if t not in e["new_ids"])
    out = stories_engine.generate([e["prompt"]], _greedy(stop_token_ids=[absent]))[0]
    assert (out.token_ids, out.finish_reason) == (e["new_ids"], "length")


@pytest.mark.parametrize("n", [1, 2, 17])
def test_max_tokens_gives_length(stories_engine, golden, n):
    e = golden["max_new_tokens_64"][0]
    out = stories_engine.generate([e["prompt"]], _greedy(n))[0]
    assert (out.token_ids, out.finish_reason) == (e["new_ids"][:n], "length")


def test_max_tokens_zero_scores_prompt_only(stories_engine, hf_stories, golden):
    e = golden["max_new_tokens_64"][1]
    out = stories_engine.generate([e["prompt"]], _greedy(0, prompt_logprobs=3))[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
    ids = e["prompt_ids"]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    ref = tu.hf_logprobs(hf_stories, ids)
    for i in range(1, len(ids)):
        tu.check_logprob_dict(out.prompt_logprobs[i], ref[i - 1], 3, ids[i])
    # Without prompt_logprobs too; and a one-token prompt.
    out = stories_engine.generate([e["prompt"], [1]], _greedy(0))
    assert [(o.token_ids, o.finish_reason, o.prompt_logprobs) for o in out] == [([], "length", None)] * 2
    tu.assert_idle(stories_engine)


@pytest.fixture(scope="module")
def eos_setup(small_llama, tmp_path_factory):
    """A copy of the random model whose config.json names as EOS a token its greedy path produces."""
    prompt = tu.random_prompts(384, [10], seed=8)[0]
    free = Engine(str(small_llama), num_threads=1).generate([prompt], _greedy(24))[0].token_ids
    eos = next(t for i, t in enumerate(free) if i >= 4 and free.index(t) == i)
    path = tu.copy_model_dir(small_llama, tmp_path_factory.mktemp("eos") / "model")
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").unlink()
    return Engine(str(path), num_threads=2), prompt, free, eos


def test_eos_stops(eos_setup):
    engine, prompt, free, eos = eos_setup
    assert list(engine.model_info.eos_token_ids) == [eos]
    out = engine.generate([prompt], _greedy(24))[0]
    k = free.index(eos)
    assert (out.token_ids, out.finish_reason) == (free[: k + 1], "stop")
    tu.assert_idle(engine)


def test_ignore_eos_continues(eos_setup):
    engine, prompt, free, eos = eos_setup
    out = engine.generate([prompt], _greedy(24, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (free, "length")
    # stop_token_ids still apply with ignore_eos.
    out = engine.generate([prompt], _greedy(24, ignore_eos=True, stop_token_ids=[eos]))[0]
    assert (out.token_ids, out.finish_reason) == (free[: free.index(eos) + 1], "stop")


def test_eos_in_a_mixed_batch(eos_setup):
    engine, prompt, free, eos = eos_setup
    outs = engine.generate([prompt, prompt], [_greedy(24), _greedy(24, ignore_eos=True)])
    assert outs[0].token_ids == free[: free.index(eos) + 1] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == free and outs[1].finish_reason == "length"
    tu.assert_idle(engine)
