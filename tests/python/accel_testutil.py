"""Shared helpers for the Python test suite: random Hugging Face checkpoints and transformers references.

Everything here is independent of accelcore: the models are built and scored with transformers
(eager attention, float32), which is the reference the engine is checked against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

# Log-probabilities must agree with transformers (float32, CPU) this closely; the observed gap is ~1e-5.
LOGPROB_TOL = 1e-4
# Where a greedy step is a near tie in the reference, either token is a correct answer.
TIE_MARGIN = 1e-4

BASE_CONFIG = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=None,  # no EOS: generation lengths stay deterministic unless a test sets one
    pad_token_id=None,
    tie_word_embeddings=False,
)


def config_class(arch: str):
    import transformers

    return {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[arch]


def model_class(arch: str):
    import transformers

    return getattr(transformers, arch)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Random weights that give peaked logits; norms and biases random too, so they matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied parameters appear once
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))


def build_model(
    path: Path,
    arch: str = "LlamaForCausalLM",
    *,
    seed: int = 0,
    save_dtype: torch.dtype = torch.float32,
    max_shard_size: Optional[str] = None,
    std: float = 0.2,
    edit_config=None,
    **overrides,
) -> Path:
    """Saves a random `arch` checkpoint (safetensors) to `path` and returns it."""
    cfg_kwargs = dict(BASE_CONFIG)
    cfg_kwargs.update(overrides)
    cfg = config_class(arch)(**cfg_kwargs)
    torch.manual_seed(seed)
    model = model_class(arch)(cfg).eval()
    randomize(model, seed, std)
    if save_dtype != torch.float32:
        model = model.to(save_dtype)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)
    if edit_config is not None:
        cfg_path = path / "config.json"
        data = json.loads(cfg_path.read_text())
        edit_config(data)
        cfg_path.write_text(json.dumps(data, indent=2))
    return path


def random_prompts(vocab: int, lengths: Sequence[int], seed: int, low: int = 3) -> List[List[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(low, vocab, size=n - 1).tolist() for n in lengths]


_HF_CACHE = {}


def hf_model(path, **config_overrides):
    """transformers' model for `path` in float32 with eager attention (config fields overridable).

    Cached per (path, overrides): the checkpoints are immutable within a session.
    """
    key = (str(path), json.dumps(config_overrides, sort_keys=True))
    if key not in _HF_CACHE:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(str(path))
        for k, v in config_overrides.items():
            setattr(cfg, k, v)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=cfg, dtype=torch.float32, attn_implementation="eager"
        )
        _HF_CACHE[key] = model.eval()
    return _HF_CACHE[key]


@torch.no_grad()
def hf_logprobs(model, ids: Sequence[int]) -> np.ndarray:
    """log_softmax of transformers' logits for every position of `ids` (row i predicts ids[i + 1])."""
    logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].to(torch.float64)
    return torch.log_softmax(logits, dim=-1).numpy()


@torch.no_grad()
def hf_logits(model, ids: Sequence[int]) -> np.ndarray:
    return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].to(torch.float64).numpy()


def check_logprob_dict(entry: Dict[int, float], ref_row: np.ndarray, k: int, taken: int, tol: float = LOGPROB_TOL):
    """One position's {token: logprob} from the engine against the reference row.

    Holds: the entry has the token taken and k top tokens (k or k + 1 keys), every value equals
    the reference log-probability, and the top tokens really are the k best (up to ties within tol).
    """
    assert taken in entry, f"the actual token {taken} is missing from {entry}"
    assert len(entry) in (k, k + 1), f"expected {k} top entries plus the actual token, got {len(entry)}"
    for tok, lp in entry.items():
        assert 0 <= tok < ref_row.shape[0]
        assert abs(lp - ref_row[tok]) <= tol, f"token {tok}: engine {lp} vs transformers {ref_row[tok]}"
    if k > 0:
        kth_best = np.sort(ref_row)[::-1][k - 1]
        top = sorted(entry, key=lambda t: -entry[t])[:k]
        for tok in top:
            assert ref_row[tok] >= kth_best - tol, f"token {tok} is not among the reference top {k}"


def check_greedy_path(tokens: Sequence[int], ref_logprobs: np.ndarray, prompt_len: int, tie: float = TIE_MARGIN):
    """Every generated token is the reference argmax of the teacher-forced logits (near ties allowed)."""
    for j, tok in enumerate(tokens):
        row = ref_logprobs[prompt_len - 1 + j]
        best = float(row.max())
        assert row[tok] >= best - tie, (
            f"step {j}: engine chose {tok} (logprob {row[tok]:.6f}) but the reference argmax "
            f"{int(row.argmax())} has {best:.6f}"
        )


def top2_margin(logits_row: np.ndarray) -> float:
    s = np.sort(logits_row)
    return float(s[-1] - s[-2])


def chi_square(counts: Dict[int, int], probs: np.ndarray, min_expected: float = 5.0):
    """Pearson's statistic and degrees of freedom; cells expected below min_expected are pooled."""
    n = sum(counts.values())
    expected = probs * n
    big = np.nonzero(expected >= min_expected)[0]
    stat, cells = 0.0, 0
    pooled_e, pooled_o = n - expected[big].sum(), n - sum(counts.get(int(t), 0) for t in big)
    for t in big:
        o = counts.get(int(t), 0)
        stat += (o - expected[t]) ** 2 / expected[t]
        cells += 1
    if pooled_e >= 1.0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        cells += 1
    elif pooled_o > 0:
        stat = float("inf")  # mass where the reference has (almost) none
    return stat, max(cells - 1, 1)


def chi_square_bound(df: int) -> float:
    """A generous acceptance bound (far beyond the 99.99th percentile) for a chi-square with df."""
    return df + 8.0 * (2.0 * df) ** 0.5 + 20.0


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def copy_model_dir(src: Path, dst: Path) -> Path:
    """Copies a (small, test-built) model directory file by file."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def assert_same_outputs(got, want, what: str) -> None:
    """Two runs' outputs are identical: the same tokens and the same log-probabilities, to the bit."""
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, f"{what}: request {i}"
        assert g.logprobs == w.logprobs, f"{what}: request {i}"


def assert_idle(engine) -> None:
    """The engine holds no request and every KV block is free."""
    s = engine.stats()
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert s["num_free_blocks"] == s["num_total_blocks"], s
    assert not engine.has_unfinished_requests()
