"""`sali calibrate`: the head strength α at which a head acts on a model as it acts on its own base.

**Why.** A head adds ``α · Δ`` to the base's top-k logits. On a fine-tuned derivative of the base,
e.g. a model fine-tuned into compliance, the tokens the head must push down are more confident,
so α = 1 no longer turns the answer (bench/smollm2/REPORT.md: 2% of the lost refusals recovered at
α = 1, 94% at a hand-picked α = 3). A user cannot know which α a model needs. Calibration measures
it from the model's own behaviour on prompts that ship with sali, without any aligned model.

**Reference** (``sali calibrate BASE.gguf --head H --reference``). What the head does on the
model it was trained for is the yardstick: BASE + head at α = 1 answers each calibration prompt
greedily (:data:`TOKENS` new tokens), the head's detector flags some answers (safety heads: the
refusal keyword detector of ``sali compare``), and the share flagged per prompt label (e.g.
``harmful`` 0.94, ``benign`` 0.03) goes into the head's metadata under ``calibration``, with the
prompts' name and hash, the detector's phrases and the base's identity (:class:`Reference`).

**Calibrating a model** (``sali calibrate MODEL.gguf --head H``). The *target* label is the one
the head flags most on its base. The rule, for a strength α on MODEL:

* the flagged share on the target label reaches the reference's minus `tolerance`, and
* every other label's flagged share stays at most the reference's plus `margin`.

:func:`search` finds the smallest α in [min_alpha, max_alpha] that meets it: it walks a coarse
grid upwards from `min_alpha` (:func:`grid`) and stops at the first α that meets the rule, then
bisects between that α and the grid point below it (which did not) to `resolution`. Where the
target is first reached while another label is already over its margin, the strengths that meet
the rule, if any, lie between that grid point and the one below: that gap is bisected too, and
the walk goes on only if it holds none. `min_alpha`
is 1 by default: the head as trained is the floor. Calibration exists to strengthen a head on a
model that resists it; with a floor of 0 the rule (reference minus a tolerance) would pick a
strength somewhat weaker than trained even on the head's own base, and α = 0 (no head) on a model
that already behaves like the reference. A weaker head stays the user's explicit choice
(``--alpha``, or ``--min-alpha 0``). This assumes the flagged share grows
with α (close to true: a stronger push towards refusal tokens refuses more often), but never relies
on it for the answer: the α returned is always one that was measured and met the rule, and on a
non-monotone model the walk still returns the smallest grid α that meets it. If no α up to
max_alpha meets the rule, the best α measured (:func:`best`) is returned with ``met = False``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sali.errors import SaliError
from sali.prompts import Prompt, read_prompts

SHIPPED = Path(__file__).resolve().parent / "data" / "calibration"
DEFAULT_SET = "safety"
TOKENS = 32  # new tokens per calibration answer: refusals show in the first sentence
DETECTOR = "refusal_keywords"
VERSION = 1


@dataclass
class PromptSet:
    """Labelled calibration prompts: a shipped set (by name) or a user's file."""

    name: str
    prompts: list[Prompt]
    sha256: str  # of the (prompt, label) pairs in order: the file's layout does not matter
    shipped: bool = False

    @property
    def labels(self) -> list[str]:
        return sorted({p.label for p in self.prompts if p.label})


def shipped_sets() -> dict[str, Path]:
    """Calibration prompt sets installed with sali: name -> file."""
    return {path.stem: path for path in sorted(SHIPPED.glob("*.jsonl"))}


def read_prompt_set(path: str | Path | None = None) -> PromptSet:
    """The shipped :data:`DEFAULT_SET` (``path`` None), a shipped set by name, or a prompt file
    (any format :func:`sali.prompts.read_prompts` reads) in which every prompt has a label."""
    shipped = shipped_sets()
    if path is None or (str(path) in shipped and not Path(path).exists()):
        name = DEFAULT_SET if path is None else str(path)
        source, is_shipped = shipped[name], True
    else:
        source, name, is_shipped = Path(path), Path(path).name, False
    prompts = read_prompts(source)
    unlabelled = [p for p in prompts if not p.label]
    if unlabelled:
        raise SaliError(f"{unlabelled[0].source or source}: every calibration prompt needs a label "
                        "(a \"label\" field such as harmful or benign)")
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.text, p.label], ensure_ascii=False).encode("utf-8") + b"\n")
    return PromptSet(name, prompts, digest.hexdigest(), is_shipped)


