"""What `sali compare` compares: its systems (table rows), the run's plan, prompt rendering.

Systems (each generates on every prompt; greedy by default):

* ``base``: the base model alone, in the heads' training format;
* ``base+<head>``: the base with each head (``base+<A>+<B>``: heads in combination, :mod:`sali.combine`);
* ``aligned``: the aligned model in its own chat format;
* ``<other>+<head>``: each ``--also`` model with each head (transfer across models or precisions);
* ``base+icl``: the base prompted with a preamble of aligned example exchanges (in-context alignment);
* ``proxy``: proxy-tuning, ``base logits + (small aligned - small base) logits`` at every step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sali.combine import Combined, spec_name
from sali.errors import SaliError
from sali.head import Head
from sali.prompts import Prompt, parse_format, render
from sali.runtime import Model, Sampling

DEFAULT_PREAMBLE = Path(__file__).resolve().parent.parent / "data" / "icl_preamble.txt"


@dataclass
class System:
    """One row of the comparison."""

    name: str
    model: Path
    kind: str  # "plain" | "head" | "aligned" | "icl" | "proxy"
    fmt: dict[str, Any]
    heads: tuple[tuple[Path, float], ...] = ()  # head files and their strengths, applied in this order
    preamble: str | None = None
    proxy: tuple[Path, Path] | None = None
    alpha: float = 1.0  # global head strength (each head runs at alpha · its strength)
    calibrated: bool = False  # the strengths are those `sali calibrate` recorded for this model

    def combined(self) -> Combined:
        """The heads as one :class:`~sali.combine.Combined` (loaded once per comparison)."""
        return Combined(tuple((load_head(path), strength) for path, strength in self.heads))

    def choice(self) -> list[tuple[str, float]] | None:
        """The heads as :meth:`sali.api.Sali.choose` takes them (names are file stems)."""
        return [(path.stem, strength) for path, strength in self.heads] or None

    def key(self, sampling: Sampling, prefill: str | None = None) -> str:
        """The cache file's name: everything that decides the responses. A single head at
        strength 1 and no prefill give the keys caches had before combinations and prefills."""
        parts = [self.kind, _file_id(self.model), json.dumps(self.fmt, sort_keys=True), json.dumps(_sampling_key(sampling), sort_keys=True, default=list)]
        for index, (path, strength) in enumerate(self.heads):
            parts.append(_file_id(path))
            if index or strength != 1.0:
                parts.append(f"strength={strength!r}")
        if self.heads and self.alpha != 1.0:
            parts.append(f"alpha={self.alpha!r}")
        if self.preamble:
            parts.append(self.preamble)
        if self.proxy:
            parts += [_file_id(p) for p in self.proxy]
        if prefill is not None:
            parts.append("prefill=" + prefill)
        if sampling.temperature > 0:
            parts.append("seed per prompt")  # sampled caches from before Sampling.for_prompt drew every prompt with one seed
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _sampling_key(sampling: Sampling) -> dict[str, Any]:
    """The settings that name a cache: the penalty fields count only when set, so caches
    written before they existed stay valid."""
    plain = Sampling()
    return {k: v for k, v in vars(sampling).items()
            if k not in ("repeat_penalty", "frequency_penalty", "presence_penalty", "penalty_last_n") or v != getattr(plain, k)}


@dataclass
class Plan:
    systems: list[System]
    prompts: list[Prompt]
    sampling: Sampling
    out: Path | None
    cache: Path
    keywords: list[str]
    threads: int | None = None
    n_gpu_layers: int = 0
    ctx: int = 2048
    prefills: list[str] = field(default_factory=list)  # each system also answers every prompt after each prefill
    pass_regex: re.Pattern | None = None  # --pass-regex: a response passes when it holds a match
    answer_match: str = "number"  # how a response is held against a prompt's answer: number | text
    cover_k: int = 64  # cover rate: the aligned top-1 among a system's top cover_k logits
    prefill_ids: dict[str, list[int]] = field(default_factory=dict)  # prefill -> its token ids, the same for every model
    generations: int = 0  # new generations made by this run (cache misses)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def load_head(path: Path) -> Head:
    """Each head file is read and validated once per comparison, however many systems use it."""
    return Head.load(path)


def _file_id(path: Path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).name}:{stat.st_size}:{int(stat.st_mtime)}"


def prompt_key(prompt: Prompt) -> str:
    return hashlib.sha256(prompt.text.encode("utf-8")).hexdigest()[:16]


def build_systems(
    base: Path,
    heads: list[Path | list[tuple[Path, float]]],
    aligned: Path | None,
    also: list[Path],
    icl: str | None,
    proxy: tuple[Path, Path] | None,
    fmt_spec: str | None,
    alpha: float | None = 1.0,
    calibration: bool = True,
) -> list[System]:
    """The systems to compare, in table order. `heads`: one entry per head system, a head file
    or heads in combination (``[(file, strength), ...]``, applied in that order). The base format
    is ``--format``, else the first head's training format, else the base model's chat template.
    Every head runs at strength `alpha` (times its own); its systems are named
    ``model+head@alpha`` when alpha is not 1, ``model+A+B@0.5`` for a combination. `alpha` None:
    each head at the strength ``sali calibrate`` recorded for it on that system's model (unless
    `calibration` is False), else 1, named the same way (:func:`calibrated`)."""
    combos = [tuple((Path(p), float(s)) for p, s in ([(h, 1.0)] if isinstance(h, (str, Path)) else h)) for h in heads]
    files = {path.resolve(): path.stem for combo in combos for path, _ in combo}
    if len(set(files.values())) != len(files):
        raise SaliError("two heads share a file name; rename one so the table can tell them apart")
    names = [spec_name([(path.stem, s) for path, s in combo]) for combo in combos]
    if len(set(names)) != len(names):
        raise SaliError(f"a head is given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    for path, _ in (part for combo in combos for part in combo):
        load_head(path)  # every file read and checked before any model loads (cached: read once)
    firsts = [load_head(combo[0][0]) for combo in combos]
    if fmt_spec:
        fmt = parse_format(fmt_spec)
    elif firsts:
        fmt = firsts[0].base_format
    else:
        fmt = {"type": "chat"}
    def head_systems(model: Path, prefix: str) -> list[System]:
        made = []
        for name, combo, head in zip(names, combos, firsts):
            strength, parts = alpha, combo
            if alpha is None:
                strength, parts = calibrated(model, combo) if calibration else (1.0, combo)
                name = spec_name([(path.stem, s) for path, s in parts])
            tag = "" if strength == 1.0 else f"@{strength:g}"
            made.append(System(f"{prefix}+{name}{tag}", model, "head", fmt if fmt_spec else head.base_format,
                               heads=parts, alpha=strength, calibrated=(strength, parts) != (1.0, combo)))
        return made

    systems = [System("base", base, "plain", fmt)]
    systems += head_systems(base, "base")
    if icl is not None:
        preamble_path = Path(icl) if icl else DEFAULT_PREAMBLE
        if not preamble_path.is_file():
            raise SaliError(f"ICL preamble not found: {preamble_path}")
        systems.append(System("base+icl", base, "icl", {"type": "plain"}, preamble=preamble_path.read_text(encoding="utf-8")))
    if proxy is not None:
        systems.append(System("proxy", base, "proxy", fmt, proxy=proxy))
    if aligned is not None:
        systems.append(System("aligned", aligned, "aligned", {"type": "chat"}))
    for other in also:
        systems.append(System(other.stem, other, "plain", fmt))
        systems += head_systems(other, other.stem)
    return systems


def calibrated(model: Path, combo: tuple[tuple[Path, float], ...]) -> tuple[float, tuple[tuple[Path, float], ...]]:
    """``(alpha, heads)`` for a head system on `model` without ``--alpha``: one head runs at the
    strength ``sali calibrate`` recorded for it on `model` (1 without a record); in a combination
    each head's recorded strength multiplies its own ``@`` strength, at alpha 1."""
    from sali.calibstore import alpha_of, lookup

    fingerprint = _vocab(model)
    found = [alpha_of(lookup(load_head(path), model, fingerprint)) for path, _ in combo]
    if len(combo) == 1:
        return (found[0] if found[0] is not None else 1.0), combo
    return 1.0, tuple((path, s * (c if c is not None else 1.0)) for (path, s), c in zip(combo, found))


