"""The command line (`python -m accelcore generate ...`) and device selection."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

import accelcore
from accelcore import Engine


def _run_cli(args, cwd):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the installed package, not the source tree
    return subprocess.run(
        [sys.executable, "-m", "accelcore", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_generate_prints_golden(stories_dir, golden, tmp_path):
    e0, e1 = golden["max_new_tokens_64"][0], golden["max_new_tokens_64"][2]
    r = _run_cli(
        ["generate", "--model", str(stories_dir), e0["prompt"], e1["prompt"], "--max-tokens", "64"], tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert e0["prompt"] + e0["continuation_text"] in r.stdout
    assert e1["prompt"] + e1["continuation_text"] in r.stdout
    assert r.stdout.index(e0["prompt"]) < r.stdout.index(e1["prompt"])
    assert "128 tokens" in r.stderr  # the summary line counts both outputs


def test_cli_stream_prints_the_same_text(stories_dir, golden, tmp_path):
    """--stream prints each prompt's text as it comes, the same as without it (also sampled)."""
    e0, e1 = golden["max_new_tokens_64"][0], golden["max_new_tokens_64"][2]
    for extra in ([], ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]):
        args = ["generate", "--model", str(stories_dir), e0["prompt"], e1["prompt"], "--max-tokens", "64"] + extra
        plain = _run_cli(args, tmp_path)
        streamed = _run_cli(args + ["--stream"], tmp_path)
        assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
        assert streamed.stdout == plain.stdout
        assert "2 prompt(s), 128 tokens" in streamed.stderr
        if not extra:
            assert e0["prompt"] + e0["continuation_text"] in streamed.stdout
            assert e1["prompt"] + e1["continuation_text"] in streamed.stdout


def test_cli_speculation_gives_the_same_text(stories_dir, golden, tmp_path):
    case = golden["max_new_tokens_256"][1]  # repetitive: drafts get accepted
    args = ["generate", "--model", str(stories_dir), case["prompt"], "--max-tokens", "256"]
    plain = _run_cli(args, tmp_path)
    spec = _run_cli(args + ["--speculation", "lookahead", "--spec-policy", "fixed", "--enable-prefix-caching"], tmp_path)
    smart = _run_cli(args + ["--speculation", "lookahead"], tmp_path)  # smartspec, the default policy
    assert plain.returncode == 0 and spec.returncode == 0 and smart.returncode == 0, spec.stderr + smart.stderr
    assert spec.stdout == plain.stdout and smart.stdout == plain.stdout
    assert case["prompt"] + case["continuation_text"] in spec.stdout
    assert "1.00 tokens per forward pass" in plain.stderr
    assert "1.00 tokens per forward pass" not in spec.stderr


def test_cli_quantization_matches_the_python_engine(stories_dir, tmp_path):
    from accelcore import Engine, SamplingParams

    prompt = "Once upon a time"
    args = ["generate", "--model", str(stories_dir), prompt, "--max-tokens", "40", "--quantization", "w4a8"]
    out = _run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr
    # The CLI's default group (128) through the Python API gives the same greedy text, and it is
    # not the float model's.
    greedy = SamplingParams(max_tokens=40, temperature=0.0)
    want = Engine(str(stories_dir), quantization="w4a8").generate([prompt], greedy)[0]
    plain = Engine(str(stories_dir)).generate([prompt], greedy)[0]
    assert want.text != plain.text
    assert prompt + want.text in out.stdout
    bad = _run_cli(args[:-1] + ["w2"], tmp_path)
    assert bad.returncode != 0 and "--quantization" in bad.stderr


def test_cli_seeded_sampling_is_reproducible(stories_dir, tmp_path):
    args = ["generate", "--model", str(stories_dir), "Once upon a time", "--max-tokens", "24",
            "--temperature", "1.0", "--seed", "7", "--num-threads", "1"]
    a, b = _run_cli(args, tmp_path), _run_cli(args, tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    engine = Engine(str(stories_dir))
    out = engine.generate(["Once upon a time"], accelcore.SamplingParams(max_tokens=24, temperature=1.0, seed=7))[0]
    assert a.stdout == b.stdout
    assert "Once upon a time" + out.text in a.stdout


def test_cli_missing_model_dir(tmp_path):
    missing = tmp_path / "no_such_model"
    r = _run_cli(["generate", "--model", str(missing), "hello"], tmp_path)
    assert r.returncode != 0
    assert "error" in r.stderr.lower() and str(missing) in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_option_value(stories_dir, tmp_path):
    r = _run_cli(["generate", "--model", str(stories_dir), "hi", "--top-p", "0"], tmp_path)
    assert r.returncode != 0
    assert "top_p" in r.stderr and "Traceback" not in r.stderr


def test_cli_usage_error(tmp_path):
    r = _run_cli(["generate", "hello"], tmp_path)  # --model is required
    assert r.returncode != 0 and "--model" in r.stderr


def test_cuda_flags_are_consistent():
    # A usable device needs a CUDA build, and on Linux the NVIDIA device nodes; without them
    # (as on the CI machines this suite targets) cuda_available() must be False.
    if accelcore.cuda_available():
        assert accelcore.cuda_compiled()
    if not accelcore.cuda_compiled() or not glob.glob("/dev/nvidia[0-9]*"):
        assert accelcore.cuda_available() is False


def test_cuda_device_rejected_with_clear_message(stories_dir, stories_engine, golden):
    # Without a usable device (or, with one, until CUDA execution lands) device="cuda" must fail
    # cleanly with a ValueError that names CUDA, and leave other engines working.
    with pytest.raises(ValueError, match="cuda"):
        Engine(str(stories_dir), device="cuda")
    e = golden["max_new_tokens_64"][0]
    out = stories_engine.generate([e["prompt"]], accelcore.SamplingParams(max_tokens=64, temperature=0.0))[0]
    assert out.token_ids == e["new_ids"]


def test_cpu_isa_and_version():
    assert accelcore.cpu_isa() in ("avx512", "avx2", "scalar")
    assert accelcore.__version__ == accelcore._core.version()
    assert accelcore.__version__.count(".") >= 2