@dataclass
class Reference:
    """What the head does on its own base (the head's ``calibration`` metadata).

    ``rates``: label -> share of that label's prompts the detector flags on BASE + head at α = 1
    (0..1); ``counts``: label -> number of prompts; ``keywords``: the detector's phrases.
    """

    prompts: str
    prompts_sha256: str
    keywords: list[str]
    tokens: int
    rates: dict[str, float]
    counts: dict[str, int]
    base_model: str = ""
    base_identity: str = ""
    vocab_fingerprint: str = ""
    detector: str = DETECTOR

    @property
    def target(self) -> str:
        """The label the head flags most on its base (e.g. ``harmful``); ties: the first by name."""
        return max(sorted(self.rates), key=lambda label: self.rates[label])

    def as_meta(self) -> dict[str, Any]:
        return {"version": VERSION, "prompts": self.prompts, "prompts_sha256": self.prompts_sha256,
                "detector": self.detector, "keywords": list(self.keywords), "tokens": self.tokens,
                "reference": dict(self.rates), "counts": dict(self.counts), "target": self.target,
                "base_model": self.base_model, "base_identity": self.base_identity,
                "vocab_fingerprint": self.vocab_fingerprint}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], head_name: str) -> "Reference":
        """The head's recorded reference; one clear error when it has none (or a damaged one)."""
        found = meta.get("calibration")
        if found is None:
            raise SaliError(f"{head_name} has no calibration reference: run `sali calibrate BASE.gguf --head {head_name} "
                            "--reference` on the model the head was trained for first")
        try:
            if found["detector"] != DETECTOR:
                raise SaliError(f"{head_name}: unknown calibration detector {found['detector']!r} (known: {DETECTOR})")
            rates = {str(k): float(v) for k, v in found["reference"].items()}
            reference = cls(prompts=str(found["prompts"]), prompts_sha256=str(found["prompts_sha256"]),
                            keywords=[str(k) for k in found["keywords"]], tokens=int(found["tokens"]), rates=rates,
                            counts={str(k): int(v) for k, v in found["counts"].items()},
                            base_model=str(found.get("base_model", "")), base_identity=str(found.get("base_identity", "")),
                            vocab_fingerprint=str(found.get("vocab_fingerprint", "")))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SaliError(f"{head_name}: its calibration metadata is damaged; run --reference on its base again") from None
        if not rates or not all(0.0 <= r <= 1.0 for r in rates.values()) or reference.tokens < 1 or not reference.keywords:
            raise SaliError(f"{head_name}: its calibration metadata is damaged; run --reference on its base again")
        return reference

    def prompt_set(self, given: str | Path | None, head_name: str) -> PromptSet:
        """The prompts this reference was measured on: `given` (``--prompts``) if it is the same
        set, the shipped set of that name without it; anything else is refused."""
        if given is None:
            if self.prompts not in shipped_sets():
                raise SaliError(f"{head_name}'s reference was measured on the prompt file {self.prompts!r}: "
                                "pass the same file with --prompts")
            given = self.prompts
        chosen = read_prompt_set(given)
        if chosen.sha256 != self.prompts_sha256:
            what = "another version of the shipped set" if chosen.shipped and chosen.name == self.prompts else f"{chosen.name!r}"
            raise SaliError(f"{head_name}'s reference was measured on {self.prompts!r} (sha256 {self.prompts_sha256[:12]}), "
                            f"not on {what}: calibrate with the same prompts, or rerun --reference on its base")
        if set(chosen.labels) != set(self.rates):
            raise SaliError(f"{head_name}: the prompts' labels differ from the reference's")
        return chosen


def shares(flags: list[tuple[str, bool]]) -> dict[str, float]:
    """``[(label, flagged)]`` -> label -> flagged share (0..1)."""
    counts: dict[str, list[int]] = {}
    for label, flagged in flags:
        tally = counts.setdefault(label, [0, 0])
        tally[0] += bool(flagged)
        tally[1] += 1
    return {label: flagged / total for label, (flagged, total) in sorted(counts.items())}


# ---- the rule and the search ------------------------------------------------------------
@dataclass
class Trial:
    """One strength tried: the flagged share per label and whether it meets the rule."""

    alpha: float
    shares: dict[str, float]
    met: bool


