"""Teacher-forced figures of `sali compare`: on the aligned model's own responses, each system's
top-1 agreement with the aligned model, KL(aligned ‖ system) and cover rate (the aligned top-1
among the system's top K logits: the tokens a top-k head can re-rank), also at the positions
where the system's own top-1 differs (the changes a re-ranking would have to make), overall, by
response position and by prompt label.

Memory stays bounded whatever the number of prompts: the aligned model reads each prompt's
response once and only its top :data:`KL_TOP_K` log-probs, its argmax and the mass outside them
are kept, spilled to a temporary file; then each other model reads the prompts one at a time and
adds to running sums. At no point does more than one prompt's ``(T, V)`` logits per model
exist, so peak memory does not grow with the number of prompts (``bench/compare_memory.py``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sali import metrics
from sali.compare.cache import Result
from sali.compare.generation import open_model
from sali.compare.systems import Plan, System, prompt_key, prompt_text, render_for
from sali.prompts import Prompt

KL_TOP_K = 256  # aligned tokens kept per position for the KL (plus one bucket for the rest)
MASKED_FLOOR = 1e-6  # probability given to tokens a head masks
POSITION_BUCKETS = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10**9))
FORCED_KINDS = ("plain", "head", "icl", "proxy")


def teacher_forced(plan: Plan, results: dict[str, dict[str, Result]],
                   progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Per system: top-1 agreement, KL(aligned ‖ system) (on the aligned top :data:`KL_TOP_K`
    with the tail mass as one more outcome, see :func:`sali.metrics.kl_top_k`) and cover rate
    (:func:`covered`, at ``plan.cover_k``) on the aligned model's own responses, averaged over
    positions, by position bucket and by label.

    Each model reads each (prompt text, response) once: the systems that share a model and a
    prompt format (plain and every head on it) reuse its logits. `progress()` is called once per
    system finished.
    """
    aligned = next((s for s in plan.systems if s.kind == "aligned"), None)
    if aligned is None:
        return {}
    targets = {prompt_key(p): results[aligned.name][prompt_key(p)].tokens for p in plan.prompts}
    figures: dict[str, dict[str, Any]] = {}
    with _Targets() as store:
        aligned_model = open_model(aligned.model, plan).model
        try:
            for prompt in plan.prompts:
                key = prompt_key(prompt)
                if targets[key] and key not in store:
                    ids = aligned_model.tokenize(prompt_text(aligned, aligned_model, prompt))
                    store.add(key, metrics.top_k_targets(aligned_model.teacher_forced_logits(ids, targets[key]), KL_TOP_K))
        finally:
            aligned_model.close()
        by_model: dict[Path, list[System]] = {}
        for system in plan.systems:
            if system.kind in FORCED_KINDS:
                by_model.setdefault(system.model, []).append(system)
        for model_path, systems in by_model.items():
            tallies = {s.name: _Tally() for s in systems}
            _score_model(plan, model_path, systems, targets, store, tallies)
            for system in systems:
                figures[system.name] = tallies[system.name].summary()
                if progress:
                    progress(system.name)
        present = sorted({p.label or "unlabelled" for p in plan.prompts if prompt_key(p) in store})
    same = {"top1": 1.0, "kl": 0.0, "cover": 1.0, "cover_changed": float("nan")}  # no position differs
    figures[aligned.name] = {**same, "by_position": {}, "by_label": {lab: dict(same) for lab in present}}
    return figures


def _score_model(plan: Plan, model_path: Path, systems: list[System], targets: dict[str, list[int]],
                 store: "_Targets", tallies: dict[str, "_Tally"]) -> None:
    """Every system on one model, prompt by prompt: one prompt's logits in memory at a time."""
    model = open_model(model_path, plan).model
    offsets = {s.name: _ProxyOffset(s, plan) for s in systems if s.kind == "proxy"}
    try:
        for prompt in plan.prompts:
            key = prompt_key(prompt)
            if key not in store:
                continue
            top1, ids, log_probs, tail = store.get(key)
            forward: dict[str, np.ndarray] = {}  # prompt text -> (T, V) logits
            for system in systems:
                text = prompt_text(system, model, prompt)
                if text not in forward:
                    forward[text] = model.teacher_forced_logits(model.tokenize(text), targets[key])
                logits = forward[text]
                if system.name in offsets:
                    logits = logits + offsets[system.name](prompt, targets[key])
                if system.heads:
                    heads = system.combined()
                    logits = np.stack([heads.apply_dense(row, system.alpha, step) for step, row in enumerate(logits)])
                agree = logits.argmax(-1) == top1
                kl = metrics.kl_top_k(ids, log_probs, tail, logits, floor=MASKED_FLOOR)
                tallies[system.name].add(agree, kl, covered(logits, top1, plan.cover_k), prompt.label or "unlabelled")
    finally:
        for offset in offsets.values():
            offset.close()
        model.close()