@functools.lru_cache(maxsize=None)
def _vocab(model: Path) -> str:
    from sali.ggufcheck import vocab_fingerprint

    return vocab_fingerprint(model)


def check_vocabularies(base: Path, others: list[tuple[str, Path]]) -> None:
    """Refuse, naming both fingerprints, any model (``(role, path)``: ``--aligned``, ``--also``,
    ``--proxy``) whose token list differs from the base's: compare measures them against the
    base token by token, and the heads only fit the base's vocabulary."""
    from sali.ggufcheck import vocab_fingerprint

    base_fp = vocab_fingerprint(base)
    for role, path in others:
        other_fp = vocab_fingerprint(path)
        if other_fp != base_fp:
            raise SaliError(
                f"{role} model {path.name} has vocabulary {other_fp}, but the base {base.name} has {base_fp}; "
                "compare needs models that share the base's token list"
            )


def icl_prompt(preamble: str, prompt: str) -> str:
    return f"{preamble.rstrip()}\n\nUser: {prompt}\nAssistant:"


def render_for(model: Model, fmt: dict[str, Any], text: str) -> str:
    """`text` as one user turn in prompt format `fmt`, with `model`'s chat template and special tokens."""
    return render(fmt, [{"role": "user", "content": text}], chat_template=model.chat_template,
                  bos_token=model.bos_text, eos_token=model.eos_text)


def prompt_text(system: System, model: Model, prompt: Prompt) -> str:
    if system.kind == "icl":
        return icl_prompt(system.preamble or "", prompt.text)
    return render_for(model, system.fmt, prompt.text)