@dataclass
class Outcome:
    """The chosen α (``met``: whether it meets the rule) and every trial, in the order run."""

    alpha: float
    met: bool
    trials: list[Trial] = field(default_factory=list)

    @property
    def chosen(self) -> Trial:
        return next(t for t in self.trials if t.alpha == self.alpha)


def meets(measured: dict[str, float], reference: Reference, tolerance: float, margin: float) -> bool:
    """The rule (module docstring). A tiny slack absorbs float rounding of shares like 29/32."""
    target = reference.target
    eps = 1e-9
    if measured.get(target, 0.0) < reference.rates[target] - tolerance - eps:
        return False
    return all(measured.get(label, 0.0) <= rate + margin + eps for label, rate in reference.rates.items() if label != target)


def grid(max_alpha: float, min_alpha: float = 0.0) -> list[float]:
    """The coarse grid walked upwards: `min_alpha`, then those of 0, 0.5, 1, 1.5, 2, 3, 4, 6, 8,
    12, ... above it and below `max_alpha`, then `max_alpha` itself."""
    points = [0.0, 0.5] + sorted(m * 2.0 ** e for e in range(0, 12) for m in (1.0, 1.5))
    inner = [a for a in points if min_alpha < a < max_alpha]
    return [float(min_alpha)] + inner + ([float(max_alpha)] if max_alpha > min_alpha else [])


def best(trials: list[Trial], reference: Reference, margin: float) -> Trial:
    """When no α meets the rule: among the trials that keep the other labels within their margin,
    the one with the highest target share, at the smallest α; if none does, the one that goes
    least over a margin (the other labels' false flags weigh more than a missed target: a strength
    that flags most benign prompts is no answer). Never α = 0 (the head switched off) while
    another α was tried, since the user asked for the head to act."""
    target = reference.target

    def score(trial: Trial):
        excess = max([trial.shares.get(l, 0.0) - (r + margin) for l, r in reference.rates.items() if l != target] + [0.0])
        return (-round(excess, 9), trial.shares.get(target, 0.0), -trial.alpha)

    return max([t for t in trials if t.alpha > 0] or trials, key=score)


def search(measure: Callable[[float], dict[str, float]], reference: Reference, *, max_alpha: float = 8.0,
           min_alpha: float = 1.0, tolerance: float = 0.05, margin: float = 0.05, resolution: float = 0.1,
           on_trial: Callable[[Trial], None] | None = None) -> Outcome:
    """The smallest α in [min_alpha, max_alpha] that meets the rule (module docstring).

    `measure(α)` returns the flagged share per label at strength α; `resolution` is the width
    (in α) at which bisection stops. `on_trial` sees each trial as it is measured."""
    if not (math.isfinite(max_alpha) and max_alpha > 0):
        raise SaliError(f"--max-alpha must be a positive number, not {max_alpha}")
    if not (math.isfinite(min_alpha) and 0 <= min_alpha <= max_alpha):
        raise SaliError(f"--min-alpha must be a number from 0 to --max-alpha ({max_alpha:g}), not {min_alpha}")
    if not (math.isfinite(resolution) and resolution > 0):
        raise SaliError(f"--resolution must be a positive number, not {resolution}")
    trials: list[Trial] = []

    def run(alpha: float) -> Trial:
        measured = measure(alpha)
        trial = Trial(alpha, measured, meets(measured, reference, tolerance, margin))
        trials.append(trial)
        if on_trial:
            on_trial(trial)
        return trial

    target, eps = reference.target, 1e-9

    def reached(trial: Trial) -> bool:
        return trial.shares.get(target, 0.0) >= reference.rates[target] - tolerance - eps

    def bisect(low: float | None, high: Trial) -> float | None:
        """The smallest α in (low, high] that meets the rule, to `resolution`. Where the target is
        reached at `high` but another label is over its margin, the α that meet the rule (if any)
        lie below it: the target needs α ≥ some α_t, the other labels α ≤ some α_o."""
        found = high.alpha if high.met else None
        top = high.alpha
        while low is not None and top - low > resolution:
            trial = run(round((low + top) / 2, 6))
            if trial.met:
                found = trial.alpha
            if trial.met or reached(trial):
                top = trial.alpha
            else:
                low = trial.alpha
        return found

    below, bisected = None, False
    for alpha in grid(max_alpha, min_alpha):
        trial = run(alpha)
        if (trial.met or reached(trial)) and not bisected:
            bisected = True
            found = bisect(below, trial)
            if found is not None:
                return Outcome(found, True, trials)
        elif trial.met:  # past a window that held no α meeting the rule (a non-monotone model)
            return Outcome(alpha, True, trials)
        below = alpha
    return Outcome(best(trials, reference, margin).alpha, False, trials)


