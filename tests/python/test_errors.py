"""Errors: each raises the documented Python exception with a useful message, and afterwards the
engine (or a fresh one) still produces the golden output with nothing left queued."""

from __future__ import annotations

import json
import math
import struct

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams


@pytest.fixture(scope="module")
def broken_models(small_llama, tmp_path_factory):
    """Damaged copies of the small random model, one per failure."""
    root = tmp_path_factory.mktemp("broken")
    out = {}

    def copy(name):
        return tu.copy_model_dir(small_llama, root / name)

    p = copy("truncated")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = p

    p = copy("truncated_to_4_bytes")
    (p / "model.safetensors").write_bytes(data[:4])
    out["truncated_to_4_bytes"] = p

    p = copy("garbage")
    (p / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    out["garbage"] = p

    p = copy("header_not_json")
    header = b"{this is not json}      "
    (p / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    out["header_not_json"] = p

    p = copy("wrong_shape")
    (p / "model.safetensors").unlink()
    from safetensors.numpy import save_file
    import numpy as np

    ref = tu.read_json(small_llama / "config.json")
    save_file({"model.embed_tokens.weight": np.zeros((ref["vocab_size"] + 1, ref["hidden_size"]), np.float32)},
              str(p / "model.safetensors"))
    out["wrong_shape"] = p

    p = copy("gpt2")
    cfg = tu.read_json(p / "config.json")
    cfg["architectures"] = ["GPT2LMHeadModel"]
    tu.write_json(p / "config.json", cfg)
    out["gpt2"] = p

    p = copy("bad_config_json")
    (p / "config.json").write_text("{ not json")
    out["bad_config_json"] = p

    p = copy("no_safetensors")
    (p / "model.safetensors").unlink()
    out["no_safetensors"] = p

    p = copy("no_config")
    (p / "config.json").unlink()
    out["no_config"] = p

    p = copy("missing_shard")
    (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors")
    tu.write_json(
        p / "model.safetensors.index.json",
        {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}},
    )
    out["missing_shard"] = p
    return out


@pytest.mark.parametrize(
    "name, exc, match",
    [
        ("truncated", ValueError, "truncated|outside|header"),
        ("truncated_to_4_bytes", ValueError, "truncated"),
        ("garbage", ValueError, "header"),
        ("header_not_json", ValueError, "JSON"),
        ("wrong_shape", ValueError, "shape"),
        ("gpt2", ValueError, "GPT2LMHeadModel"),
        ("bad_config_json", ValueError, "JSON"),
        ("no_safetensors", FileNotFoundError, "safetensors"),
        ("no_config", FileNotFoundError, "config.json"),
        ("missing_shard", FileNotFoundError, "model-00002-of-00002"),
    ],
)
def test_bad_checkpoint(broken_models, stories_engine, assert_engine_healthy, name, exc, match):
    with pytest.raises(exc, match=match):
        Engine(str(broken_models[name]))
    assert_engine_healthy(stories_engine)


def test_missing_directory(tmp_path, stories_engine, assert_engine_healthy):
    with pytest.raises(FileNotFoundError, match="not found"):
        Engine(str(tmp_path / "does_not_exist"))
    with pytest.raises(FileNotFoundError):
        Engine("./no/such/model/dir")
    assert_engine_healthy(stories_engine)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(dtype="float16"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(num_threads=-1), "num_threads"),
        (dict(block_size=0), "block_size"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(max_model_len=100_000), "max_model_len"),
        (dict(not_an_option=1), "not_an_option"),
    ],
)
def test_bad_engine_options(stories_dir, stories_engine, assert_engine_healthy, options, match):
    with pytest.raises(ValueError, match=match):
        Engine(str(stories_dir), **options)
    assert_engine_healthy(stories_engine)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(logprobs=-2), "logprobs"),
        (dict(prompt_logprobs=-5), "prompt_logprobs"),
    ],
)
def test_bad_sampling_params(stories_engine, assert_engine_healthy, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    # Fields mutated after construction are validated when the request is added.
    sp = SamplingParams()
    field, value = next(iter(kwargs.items()))
    setattr(sp, field, value)
    with pytest.raises(ValueError, match=match):
        stories_engine.generate(["Once upon a time"], sp)
    with pytest.raises(ValueError, match=match):
        stories_engine.add_request([1, 403], sp)
    assert_engine_healthy(stories_engine)


@pytest.mark.parametrize(
    "prompt, sp_kwargs, exc_match",
    [
        ([1, 512], {}, "out of range"),
        ([1, -1], {}, "out of range"),
        ([1, 10**12], {}, "out of range"),  # not even an int32
        ("", {}, "empty"),
        ([], {}, "empty"),
        ([1, True], {}, "boolean"),
        ([1, "a"], {}, "token ids"),
        ([1, 3.7], {}, "integer token ids"),  # never truncated silently
        (None, {}, "prompt"),
        ("Once upon a time", dict(stop_token_ids=[512]), "stop token"),
        ("Once upon a time", dict(logprobs=513), "vocabulary"),
        ("Once upon a time", dict(prompt_logprobs=513), "vocabulary"),
        # 5 prompt tokens + 508 > max_position_embeddings (512).
        ("Once upon a time", dict(max_tokens=508), "maximum model length"),
        ([1] * 513, dict(max_tokens=0), "maximum model length"),
    ],
)
def test_bad_request(stories_engine, assert_engine_healthy, prompt, sp_kwargs, exc_match):
    with pytest.raises(ValueError, match=exc_match):
        stories_engine.generate([prompt], SamplingParams(**sp_kwargs))
    assert_engine_healthy(stories_engine)


def test_length_limit_boundary(stories_engine):
    """Exactly max_model_len tokens is allowed; one more is not."""
    out = stories_engine.generate(
        ["Once upon a time"], SamplingParams(max_tokens=507, temperature=0.0, ignore_eos=True)
    )[0]
    assert len(out.token_ids) == 507 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="maximum model length"):
        stories_engine.add_request([1, 403, 407, 261, 378], SamplingParams(max_tokens=508))
    tu.assert_idle(stories_engine)


