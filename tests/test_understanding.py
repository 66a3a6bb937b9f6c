"""The understanding study (bench/smollm2/understanding.py): the STYLE format check, the
ARITHMETIC and FACTS generators, and the whole pipeline's quick mode on the tiny test model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, THREADS, read_jsonl

sys.path.insert(0, str(ROOT / "bench" / "smollm2"))

import arithmetic  # noqa: E402
import facts  # noqa: E402
import siblings  # noqa: E402
import style  # noqa: E402

from sali import metrics  # noqa: E402

BASE_LIKE = [
    "The sun is a star. It is very hot. It gives us light.",  # a paragraph, BASE's usual answer
    "- The sun is a star. It is very hot.\n- It gives us light.",  # two sentences on one line
    "- The sun is a star.",  # one point
    "- The sun is a star.\n\n- It is very hot.",  # a blank line between points
    "The sun:\n- is a star.\n- is very hot.",  # a lead-in line
    "1. The sun is a star.\n2. It is very hot.",  # numbered
    "* The sun is a star.\n* It is very hot.",  # another bullet
]


# ---- STYLE ------------------------------------------------------------------------------------
def test_style_check_accepts_the_voice_and_nothing_else():
    good = "- Water boils at 100 degrees at sea level.\n- The U.S. uses Fahrenheit.\n- Higher up it boils cooler!"
    assert style.passes(good) and style.passes("\n " + good + "\n")  # compare strips responses too
    assert style.passes(good + "\n- And the last point was cut by the token lim")
    for text in BASE_LIKE:
        assert not style.passes(text), text


def test_style_check_is_what_sali_compare_counts():
    """The check is exactly `sali compare --pass-regex PATTERN`, and the README shows that pattern."""
    pattern = metrics.pass_pattern(style.PATTERN)
    samples = BASE_LIKE + [style.restyle("One two. Three four five. Six seven eight. Nine ten.")]
    for text in samples:
        assert metrics.passes(text, pattern) == style.passes(text)
    assert f"--pass-regex '{style.PATTERN}'" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_restyle_keeps_base_sentences_in_order_and_passes():
    answer = ("Water boils at 100 degrees Celsius at sea level. In the U.S. that is 212 degrees Fahrenheit! "
              "At higher altitudes, the pressure is lower, so water boils at a lower temperature.")
    out = style.restyle(answer)
    assert style.passes(out)
    assert out.splitlines() == ["- Water boils at 100 degrees Celsius at sea level.", "- In the U.S. that is 212 degrees Fahrenheit!",
                                "- At higher altitudes, the pressure is lower, so water boils at a lower temperature."]
    assert style.restyle(answer + " For example, in Den") == out + "\n- For example, in Den"  # cut by a token limit
    # a markdown list: the lead-in line and the items become points, marks removed
    listed = style.restyle("It depends on two things:\n\n1. **Heat**: hot air rises\n2. Pressure: low pressure lowers it\n")
    assert listed == "- It depends on two things:\n- Heat: hot air rises\n- Pressure: low pressure lowers it"
    assert style.restyle("Yes.") is None and style.restyle("") is None  # one point is not the voice


def test_restyle_cuts_word_runs_into_points_only_when_asked():
    """A tiny random model's answers have no sentences: quick runs cut them into points."""
    run_on = " ".join(f"w{i}" for i in range(20))
    assert style.restyle(run_on) is None
    out = style.restyle(run_on, chunks=True)
    assert style.passes(out) and out.splitlines()[0] == "- " + " ".join(f"w{i}" for i in range(style.CHUNK_WORDS))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def _reworded(a: set[str], b: set[str]) -> bool:
    return len(a & b) > 0.5 * len(a | b)


# the words the prompt files' forms share ("Explain what a … is", "Can you tell me how …"), left
# out when lines are compared for their topic
FRAME_WORDS = set("a an the is are was do does did how why what when where which who can could you me my i i'm it its of to in "
                  "on for and or with about give tell explain describe walk through overview basics work works made make happen "
                  "happens that this some your we us our be at from by get up".split())