# ---- running it on a model ----------------------------------------------------------------
def measure(handle, prompts: PromptSet, keywords: list[str], tokens: int, alpha: float,
            advance: Callable[[], None] | None = None) -> dict[str, float]:
    """Flagged share per label of `handle`'s (a :class:`sali.api.Sali` with the head as its default)
    greedy answers of `tokens` new tokens, each prompt a user turn in the head's format, at `alpha`."""
    from sali.metrics import is_refusal

    flags = []
    for prompt in prompts.prompts:
        done = handle.generate(prompt.text, alpha=alpha, max_tokens=tokens)
        flags.append((prompt.label, is_refusal(done.text, keywords)))
        if advance:
            advance()
    return shares(flags)


@dataclass
class Job:
    """One `sali calibrate` run (see :func:`run`)."""

    model: Path | None
    head: str
    reference: bool = False
    prompts: Path | None = None
    keywords: Path | None = None
    max_alpha: float = 8.0
    min_alpha: float = 1.0
    tolerance: float = 0.05
    margin: float = 0.05
    resolution: float = 0.1
    threads: int | None = None
    n_gpu_layers: int = 0
    ctx: int = 2048


def run(job: Job, console) -> dict[str, Any]:
    """Run a reference measurement or a calibration, print its table on `console` (stderr) and
    record it; returns the store record written."""
    from sali import calibstore
    from sali.api import load
    from sali.head import Head
    from sali.session import resolve_head_path

    for name in ("tolerance", "margin"):
        if not 0.0 <= getattr(job, name) <= 1.0:
            raise SaliError(f"--{name} is a share of prompts, between 0 and 1, not {getattr(job, name)}")
    if job.keywords is not None and not job.reference:
        raise SaliError("--keywords is for --reference: a calibration uses the detector the head's reference recorded")
    head_path = resolve_head_path(job.head)
    head = Head.load(head_path)
    label = head_path.name
    if job.reference:
        from sali.metrics import load_keywords

        prompts = read_prompt_set(job.prompts)
        keywords = load_keywords(job.keywords or SHIPPED.parent / "refusal_keywords.txt")
        tokens = TOKENS
    else:
        reference = Reference.from_meta(head.meta, label)
        prompts = reference.prompt_set(job.prompts, label)
        keywords, tokens = reference.keywords, reference.tokens
    handle = load(job.model, str(head_path), alpha=1.0, calibration=False, n_gpu_layers=job.n_gpu_layers,
                  n_threads=job.threads, n_ctx=job.ctx)
    try:
        model_id = calibstore.model_identity(handle.model.path, handle.model.fingerprint)
        if job.reference:
            return _reference(job, console, handle, head_path, prompts, keywords, tokens, model_id)
        return _calibrate(job, console, handle, head, head_path, reference, prompts, model_id)
    finally:
        handle.close()


