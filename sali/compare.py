"""`sali compare`: run prompt sets through base, base + head(s), aligned and baselines; measure.

Systems (each generates on every prompt; greedy by default):

* ``base``: the base model alone, in the heads' training format;
* ``base+<head>``: the base with each head;
* ``aligned``: the aligned model in its own chat format;
* ``<other>+<head>``: each ``--also`` model with each head (transfer across models or precisions);
* ``base+icl``: the base prompted with a preamble of aligned example exchanges (in-context alignment);
* ``proxy``: proxy-tuning, ``base logits + (small aligned - small base) logits`` at every step.

Each model is loaded once. Responses are cached per (system, prompt) in ``<out>/cache``: an
interrupted comparison resumes, and adding a head reuses every other system's responses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sali import metrics
from sali.errors import SaliError
from sali.head import Head
from sali.prompts import Prompt, describe_format, parse_format, render
from sali.api import Sali, load
from sali.runtime import Model, Sampling

DEFAULT_PREAMBLE = Path(__file__).resolve().parent / "data" / "icl_preamble.txt"
POSITION_BUCKETS = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10**9))


@dataclass
class System:
    """One row of the comparison."""

    name: str
    model: Path
    kind: str  # "plain" | "head" | "aligned" | "icl" | "proxy"
    fmt: dict[str, Any]
    head: Path | None = None
    preamble: str | None = None
    proxy: tuple[Path, Path] | None = None
    alpha: float = 1.0  # head strength

    def key(self, sampling: Sampling) -> str:
        parts = [self.kind, _file_id(self.model), json.dumps(self.fmt, sort_keys=True), json.dumps(_sampling_key(sampling), sort_keys=True, default=list)]
        if self.head:
            parts.append(_file_id(self.head))
            if self.alpha != 1.0:
                parts.append(f"alpha={self.alpha!r}")
        if self.preamble:
            parts.append(self.preamble)
        if self.proxy:
            parts += [_file_id(p) for p in self.proxy]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _sampling_key(sampling: Sampling) -> dict[str, Any]:
    """The settings that name a cache: the penalty fields count only when set, so caches
    written before they existed stay valid."""
    plain = Sampling()
    return {k: v for k, v in vars(sampling).items()
            if k not in ("repeat_penalty", "frequency_penalty", "presence_penalty", "penalty_last_n") or v != getattr(plain, k)}


@dataclass
class Result:
    """A system's response to one prompt."""

    response: str
    tokens: list[int]
    seconds: float
    finish_reason: str


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
    heads: list[Path],
    aligned: Path | None,
    also: list[Path],
    icl: str | None,
    proxy: tuple[Path, Path] | None,
    fmt_spec: str | None,
    alpha: float = 1.0,
) -> list[System]:
    """The systems to compare, in table order. The base format is ``--format``, else the first
    head's training format, else the base model's chat template. Every head runs at strength
    `alpha`; its systems are named ``model+head@alpha`` when alpha is not 1."""
    loaded = [load_head(h) for h in heads]
    names = [h.stem for h in heads]
    if len(set(names)) != len(names):
        raise SaliError("two heads share a file name; rename one so the table can tell them apart")
    if fmt_spec:
        fmt = parse_format(fmt_spec)
    elif loaded:
        fmt = loaded[0].base_format
    else:
        fmt = {"type": "chat"}
    tag = "" if alpha == 1.0 else f"@{alpha:g}"
    systems = [System("base", base, "plain", fmt)]
    for path, head in zip(heads, loaded):
        systems.append(System(f"base+{path.stem}{tag}", base, "head", fmt if fmt_spec else head.base_format, head=path, alpha=alpha))
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
        for path, head in zip(heads, loaded):
            systems.append(System(f"{other.stem}+{path.stem}{tag}", other, "head", fmt if fmt_spec else head.base_format, head=path, alpha=alpha))
    return systems


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


