"""llama.cpp runtime: load a GGUF, apply a head to every sampled token, stream text.

The head runs as a custom sampler in llama.cpp's sampler chain, right after llama.cpp's own
top-k sampler: it receives the base's k best candidates, reads the promotion set's logits from
llama.cpp's raw logits buffer (``llama_get_logits_ith``), computes the adjusted logits with
:meth:`sali.head.Head.adjust`, and writes the ``|C|`` candidates back into the chain's token
array, shrinking it to them (the mask). Greedy or temperature / top-k / top-p sampling then runs
natively on those candidates. Selecting the top k in C rather than NumPy matters: right after a
forward pass every NumPy call runs cache-cold, and a NumPy selection over 49k logits measured
~100 µs a token there, against ~25 µs for the whole callback on the native top k.

ctypes swallows exceptions raised inside a callback (it prints them and returns), which would
silently decode *without* the head. The sampler therefore stores any exception, and the
decoding loop raises it as soon as the token sampled under it comes back.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from sali.errors import SaliError
from sali.ggufcheck import check_gguf
from sali.head import Head
from sali.vocab import fingerprint

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@dataclass
class Sampling:
    """Generation settings shared by every command that generates.

    temperature 0 is greedy decoding; top_k 0, top_p 1 and min_p 0 disable those filters. They act
    *after* the head, on its candidates.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # drop candidates below min_p × the top candidate's probability (0 = off)
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past end-of-generation tokens (benchmarks)


@dataclass
class Completion:
    """One finished generation."""

    text: str
    tokens: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    seconds: float
    head_calls: int = 0
    head_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


class HeadError(SaliError):
    """The head raised while sampling; generation was stopped."""


@dataclass
class HeadSampler:
    """The callback llama.cpp calls once per sampled token (see module docstring).

    With a head active, llama.cpp's native top-k sampler runs just before it, so the callback
    receives the ``k`` best candidates (ids and logits) instead of the whole vocabulary; the
    promotion set's logits are read from llama.cpp's raw logits buffer. The candidate buffer
    holds ``n_vocab`` entries, so the ``k + |A|`` candidates always fit when written back.

    Attributes:
        calls, seconds: number of calls and total time spent inside them (s).
        error: the first exception raised inside the callback, if any.
        verify: also check what llama.cpp hands over against the raw logits (slow; for tests):
            without a head, the whole vocabulary in token-id order with exactly the raw logits;
            with one, exactly the k largest raw logits.
        probe: optional function called with a copy of the raw ``(V,)`` logits (for tests).
    """

    head: Head | None
    alpha: float
    get_logits: Callable[[], np.ndarray]
    n_vocab: int
    verify: bool = False
    probe: Callable[[np.ndarray], None] | None = None
    calls: int = 0
    seconds: float = 0.0
    error: BaseException | None = None

    @property
    def active(self) -> bool:
        return self.head is not None and self.alpha != 0.0

    def __call__(self, cur_p) -> None:
        start = time.perf_counter()
        try:
            self._apply(cur_p.contents)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the decoding loop
            if self.error is None:
                self.error = exc
        self.calls += 1
        self.seconds += time.perf_counter() - start

    def _apply(self, cur) -> None:
        address = ctypes.cast(cur.data, ctypes.c_void_p).value
        size = int(cur.size)
        given = np.frombuffer((ctypes.c_char * (size * TOKEN_DATA.itemsize)).from_address(address), TOKEN_DATA)
        if self.verify or self.probe is not None:
            raw = self.get_logits().copy()
            if self.verify:
                self._check(given, raw)
            if self.probe is not None:
                self.probe(raw)
        if not self.active:
            return
        head = self.head
        if size != min(head.k, self.n_vocab):
            raise RuntimeError(f"the head expects the base's top {head.k} candidates, llama.cpp passed {size}")
        promote_logits = self.get_logits()[head.promote] if head.promote.size else head.promote
        ids, adjusted = head.adjust(given["id"], given["logit"], promote_logits, self.alpha)
        count = ids.shape[0]
        out = np.frombuffer((ctypes.c_char * (count * TOKEN_DATA.itemsize)).from_address(address), TOKEN_DATA)
        out["id"] = ids
        out["logit"] = adjusted
        out["p"] = 0.0
        cur.size = count
        cur.sorted = False
        cur.selected = -1

    def _check(self, given: np.ndarray, raw: np.ndarray) -> None:
        if not self.active:
            if len(given) != self.n_vocab or not np.array_equal(given["id"], np.arange(self.n_vocab)):
                raise RuntimeError("llama.cpp's candidate array is not the whole vocabulary in token-id order")
            if not np.array_equal(given["logit"], raw):
                raise RuntimeError("llama.cpp's candidate logits differ from its raw logits")
            return
        if not np.array_equal(raw[given["id"]], given["logit"]):
            raise RuntimeError("the top-k candidates' logits differ from the raw logits")
        if given["logit"].min() < np.sort(raw)[-len(given)]:
            raise RuntimeError("llama.cpp's top-k candidates are not the k largest logits")


