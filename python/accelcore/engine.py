"""The Python face of the C++ engine: model resolution, tokenization and result objects.

All scheduling, memory and compute live in C++ (accelcore._core); this module only turns text
into token ids and C++ outputs into vLLM-style result objects.
"""

from __future__ import annotations

import operator
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

from accelcore import _core
from accelcore._core import SamplingParams

Prompt = Union[str, Sequence[int]]
Logprobs = Dict[int, float]


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    logprobs: Optional[List[Logprobs]] = None
    error: Optional[str] = None  # why, when finish_reason is "error"


@dataclass
class RequestOutput:
    """The result of one prompt, shaped like vLLM's RequestOutput (plus shortcuts to outputs[0])."""

    request_id: int
    prompt: Optional[str]
    prompt_token_ids: List[int]
    prompt_logprobs: Optional[List[Optional[Logprobs]]]
    outputs: List[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # Set when finished: ttft_s, tpot_s, e2e_s, num_cached_tokens, num_preemptions.
    metrics: Optional[Dict[str, float]] = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> List[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> Optional[str]:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> Optional[List[Logprobs]]:
        return self.outputs[0].logprobs

    @property
    def num_steps(self) -> int:
        """Forward passes that produced this request's tokens (the last prefill pass included)."""
        return int(self.metrics["num_steps"]) if self.metrics else 0

    @property
    def num_draft_tokens(self) -> int:
        return int(self.metrics["num_draft_tokens"]) if self.metrics else 0

    @property
    def num_accepted_draft_tokens(self) -> int:
        return int(self.metrics["num_accepted_draft_tokens"]) if self.metrics else 0


@dataclass
class StreamOutput:
    """One update of a streamed request: the tokens and text new since the previous update."""

    request_id: int
    new_token_ids: List[int]
    new_text: str
    token_ids: List[int]
    text: str
    finished: bool
    finish_reason: Optional[str]
    metrics: Optional[Dict[str, float]] = None


_METRIC_FIELDS = (
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "num_cached_tokens",
    "num_preemptions",
    "num_steps",
    "num_draft_tokens",
    "num_accepted_draft_tokens",
)


class _IncrementalText:
    """A stream's text so far, decoding only a window of its last tokens per step.

    Decoding the whole prompt and output at every step made a stream's text cost grow with its
    length at every token (stories260K, 200 tokens after a 300-token prompt: 71-74 ms streamed
    against 15-17 ms generated; benchmarks/streaming.py). As vLLM's incremental detokenizer does, each step decodes the tokens from a
    few before the last emitted one (`prefix`) to the end, and emits what that adds to the decode of
    the window without the new tokens: a decoder's edge effects (Llama's stripped leading space)
    are the same in both and cancel. The finished text is still the whole sequence's decode (what
    generate() returns), and a step whose window does not extend its earlier text falls back to it.
    """

    def __init__(self, engine: "Engine", prompt_ids: Sequence[int]):
        self._engine = engine
        added = engine.tokenizer.get_added_tokens_decoder() if engine.tokenizer is not None else {}
        self._special = {i for i, t in added.items() if t.special}
        self._prompt = list(prompt_ids)
        self._ids = list(prompt_ids)  # prompt and output so far
        self._prefix = 0  # the window's first token
        if engine.tokenizer is not None:
            self._prefix = self._char_start(self._ids, max(len(self._ids) - 6, 0))
        self._read = len(self._ids)  # the window's tokens before it are shown as text
        self._base = ""  # the stream's text up to token _read

    def text(self, out_ids: Sequence[int], text: str, finished: bool) -> str:
        """The stream's text after out_ids (the output so far); `text`: the text before them."""
        engine = self._engine
        if finished or engine.tokenizer is None:
            return engine._continuation_text(self._prompt, out_ids)
        ids = self._ids
        ids.extend(out_ids[len(ids) - len(self._prompt):])
        if self._joins(ids[-1]):
            # The last token is a byte whose run may go on: held back, as the whole run is. A
            # byte-fallback decoder renders a run that is not valid UTF-8 as one U+FFFD per byte,
            # whole characters in it included ("日" became "����" when the next character's first
            # byte came): shown early, text was taken back, and the stream sent its whole text
            # again.
            return text
        before = engine.decode(ids[self._prefix:self._read])
        window = engine.decode(ids[self._prefix:])
        if window.startswith(before):
            full = self._base + window[len(before):]
        else:
            full = engine._continuation_text(self._prompt, out_ids)
        if full.endswith("\ufffd"):
            # A character whose bytes are still arriving (split across tokens): what comes before
            # it is shown, the window stays.
            shown = full.rstrip("\ufffd")
            return shown if shown.startswith(text) else text
        self._prefix, self._read, self._base = self._char_start(ids, self._read), len(ids), full
        return full

    def _joins(self, token: int) -> bool:
        """Whether the token may join a run of byte-fallback tokens, which the decoder decodes
        as one byte string: a byte token (`<0xNN>`), or a special token (skipped, so that the
        bytes on either side join)."""
        if token in self._special:
            return True
        piece = self._engine.tokenizer.id_to_token(token)
        return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")

    def _char_start(self, ids: Sequence[int], i: int) -> int:
        """i, or the closest token before it that starts no later than the character or run of
        byte tokens at i: a window that starts inside one decodes it differently."""
        while i > 0 and (self._joins(ids[i]) or self._engine.decode([ids[i]]).startswith("\ufffd")):
            i -= 1
        return i


def _metrics(out) -> Dict[str, float]:
    return {name: getattr(out.metrics, name) for name in _METRIC_FIELDS}


def resolve_model_path(model: str) -> str:
    """A local directory as is; otherwise a Hugging Face hub id through huggingface_hub's cache."""
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise FileNotFoundError(
                f"model directory not found: {model!r} (to use a hub id, install huggingface_hub)"
            ) from None
        try:
            return snapshot_download(
                model, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]
            )
        except Exception as e:  # network errors, unknown repo, gated repo
            raise FileNotFoundError(f"model {model!r} is neither a directory nor a reachable hub repo: {e}") from e
    raise FileNotFoundError(f"model directory not found: {model!r}")


class Engine:
    """An inference engine over one model.

    Keyword options map to the C++ EngineConfig: num_threads, block_size, num_kv_blocks,
    kv_cache_memory_bytes, max_num_seqs, max_num_batched_tokens, max_model_len,
    enable_prefix_caching, seed, speculation options, quantization, quant_group_size,
    quant_calibration (texts or token id lists), kv_cache_dtype.

    Threads: add_request, abort and stats may be called from any thread while one thread drives
    step() (or generate/generate_stream, which drive step() themselves). Outputs that a step
    produces for a request some other call is waiting on are kept for that call.
    """

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu", **options):
        self.model_path = resolve_model_path(model)
        config = _core.EngineConfig()
        config.model_path = self.model_path
        config.dtype = dtype
        config.device = device
        self.tokenizer = self._load_tokenizer(self.model_path)
        calibration = options.pop("quant_calibration", None)
        if calibration is None and options.get("quantization") == "w4a4":
            # FMPQ needs calibration activations: without any given, text sampled from the model
            # itself (seeded, so the quantized model is reproducible).
            from accelcore.quantize import sample_calibration

            calibration = sample_calibration(self.model_path, num_threads=options.get("num_threads"))
        for key, value in options.items():
            if key == "model_path" or not hasattr(config, key):
                raise ValueError(f"unknown Engine option {key!r}")
            if value is not None:
                setattr(config, key, value)
        if calibration is not None:
            # Texts or token id lists; texts are tokenized like prompts.
            config.quant_calibration = [self._prompt_ids(c) for c in calibration]
        self._engine = _core.Engine(config)
        # Outputs a step produced for requests the stepping caller does not own, by request id.
        self._inbox: Dict[int, list] = {}
        self._inbox_lock = threading.Lock()
        self._owned: set = set()  # ids generate/generate_stream wait on
        self._discard: set = set()  # ids they gave up on: their abort outputs are dropped
        # Stepping and routing a step's outputs happen as one, so outputs never reorder between
        # threads that step (a server loop beside a generate call).
        self._step_lock = threading.Lock()

    @staticmethod
    def _load_tokenizer(path: str):
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tok_file)

    # ---- model facts ----
    @property
    def model_info(self):
        return self._engine.model_info

    @property
    def config(self):
        """The engine's EngineConfig as resolved (a quantized checkpoint's scheme, the KV dtype)."""
        return self._engine.config

    # ---- tokenization ----
    def encode(self, text: str) -> List[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer.json: pass prompts as token id lists")
        if not isinstance(text, str):
            raise ValueError(f"expected a string prompt, got {type(text).__name__}")
        if text == "":
            raise ValueError("prompt is empty: give at least one character or token")
        return self.tokenizer.encode(text).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _continuation_text(self, prompt_ids: Sequence[int], out_ids: Sequence[int]) -> str:
        # Decoding the whole sequence keeps the spacing the prompt implies (Llama's decoder strips
        # a leading space from text decoded on its own).
        if self.tokenizer is None:
            return ""
        prefix = self.decode(prompt_ids)
        full = self.decode(list(prompt_ids) + list(out_ids))
        return full[len(prefix):] if full.startswith(prefix) else self.decode(out_ids)

    def _prompt_ids(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        try:
            # operator.index accepts ints (and numpy integers) but not floats or strings.
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError(f"a prompt must be a string or a list of integer token ids, got {prompt!r:.80}") from None
        if any(isinstance(t, bool) for t in prompt):
            raise ValueError("token ids must be integers, not booleans")
        for i, t in enumerate(ids):
            if not -(2**31) <= t < 2**31:  # would not even reach the C++ range check (int32)
                vocab = self.model_info.vocab_size if hasattr(self, "_engine") else "the vocabulary size"
                raise ValueError(f"prompt token id {t} at index {i} is out of range [0, {vocab})")
        return ids

    # ---- low level: the step loop ----
    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None) -> int:
        """Queues one request; returns its id. Raises ValueError on bad input."""
        return self._engine.add_request(self._prompt_ids(prompt), params or SamplingParams())

    def step(self):
        """Runs one engine step; returns the C++ outputs (new tokens per request) for requests
        added with add_request (outputs of generate/generate_stream requests go to those calls)."""
        with self._step_lock:
            outs = self._take_inbox(None)
            for out in self._engine.step():
                if out.request_id in self._owned or out.request_id in self._discard:
                    self._put_inbox(out)
                else:
                    outs.append(out)
        return outs

    def _put_inbox(self, out) -> None:
        with self._inbox_lock:
            if out.request_id in self._discard:
                if out.finished:
                    self._discard.discard(out.request_id)
                return
            self._inbox.setdefault(out.request_id, []).append(out)

    def _take_inbox(self, ids) -> list:
        """Removes and returns kept outputs: for `ids`, or (None) for every request not owned."""
        with self._inbox_lock:
            keys = [k for k in self._inbox if (k in ids if ids is not None else k not in self._owned)]
            return [o for k in keys for o in self._inbox.pop(k)]

    def _pump(self, ids) -> list:
        """Outputs for `ids`: kept ones, else one engine step's worth; others are kept."""
        with self._step_lock:
            outs = self._take_inbox(ids)
            if outs:
                return outs
            for out in self._engine.step():
                if out.request_id in ids:
                    outs.append(out)
                else:
                    self._put_inbox(out)
        return outs

    def abort(self, request_id: int) -> None:
        self._engine.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while the engine holds requests, or step() still has outputs to hand over (kept
        when generate/generate_stream stepped requests added with add_request)."""
        if self._engine.has_unfinished_requests():
            return True
        with self._inbox_lock:
            return any(k not in self._owned for k in self._inbox)

    def stats(self) -> Dict[str, float]:
        """Engine counters: num_running, num_waiting, num_free_blocks, num_total_blocks,
        num_preemptions, prefix_cache_hit_tokens, step_time_s, forward_time_s, ..."""
        s = self._engine.stats()
        return {name: getattr(s, name) for name in dir(s) if not name.startswith("_")}

    def save_quantized(self, out_dir: str) -> None:
        """Writes the quantized model (a 4-bit `quantization`, or a quantized checkpoint loaded) to
        `out_dir` (new or empty) as a checkpoint Engine loads: packed safetensors, config.json with
        a quantization_config, the tokenizer copied."""
        self._engine.save_quantized(str(out_dir))

    # ---- high level ----
    def generate(
        self,
        prompts: Union[Prompt, Iterable[Prompt]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
    ) -> List[RequestOutput]:
        """Generates for every prompt (batched in one engine) and returns results in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        # Tokenize everything first so a bad prompt leaves nothing queued.
        ids = [self._prompt_ids(p) for p in prompts]
        results: Dict[int, RequestOutput] = {}
        order: List[int] = []
        try:
            for prompt, prompt_ids, sp in zip(prompts, ids, params):
                rid = self._add_owned(prompt_ids, sp)
                order.append(rid)
                results[rid] = RequestOutput(
                    request_id=rid,
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=prompt_ids,
                    prompt_logprobs=None,
                    outputs=[CompletionOutput(0, "", [], None, [] if sp.logprobs is not None else None)],
                )
            pending = set(order)
            while pending:
                for out in self._pump(pending):
                    self._apply(results[out.request_id], out)
                    if out.finished:
                        pending.discard(out.request_id)
        finally:
            self._release(order, [rid for rid in order if not results[rid].finished])
        for res in results.values():
            comp = res.outputs[0]
            comp.text = self._continuation_text(res.prompt_token_ids, comp.token_ids)
        return [results[rid] for rid in order]

    def generate_stream(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None) -> Iterator[StreamOutput]:
        """Generates for one prompt, yielding the new tokens (and text) of each step as they come.

        Closing the generator early aborts the request."""
        prompt_ids = self._prompt_ids(prompt)
        rid = self._add_owned(prompt_ids, sampling_params or SamplingParams())
        token_ids: List[int] = []
        text = ""
        detok = _IncrementalText(self, prompt_ids)
        finished = False
        try:
            while not finished:
                for out in self._pump({rid}):
                    token_ids.extend(out.new_token_ids)
                    finished = out.finished
                    full = detok.text(token_ids, text, finished)
                    new_text = full[len(text):] if full.startswith(text) else full
                    text = full
                    if out.new_token_ids or finished:
                        yield StreamOutput(
                            request_id=rid,
                            new_token_ids=list(out.new_token_ids),
                            new_text=new_text,
                            token_ids=list(token_ids),
                            text=text,
                            finished=finished,
                            finish_reason=out.finish_reason,
                            metrics=_metrics(out) if finished else None,
                        )
        finally:
            self._release([rid], [] if finished else [rid])

    def _add_owned(self, prompt_ids: List[int], params: SamplingParams) -> int:
        # Owned before the engine can produce anything for it, so no output escapes to step().
        with self._inbox_lock:
            rid = self._engine.add_request(prompt_ids, params)
            self._owned.add(rid)
        return rid

    def _release(self, ids, unfinished) -> None:
        """Ends ownership of `ids`; aborts those of `unfinished` that have not finished (after an
        exception or a closed stream)."""
        with self._inbox_lock:
            # A finished output may already wait in the inbox, unread: then there is nothing to abort.
            unfinished = [r for r in unfinished if not any(o.finished for o in self._inbox.get(r, ()))]
            self._discard.update(unfinished)
            for rid in ids:
                self._owned.discard(rid)
                self._inbox.pop(rid, None)
        for rid in unfinished:
            self._engine.abort(rid)
        if unfinished:
            # Collect the abort outputs now, so the engine reports nothing unfinished for them.
            with self._step_lock:
                for out in self._engine.step():
                    self._put_inbox(out)

    @staticmethod
    def _apply(res: RequestOutput, out) -> None:
        comp = res.outputs[0]
        comp.token_ids.extend(out.new_token_ids)
        if comp.logprobs is not None:
            comp.logprobs.extend(dict(lp) for lp in out.new_logprobs)
        if out.prompt_logprobs is not None:
            res.prompt_logprobs = [dict(lp) if i > 0 else None for i, lp in enumerate(out.prompt_logprobs)]
        if out.finished:
            comp.finish_reason = out.finish_reason
            comp.error = out.error or None
            res.finished = True
            res.metrics = _metrics(out)