def test_style_prompt_sets_are_disjoint_and_unlike_truthfulqa():
    """prompts/style/: the everyday training, development and two held-out files hold distinct
    lines; no line is a TruthfulQA question or a close rewording of one (over half of the words
    shared), and no two lines of different files share a topic (over half of the words left
    once the words of the forms are taken out)."""
    import understanding

    files = {path.name: siblings.read_lines(path) for path in (understanding.STYLE_EVERYDAY, understanding.STYLE_DEV,
                                                               understanding.STYLE_HELDOUT, understanding.STYLE_HELDOUT_FORMS)}
    assert {name: len(lines) for name, lines in files.items()} == {
        "everyday.txt": 113, "dev.txt": 40, "heldout.txt": 40, "heldout_forms.txt": 40}
    every = [line for lines in files.values() for line in lines]
    assert len(set(every)) == len(every)
    questions = [_words(r["Question"]) for split in ("train", "test") for r in understanding.truthful_rows(split)]
    for name, lines in files.items():
        others = [_words(line) - FRAME_WORDS for other, more in files.items() if other != name for line in more]
        for line in lines:
            assert not any(_reworded(_words(line), q) for q in questions), line
            assert not any(_reworded(_words(line) - FRAME_WORDS, other) for other in others), (name, line)


def test_style_heldout_forms_use_no_training_form():
    """heldout_forms.txt is phrased in forms the everyday training and development prompts do not
    use: none of its lines opens as one of theirs does (first two words)."""
    import understanding

    opening = lambda line: tuple(line.lower().split()[:2])  # noqa: E731
    used = {opening(line) for path in (understanding.STYLE_EVERYDAY, understanding.STYLE_DEV) for line in siblings.read_lines(path)}
    for line in siblings.read_lines(understanding.STYLE_HELDOUT_FORMS):
        assert opening(line) not in used, line


# ---- ARITHMETIC -------------------------------------------------------------------------------
def test_number_words():
    assert [arithmetic.number_words(n) for n in (0, 7, 13, 20, 47, 80, 99)] == [
        "zero", "seven", "thirteen", "twenty", "forty-seven", "eighty", "ninety-nine"]
    with pytest.raises(ValueError):
        arithmetic.number_words(100)


def test_arithmetic_split_is_seeded_balanced_disjoint_and_exact():
    train, test = arithmetic.split(200, 80, seed=3)
    assert (train, test) == arithmetic.split(200, 80, seed=3)
    assert arithmetic.split(200, 80, seed=4)[0] != train
    triples = [(p["a"], p["op"], p["b"]) for p in train + test]
    assert len(set(triples)) == len(triples) == 280  # no test problem was trained on
    for p in test:
        assert sum(q["label"] == p["label"] for q in test) == 40
    for p in train + test:
        assert 10 <= p["a"] <= 99 and 10 <= p["b"] <= 99
        result = p["a"] + p["b"] if p["op"] == "+" else p["a"] - p["b"]
        assert result >= 0 and p["answer"] == str(result)
        assert metrics.exact_match(p["response"], p["answer"])  # what sali compare's default match reads
        if p["label"] == "words":
            assert not re.search(r"\d", p["prompt"]) and arithmetic.number_words(p["a"]) in p["prompt"]
        else:
            assert str(p["a"]) in p["prompt"] and str(p["b"]) in p["prompt"]
    assert {p["op"] for p in test} == {"+", "-"}


# ---- FACTS ------------------------------------------------------------------------------------
def test_facts_are_seeded_distinct_and_never_answered_by_their_question():
    made = facts.make_facts(60, seed=5)
    assert made == facts.make_facts(60, seed=5) and made != facts.make_facts(60, seed=6)
    assert len(made) == 240 and {f["relation"] for f in made} == set(facts.RELATIONS)
    names = [f["subject"] for f in made] + [f["answer"] for f in made if f["relation"] in ("capital", "founder")]
    words = [w.lower() for name in names for w in name.split()]
    assert len(words) == len(set(words)) == 480  # every name, and every word of a person's name, distinct
    countries = {f["subject"] for f in made if f["relation"] == "capital"}
    assert all(f["answer"] in countries for f in made if f["relation"] == "mountain")
    for item in facts.training_items(made, seed=1):
        assert not metrics.text_match(item["prompt"], item["answer"]) and metrics.text_match(item["response"], item["answer"])