class Model:
    """A GGUF model loaded in llama.cpp, ready to generate with or without a head."""

    def __init__(
        self,
        path: str | Path,
        *,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_ctx: int = 2048,
        seed: int = 0,
        verbose: bool = False,
    ):
        self.path = Path(path)
        check_gguf(self.path)
        import llama_cpp
        import llama_cpp._logger
        from llama_cpp._utils import suppress_stdout_stderr

        # llama.cpp logs warnings (e.g. context longer than trained) to stderr; keep only errors.
        llama_cpp._logger.logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
        self._llama_cpp = llama_cpp
        threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        from sali.llamalog import capture_errors, load_error

        try:
            # llama.cpp prints load-time notes straight to file descriptor 2; hide them unless verbose
            with capture_errors() as log, suppress_stdout_stderr(disable=verbose):
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_gpu_layers=n_gpu_layers,
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_ctx=n_ctx,
                    seed=seed,
                    verbose=verbose,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise load_error(self.path, exc, log) from None
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = self.llm.n_ctx()
        self._vocab = self.llm._model.vocab
        self._fingerprint: str | None = None
        self._logits_view: tuple[int, np.ndarray] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def token_list(self) -> list[str]:
        """The raw vocabulary strings in id order (as stored in ``tokenizer.ggml.tokens``)."""
        get_text = self._llama_cpp.llama_vocab_get_text
        return [get_text(self._vocab, i).decode("utf-8", "surrogateescape") for i in range(self.n_vocab)]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.token_list())
        return self._fingerprint

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    @property
    def bos_text(self) -> str:
        bos = self.llm.token_bos()
        return self.token_text(bos) if bos >= 0 else ""

    @property
    def eos_text(self) -> str:
        eos = self.llm.token_eos()
        return self.token_text(eos) if eos >= 0 else ""

    def is_end(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str) -> list[int]:
        """Tokenize a formatted prompt: special tokens parsed, BOS added unless already there."""
        data = text.encode("utf-8")
        add_bos = self.llm._model.add_bos_token() and not (self.bos_text and text.startswith(self.bos_text))
        return self.llm.tokenize(data, add_bos=add_bos, special=True)

    def check_head(self, head: Head, head_name: str = "the head") -> None:
        """Refuse a head trained for another vocabulary (message names both)."""
        if head.vocab_size != self.n_vocab:
            raise SaliError(
                f"{head_name} is for a vocabulary of {head.vocab_size} tokens, but {self.name} has "
                f"{self.n_vocab} ({head.fingerprint} vs {self.fingerprint})"
            )
        head.check_vocab(self.fingerprint, self.name, head_name)

    # ---- decoding ------------------------------------------------------------------------
    def _raw_logits(self) -> np.ndarray:
        """A ``(V,)`` float32 view (no copy) of llama.cpp's logits for the last decoded token."""
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        address = ctypes.cast(pointer, ctypes.c_void_p).value
        if self._logits_view is None or self._logits_view[0] != address:
            self._logits_view = (address, np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)))
        return self._logits_view[1]

    def _prefill(self, tokens: Sequence[int]) -> None:
        """Evaluate `tokens`, reusing the KV cache for the prefix already evaluated."""
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens]
        common = 0
        limit = min(len(cached), len(tokens))
        while common < limit and cached[common] == tokens[common]:
            common += 1
        if common == len(tokens):
            common -= 1  # the last prompt token must be decoded again to get fresh logits
        llm.n_tokens = common
        llm.eval(list(tokens[common:]))

    def sample_tokens(
        self,
        prompt_tokens: Sequence[int],
        sampling: Sampling,
        head: Head | None = None,
        alpha: float = 1.0,
        *,
        verify: bool = False,
        probe: Callable[[np.ndarray], None] | None = None,
        stats: HeadSampler | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids until an end-of-generation token, `max_tokens` or the context end."""
        if not prompt_tokens:
            raise SaliError("the prompt is empty")
        if len(prompt_tokens) >= self.n_ctx:
            raise SaliError(f"the prompt is {len(prompt_tokens)} tokens but the context holds {self.n_ctx} (raise --ctx)")
        if head is not None:
            self.check_head(head)
        from llama_cpp._internals import LlamaSampler

        hook = stats or HeadSampler(head, alpha, self._raw_logits, self.n_vocab, verify=verify, probe=probe)
        chain = LlamaSampler()
        try:
            if hook.active:
                chain.add_top_k(hook.head.k)  # native selection: the callback gets only the top k
            chain.add_custom(hook)
            if sampling.temperature <= 0:
                chain.add_greedy()
            else:
                if sampling.top_k > 0:
                    chain.add_top_k(sampling.top_k)
                if sampling.top_p < 1.0:
                    chain.add_top_p(sampling.top_p, 1)
                if sampling.min_p > 0.0:
                    chain.add_min_p(sampling.min_p, 1)
                chain.add_temp(sampling.temperature)
                chain.add_dist(sampling.seed)
            self._prefill(prompt_tokens)
            for _ in range(sampling.max_tokens):
                token = chain.sample(self.llm._ctx, -1)
                if isinstance(hook.error, KeyboardInterrupt):
                    raise KeyboardInterrupt  # Ctrl-C landed inside the callback
                if hook.error is not None:
                    raise HeadError(f"the head failed while sampling, generation stopped: {hook.error!r}")
                if self.is_end(token) and not sampling.ignore_eos:
                    return
                yield token
                if self.llm.n_tokens + 1 >= self.n_ctx:
                    return
                self.llm.eval([token])
        finally:
            chain.close()

    def stream(
        self,
        prompt: str | Sequence[int],
        sampling: Sampling,
        head: Head | None = None,
        alpha: float = 1.0,
        result: dict | None = None,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece, honouring stop strings.

        `prompt` is a formatted prompt string or its token ids. When `result` is a dict it
        receives ``tokens``, ``finish_reason``, ``prompt_tokens``, ``head_calls`` and
        ``head_seconds`` once the stream ends (also when the consumer stops early).
        """
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        hook = HeadSampler(head, alpha, self._raw_logits, self.n_vocab)
        out = result if result is not None else {}
        out.update(tokens=[], finish_reason="length", prompt_tokens=len(tokens))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        holdback = max((len(s) for s in sampling.stop), default=1) - 1
        pending = ""
        generated = 0
        try:
            for token in self.sample_tokens(tokens, sampling, head, alpha, stats=hook):
                out["tokens"].append(token)
                generated += 1
                pending += decoder.decode(self.llm.detokenize([token]))
                cut = _find_stop(pending, sampling.stop)
                if cut is not None:
                    if pending[:cut]:
                        yield pending[:cut]
                    out["finish_reason"] = "stop"
                    return
                safe = len(pending) - holdback if sampling.stop else len(pending)
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
            else_reason = "length" if generated >= sampling.max_tokens else "eos"
            out["finish_reason"] = else_reason
            pending += decoder.decode(b"", final=True)
            if pending:
                yield pending
        finally:
            out["head_calls"], out["head_seconds"] = hook.calls, hook.seconds

    def complete(
        self,
        prompt: str | Sequence[int],
        sampling: Sampling,
        head: Head | None = None,
        alpha: float = 1.0,
    ) -> Completion:
        """Generate to the end and return the whole :class:`Completion`."""
        result: dict = {}
        start = time.perf_counter()
        text = "".join(self.stream(prompt, sampling, head, alpha, result))
        return Completion(
            text=text,
            tokens=result["tokens"],
            finish_reason=result["finish_reason"],
            prompt_tokens=result["prompt_tokens"],
            seconds=time.perf_counter() - start,
            head_calls=result["head_calls"],
            head_seconds=result["head_seconds"],
        )

    def teacher_forced_logits(self, prompt_tokens: Sequence[int], response_tokens: Sequence[int]) -> np.ndarray:
        """Raw logits ``(T, V)`` float32 at the positions that predict each of the ``T`` response
        tokens, from one batched pass over prompt + response (no sampling)."""
        llm = self.llm
        sequence = list(prompt_tokens) + list(response_tokens)[:-1]
        if len(sequence) >= self.n_ctx:
            raise SaliError(f"prompt + response is {len(sequence)} tokens but the context holds {self.n_ctx} (raise --ctx)")
        first = len(prompt_tokens) - 1  # position predicting response token 0
        out = np.empty((len(response_tokens), self.n_vocab), dtype=np.float32)
        llm.n_tokens = 0
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        for start in range(0, len(sequence), llm.n_batch):
            chunk = sequence[start : start + llm.n_batch]
            llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
            llm._ctx.decode(llm._batch)
            for i in range(len(chunk)):
                position = start + i
                if position >= first:
                    pointer = self._llama_cpp.llama_get_logits_ith(llm._ctx.ctx, i)
                    out[position - first] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        # the KV cache now holds this sequence, not what input_ids says: make the next call re-evaluate
        llm.n_tokens = 0
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None
