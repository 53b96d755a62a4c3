"""Fixtures for the accelcore Python tests.

The tests run against the *installed* package (`pip install --no-build-isolation .`), never the
source tree under python/accelcore, which has no compiled _core module.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_SOURCE_PKG_ROOT = (REPO / "python").resolve()

# Never let the repository's source package shadow the installed one.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _SOURCE_PKG_ROOT]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # for accel_testutil, also under --import-mode=importlib

import accelcore  # noqa: E402

if Path(accelcore.__file__).resolve().parent == _SOURCE_PKG_ROOT / "accelcore":
    raise pytest.UsageError(
        "accelcore resolves to the source tree; install it (pip install --no-build-isolation .) "
        "and run pytest so that the installed package is imported"
    )

import accel_testutil as tu  # noqa: E402
import torch  # noqa: E402

# The references are tiny; torch's intra-op threads only add scheduling overhead (100x here) and
# compete with the engine's own pool.
torch.set_num_threads(1)


def _stories_dir() -> Path:
    env = os.environ.get("ACCELCORE_TEST_MODEL")
    return Path(env) if env else (REPO.parent / "shared" / "models" / "stories260K")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    d = _stories_dir()
    if not (d / "config.json").is_file() or not (d / "reference_outputs.json").is_file():
        pytest.fail(
            f"test model not found at {d} (set ACCELCORE_TEST_MODEL to the stories260K directory)",
            pytrace=False,
        )
    return d


@pytest.fixture(scope="session")
def golden(stories_dir):
    return json.loads((stories_dir / "reference_outputs.json").read_text())


@pytest.fixture(scope="session")
def golden_cases(golden):
    """All six (max_new_tokens, entry) pairs."""
    cases = []
    for key in ("max_new_tokens_64", "max_new_tokens_256"):
        n = int(key.rsplit("_", 1)[1])
        for entry in golden[key]:
            assert len(entry["new_ids"]) == n
            cases.append((n, entry))
    assert len(cases) == 6
    return cases


@pytest.fixture(scope="session")
def stories_engine(stories_dir):
    """One shared engine over stories260K. Tests must leave it idle (they check stats())."""
    return accelcore.Engine(str(stories_dir), num_threads=2)


@pytest.fixture(scope="session")
def hf_stories(stories_dir):
    return tu.hf_model(stories_dir)


@pytest.fixture
def assert_engine_healthy(golden):
    """Checks that an engine still produces the golden greedy output and holds nothing."""

    def check(engine):
        entry = golden["max_new_tokens_64"][0]
        out = engine.generate([entry["prompt"]], accelcore.SamplingParams(max_tokens=64, temperature=0.0))[0]
        assert out.token_ids == entry["new_ids"]
        assert out.text == entry["continuation_text"]
        tu.assert_idle(engine)

    return check


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """build(name, arch=..., **options) -> Path of a random checkpoint, built once per name."""
    root = tmp_path_factory.mktemp("models")
    built = {}

    def build(name, arch="LlamaForCausalLM", **options):
        if name not in built:
            built[name] = tu.build_model(root / name, arch, **options)
        return built[name]

    return build


@pytest.fixture(scope="session")
def small_llama(model_factory):
    """A random GQA Llama (vocab 384, 2 layers) without EOS, the workhorse of the token-id tests."""
    return model_factory("small_llama", seed=11)


@pytest.fixture(scope="session")
def small_llama_engine(small_llama):
    return accelcore.Engine(str(small_llama), num_threads=2)