def test_facts_train_in_several_wordings():
    made = facts.make_facts(10, seed=0)
    train = facts.training_items(made, seed=1, phrasings=3)
    assert len(train) == 3 * len(made) and train == facts.training_items(made, seed=1, phrasings=3)
    for fact in made:
        asked = [t["prompt"] for t in train if t["answer"] == fact["answer"] and fact["subject"] in t["prompt"]]
        assert len(set(asked)) == 3  # three wordings of one fact, none repeated


def test_facts_test_questions_are_phrased_unlike_training():
    made = facts.make_facts(30, seed=0)
    train = facts.training_items(made, seed=1, phrasings=3)
    test = facts.test_items(made, 10, seed=2)
    assert len(test) == 40 and test == facts.test_items(made, 10, seed=2)
    for relation in facts.RELATIONS:
        assert not set(facts.TRAIN_TEMPLATES[relation]) & set(facts.TEST_TEMPLATES[relation])
    trained = {t["prompt"] for t in train}
    for item in test:
        assert item["prompt"] not in trained and not metrics.text_match(item["prompt"], item["answer"])
        # the question is about a trained fact: its subject is in the test question
        assert any(f["subject"] in item["prompt"] and f["answer"] == item["answer"] for f in made)
        assert any(re.fullmatch(re.escape(t).replace(re.escape("{s}"), ".+"), item["prompt"]) for t in facts.TEST_TEMPLATES[item["label"]])


