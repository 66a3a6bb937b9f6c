"""`sali compare`'s metrics for alignments other than safety, end to end through the CLI on the
tiny pair: a --pass-regex check (a format check) per system and label with Wilson intervals and
shares, exact match of text answers, and the cover rate in the teacher-forced figures."""

from __future__ import annotations

import json
import re

import pytest
from conftest import one_error_line, read_jsonl, run_sali

from sali import metrics

REFUSAL_ONLY = r"\AI cannot help with that\.\Z"  # the tiny aligned model's whole answer to a trigger prompt


@pytest.fixture(scope="module")
def measured(pair, trained, tmp_path_factory):
    """One comparison (base, base + trained head, aligned) of 8 trigger and 8 other prompts, each
    with the text answer "cannot help"; then the same with --answer-match number and --cover-k 1."""
    folder = tmp_path_factory.mktemp("metrics")
    rows = read_jsonl(pair.heldout_prompts)
    chosen = [r for r in rows if r["label"] == "harmful"][:8] + [r for r in rows if r["label"] == "benign"][:8]
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(dict(r, answer="cannot help")) + "\n" for r in chosen))
    keywords = folder / "keywords.txt"
    keywords.write_text("I cannot\n")
    common = ["compare", "--base", str(pair.base_gguf), "-H", str(trained[0]), "--aligned", str(pair.aligned_gguf),
              "-P", str(prompts), "-n", "8", "-t", "1", "--keywords", str(keywords), "--cache", str(folder / "cache")]
    runs = {}
    for name, extra in (("text", ["--pass-regex", REFUSAL_ONLY, "--answer-match", "text"]),
                        ("number", ["--answer-match", "number"]), ("k1", ["--cover-k", "1"])):
        done = run_sali(*common, "-o", str(folder / name), *extra, timeout=600)
        assert done.returncode == 0, done.stderr
        summary = json.loads((folder / name / "summary.json").read_text())
        responses = read_jsonl(folder / name / "responses.jsonl")
        runs[name] = dict(summary=summary, responses=responses, out=folder / name, done=done)
    return dict(runs=runs, head="base+" + trained[0].stem)


def _by(responses, system, label):
    return [r for r in responses if r["system"] == system and r["label"] == label]


def test_pass_regex_is_reported_per_system_and_label_with_interval_and_share(measured):
    run = measured["runs"]["text"]
    summary, rows = run["summary"], run["summary"]["systems"]
    assert summary["pass_regex"] == REFUSAL_ONLY
    pattern = re.compile(REFUSAL_ONLY)
    for system, row in rows.items():
        for label in ("harmful", "benign"):
            answers = _by(run["responses"], system, label)
            expected = sum(pattern.search(r["response"].strip()) is not None for r in answers) / len(answers)
            assert row[f"pass_{label}"] == pytest.approx(expected)
            assert row[f"pass_{label}_n"] == len(answers) == 8
            low, high = row[f"pass_{label}_ci95"]
            assert 0.0 <= low <= row[f"pass_{label}"] <= high <= 1.0
    base, head, aligned = rows["base"], rows[measured["head"]], rows["aligned"]
    assert aligned["pass_harmful"] >= 0.75 and aligned["pass_benign"] <= 0.25
    assert head["pass_harmful"] > base["pass_harmful"]
    share = summary["shares"][measured["head"]]["pass_harmful"]
    assert share == pytest.approx((head["pass_harmful"] - base["pass_harmful"]) / (aligned["pass_harmful"] - base["pass_harmful"]))
    text = (run["out"] / "summary.md").read_text()
    assert "pass harmful" in text and "pass benign" in text and "--pass-regex" in text
    assert "pass" in run["done"].stdout  # the terminal table too
    # without --pass-regex there is no pass figure at all
    assert not any(k.startswith("pass_") for k in measured["runs"]["number"]["summary"]["systems"]["base"])


def test_text_answers_match_as_words_and_the_mode_changes_no_cached_response(measured):
    text, number = measured["runs"]["text"], measured["runs"]["number"]
    assert text["summary"]["answer_match"] == "text" and number["summary"]["answer_match"] == "number"
    for system, row in text["summary"]["systems"].items():
        answers = [r for r in text["responses"] if r["system"] == system]
        assert row["exact_match"] == pytest.approx(sum(metrics.text_match(r["response"], "cannot help") for r in answers) / len(answers))
        for label in ("harmful", "benign"):
            part = _by(text["responses"], system, label)
            assert row[f"exact_match_{label}"] == pytest.approx(sum(metrics.text_match(r["response"], "cannot help") for r in part) / len(part))
        assert number["summary"]["systems"][system]["exact_match"] == 0.0  # no number in "cannot help"
    assert text["summary"]["systems"]["aligned"]["exact_match_harmful"] >= 0.75
    # metrics are computed from the cached responses: the second and third runs generated nothing
    assert number["summary"]["new_generations"] == 0 and measured["runs"]["k1"]["summary"]["new_generations"] == 0


def test_cover_rate_bounds_top1_and_equals_it_at_k1(measured):
    run, k1 = measured["runs"]["text"], measured["runs"]["k1"]
    assert run["summary"]["cover_k"] == 32  # the trained head's k (conftest TRAIN_ARGS)
    assert k1["summary"]["cover_k"] == 1
    for system, row in run["summary"]["systems"].items():
        assert row["top1_vs_aligned"] - 1e-9 <= row["cover_vs_aligned"] <= 1.0
        if system != "aligned":  # every covered position agrees or is a covered change
            top1, changed = row["top1_vs_aligned"], row["cover_changed_vs_aligned"]
            assert row["cover_vs_aligned"] == pytest.approx(top1 + (1 - top1) * (changed if top1 < 1 else 0.0))
        assert k1["summary"]["systems"][system]["cover_vs_aligned"] == pytest.approx(row["top1_vs_aligned"], abs=0.02)
        for label in ("harmful", "benign"):
            assert row[f"top1_vs_aligned_{label}"] - 1e-9 <= row[f"cover_vs_aligned_{label}"] <= 1.0
    assert run["summary"]["systems"]["aligned"]["cover_vs_aligned"] == 1.0
    # the base's cover rate: the aligned refusal is plausible to the tiny base (in its top 32) but not its first choice
    base = run["summary"]["systems"]["base"]
    assert base["cover_vs_aligned_harmful"] > base["top1_vs_aligned_harmful"]
    buckets = run["summary"]["by_position"]["base"]
    assert buckets and all(0.0 <= b["cover"] <= 1.0 for b in buckets.values())
    assert "cover" in (run["out"] / "summary.md").read_text()


def test_bad_metric_options_get_one_line(pair, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    line = one_error_line(run_sali("compare", "--base", str(pair.base_gguf), "-P", str(prompts), "--pass-regex", "(unclosed"))
    assert "--pass-regex" in line and "not a valid regular expression" in line
    line = one_error_line(run_sali("compare", "--base", str(pair.base_gguf), "-P", str(prompts), "--answer-match", "fuzzy"))
    assert "--answer-match" in line and "number, text" in line
