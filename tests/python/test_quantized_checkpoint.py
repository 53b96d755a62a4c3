"""Quantized checkpoints (`accelcore quantize`, Engine.save_quantized): a checkpoint written for a
scheme loads into an engine that gives exactly what the engine that quantized it on the fly gives
(same calibration); the directory is Hugging Face style (config.json with a quantization_config,
packed safetensors, the tokenizer); bad or mismatched checkpoints fail with errors naming what is
wrong; the CLI writes one with a progress bar and `generate` runs it; the checkpoint of a 4-bit
scheme at group size 128 is at most 30% of the model's float16 bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

import accel_testutil as tu
from accelcore import Engine, SamplingParams
from accelcore.quantize import quantize, read_calibration, scheme_options


@pytest.fixture(scope="module")
def calibration_file(stories_dir, tmp_path_factory):
    # A few sampled stories as token ids, one JSON list per line.
    base = Engine(str(stories_dir), num_threads=2)
    params = [SamplingParams(max_tokens=127, temperature=1.0, seed=40 + i, ignore_eos=True) for i in range(6)]
    seqs = [[1] + o.token_ids for o in base.generate([[1]] * 6, params)]
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in seqs) + "\n")
    return path, seqs


@pytest.fixture(scope="module")
def workload(golden):
    g = golden["max_new_tokens_256"]
    prompts = [e["prompt"] for e in g] + ["The little dog was sad because"]
    params = [SamplingParams(max_tokens=80, temperature=0.0, logprobs=2) for _ in g] + [
        SamplingParams(max_tokens=60, temperature=0.9, seed=5, logprobs=1)
    ]
    return prompts, params


@pytest.mark.parametrize("scheme", ["w4a16kv16", "w4a8kv4", "w4a4kv4"])
def test_loaded_checkpoint_equals_on_the_fly_quantization(stories_dir, calibration_file, workload, tmp_path, scheme):
    path, seqs = calibration_file
    out = tmp_path / "q"
    summary = quantize(str(stories_dir), str(out), scheme, group_size=32, calibration=str(path), progress=False)
    assert summary["bytes"] == os.path.getsize(out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    opts = scheme_options(scheme)
    assert q["quant_method"] == "accelcore" and q["scheme"] == scheme and q["group_size"] == 32
    assert q["kv_cache"] == opts["kv_cache_dtype"] and q["activations"] == opts["quantization"][2:]
    assert cfg["hidden_size"] == 64  # the rest of the config is the source's
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (stories_dir / f).read_bytes()

    prompts, params = workload
    loaded = Engine(str(out), num_threads=2)  # the KV cache dtype comes from the checkpoint
    assert loaded.config.kv_cache_dtype == opts["kv_cache_dtype"]
    assert loaded.config.quantization == opts["quantization"]
    fly = Engine(str(stories_dir), num_threads=2, quant_group_size=32, quant_calibration=seqs, **opts)
    want = fly.generate(prompts, params)
    tu.assert_same_outputs(loaded.generate(prompts, params), want, f"{scheme}: loaded vs on the fly")
    # Speculation on the loaded checkpoint changes nothing either.
    spec = Engine(str(out), num_threads=2, speculation="lookahead", spec_policy="fixed")
    tu.assert_same_outputs(spec.generate(prompts, params), want, f"{scheme}: loaded, speculation")
    tu.assert_idle(loaded)

    # Saving the loaded checkpoint again gives the same tensors.
    again = tmp_path / "again"
    loaded.save_quantized(str(again))
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_cli_quantize_then_generate(stories_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "accelcore", "quantize", "--model", str(stories_dir), "--out", str(out),
           "--scheme", "w4a8kv8", "--group-size", "32", "--num-samples", "4", "--sample-len", "64"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "quantizing (w4a8kv8, gptq)" in res.stderr and "5/5" in res.stderr  # the progress bar, per layer
    assert "of the model in float16" in res.stdout
    gen = subprocess.run([sys.executable, "-m", "accelcore", "generate", "--model", str(out), "Once upon a time",
                          "--max-tokens", "20"], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Once upon a time") and len(gen.stdout.split()) > 10
    # It ran the checkpoint as stored, its 8-bit KV cache included: the same text as the engine.
    want = Engine(str(out)).generate(["Once upon a time"], SamplingParams(max_tokens=20, temperature=0.0))[0]
    assert Engine(str(out)).config.kv_cache_dtype == "int8"
    assert gen.stdout.strip() == ("Once upon a time" + want.text).strip()
    # Bad requests fail with a message, not a traceback.
    bad = subprocess.run(cmd[:-6] + ["--out", str(tmp_path / "x"), "--scheme", "w3a8"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown quantization scheme 'w3a8'" in bad.stderr and "Traceback" not in bad.stderr
    busy = subprocess.run(cmd, capture_output=True, text=True)  # out exists now
    assert busy.returncode != 0 and "not empty" in busy.stderr


def test_checkpoint_is_at_most_30_percent_of_float16(model_factory, tmp_path):
    # Group size 128 (the default); embedding and head in 8 bits per row.
    path = model_factory("ckpt_size", seed=5, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=256)
    summary = quantize(str(path), str(tmp_path / "q"), "w4a8kv4", method="rtn", progress=False)
    assert summary["ratio"] <= 0.30, summary
    assert Engine(str(tmp_path / "q")).generate([[1, 5, 9]], SamplingParams(max_tokens=4, temperature=0.0))[0].token_ids


@pytest.fixture(scope="module")
def good_checkpoint(stories_dir, calibration_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "q"
    quantize(str(stories_dir), str(out), "w4a4kv4", group_size=32, calibration=str(calibration_file[0]), progress=False)
    return out


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        os.chmod(f, 0o644)
    return dst


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(d, fn):
    # Reads model.safetensors into (header, raw bytes per tensor), lets fn edit them, writes it back.
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    tensors = {k: [v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]]] for k, v in header.items()}
    fn(tensors)
    out, off, body = {}, 0, b""
    if meta is not None:
        out["__metadata__"] = meta
    for k, (dt, shape, data) in tensors.items():
        out[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        body += data
    text = json.dumps(out).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + body)


def test_corrupt_or_mismatched_checkpoints_fail_clearly(good_checkpoint, tmp_path):
    Engine(str(good_checkpoint))  # the untouched copy loads

    def fails(name, match, config=None, tensors=None):
        d = _copy(good_checkpoint, tmp_path, name)
        if config:
            _edit_config(d, config)
        if tensors:
            _rewrite_tensors(d, tensors)
        with pytest.raises(ValueError, match=match):
            Engine(str(d))

    fails("method", "quant_method is 'gptq'", config=lambda q: q.update(quant_method="gptq"))
    fails("version", "format_version must be 1", config=lambda q: q.update(format_version=2))
    fails("acts", "activations must be", config=lambda q: q.update(activations="a3"))
    fails("kv", "kv_cache must be", config=lambda q: q.update(kv_cache="fp8"))
    # The config says groups of 64: the packed tensors (written for 32) do not match.
    fails("group", r"q_proj.scales' is F32 \[64, 2\], the config and its quantization_config imply F32 \[64, 1\]",
          config=lambda q: q.update(group_size=64))
    fails("subgroup", "act_group is 16", config=lambda q: q.update(act_group=16))
    # A scheme without FMPQ orders, read as w4a4: the orders are missing.
    fails("noorder", "no tensor 'model.layers.0.self_attn.qkv_proj.input_order'",
          tensors=lambda t: [t.pop(k) for k in list(t) if k.endswith("input_order")])

    def truncate(t):
        dt, shape, data = t["model.layers.1.mlp.down_proj.qweight"]
        t["model.layers.1.mlp.down_proj.qweight"] = [dt, [shape[0], shape[1] - 1], data[: shape[0] * (shape[1] - 1)]]

    fails("packed", r"down_proj.qweight' is U8 \[64, 95\]", tensors=truncate)

    def bad_order(t):
        dt, shape, data = t["model.layers.0.mlp.down_proj.input_order"]
        t["model.layers.0.mlp.down_proj.input_order"] = [dt, shape, data[:4] + data[:4] + data[8:]]  # a repeat

    fails("perm", "down_proj.input_order' is not a permutation", tensors=bad_order)

    def bad_zero(t):
        dt, shape, data = t["model.layers.2.self_attn.o_proj.zeros"]
        t["model.layers.2.self_attn.o_proj.zeros"] = [dt, shape, b"\x20" + data[1:]]

    fails("zero", "o_proj.zeros' holds 32", tensors=bad_zero)

    # Options that contradict the checkpoint.
    with pytest.raises(ValueError, match="quantized checkpoint"):
        Engine(str(good_checkpoint), quantization="w4a8")
    with pytest.raises(ValueError, match="already quantized"):
        Engine(str(good_checkpoint), quantization="w4a4", quant_calibration=[[1, 2, 3]])
    Engine(str(good_checkpoint), kv_cache_dtype="int8")  # the KV cache may still be chosen


def test_bad_quantize_requests(stories_dir, tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        Engine(str(stories_dir)).save_quantized(str(tmp_path / "f"))
    with pytest.raises(ValueError, match="quantizes no weights"):
        quantize(str(stories_dir), str(tmp_path / "kv"), "kv4")
    with pytest.raises(ValueError, match="round to nearest uses none"):
        quantize(str(stories_dir), str(tmp_path / "rtn"), "w4a8kv4", method="rtn", calibration=__file__)
    with pytest.raises(ValueError, match="quant_method must be"):
        Engine(str(stories_dir), quantization="w4a8", quant_method="awq")
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        quantize(str(stories_dir), str(tmp_path / "c"), "w4a8", calibration=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_calibration(str(bad))
    engine = Engine(str(stories_dir), quantization="w4a8", quant_group_size=32)
    with pytest.raises(ValueError, match="is the model's own directory"):
        engine.save_quantized(str(stories_dir))
