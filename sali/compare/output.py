"""Files `sali compare -o DIR` writes: responses.jsonl, summary.json, summary.md and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sali.atomic import atomic_path, write_text
from sali.compare.summary import markdown
from sali.compare.systems import Plan, prompt_key


def plot(summary: dict[str, Any], folder: Path) -> list[Path]:
    """refusal.png (refusal and over-refusal by system; not with --forced-only, where only the
    aligned model answered) and kl_by_position.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if not summary.get("forced_only"):
        written.append(_refusal_plot(plt, summary, folder))
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


def _refusal_plot(plt, summary: dict[str, Any], folder: Path) -> Path:
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
    return folder / "refusal.png"


def write_outputs(plan: Plan, results, summary: dict[str, Any], prefilled: dict[str, Any] | None = None) -> list[Path]:
    """Write the files; `prefilled` (``{prefill: results}``) adds the responses after each prefill,
    whose ``response`` is the continuation and ``prefill`` the forced text (None without one)."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    conditions = [(None, results), *(prefilled or {}).items()]
    with atomic_path(out / "responses.jsonl") as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for prefill, answers in conditions:
                for prompt in plan.prompts:
                    for system in plan.systems:
                        if system.name not in answers:
                            continue  # --forced-only: only the aligned model answered
                        result = answers[system.name][prompt_key(prompt)]
                        handle.write(json.dumps({
                            "system": system.name, "prompt": prompt.text, "label": prompt.label, "answer": prompt.answer,
                            "prefill": prefill, "response": result.response, "tokens": len(result.tokens),
                            "seconds": result.seconds, "finish_reason": result.finish_reason,
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
