"""llama.cpp runtime: load a GGUF, apply a head to every sampled token, stream text.

The head runs as a sampler in llama.cpp's sampler chain, right after llama.cpp's own top-k
sampler: it receives the base's k best candidates, reads the promotion set's logits from
llama.cpp's raw logits buffer (``llama_get_logits_ith``), computes the adjusted logits and writes
the ``|C|`` candidates back into the chain's token array in place, shrinking it to them (the
mask). Greedy or temperature / top-k / top-p sampling then runs natively on those candidates.
One head alone runs as compiled code that llama.cpp calls directly (:mod:`sali.native`: no
Python per token); heads in combination, ``explain`` and the test checks run as a Python
callback (:class:`HeadSampler`, :class:`ChainSampler`) around the same arithmetic
(:meth:`sali.head.Head.adjust_into`, :mod:`sali.kernel`). Plain decoding puts no callback in the
chain at all. Selecting the top k in C rather than NumPy matters: right after a forward pass
everything runs cache-cold, and a NumPy selection over 49k logits measured ~100 µs a token there.

ctypes swallows exceptions raised inside a callback (it prints them and returns), which would
silently decode *without* the head. The sampler therefore stores any exception, and the
decoding loop raises it as soon as the token sampled under it comes back. For the same reason
Ctrl-C is held back while llama.cpp evaluates or samples on the main thread (:class:`CtrlC`):
the press is recorded and raised as KeyboardInterrupt right after, never inside the callback.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from numpy.random import SeedSequence  # imported here, not on first use: see Sampling.for_prompt

from sali.errors import SaliError
from sali.ggufcheck import check_gguf, kv_cache_bytes_per_token
from sali.head import Head, top_k_ids
from sali.vocab import fingerprint

_NO_LOGITS = np.zeros(0, dtype=np.float32)  # source of promoted logits for a head without promotion set
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@dataclass
class Sampling:
    """Generation settings shared by every command that generates.

    temperature 0 is greedy decoding; top_k 0, top_p 1, min_p 0, repeat_penalty 1 and the two
    OpenAI-style penalties at 0 disable those filters. They act *after* the head, on its
    candidates, in llama.cpp's order: penalties, top-k, top-p, min-p, temperature.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # divides a repeated token's positive logit (llama.cpp's repeat penalty)
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence (OpenAI semantics)
    presence_penalty: float = 0.0  # subtracted once if the token occurred at all
    penalty_last_n: int = 64  # how many of the last generated tokens the penalties look at
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past end-of-generation tokens (benchmarks)

    def check(self) -> None:
        """One clear error for settings llama.cpp would misbehave on."""
        if self.max_tokens < 1:
            raise SaliError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SaliError(f"temperature must be a finite number ≥ 0, not {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0:
            raise SaliError(f"top_p and min_p must lie in [0, 1] (got {self.top_p}, {self.min_p})")
        if self.top_k < 0:
            raise SaliError(f"top_k must be ≥ 0, not {self.top_k}")
        if not (self.repeat_penalty > 0 and math.isfinite(self.repeat_penalty)):
            raise SaliError(f"repeat_penalty must be a finite number > 0, not {self.repeat_penalty}")
        if not (math.isfinite(self.frequency_penalty) and math.isfinite(self.presence_penalty)):
            raise SaliError("frequency_penalty and presence_penalty must be finite numbers")

    def for_prompt(self, index: int) -> "Sampling":
        """These settings for prompt `index` (from 0) of a batch (generate -P, compare).

        Prompt 0 samples with ``seed`` itself, as ``sali chat`` and a one-prompt run do; every
        later prompt with its own seed mixed from ``seed`` and `index`. With one seed for all,
        every prompt would draw the same random numbers, so their outcomes move together and a
        rate over prompts swings with the seed far more than independent draws would; a plain
        ``seed + index`` would make runs with seeds 0 and 1 share all but one stream.

        This runs between two prompts of a batch, so it must not import anything: NumPy loads
        ``numpy.random`` on first use, and a Ctrl-C landing in that import (one of its compiled
        modules catches exceptions while it initialises) was lost, so the batch ran to the end.
        """
        if index == 0:
            return self
        mixed = int(SeedSequence([self.seed % 2**32, index]).generate_state(1)[0])
        return replace(self, seed=mixed % 0xFFFFFFFF)  # 0xFFFFFFFF would ask llama.cpp for a random seed

    @property
    def penalised(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass
class Completion:
    """One generation: filled in as it runs, final once its :class:`Stream` ends.

    finish_reason: ``eos`` (the model ended its turn), ``stop`` (a stop string), ``length``
    (``max_tokens`` reached), ``context`` (the context window is full) or ``cancelled``.
    """

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens kept from the KV cache instead of being read again
    seconds: float = 0.0  # wall time from the start of the prompt's evaluation to the end
    first_token_seconds: float | None = None  # time to the first generated token
    head_calls: int = 0
    head_seconds: float = 0.0
    prefill: str = ""  # text the response was forced to begin with (its tokens count as prompt tokens)
    explained: list["Explained"] | None = None  # per generated token, only when asked (explain=True)

    @property
    def response(self) -> str:
        """The whole response: the prefill, then the generated text."""
        return self.prefill + self.text

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def usage(self) -> dict[str, int]:
        """Token counts as OpenAI reports them (cached: prompt tokens kept from the KV cache)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens),
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class Explained:
    """What the head did to one generated token (``explain=True``).

    ``base_top1`` is the base's own choice (the argmax of its raw logits), ``head_top1`` the best
    candidate after the head(s), before penalties and sampling; ``rank`` is the chosen token's
    1-based rank among the base's logits, None when outside the top k the (first) head reads
    (without a head: among the whole vocabulary); ``logit_change`` is the chosen token's adjusted
    minus base logit in nats (0 without a head). ``changed``: the head moved the top-1 away from
    the base's, so the base alone would have chosen another token here (greedy decoding).
    """

    position: int
    token: int
    text: str
    base_top1: int
    base_text: str
    head_top1: int
    rank: int | None
    logit_change: float

    @property
    def changed(self) -> bool:
        return self.head_top1 != self.base_top1

    def as_dict(self) -> dict:
        return {"position": self.position, "token": {"id": self.token, "text": self.text},
                "base_top1": {"id": self.base_top1, "text": self.base_text}, "head_top1": self.head_top1,
                "rank": self.rank, "logit_change": round(self.logit_change, 5), "changed": self.changed}


class Stream:
    """The text of a generation piece by piece; :attr:`completion` is the result object.

    Iterating yields ``str`` pieces; once the iteration ends (or :meth:`close` stops it early)
    ``completion`` holds the whole text, tokens, finish reason and timings.
    """

    def __init__(self, pieces: Iterator[str], completion: Completion):
        self._pieces = pieces
        self.completion = completion

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating; the model is free for the next generation."""
        self._pieces.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finish(self) -> Completion:
        """Run to the end and return the :class:`Completion`."""
        for _ in self:
            pass
        return self.completion


class CtrlC:
    """Hold Ctrl-C back while llama.cpp runs one step, then raise it.

    Python raises KeyboardInterrupt between any two bytecodes, so a press could land in the
    sampler callback outside its ``try`` (where ctypes prints and drops it: the press would be
    lost). :meth:`install` replaces Python's default handler once per generation (main thread
    only; a server keeps its own handler) with one that, inside ``with ctrl_c:``, only records
    the press, which leaving the block raises; outside the block (e.g. while the generation is
    suspended at a ``yield``) it raises at once, as Python's own does. Entering and leaving a
    block are two attribute writes, so the per-token cost stays nil.
    """

    def __init__(self) -> None:
        self.pressed = False
        self.holding = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def uninstall(self) -> None:
        """Put the previous handler back, unless someone replaced ours meanwhile."""
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if not self.holding:
            raise KeyboardInterrupt
        self.pressed = True

    def __enter__(self) -> "CtrlC":
        self.holding = True
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.holding = False
        if self.pressed:
            self.pressed = False
            if kind is None:
                raise KeyboardInterrupt


class SaliWarning(UserWarning):
    """Something the user asked for cannot be done on this machine, and sali goes on without it."""


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
        durations: when a list, every call's time (s) is appended to it (benchmarks).
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
    durations: list[float] | None = None  # when a list, each call's seconds are appended (benchmarks)
    _address: int | None = None  # of the candidate array whose field views are cached below
    _ids: np.ndarray | None = None  # (n_vocab,) int32 view of its ids
    _logits: np.ndarray | None = None  # (n_vocab,) float32 view of its logits

    @property
    def active(self) -> bool:
        return self.head is not None and self.alpha != 0.0

    @property
    def top_k(self) -> int:
        """How many of the base's best candidates llama.cpp's native top-k hands the callback."""
        return self.head.k

    def adjusted(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The candidates the last call left (ids, logits), when they were recorded (ChainSampler)."""
        return None

    @property
    def selects_top_k(self) -> bool:
        """Whether it picks the base's top k itself (the compiled sampler does; this callback relies
        on llama.cpp's top-k sampler just before it)."""
        return False

    @property
    def needed(self) -> bool:
        """Whether the chain needs this callback at all (plain decoding with nothing to check does not)."""
        return self.active or self.verify or self.probe is not None

    def attach(self, chain) -> None:
        """Add this callback to llama-cpp-python's sampler chain ``chain``."""
        chain.add_custom(self)

    def __call__(self, cur_p) -> None:
        start = time.perf_counter()
        try:
            self._apply(cur_p.contents)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the decoding loop
            if self.error is None:
                self.error = exc
        elapsed = time.perf_counter() - start
        self.calls += 1
        self.seconds += elapsed
        if self.durations is not None:
            self.durations.append(elapsed)

    def _apply(self, cur) -> None:
        address = ctypes.cast(cur.data, ctypes.c_void_p).value
        if address != self._address:  # llama.cpp builds the array anew per token, mostly at the same address
            whole = np.frombuffer((ctypes.c_char * (self.n_vocab * TOKEN_DATA.itemsize)).from_address(address), TOKEN_DATA)
            self._ids, self._logits, self._address = whole["id"], whole["logit"], address
        size = cur.size
        if self.verify or self.probe is not None:
            self._inspect(cur)
        if not self.active:
            return
        head = self.head
        if size != min(head.k, self.n_vocab):
            raise RuntimeError(f"the head expects the base's top {head.k} candidates, llama.cpp passed {size}")
        ids, logits = self._ids, self._logits
        # the candidates are rewritten in place (the head reads each input before writing its slot);
        # p needs no writing: llama.cpp builds the array with p = 0 and its samplers recompute it
        raw = self.get_logits() if head.promote.size else _NO_LOGITS
        # self.calls counts this generation's earlier tokens: the response step (prefilled tokens are not sampled)
        count = head.adjust_into(ids[:size], logits[:size], raw, head.promote, ids, logits, self.alpha, self.calls)
        cur.size = count
        cur.sorted = False
        cur.selected = -1

    def _inspect(self, cur) -> None:
        """``verify`` and ``probe`` (tests): check the candidates, hand over the raw logits."""
        raw = self.get_logits().copy()
        if self.verify:
            check_candidates(candidates(cur), raw, self.n_vocab, self.top_k if self.active else 0)
        if self.probe is not None:
            self.probe(raw)


@dataclass
class ChainSampler(HeadSampler):
    """:class:`HeadSampler` for heads in combination (:mod:`sali.combine`, the same rule as
    :func:`sali.combine.apply_chain`), and for recording each call's result (``record``, for
    ``explain``). It runs only when asked; the single-head path stays as it is.

    Given a :class:`~sali.combine.Combined` (or one :class:`Head`) as ``head``, it keeps the heads
    that act at ``alpha · s`` in ``parts``, runs the first exactly as :class:`HeadSampler` runs a
    head alone (``head``/``alpha`` become that head and its strength), then the others in turn.
    """

    record: bool = False
    parts: list = field(default_factory=list)  # (Head, effective strength), none at 0
    _dense: np.ndarray | None = None  # (V,) -inf but for the current candidates (later heads' promotion logits)
    _written: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.head, Head):
            self.parts = [(self.head, self.alpha)] if self.alpha != 0.0 else []
        elif self.head is not None:
            self.parts = self.head.active(self.alpha)
        self.head, self.alpha = self.parts[0] if self.parts else (None, 0.0)

    def adjusted(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._written

    def _apply(self, cur) -> None:
        super()._apply(cur)  # the first head
        if not self.active:
            return
        count = cur.size
        for head, strength in self.parts[1:]:
            count = self._follow(head, strength, count)
        cur.size = count
        if self.record:
            self._written = (self._ids[:count].copy(), self._logits[:count].copy())

    def _follow(self, head: Head, strength: float, count: int) -> int:
        """A later head on the ``count`` candidates in place (sali.combine.follow, rule step 2)."""
        ids, logits = self._ids, self._logits
        if self._dense is None:
            self._dense = np.full(self.n_vocab, -np.inf, dtype=np.float32)
        dense = self._dense
        now_ids = ids[:count].copy()
        now_logits = logits[:count].copy()
        dense[now_ids] = now_logits
        chosen = top_k_ids(now_logits, head.k)
        top_ids, top_logits = now_ids[chosen], now_logits[chosen]
        try:
            count = head.adjust_into(top_ids, top_logits, dense, head.promote, ids, logits, strength, self.calls)
        finally:
            dense[now_ids] = -np.inf
        kept = np.isfinite(logits[:count])  # promoted tokens an earlier head masked stay masked
        if not kept.all():
            survivors = np.flatnonzero(kept)
            ids[: survivors.size], logits[: survivors.size] = ids[survivors], logits[survivors]
            count = int(survivors.size)
        return count


def candidates(cur) -> np.ndarray:
    """A structured view (no copy) of a ``llama_token_data_array``'s ``size`` candidates."""
    address = ctypes.cast(cur.data, ctypes.c_void_p).value
    size = int(cur.size)
    return np.frombuffer((ctypes.c_char * (size * TOKEN_DATA.itemsize)).from_address(address), TOKEN_DATA)


def check_candidates(given: np.ndarray, raw: np.ndarray, n_vocab: int, top_k: int) -> None:
    """What the head relies on from llama.cpp's sampler chain, checked against the ``(V,)`` raw
    logits: with no sampler before the callback (``top_k`` 0), the whole vocabulary in token-id
    order with exactly the raw logits; after a native top-k, exactly the k largest raw logits."""
    if not top_k:
        if len(given) != n_vocab or not np.array_equal(given["id"], np.arange(n_vocab)):
            raise RuntimeError(f"llama.cpp's candidate array ({len(given)} entries) is not the whole vocabulary "
                               f"({n_vocab}) in token-id order")
        if not np.array_equal(given["logit"], raw):
            raise RuntimeError("llama.cpp's candidate logits differ from its raw logits")
        return
    if len(given) != min(top_k, n_vocab):
        raise RuntimeError(f"llama.cpp's top-{top_k} sampler passed {len(given)} candidates")
    if not np.array_equal(raw[given["id"]], given["logit"]):
        raise RuntimeError("the top-k candidates' logits differ from the raw logits")
    if given["logit"].min() < np.sort(raw)[-len(given)]:
        raise RuntimeError("llama.cpp's top-k candidates are not the k largest logits")


_CONTRACT = {"checked": False}
_CONTRACT_LOCK = threading.Lock()


def _check_sampler_contract(model: "Model") -> None:
    """Once per process, before the first token is sampled: run llama.cpp's sampler chain on the
    current logits with a probing callback, alone and after a native top-k, and check what it
    hands over (:func:`check_candidates`). sali uses llama-cpp-python's private sampler classes;
    a build that changed them would otherwise decode silently wrong."""
    from llama_cpp._internals import LlamaSampler

    with _CONTRACT_LOCK:
        if _CONTRACT["checked"]:
            return
        for k in (0, min(8, model.n_vocab)):
            failures: list[BaseException] = []

            def probe(cur_p, k=k, failures=failures) -> None:
                try:
                    check_candidates(candidates(cur_p.contents), model._raw_logits().copy(), model.n_vocab, k)
                except BaseException as exc:  # noqa: BLE001 - reported below; ctypes would swallow it
                    failures.append(exc)

            chain = LlamaSampler()
            try:
                if k:
                    chain.add_top_k(k)
                chain.add_custom(probe)
                chain.add_greedy()
                chain.sample(model.llm._ctx, -1)
            finally:
                chain.close()
            if failures:
                from importlib.metadata import version

                raise SaliError(f"llama-cpp-python {version('llama-cpp-python')} does not hand the head the candidates it "
                                f"relies on ({failures[0]}); install the version pyproject.toml pins")
        _CONTRACT["checked"] = True


def _check_context_fits(header, n_ctx: int, n_gpu_layers: int) -> None:
    """Refuse a context whose buffers cannot fit in this machine's memory, before llama.cpp
    tries: a context of billions of tokens makes the kernel kill the process silently when the
    pages are touched. Counted: llama-cpp-python's token buffer (4 bytes a position) and, with
    no layer offloaded to a GPU, llama.cpp's f16 KV cache."""
    per_token = 4 + ((kv_cache_bytes_per_token(header) or 0) if not n_gpu_layers else 0)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if n_ctx * per_token > memory:
        raise SaliError(f"a context of {n_ctx:,} tokens needs about {n_ctx * per_token / 2**30:,.0f} GiB "
                        f"({per_token:,} bytes a token), more than this machine's {memory / 2**30:,.0f} GiB; lower --ctx")


class Model:
    """A GGUF model loaded in llama.cpp, ready to generate with or without a head."""

    read_chunk = 256  # tokens per llama.cpp batch when a prompt is read (see _prefill)

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
        _check_context_fits(check_gguf(self.path), n_ctx, n_gpu_layers)
        import llama_cpp
        import llama_cpp._logger
        from llama_cpp._utils import suppress_stdout_stderr

        # llama.cpp logs warnings (e.g. context longer than trained) to stderr; keep only errors.
        llama_cpp._logger.logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
        self._llama_cpp = llama_cpp
        if n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            warnings.warn(f"this llama.cpp build cannot offload to a GPU: -ngl {n_gpu_layers} ignored, every layer "
                          "stays on the CPU (README: GPU offload)", SaliWarning, stacklevel=2)
            n_gpu_layers = 0
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
        # llama.cpp may round the context up; llama-cpp-python's token buffer keeps the size asked for
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self._vocab = self.llm._model.vocab
        self._fingerprint: str | None = None
        self._logits_view: tuple[int, np.ndarray] | None = None
        # one llama.cpp context decodes one sequence at a time: generations take turns on it
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._whole_batches = 0  # the cache's tokens read as whole read_chunk batches from the start

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

    def _prefill(self, tokens: Sequence[int], reuse_cache: bool = False) -> int:
        """Evaluate `tokens`; returns how many of them were kept from the KV cache instead.

        llama.cpp's kernels round differently by batch shape (a token decoded alone, quantised
        weights repacked in groups of rows), so a prompt read after a reused prefix can get
        logits a whole logit away from a fresh read (``bench/prompt_reuse.py``). So a prompt is
        read in batches of :attr:`read_chunk` tokens from its start, and only whole batches that
        an earlier read of the same tokens left in the cache are kept: the logits are
        bit-identical to a fresh context's whatever was read before, and a long shared opening
        (a system prompt, an in-context preamble) is still read once.

        `reuse_cache` (a chat continuing its own conversation) keeps all the cache shares with
        `tokens`, its generated replies included, and reads only the rest: faster, not exact.
        """
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens]
        common = 0
        limit = min(len(cached), len(tokens))
        while common < limit and cached[common] == tokens[common]:
            common += 1
        common = min(common, len(tokens) - 1)  # the last prompt token is decoded again for fresh logits
        if reuse_cache:
            keep = common
        else:
            keep = min(common, self._whole_batches)
            keep -= keep % self.read_chunk
        llm.n_tokens = keep  # eval() drops the cache from here on
        self._whole_batches = min(self._whole_batches, keep)  # what stays true if the read is interrupted
        for start in range(keep, len(tokens), self.read_chunk):
            llm.eval(list(tokens[start : start + self.read_chunk]))
        if not reuse_cache:
            self._whole_batches = len(tokens) - len(tokens) % self.read_chunk
        return keep

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold the context for one generation; other threads wait their turn (FIFO enough for
        a server's queue). A second generation opened in the thread already holding it would
        deadlock: it is refused instead."""
        if self._owner == threading.get_ident():
            raise SaliError("a generation on this model is still open in this thread; finish or close it first")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    # ---- stepping by hand (proxy-tuning: several models in lockstep) --------------------------
    def prefill(self, prompt_tokens: Sequence[int]) -> np.ndarray:
        """Evaluate a prompt; returns the ``(V,)`` logits view for the next token (valid until the next call)."""
        self._prefill(prompt_tokens)
        return self._raw_logits()

    def feed(self, token: int) -> np.ndarray:
        """Append one token; returns the next ``(V,)`` logits view."""
        self.llm.eval([token])
        return self._raw_logits()

    @property
    def room(self) -> int:
        """Tokens the context can still take."""
        return self.n_ctx - self.llm.n_tokens

    def tokenize_text(self, text: str) -> list[int]:
        """Tokenize text that continues a sequence (a prefill): no BOS, special tokens not parsed."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", "replace")

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
        explain: list[Explained] | None = None,
        reuse_cache: bool = False,
        on_prompt: Callable[[int], None] | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids until an end-of-generation token, `max_tokens` or the context
        end; the generator's return value is the finish reason (``eos``, ``length``, ``context``).

        The chain: [native top-k(head.k), unless the compiled head selects its own] → head →
        penalties → top-k → top-p → min-p → temperature → sampling (or greedy). `head` is a
        :class:`Head` or heads in combination (:class:`sali.combine.Combined`). With `explain` a
        list, an :class:`Explained` is appended to it for every token before the token is yielded.
        The prompt is read as a new context would read it unless `reuse_cache` (see
        :meth:`_prefill`); `on_prompt` is then called with the number of prompt tokens kept from
        the KV cache.
        """
        if not prompt_tokens:
            raise SaliError("the prompt is empty")
        if len(prompt_tokens) >= self.n_ctx:
            raise SaliError(f"the prompt is {len(prompt_tokens)} tokens but the context holds {self.n_ctx}, "
                            f"{len(prompt_tokens) - self.n_ctx + 1} too many (raise --ctx)")
        sampling.check()
        for one in _heads_of(head):
            self.check_head(one)
        from llama_cpp._internals import LlamaSampler

        hook = stats or self.sampler(head, alpha, explain is not None, verify=verify, probe=probe)
        with self._turn():
            chain = LlamaSampler()
            ctrl_c = CtrlC()
            try:
                ctrl_c.install()
                if hook.active and not hook.selects_top_k:
                    chain.add_top_k(hook.top_k)  # native selection: the callback gets only the top k
                if hook.needed:
                    hook.attach(chain)
                if sampling.penalised:
                    chain.add_penalties(self.n_vocab, sampling.penalty_last_n, sampling.repeat_penalty,
                                        sampling.frequency_penalty, sampling.presence_penalty)
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
                with ctrl_c:
                    reused = self._prefill(prompt_tokens, reuse_cache)
                if on_prompt is not None:
                    on_prompt(reused)
                if not _CONTRACT["checked"]:
                    with ctrl_c:  # its probe reports any exception, a Ctrl-C included, as a broken contract
                        _check_sampler_contract(self)
                for _ in range(sampling.max_tokens):
                    with ctrl_c:
                        token = chain.sample(self.llm._ctx, -1)
                    if isinstance(hook.error, KeyboardInterrupt):
                        raise KeyboardInterrupt  # Ctrl-C landed inside the callback
                    if hook.error is not None:
                        raise HeadError(f"the head failed while sampling, generation stopped: {hook.error!r}")
                    if self.is_end(token) and not sampling.ignore_eos:
                        return "eos"
                    if explain is not None:
                        explain.append(self._explain(len(explain), token, hook))
                    yield token
                    if self.llm.n_tokens + 1 >= self.n_ctx:
                        return "context"
                    with ctrl_c:
                        self.llm.eval([token])
                return "length"
            finally:
                ctrl_c.uninstall()
                chain.close()

    def sampler(self, head, alpha: float, record: bool = False, *, native: bool = True, **options) -> HeadSampler:
        """The sampler for `head` (a Head, heads in combination, or None) at strength `alpha`: one
        head alone runs as compiled code inside llama.cpp (:class:`sali.native.NativeSampler`, no
        Python per token) unless `native` is False or a Python callback must see each call
        (`options` verify/probe, `record`); heads in combination and recording use
        :class:`ChainSampler`."""
        if record or (head is not None and not isinstance(head, Head)):
            return ChainSampler(head, alpha, self._raw_logits, self.n_vocab, record=record, **options)
        if native and head is not None and alpha != 0.0 and not any(options.values()):
            from sali.native import NativeSampler

            return NativeSampler(head, alpha, self.llama_context, self.n_vocab)
        return HeadSampler(head, alpha, self._raw_logits, self.n_vocab, **options)

    @property
    def llama_context(self) -> int:
        """The address of the ``llama_context`` (for compiled samplers that read its logits)."""
        return ctypes.cast(self.llm._ctx.ctx, ctypes.c_void_p).value

    def _explain(self, position: int, token: int, hook: HeadSampler) -> Explained:
        """What the head did to `token`, from the raw logits (still those of this step) and the
        candidates the head left (recorded by the ChainSampler)."""
        raw = self._raw_logits()
        base = float(raw[token])
        base_top1 = int(np.argmax(raw))
        rank: int | None = 1 + int(np.count_nonzero(raw > base))
        head_top1, change = base_top1, 0.0
        written = hook.adjusted() if hook.active else None
        if written is not None:
            ids, logits = written
            head_top1 = int(ids[np.argmax(logits)])
            change = float(logits[np.flatnonzero(ids == token)[0]]) - base
            if rank > hook.top_k:
                rank = None
        return Explained(position, int(token), self.token_text(token), base_top1, self.token_text(base_top1),
                         head_top1, rank, change)

    def stream(
        self,
        prompt: str | Sequence[int],
        sampling: Sampling,
        head: Head | None = None,
        alpha: float = 1.0,
        cancel: threading.Event | None = None,
        *,
        prefill: Sequence[int] = (),
        explain: bool = False,
        reuse_cache: bool = False,
    ) -> Stream:
        """Generate from a formatted prompt string (or its token ids), honouring stop strings.

        Returns a :class:`Stream` of text pieces whose ``completion`` is the result. Setting
        `cancel` (from any thread) stops the generation at the next token (``cancelled``).
        `prefill`: token ids forced after the prompt (the response begins with them; they count
        as prompt tokens, and the completion's text and tokens are what follows). `explain`:
        fill ``completion.explained`` (:class:`Explained` per token; costs extra work per token).
        `reuse_cache`: keep all the KV cache shares with this prompt (a chat continuing its
        conversation), not only whole read batches (:meth:`_prefill`); ``completion.cached_tokens``
        says how many tokens were kept.
        """
        tokens = (self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)) + list(prefill)
        done = Completion(prompt_tokens=len(tokens), explained=[] if explain else None)
        if prefill:
            done.prefill = self.detokenize(prefill)
        return Stream(self._pieces(tokens, sampling, head, alpha, cancel, done, reuse_cache), done)

    def _pieces(self, tokens, sampling: Sampling, head, alpha, cancel, done: Completion,
                reuse_cache: bool = False) -> Iterator[str]:
        hook = self.sampler(head, alpha, done.explained is not None)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        holdback = max((len(s) for s in sampling.stop), default=1) - 1
        pending = ""
        start = time.perf_counter()
        source = self.sample_tokens(tokens, sampling, head, alpha, stats=hook, explain=done.explained,
                                    reuse_cache=reuse_cache, on_prompt=lambda n: setattr(done, "cached_tokens", n))
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    done.finish_reason = "cancelled"
                    return
                try:
                    token = next(source)
                except StopIteration as end:
                    done.finish_reason = end.value
                    break
                if done.first_token_seconds is None:
                    done.first_token_seconds = time.perf_counter() - start
                done.tokens.append(token)
                pending += decoder.decode(self.llm.detokenize([token]))
                cut = _find_stop(pending, sampling.stop)
                if cut is not None:
                    done.finish_reason = "stop"
                    if pending[:cut]:
                        done.text += pending[:cut]
                        yield pending[:cut]
                    return
                safe = len(pending) - holdback if sampling.stop else len(pending)
                if safe > 0:
                    done.text += pending[:safe]
                    yield pending[:safe]
                    pending = pending[safe:]
            pending += decoder.decode(b"", final=True)
            if pending:
                done.text += pending
                yield pending
        finally:
            source.close()
            done.head_calls, done.head_seconds = hook.calls, hook.seconds
            done.seconds = time.perf_counter() - start

    def complete(
        self,
        prompt: str | Sequence[int],
        sampling: Sampling,
        head: Head | None = None,
        alpha: float = 1.0,
    ) -> Completion:
        """Generate to the end and return the whole :class:`Completion`."""
        return self.stream(prompt, sampling, head, alpha).finish()

    def teacher_forced_logits(self, prompt_tokens: Sequence[int], response_tokens: Sequence[int]) -> np.ndarray:
        """Raw logits ``(T, V)`` float32 at the positions that predict each of the ``T`` response
        tokens, from one batched pass over prompt + response (no sampling)."""
        sequence = list(prompt_tokens) + list(response_tokens)[:-1]
        if len(sequence) >= self.n_ctx:
            raise SaliError(f"prompt + response is {len(sequence)} tokens but the context holds {self.n_ctx} (raise --ctx)")
        first = len(prompt_tokens) - 1  # position predicting response token 0
        out = np.empty((len(response_tokens), self.n_vocab), dtype=np.float32)
        with self._turn():
            self._forced_pass(sequence, first, out)
        return out

    def _forced_pass(self, sequence: list[int], first: int, out: np.ndarray) -> None:
        llm = self.llm
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
        self.forget_cache()

    def forget_cache(self) -> None:
        """Make the next prompt be read whole, keeping nothing of what the KV cache holds."""
        self.llm.n_tokens = 0
        self._whole_batches = 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


def _heads_of(head) -> list[Head]:
    """The Head objects in `head` (None, a Head, or heads in combination)."""
    if head is None:
        return []
    return [head] if isinstance(head, Head) else [one for one, _ in head.parts]


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None