# ---- generation --------------------------------------------------------------------------------
class Cache:
    """Append-only JSONL per system: one line per finished prompt. A line cut short by an
    interruption is ignored when read back."""

    def __init__(self, folder: Path, system: System, sampling: Sampling):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{system.key(sampling)}.jsonl"
        self.entries: dict[str, Result] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["prompt"]] = Result(row["response"], row["tokens"], row["seconds"], row["finish_reason"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def add(self, key: str, result: Result) -> None:
        self.entries[key] = result
        row = {"prompt": key, "response": result.response, "tokens": result.tokens, "seconds": result.seconds, "finish_reason": result.finish_reason}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def icl_prompt(preamble: str, prompt: str) -> str:
    return f"{preamble.rstrip()}\n\nUser: {prompt}\nAssistant:"


def _render(model: Model, fmt: dict[str, Any], text: str) -> str:
    return render(fmt, [{"role": "user", "content": text}], chat_template=model.chat_template,
                  bos_token=model.bos_text, eos_token=model.eos_text)


def prompt_text(system: System, model: Model, prompt: Prompt) -> str:
    if system.kind == "icl":
        return icl_prompt(system.preamble or "", prompt.text)
    return _render(model, system.fmt, prompt.text)


def generate_all(plan: Plan, progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, Result]]:
    """Responses of every system to every prompt: ``{system: {prompt_key: Result}}``."""
    results: dict[str, dict[str, Result]] = {}
    by_model: dict[Path, list[System]] = {}
    for system in plan.systems:
        by_model.setdefault(system.model, []).append(system)
    for model_path, systems in by_model.items():
        caches = {s.name: Cache(plan.cache, s, plan.sampling) for s in systems}
        todo = [s for s in systems if any(prompt_key(p) not in caches[s.name].entries for p in plan.prompts)]
        heads = list(dict.fromkeys(s.head for s in todo if s.head))
        model = _open(model_path, plan, heads) if todo else None
        try:
            for system in systems:
                cache = caches[system.name]
                runner = _runner(system, model, plan) if system in todo else None
                for index, prompt in enumerate(plan.prompts):
                    key = prompt_key(prompt)
                    if key not in cache.entries:
                        cache.add(key, runner(prompt))
                        plan.generations += 1
                    if progress:
                        progress(system.name, index + 1, len(plan.prompts))
                results[system.name] = cache.entries
                if runner is not None and hasattr(runner, "close"):
                    runner.close()
        finally:
            if model is not None:
                model.close()
    return results


def _open(path: Path, plan: Plan, heads: list[Path] = ()) -> Sali:
    return load(path, [str(h) for h in heads], n_gpu_layers=plan.n_gpu_layers, n_threads=plan.threads, n_ctx=plan.ctx,
                seed=plan.sampling.seed)


def _runner(system: System, handle: Sali, plan: Plan):
    sampling = plan.sampling
    if system.kind == "icl":
        sampling = Sampling(**{**vars(plan.sampling), "stop": tuple(plan.sampling.stop) + ("\nUser:",)})
    if system.kind == "proxy":
        return ProxyRunner(system, handle.model, plan)
    head = Path(system.head).stem if system.head else None

    def run(prompt: Prompt) -> Result:
        text = prompt_text(system, handle.model, prompt)
        done = handle.generate(text, raw=True, head=head, alpha=system.alpha, sampling=sampling)
        return Result(done.text.strip(), done.tokens, round(done.seconds, 4), done.finish_reason)

    return run


class ProxyRunner:
    """Proxy-tuning decoding: three models in lockstep, greedy (or temperature) in NumPy."""

    def __init__(self, system: System, base: Model, plan: Plan):
        small_base, small_aligned = system.proxy
        self.base = base
        self.small_base = _open(small_base, plan).model
        self.small_aligned = _open(small_aligned, plan).model
        for other in (self.small_base, self.small_aligned):
            if other.fingerprint != base.fingerprint:
                raise SaliError(f"proxy model {other.name} has another vocabulary ({other.fingerprint}) than {base.name} ({base.fingerprint})")
        self.system = system
        self.sampling = plan.sampling
        self.rng = np.random.default_rng(plan.sampling.seed)

    def __call__(self, prompt: Prompt) -> Result:
        start = time.perf_counter()
        models = (self.base, self.small_base, self.small_aligned)
        formats = (self.system.fmt, self.system.fmt, {"type": "chat"})
        base, small_base, small_aligned = (m.prefill(m.tokenize(_render(m, fmt, prompt.text))) for m, fmt in zip(models, formats))
        tokens: list[int] = []
        finish = "length"
        for _ in range(self.sampling.max_tokens):
            token = self._choose(base + small_aligned - small_base)
            if self.base.is_end(token):
                finish = "eos"
                break
            tokens.append(token)
            if any(m.room <= 1 for m in models):
                finish = "context"
                break
            base, small_base, small_aligned = (m.feed(token) for m in models)
        text = self.base.detokenize(tokens)
        return Result(text.strip(), tokens, round(time.perf_counter() - start, 4), finish)

    def _choose(self, logits: np.ndarray) -> int:
        if self.sampling.temperature <= 0:
            return int(np.argmax(logits))
        z = logits / self.sampling.temperature
        p = np.exp(z - z.max())
        return int(self.rng.choice(len(p), p=p / p.sum()))

    def close(self) -> None:
        self.small_base.close()
        self.small_aligned.close()


# ---- teacher-forced figures ----------------------------------------------------------------------
def teacher_forced(plan: Plan, results: dict[str, dict[str, Result]], progress=None) -> dict[str, dict[str, Any]]:
    """Per system: top-1 agreement and KL(aligned ‖ system) on the aligned model's own responses,
    averaged over positions and by position bucket.

    Each model reads each (prompt text, response) once: the systems that share a model and a
    prompt format (plain and every head on it) reuse its logits. `progress()` is called once per
    system finished.
    """
    aligned = next((s for s in plan.systems if s.kind == "aligned"), None)
    if aligned is None:
        return {}
    targets = {prompt_key(p): results[aligned.name][prompt_key(p)].tokens for p in plan.prompts}
    aligned_model = _open(aligned.model, plan).model
    aligned_log_probs: dict[str, np.ndarray] = {}  # prompt key -> (T, V)
    try:
        for prompt in plan.prompts:
            key = prompt_key(prompt)
            if targets[key]:
                ids = aligned_model.tokenize(prompt_text(aligned, aligned_model, prompt))
                logits = aligned_model.teacher_forced_logits(ids, targets[key])
                aligned_log_probs[key] = metrics.log_softmax_rows(logits).astype(np.float32)
    finally:
        aligned_model.close()
    by_model: dict[Path, list[System]] = {}
    for system in plan.systems:
        if system.kind in ("plain", "head", "icl", "proxy"):
            by_model.setdefault(system.model, []).append(system)
    figures: dict[str, dict[str, Any]] = {}
    for model_path, systems in by_model.items():
        model = _open(model_path, plan).model
        offsets = {s.name: _ProxyOffset(s, plan) for s in systems if s.kind == "proxy"}
        rows: dict[str, tuple[list, list, list]] = {s.name: ([], [], []) for s in systems}
        try:
            for prompt in plan.prompts:
                key = prompt_key(prompt)
                if key not in aligned_log_probs:
                    continue
                target_lp = aligned_log_probs[key]
                target_top1 = target_lp.argmax(-1)
                forward: dict[str, np.ndarray] = {}  # prompt text -> (T, V) logits
                for system in systems:
                    text = prompt_text(system, model, prompt)
                    if text not in forward:
                        forward[text] = model.teacher_forced_logits(model.tokenize(text), targets[key])
                    logits = forward[text]
                    if system.name in offsets:
                        logits = logits + offsets[system.name](prompt, targets[key])
                    if system.head is not None:
                        head = load_head(system.head)
                        logits = np.stack([head.apply_dense(row, system.alpha) for row in logits])
                    agree, kls, labels = rows[system.name]
                    agree.append((logits.argmax(-1) == target_top1).astype(float).tolist())
                    kls.append(metrics.kl_rows(target_lp, logits, floor=1e-6).tolist())
                    labels.append(prompt.label or "unlabelled")
        finally:
            for offset in offsets.values():
                offset.close()
            model.close()
        for system in systems:
            agree, kls, labels = rows[system.name]
            figures[system.name] = _position_summary(agree, kls)
            figures[system.name]["by_label"] = {
                label: {
                    "top1": metrics.mean(v for row, lab in zip(agree, labels) if lab == label for v in row),
                    "kl": metrics.mean(v for row, lab in zip(kls, labels) if lab == label for v in row),
                }
                for label in sorted(set(labels))
            }
            if progress:
                progress(system.name)
    present = sorted({p.label or "unlabelled" for p in plan.prompts if prompt_key(p) in aligned_log_probs})
    figures[aligned.name] = {"top1": 1.0, "kl": 0.0, "by_position": {}, "by_label": {lab: {"top1": 1.0, "kl": 0.0} for lab in present}}
    return figures


class _ProxyOffset:
    """Teacher-forced ``small aligned - small base`` logits for proxy-tuning."""

    def __init__(self, system: System, plan: Plan):
        self.small_base, self.small_aligned = (_open(path, plan).model for path in system.proxy)
        self.fmt = system.fmt

    def __call__(self, prompt: Prompt, response: list[int]) -> np.ndarray:
        parts = []
        for model, fmt in ((self.small_aligned, {"type": "chat"}), (self.small_base, self.fmt)):
            parts.append(model.teacher_forced_logits(model.tokenize(_render(model, fmt, prompt.text)), response))
        return parts[0] - parts[1]

    def close(self) -> None:
        self.small_base.close()
        self.small_aligned.close()


def _position_summary(agree: list[list[float]], kls: list[list[float]]) -> dict[str, Any]:
    flat_agree = [v for row in agree for v in row]
    flat_kl = [v for row in kls for v in row]
    by_position = {}
    for low, high in POSITION_BUCKETS:
        a = [v for row in agree for i, v in enumerate(row) if low <= i < high]
        k = [v for row in kls for i, v in enumerate(row) if low <= i < high]
        if a:
            label = f"{low}" if high == low + 1 else (f"{low}-{high - 1}" if high < 10**9 else f"{low}+")
            by_position[label] = {"top1": metrics.mean(a), "kl": metrics.mean(k), "positions": len(a)}
    return {"top1": metrics.mean(flat_agree), "kl": metrics.mean(flat_kl), "positions": len(flat_agree), "by_position": by_position}


# ---- summary ---------------------------------------------------------------------------------------
def summarize(plan: Plan, results: dict[str, dict[str, Result]], forced: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every figure per system (and per label), plus the superficial shares."""
    aligned = next((s for s in plan.systems if s.kind == "aligned"), None)
    labels = sorted({p.label or "unlabelled" for p in plan.prompts})
    rows = {}
    for system in plan.systems:
        res = results[system.name]
        entries = [(p, res[prompt_key(p)]) for p in plan.prompts]
        row: dict[str, Any] = {"kind": system.kind, "model": system.model.name, "head": system.head.name if system.head else None,
                               "format": describe_format(system.fmt) if system.kind != "icl" else "icl preamble"}
        for label in labels:
            subset = [(p, r) for p, r in entries if (p.label or "unlabelled") == label]
            refused = sum(metrics.is_refusal(r.response, plan.keywords) for _, r in subset)
            row[f"refusal_{label}"] = refused / len(subset) if subset else float("nan")
            row[f"refusal_{label}_n"] = len(subset)
            row[f"refusal_{label}_ci95"] = list(metrics.wilson_interval(refused, len(subset)))
        answered = [(p, r) for p, r in entries if p.answer]
        if answered:
            row["exact_match"] = metrics.mean(metrics.exact_match(r.response, p.answer) for p, r in answered)
        if aligned is not None:
            ref = results[aligned.name]
            f1 = {prompt_key(p): metrics.token_f1(r.response, ref[prompt_key(p)].response) for p, r in entries}
            row["f1_vs_aligned"] = metrics.mean(f1.values())
            if len(labels) > 1:
                for label in labels:
                    row[f"f1_vs_aligned_{label}"] = metrics.mean(f1[prompt_key(p)] for p, _ in entries if (p.label or "unlabelled") == label)
        row["loops"] = metrics.mean(metrics.repeated_sentence_loop(r.response) for _, r in entries)
        tokens = sum(len(r.tokens) for _, r in entries)
        seconds = sum(r.seconds for _, r in entries)
        row["tokens_per_second"] = tokens / seconds if seconds > 0 else float("nan")
        row["mean_tokens"] = tokens / max(len(entries), 1)
        if system.name in forced:
            row["top1_vs_aligned"] = forced[system.name]["top1"]
            row["kl_vs_aligned"] = forced[system.name]["kl"]
            for label, values in forced[system.name].get("by_label", {}).items():
                row[f"top1_vs_aligned_{label}"] = values["top1"]
                row[f"kl_vs_aligned_{label}"] = values["kl"]
        rows[system.name] = row
    shares = {}
    if aligned is not None:
        base_row, aligned_row = rows["base"], rows[aligned.name]
        for name, row in rows.items():
            if name in ("base", aligned.name):
                continue
            shares[name] = {
                metric: metrics.superficial_share(row[metric], base_row[metric], aligned_row[metric])
                for metric in row
                if metric.startswith(("refusal_", "exact_match", "top1_vs_aligned", "kl_vs_aligned", "f1_vs_aligned"))
                and isinstance(row.get(metric), float) and metric in base_row and metric in aligned_row
            }
    return {
        "systems": rows,
        "shares": shares,
        "labels": labels,
        "prompts": len(plan.prompts),
        "by_position": {name: f.get("by_position", {}) for name, f in forced.items()},
        "sampling": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plan.sampling).items()},
    }


COLUMNS = [
    ("refusal_harmful", "refusal harmful"),
    ("refusal_benign", "refusal benign"),
    ("refusal_unlabelled", "refusal"),
    ("exact_match", "exact match"),
    ("f1_vs_aligned", "F1 vs aligned"),
    ("top1_vs_aligned", "top-1 vs aligned"),
    ("kl_vs_aligned", "KL"),
    ("loops", "loops"),
    ("tokens_per_second", "tok/s"),
]
NOTES = (
    "refusal: share of responses containing a refusal phrase, with its Wilson 95% interval in brackets "
    "(with 50–100 prompts a difference inside the intervals can be noise). F1 vs aligned: word-overlap F1 with the aligned "
    "model's response. top-1 vs aligned and KL: teacher-forced on the aligned model's responses; KL(aligned ‖ system) "
    "in nats, tokens a head masks counted at probability 1e-6. loops: share of responses repeating a sentence 3+ times. "
    "In parentheses: the superficial share (system − base) / (aligned − base), where aligned and base differ by at least 0.05."
)


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table (shared by the terminal and Markdown output)."""
    systems = summary["systems"]
    columns = list(COLUMNS)
    known = {key for key, _ in COLUMNS}
    extra = sorted({k for row in systems.values() for k in row
                    if k.startswith("refusal_") and not k.endswith(("_n", "_ci95")) and k not in known})
    columns[2:2] = [(key, "refusal " + key.removeprefix("refusal_")) for key in extra]
    present = [(key, title) for key, title in columns if any(key in row for row in systems.values())]
    header = ["system"] + [title for _, title in present]
    rows = []
    for name, row in systems.items():
        cells = [name]
        for key, _ in present:
            value = row.get(key)
            text = "—" if value is None or (isinstance(value, float) and np.isnan(value)) else (f"{value:.1f}" if key == "tokens_per_second" else f"{value:.3f}")
            interval = row.get(f"{key}_ci95")
            if interval is not None and not any(np.isnan(interval)):
                text += f" [{interval[0]:.2f}–{interval[1]:.2f}]"
            share = summary["shares"].get(name, {}).get(key)
            if share is not None and key != "tokens_per_second":
                text += f" ({share:.0%})"
            cells.append(text)
        rows.append(cells)
    return header, rows


def markdown(summary: dict[str, Any]) -> str:
    header, rows = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return f"# sali compare\n\n{summary['prompts']} prompts.\n\n" + "\n".join(lines) + "\n\n" + NOTES + "\n"


def plot(summary: dict[str, Any], folder: Path) -> list[Path]:
    """refusal.png (refusal and over-refusal by system) and kl_by_position.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sali.atomic import atomic_path

    written = []
    systems = summary["systems"]
    names = list(systems)
    labels = [label for label in summary["labels"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / max(len(labels), 1)
    for j, label in enumerate(labels):
        values = [systems[n].get(f"refusal_{label}", np.nan) for n in names]
        ax.bar(np.arange(len(names)) + j * width, values, width, label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(labels) - 1) / 2, names, rotation=20, ha="right")
    ax.set_ylabel("refusal rate")
    ax.set_ylim(0, 1.05)
    ax.legend(title="prompts")
    ax.set_title("Refusal by system")
    fig.tight_layout()
    with atomic_path(folder / "refusal.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    written.append(folder / "refusal.png")
    curves = {n: b for n, b in summary.get("by_position", {}).items() if b}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, buckets in curves.items():
            ax.plot(list(buckets), [v["kl"] for v in buckets.values()], marker="o", label=name)
        ax.set_xlabel("response position (tokens)")
        ax.set_ylabel("KL(aligned ‖ system), nats")
        ax.set_title("Distance to the aligned model by position")
        ax.legend()
        fig.tight_layout()
        with atomic_path(folder / "kl_by_position.png", suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        written.append(folder / "kl_by_position.png")
    return written


def write_outputs(plan: Plan, results, summary: dict[str, Any]) -> list[Path]:
    from sali.atomic import atomic_path, write_text

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "responses.jsonl") as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for prompt in plan.prompts:
                for system in plan.systems:
                    result = results[system.name][prompt_key(prompt)]
                    handle.write(json.dumps({
                        "system": system.name, "prompt": prompt.text, "label": prompt.label, "answer": prompt.answer,
                        "response": result.response, "tokens": len(result.tokens), "seconds": result.seconds,
                        "finish_reason": result.finish_reason,
                    }, ensure_ascii=False) + "\n")
    write_text(out / "summary.json", json.dumps(_clean(summary), indent=2) + "\n")
    write_text(out / "summary.md", markdown(summary))
    return [out / "responses.jsonl", out / "summary.json", out / "summary.md", *plot(summary, out)]


def _clean(value):
    """JSON-ready copy: NaN becomes null, NumPy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