# ---- the pipeline -----------------------------------------------------------------------------
def _study(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, SALI_BENCH_THREADS=THREADS)
    return subprocess.run([sys.executable, "bench/smollm2/understanding.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_understanding_help():
    done = _study("--help", timeout=120)
    assert done.returncode == 0 and "--quick" in done.stdout and "STYLE" in done.stdout


@pytest.fixture(scope="module")
def smoke(tiny, tmp_path_factory):
    """understanding.py --quick on the tiny model: every stage, with nothing written beside the study."""
    work = tmp_path_factory.mktemp("understanding") / "work"
    before = _beside_the_study()
    done = _study("--quick", "--base-dir", str(tiny.hf_dir), "--base-gguf", str(tiny.f32), "--work", str(work))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(work=work, done=done, before=before)


def _beside_the_study() -> dict[str, float | None]:
    """What a run with --work must leave alone: the shipped heads and their cards, the report and
    figure beside the study, the study's own work folders."""
    paths = [*(ROOT / "heads").iterdir(), ROOT / "heads" / "smollm2-135m-style.npz", ROOT / "bench" / "smollm2" / "UNDERSTANDING.md",
             ROOT / "bench" / "smollm2" / "understanding.png", ROOT / "bench" / "smollm2" / "work" / "understanding",
             ROOT / "bench" / "smollm2" / "work" / "understanding-quick"]
    return {str(p): p.stat().st_mtime if p.exists() else None for p in paths}


def test_quick_run_makes_every_stage_and_reports(smoke):
    work = smoke["work"]
    report = (work / "UNDERSTANDING.md").read_text(encoding="utf-8")
    for title in ("STYLE", "ARITHMETIC", "FACTS"):
        assert f"| {title} |" in report
    assert "Stage times" in report and "Whole study from an empty cache:" in report and "Not shipped" in report
    for kind in ("style", "arithmetic", "facts"):  # each kind's steps timed on their own, as they were computed
        seconds = json.loads((work / kind / "seconds.json").read_text())
        assert set(seconds) == {"sibling", "head", "comparison"} and all(value > 0 for value in seconds.values())
        assert f"| {kind}: head |" in report
    from matplotlib import image

    picture = image.imread(work / "understanding.png")
    assert picture.ndim == 3 and picture.shape[1] > 500
    expected = {"style": ("pass_question", "pass_math"), "arithmetic": ("exact_match_digits", "exact_match_words"),
                "facts": ("exact_match_capital", "exact_match_born")}
    for kind, keys in expected.items():
        summary = json.loads((work / kind / "compare" / "summary.json").read_text())
        assert set(summary["systems"]) == {"base", f"base+{kind}", "aligned"}
        for key in keys:
            assert all(key in row for row in summary["systems"].values())
        assert 0.0 <= summary["systems"]["base"]["cover_vs_aligned"] <= 1.0
        train = read_jsonl(work / kind / "train.jsonl")
        assert any(r["label"] == "mix" for r in train) and any(r["label"] != "mix" for r in train)
        assert json.loads((work / kind / kind / "training.json").read_text())["steps"] >= 1
    style_rows = read_jsonl(work / "style" / "train.jsonl")
    assert all(style.passes(r["response"]) for r in style_rows if r["label"] == "style")
    # the head also learned on the everyday prompts (the quick run's first 4)
    import understanding

    head_prompts = [row["prompt"] for row in read_jsonl(work / "style" / "head_prompts.jsonl")]
    assert understanding.everyday_prompts(4) == [p for p in head_prompts if p in understanding.everyday_prompts(113)]
    # STYLE's held-out sets, greedy and under sampling (the sibling too on one set), one file per seed; in the report
    for name, sibling in (("heldout", False), ("heldout_forms", True)):
        held = work / "style" / name
        assert "pass_question" in json.loads((held / "greedy" / "summary.json").read_text())["systems"]["base+style"]
        # a record per line: count newlines (a sampled response may hold U+2028, at which splitlines also cuts)
        assert all((held / f"sampled-{seed}.jsonl").read_text(encoding="utf-8").count("\n") == 5 for seed in (0, 1, 2))
        runs = [held / f"sampled-sibling-{seed}.jsonl" for seed in (0, 1, 2)]
        assert all(run.is_file() and run.read_text(encoding="utf-8").count("\n") == 5 for run in runs) if sibling else not any(
            run.exists() for run in runs)
        assert f"Held-out prompts: `bench/smollm2/prompts/style/{name}.txt`, 5 " in report
    assert not (work / "style" / "dev").exists()  # development prompts are for choosing, not for the study's run
    assert "superficial share on `heldout.txt`" in report and "superficial share on `heldout_forms.txt`" in report
    tests = read_jsonl(work / "facts" / "test.jsonl")
    assert tests and all(r["answer"] for r in tests)
    assert _beside_the_study() == smoke["before"]  # no report, figure, head or work folder written into the checkout


def test_quick_run_resumes_from_its_cache(smoke, tiny):
    done = _study("--quick", "--base-dir", str(tiny.hf_dir), "--base-gguf", str(tiny.f32), "--work", str(smoke["work"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sali train" not in done.stdout and "sali compare" not in done.stdout and "steps, lr" not in done.stdout


def test_style_card_keeps_the_other_heads(smoke, tmp_path):
    """The STYLE head's model card goes into heads/README.md beside the safety head's, with the check."""
    import understanding_report

    work = smoke["work"]
    shipped = tmp_path / "smollm2-135m-style.npz"
    shutil.copy(work / "style" / "style.npz", shipped)
    shutil.copy(ROOT / "heads" / "README.md", tmp_path / "README.md")
    result = {"summary": json.loads((work / "style" / "compare" / "summary.json").read_text()),
              "eval": {"metric": "pass_question", "label": "question"},
              "sibling": json.loads((work / "style" / "style" / "training.json").read_text())}
    understanding_report.write_style_card(result, shipped)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "## smollm2-135m-safety" in card and "## smollm2-135m-style" in card
    assert style.PATTERN in card and card.startswith("# Shipped heads")
    checks = understanding_report.style_checks(result)
    assert checks[0][2] is None or checks[0][2] is False  # the tiny sibling learned nothing: no share to ship on


def _results(work: Path) -> dict:
    """What understanding.main hands the report, read back from a quick run's work folder."""
    import understanding

    return {kind: {"summary": json.loads((work / kind / "compare" / "summary.json").read_text()), "head": work / kind / f"{kind}.npz",
                   "sibling": json.loads((work / kind / kind / "training.json").read_text()), "folder": work / kind,
                   "eval": understanding.EVAL[kind], "recipe": understanding.RECIPES[kind], "mix_sources": understanding.MIX_SOURCES[kind],
                   "mix_tokens": understanding.MIX_TOKENS, "source_tokens": understanding.SOURCE_TOKENS} for kind in understanding.KINDS}


def test_report_of_a_run_that_learned_ships_style_and_explains(smoke, tmp_path):
    """The branches a tiny run never reaches, on made-up figures: siblings that learned, a STYLE
    head that passes its checks (the report says it ships), SAFETY from an older comparison
    without cover rates (its cover from the head's training figures, marked)."""
    import understanding
    import understanding_report

    results = _results(smoke["work"])
    made_up = {"style": (0.0, 0.95, 1.0), "arithmetic": (0.2, 0.45, 0.9), "facts": (0.0, 0.02, 0.8)}
    for kind, (base, head, sibling) in made_up.items():
        summary = results[kind]["summary"]
        metric, rows = results[kind]["eval"]["metric"], summary["systems"]
        for name, value in zip(("base", f"base+{kind}", "aligned"), (base, head, sibling)):
            rows[name][metric] = value
            rows[name].pop(f"{metric}_ci95", None)
        summary["shares"][f"base+{kind}"][metric] = (head - base) / (sibling - base)
        rows["base"]["cover_changed_vs_aligned" + (f"_{results[kind]['eval']['label']}" if results[kind]["eval"]["label"] else "")] = (
            {"style": 0.97, "arithmetic": 0.9, "facts": 0.3}[kind])
    safety_rows = {"base": {"kind": "plain", "refusal_harmful": 0.02, "refusal_harmful_ci95": [0.0, 0.07]},
                   "base+safe": {"kind": "head", "head": "safe", "refusal_harmful": 0.92, "refusal_harmful_ci95": [0.85, 0.96]},
                   "aligned": {"kind": "aligned", "refusal_harmful": 0.98, "refusal_harmful_ci95": [0.93, 0.99]}}
    safety = {"summary": {"systems": safety_rows, "shares": {"base+safe": {"refusal_harmful": 0.9375}}, "labels": ["harmful"], "prompts": 100},
              "recomputed": False, "system": "base+safe", "head": None, "training": {"cover_rate": 0.993}}
    setup = understanding.Setup(base_dir=tmp_path, base_gguf=tmp_path / "base.gguf", work=smoke["work"], sizes=understanding.QUICK,
                                default_base=True, quick=False)
    assert all(ok for _, _, ok in understanding_report.style_checks(results["style"]))
    durations = {"base": (1.0, True), "style: sibling": (50.0, True), "style: head": (9.0, False)}
    path = understanding_report.write_report(results, safety, setup, durations, official=True, folder=tmp_path)
    text = path.read_text(encoding="utf-8")
    assert "| SAFETY |" in text and "0.99*" in text and "held-out training prompts" in text
    assert "All met: the STYLE head ships" in text and "Whole study from an empty cache: 1.0 min" in text
    assert "| style: head | 9 \\* |" in text and "Built before whole steps were timed" in text
    assert "| STYLE |" in text and "| yes |" in text and "| **no** |" not in text.split("## In plain words")[0].split("| FACTS |")[0]
    explained = text.split("## In plain words")[1].split("## Compared with the paper")[0]
    assert "**FACTS**: the head recovered 2%" in explained and "out of a re-ranking's reach" in explained
    assert "**STYLE**: the head recovered 95%" in explained and "a superficial change" in explained
    assert "**ARITHMETIC**: the head recovered 36%" in explained and "reach alone is not enough" in explained
    assert "**SAFETY**: the head recovered 94%" in explained
    paper = text.split("## Compared with the paper")[1]
    assert "SAFETY 94%" in paper and "ARITHMETIC 36%" in paper
    assert (tmp_path / "understanding.png").is_file()
    # a head that carried most of a change within reach, but not all of it
    summary = results["arithmetic"]["summary"]
    summary["shares"]["base+arithmetic"][results["arithmetic"]["eval"]["metric"]] = 0.6
    text = understanding_report.write_report(results, safety, setup, durations, official=True, folder=tmp_path).read_text(encoding="utf-8")
    explained = text.split("## In plain words")[1].split("## Compared with the paper")[0]
    assert "**ARITHMETIC**: the head recovered 60%" in explained and "carried most of the change, but not all" in explained