def covered(logits: np.ndarray, tokens: np.ndarray, k: int) -> np.ndarray:
    """``(T,)`` bool: ``tokens[t]`` is among the `k` largest of ``logits[t]`` (``(T, V)``), i.e.
    fewer than `k` tokens score strictly higher; a token at ``-inf`` (masked by a head) never is."""
    value = np.take_along_axis(logits, np.asarray(tokens, dtype=np.int64)[:, None], axis=-1)
    return np.isfinite(value[:, 0]) & ((logits > value).sum(-1) < k)


class _Targets:
    """The aligned model's per-position targets (:func:`sali.metrics.top_k_targets`) for every
    prompt, in an anonymous temporary file (deleted on close) and read back one prompt at a time:
    memory holds an offset per prompt, never the arrays."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="sali-compare-")
        self.index: dict[str, tuple[int, int, int]] = {}  # prompt key -> (offset, T, k)

    def __enter__(self) -> "_Targets":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def add(self, key: str, arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        top1, ids, log_probs, tail = arrays
        self.file.seek(0, 2)
        self.index[key] = (self.file.tell(), *ids.shape)
        for array, dtype in zip(arrays, (np.int32, np.int32, np.float32, np.float64)):
            self.file.write(np.ascontiguousarray(array, dtype=dtype).tobytes())

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        offset, T, k = self.index[key]
        self.file.seek(offset)
        top1 = np.frombuffer(self.file.read(4 * T), np.int32)
        ids = np.frombuffer(self.file.read(4 * T * k), np.int32).reshape(T, k)
        log_probs = np.frombuffer(self.file.read(4 * T * k), np.float32).reshape(T, k)
        tail = np.frombuffer(self.file.read(8 * T), np.float64)
        return top1, ids, log_probs, tail


class _Tally:
    """Running sums of top-1 agreement, KL and cover (at all positions, and at the positions
    where the top-1 differs) per position bucket and per label: a system's figures without
    keeping a value per position."""

    def __init__(self):
        self.buckets = np.zeros((len(POSITION_BUCKETS), 6))  # agree, kl, cover, differ, cover where differ, positions
        self.labels: dict[str, np.ndarray] = {}

    def add(self, agree: np.ndarray, kl: np.ndarray, cover: np.ndarray, label: str) -> None:
        """One prompt's ``(T,)`` agreement (bool), KL (nats) and cover (bool) by response position."""
        def sums(mask: np.ndarray) -> tuple:
            return (agree[mask].sum(), kl[mask].sum(), cover[mask].sum(), (~agree[mask]).sum(),
                    (cover[mask] & ~agree[mask]).sum(), mask.sum())

        positions = np.arange(len(agree))
        for b, (low, high) in enumerate(POSITION_BUCKETS):
            self.buckets[b] += sums((positions >= low) & (positions < high))
        self.labels.setdefault(label, np.zeros(6))
        self.labels[label] += sums(np.ones(len(agree), dtype=bool))

    @staticmethod
    def _figures(sums: np.ndarray) -> dict[str, float]:
        agree, kl, cover, differ, cover_differ, n = sums
        return {"top1": _ratio(agree, n), "kl": _ratio(kl, n), "cover": _ratio(cover, n), "cover_changed": _ratio(cover_differ, differ)}

    def summary(self) -> dict[str, Any]:
        total = self.buckets.sum(axis=0)
        by_position = {}
        for (low, high), sums in zip(POSITION_BUCKETS, self.buckets):
            if sums[-1]:
                label = f"{low}" if high == low + 1 else (f"{low}-{high - 1}" if high < 10**9 else f"{low}+")
                by_position[label] = {**self._figures(sums), "positions": int(sums[-1])}
        return {**self._figures(total), "positions": int(total[-1]), "by_position": by_position,
                "by_label": {label: self._figures(sums) for label, sums in sorted(self.labels.items())}}


def _ratio(value: float, count: float) -> float:
    return float(value / count) if count else float("nan")


class _ProxyOffset:
    """Teacher-forced ``small aligned - small base`` logits for proxy-tuning."""

    def __init__(self, system: System, plan: Plan):
        self.small_base, self.small_aligned = (open_model(path, plan).model for path in system.proxy)
        self.fmt = system.fmt

    def __call__(self, prompt: Prompt, response: list[int]) -> np.ndarray:
        parts = []
        for model, fmt in ((self.small_aligned, {"type": "chat"}), (self.small_base, self.fmt)):
            parts.append(model.teacher_forced_logits(model.tokenize(render_for(model, fmt, prompt.text)), response))
        return parts[0] - parts[1]

    def close(self) -> None:
        self.small_base.close()
        self.small_aligned.close()