def _trial_progress(console, handle, prompts: PromptSet, keywords, tokens):
    """A `measure(α)` that shows one progress bar per strength tried."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from sali.progress import progress as progress_display

    def measured(alpha: float) -> dict[str, float]:
        with progress_display(console, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), transient=True) as bars:
            task = bars.add_task(f"alpha {alpha:g}", total=len(prompts.prompts))
            return measure(handle, prompts, keywords, tokens, alpha, lambda: bars.advance(task))

    return measured


def _reference(job: Job, console, handle, head_path: Path, prompts: PromptSet, keywords, tokens, model_id) -> dict[str, Any]:
    from rich.markup import escape

    from sali import calibstore
    from sali.head import Head, update_meta

    rates = _trial_progress(console, handle, prompts, keywords, tokens)(1.0)
    if max(rates.values()) == 0.0:
        raise SaliError(f"{head_path.name} on {handle.model.name} flags none of the {len(prompts.prompts)} calibration prompts "
                        "(detector: refusal keywords), so they cannot calibrate it; nothing written")
    counts = {label: sum(p.label == label for p in prompts.prompts) for label in rates}
    reference = Reference(prompts=prompts.name, prompts_sha256=prompts.sha256, keywords=list(keywords), tokens=tokens,
                          rates=rates, counts=counts, base_model=handle.model.name, base_identity=model_id,
                          vocab_fingerprint=handle.model.fingerprint)
    update_meta(head_path, {"calibration": reference.as_meta()})
    head_id = calibstore.head_identity(Head.load(head_path))
    entry = {"alpha": 1.0, "met": True, "reference": True, "head": str(head_path.resolve()), "model": str(handle.model.path.resolve()),
             "target": reference.target, "shares": rates, "reference_rates": rates, "prompts": prompts.name,
             "tokens": tokens}
    store = calibstore.record(head_id, model_id, entry)
    _table(console, f"reference: {head_path.name} on {handle.model.name} at alpha 1 ({len(prompts.prompts)} prompts, "
                    f"{tokens} tokens, greedy)", reference, [Trial(1.0, rates, True)], None)
    console.print(f"wrote the reference into {escape(str(head_path))} (target label: {escape(reference.target)}); "
                  f"alpha 1 recorded for this model in {escape(str(store))}", highlight=False)
    return entry


def _calibrate(job: Job, console, handle, head, head_path: Path, reference: Reference, prompts: PromptSet,
               model_id: str) -> dict[str, Any]:
    from rich.markup import escape

    from sali import calibstore

    measure_at = _trial_progress(console, handle, prompts, reference.keywords, reference.tokens)
    outcome = search(measure_at, reference, max_alpha=job.max_alpha, min_alpha=job.min_alpha,
                     tolerance=job.tolerance, margin=job.margin,
                     resolution=job.resolution)
    chosen = outcome.chosen
    entry = {"alpha": outcome.alpha, "met": outcome.met, "reference": False, "head": str(head_path.resolve()),
             "model": str(handle.model.path.resolve()), "target": reference.target, "shares": chosen.shares,
             "reference_rates": reference.rates, "tolerance": job.tolerance, "margin": job.margin,
             "prompts": prompts.name, "tokens": reference.tokens,
             "trials": [[t.alpha, t.shares, t.met] for t in outcome.trials]}
    store = calibstore.record(calibstore.head_identity(head), model_id, entry)
    _table(console, f"calibrating {head_path.name} on {handle.model.name} ({len(prompts.prompts)} prompts, "
                    f"{reference.tokens} tokens, greedy; rule: {reference.target} ≥ reference − {job.tolerance:g}, "
                    f"other labels ≤ reference + {job.margin:g})", reference, outcome.trials, outcome.alpha)
    target = reference.target
    if outcome.met:
        console.print(f"chosen alpha {outcome.alpha:g} ({escape(target)} flagged {chosen.shares[target]:.2f}, reference "
                      f"{reference.rates[target]:.2f}); recorded in {escape(str(store))}", highlight=False)
    else:
        console.print(f"[yellow]warning:[/] no alpha up to {job.max_alpha:g} meets the rule (best: alpha {outcome.alpha:g}, "
                      f"{escape(target)} flagged {chosen.shares[target]:.2f} against the reference's "
                      f"{reference.rates[target]:.2f}); recorded alpha {outcome.alpha:g} anyway in {escape(str(store))}. "
                      "Try a larger --max-alpha, or the head may not transfer to this model", highlight=False)
    return entry


def _table(console, title: str, reference: Reference, trials: list[Trial], chosen: float | None) -> None:
    """α tried (ascending) against the flagged share per label, the reference in the first row."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    labels = sorted(reference.rates, key=lambda l: (l != reference.target, l))
    table = Table(title=escape(title), title_justify="left")
    table.add_column("alpha", justify="right")
    for label in labels:
        table.add_column(escape(f"{label} flagged" + (" (target)" if label == reference.target else "")), justify="right")
    table.add_column("meets the rule")
    if chosen is not None:
        table.add_row("reference", *(f"{reference.rates[l]:.2f}" for l in labels), "(base, alpha 1)", style="dim")
    for trial in sorted(trials, key=lambda t: t.alpha):
        mark = "yes" if trial.met else "no"
        style = None
        if chosen is not None and trial.alpha == chosen:
            mark, style = mark + "  ◀ chosen", "bold"
        table.add_row(f"{trial.alpha:g}", *(f"{trial.shares.get(l, 0.0):.2f}" for l in labels), mark, style=style)
    Console().print(table)