def test_max_model_len_option_limits_requests(stories_dir):
    engine = Engine(str(stories_dir), max_model_len=32)
    assert engine.model_info.max_model_len == 32
    assert len(engine.generate([[1] * 8], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids) == 24
    with pytest.raises(ValueError, match="maximum model length 32"):
        engine.generate([[1] * 8], SamplingParams(max_tokens=25))
    tu.assert_idle(engine)


def test_bad_prompt_in_batch_leaves_nothing_queued(stories_engine, assert_engine_healthy, golden):
    good = golden["max_new_tokens_64"][0]["prompt"]
    for bad in ([1, 9999], "", [], [1, -3]):
        with pytest.raises(ValueError):
            stories_engine.generate([good, good, bad, good], SamplingParams(max_tokens=8))
        tu.assert_idle(stories_engine)
    # A bad SamplingParams in the middle of a list.
    bad_sp = SamplingParams()
    bad_sp.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        stories_engine.generate([good] * 3, [SamplingParams(), bad_sp, SamplingParams()])
    tu.assert_idle(stories_engine)
    with pytest.raises(ValueError, match="SamplingParams"):
        stories_engine.generate([good] * 3, [SamplingParams()] * 2)
    tu.assert_idle(stories_engine)
    assert_engine_healthy(stories_engine)


def test_add_request_errors_leave_engine_usable(stories_engine, assert_engine_healthy):
    with pytest.raises(ValueError):
        stories_engine.add_request([], SamplingParams())
    with pytest.raises(ValueError):
        stories_engine.add_request([600], SamplingParams())
    tu.assert_idle(stories_engine)
    assert_engine_healthy(stories_engine)


def test_errors_do_not_poison_a_fresh_engine(broken_models, small_llama):
    """After failed loads, a new engine over a good model loads and matches a reference engine."""
    for name in ("garbage", "truncated", "gpt2"):
        with pytest.raises(ValueError):
            Engine(str(broken_models[name]))
    prompt = tu.random_prompts(384, [7], seed=1)[0]
    a = Engine(str(small_llama), num_threads=1).generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    hf = tu.hf_model(small_llama)
    ref = tu.hf_logprobs(hf, prompt + a[0].token_ids)
    tu.check_greedy_path(a[0].token_ids, ref, len(prompt))

