"""`sali train` end to end on the tiny pair: real torch extraction and training, real llama.cpp use."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TRAIN_ARGS, interruptible, one_error_line, run_sali, starts_refusal, train

from sali.head import Head, LMHead
from sali.runtime import Model, Sampling

def refusal_rates(gguf: Path, prompts: list[str], head: Head | None = None) -> float:
    from sali.prompts import render

    model = Model(gguf, n_threads=1, n_ctx=256)
    try:
        fmt = head.base_format if head is not None else {"type": "chat"}
        hits = 0
        for prompt in prompts:
            text = render(fmt, [{"role": "user", "content": prompt}], chat_template=model.chat_template)
            hits += starts_refusal(model.complete(text, Sampling(max_tokens=8), head).text)
        return hits / len(prompts)
    finally:
        model.close()


def test_topk_head_recovers_refusals_on_heldout_prompts(pair, trained):
    head_path, _, done = trained
    head = Head.load(head_path)
    trigger, other = pair.groups["heldout_trigger"], pair.groups["heldout_other"]
    base_trigger = refusal_rates(pair.base_gguf, trigger)
    head_trigger = refusal_rates(pair.base_gguf, trigger, head)
    head_other = refusal_rates(pair.base_gguf, other, head)
    print(f"held-out refusal starts: base {base_trigger:.2f} -> base+head {head_trigger:.2f} on trigger, {head_other:.2f} on other")
    assert base_trigger <= 0.1  # the base alone does not refuse: the head did the work
    assert head_trigger >= 0.9
    assert head_other <= 0.1
    # the metadata carries the training figures and the recorded base format
    figures = head.meta["training"]
    assert figures["top1_agreement_head"] > figures["top1_agreement_base"]
    assert figures["kl_head"] < figures["kl_base_on_candidates"]
    assert 0 < figures["cover_rate"] <= 1 and figures["positions"] > 100
    assert head.base_format == {"type": "chat"} and head.meta["aligned_model"] == "aligned"
    assert "top-1 agreement" in done.stderr


def test_head_fingerprint_matches_the_gguf(pair, trained):
    head = Head.load(trained[0])
    model = Model(pair.base_gguf, n_threads=1, n_ctx=128)
    assert head.fingerprint == model.fingerprint
    model.close()


def test_lmhead_merged_into_gguf_recovers_refusals(pair, trained, tmp_path):
    _, cache, _ = trained
    head_path = tmp_path / "white.npz"
    train(pair, head_path, cache, "--kind", "lmhead")  # extracts again: top-k shards hold no hidden states
    assert isinstance(LMHead.load(head_path), LMHead)
    folders = {p.parent for p in cache.rglob("shard-*.npz")}
    assert len(folders) == 2
    holds = {folder: "hidden" in np.load(folder / "shard-00000.npz").files for folder in folders}
    assert sorted(holds.values()) == [False, True]
    sizes = {holds[f]: sum(p.stat().st_size for p in f.glob("shard-*.npz")) for f in folders}
    print(f"shards with hidden states {sizes[True]:,} bytes, without {sizes[False]:,} ({sizes[False] / sizes[True]:.2f}x)")
    assert sizes[False] < sizes[True]
    # a top-k run finding only the white-box run's shards reuses them (they hold all it reads)
    white = next(f for f in folders if holds[f])
    shutil.copytree(white, tmp_path / "reuse" / white.name)
    train(pair, tmp_path / "topk.npz", tmp_path / "reuse")
    assert [p.name for p in (tmp_path / "reuse").iterdir()] == [white.name]
    reference = Head.load(trained[0])
    np.testing.assert_array_equal(Head.load(tmp_path / "topk.npz").U, reference.U)
    info = run_sali("head", "info", str(head_path))
    assert info.returncode == 0 and "lmhead" in info.stdout
    # a top-k runtime refuses it with a pointer to the merge
    refused = run_sali("generate", str(pair.base_gguf), "-H", str(head_path), "-p", "hi")
    assert refused.returncode != 0 and "--merge-head" in refused.stderr
    merged = tmp_path / "merged.gguf"
    done = run_sali("convert", str(pair.base_gguf), "--merge-head", str(head_path), "-o", str(merged))
    assert done.returncode == 0, done.stderr
    trigger, other = pair.groups["heldout_trigger"], pair.groups["heldout_other"]
    merged_trigger, merged_other = refusal_rates(merged, trigger), refusal_rates(merged, other)
    print(f"white-box merged GGUF: refusal starts {merged_trigger:.2f} on trigger, {merged_other:.2f} on other")
    assert merged_trigger >= 0.9 and merged_other <= 0.1


def test_second_run_reuses_extraction_and_same_seed_gives_same_head(pair, trained, tmp_path):
    head_path, cache, _ = trained
    shards = sorted(cache.rglob("shard-*.npz"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = tmp_path / "again.npz"
    train(pair, again, cache)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # nothing extracted again
    first, second = Head.load(head_path), Head.load(again)
    for name in ("U", "W", "bias", "promote"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # --sharpen reaches training (same extraction, same seed, another head) and is recorded
    sharp = tmp_path / "sharp.npz"
    train(pair, sharp, cache, "--sharpen", "3")
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    sharpened = Head.load(sharp)
    assert sharpened.meta["training"]["sharpen"] == 3.0 and "sharpen" not in first.meta["training"]
    assert not np.array_equal(sharpened.W, first.W)
    # --dead-zone is a run-time rule: the same weights, the zone in the head (format 2); the
    # validation figures are measured with it
    zoned_path = tmp_path / "zoned.npz"
    train(pair, zoned_path, cache, "--dead-zone", "0.5")
    zoned = Head.load(zoned_path)
    for name in ("U", "W", "bias", "promote"):
        np.testing.assert_array_equal(getattr(first, name), getattr(zoned, name))
    assert zoned.dead_zone == 0.5 and first.dead_zone == 0.0
    assert zoned.meta["version"] == 2 and first.meta["version"] == 1
    train(pair, zoned_path, cache, "--dead-zone", "0.5", "--dead-zone-from", "2")  # sparing the first 2 steps: format 3
    spared = Head.load(zoned_path)
    np.testing.assert_array_equal(first.W, spared.W)
    assert (spared.dead_zone, spared.dead_zone_from, spared.meta["version"]) == (0.5, 2, 3)


def test_adding_a_prompt_file_reuses_the_extraction_of_the_others(pair, trained, tmp_path):
    """Each prompt file has its own extraction cache: training on the same file plus a second
    one extracts only the second, and the two files' prompts stay distinct prompts."""
    from sali.extract import load_extractions, load_shards

    cache = tmp_path / "cache"
    shutil.copytree(trained[1], cache)  # copy2 keeps the modification times
    shards = sorted(cache.rglob("shard-*.npz"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    before = set(cache.iterdir())  # the top-k extraction of the first file (and a white-box one, if made)
    out = tmp_path / "two-files.npz"
    done = run_sali("train", "--base", str(pair.base), "--aligned", str(pair.aligned), "-P", str(pair.train_prompts),
                    "-P", str(pair.heldout_prompts), "-o", str(out), "--cache", str(cache), *TRAIN_ARGS,
                    env={"SALI_PROGRESS_INTERVAL": "0"})
    assert done.returncode == 0, done.stderr
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # the first file was not extracted again
    assert (done.stdout + done.stderr).count("extraction cache:") == 2
    n_first = len(pair.train_prompts.read_text().splitlines())
    n_second = len(pair.heldout_prompts.read_text().splitlines())
    # the progress starts at the prompts found in the cache, and its time left counts new work only
    progress = [line for line in done.stderr.splitlines() if line.startswith("progress: extracting")]
    assert progress[0].startswith(f"progress: extracting (prompts) {n_first}/{n_first + n_second} ("), progress
    assert progress[-1].startswith(f"progress: extracting (prompts) {n_first + n_second}/{n_first + n_second} (100%)")
    added = set(cache.iterdir()) - before
    assert len(added) == 1 and list(next(iter(added)).glob("shard-*.npz"))
    # the first file's folder: the top-k one (a white-box folder of the same file holds the same positions)
    first_folder = min(before, key=lambda folder: json.loads((folder / "settings.json").read_text())["hidden"])
    folders = [first_folder, next(iter(added))]
    data = load_extractions(folders, [n_first, n_second])
    first, second = load_shards(folders[0]), load_shards(folders[1])
    assert len(data["token"]) == len(first["token"]) + len(second["token"])
    np.testing.assert_array_equal(data["row"], np.concatenate([first["row"], second["row"] + n_first]))
    assert set(np.unique(data["row"])) == set(range(n_first + n_second))  # every prompt answered, none merged
    assert data["responses"][str(n_first)] == second["responses"]["0"]
    assert Head.load(out).meta["training"]["prompts"] == n_first + n_second


def test_a_file_setting_changes_the_extraction_of_that_file_alone(pair, trained, tmp_path):
    """--file-setting FILE:max-new-tokens=N extracts FILE's answers to N tokens and no other file's:
    the first file's cache is reused as it was, the second holds positions past the job's 12, and
    the head's metadata names the setting."""
    from sali.extract import load_shards

    cache = tmp_path / "cache"
    shutil.copytree(trained[1], cache)
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("shard-*.npz")}
    before = set(cache.iterdir())
    out = tmp_path / "longer.npz"
    done = run_sali("train", "--base", str(pair.base), "--aligned", str(pair.aligned), "-P", str(pair.train_prompts),
                    "-P", str(pair.heldout_prompts), "--file-setting", f"{pair.heldout_prompts}:max-new-tokens=20",
                    "-o", str(out), "--cache", str(cache), *TRAIN_ARGS)
    assert done.returncode == 0, done.stderr
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    (added,) = set(cache.iterdir()) - before
    assert json.loads((added / "settings.json").read_text())["max_new_tokens"] == 20
    steps = load_shards(added)["step"]
    assert steps.max() >= 12 and steps.max() < 20
    assert Head.load(out).meta["training"]["file_settings"] == {pair.heldout_prompts.name: {"max_new_tokens": 20}}


def test_file_settings_that_do_not_fit_give_one_line(pair, tmp_path):
    common = ("train", "--base", str(pair.base), "--aligned", str(pair.aligned), "-P", str(pair.train_prompts), "-o", str(tmp_path / "h.npz"),
              "--cache", str(tmp_path / "cache"))
    for setting, words in ((f"{pair.heldout_prompts}:max-new-tokens=8", "not one of the -P"),
                           (f"{pair.train_prompts}:top-k=8", "KEY must be one of"),
                           (f"{pair.train_prompts}:max-new-tokens=0", "at least 1"),
                           (f"{pair.train_prompts}:trajectories=base", "aligned or aligned+base"),
                           ("max-new-tokens", "FILE:KEY=VALUE")):
        assert words in one_error_line(run_sali(*common, "--file-setting", setting)), setting
    assert not (tmp_path / "h.npz").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_interrupted_extraction_resumes_to_the_same_head(pair, trained, tmp_path, sig):
    """Kill `sali train` (SIGKILL) or press Ctrl-C (SIGINT) once its first shard is written,
    rerun: the same head results. Ctrl-C ends the run with one line and exit status 130."""
    reference, _, _ = trained
    cache = tmp_path / "cache"
    out = tmp_path / "resumed.npz"
    args = [sys.executable, "-m", "sali", "train", "--base", str(pair.base), "--aligned", str(pair.aligned),
            "-P", str(pair.train_prompts), "-o", str(out), "--cache", str(cache), *TRAIN_ARGS]
    child = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=interruptible)
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache.rglob("shard-00000.npz")):
        time.sleep(0.05)
    os.kill(child.pid, sig)
    _, stderr = child.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert child.returncode == 130
        assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted", stderr
    shards = list(cache.rglob("shard-*.npz"))
    assert 1 <= len(shards) < 8, "the run was not interrupted during extraction"
    assert not out.exists()
    train(pair, out, cache)
    first, resumed = Head.load(reference), Head.load(out)
    for name in ("U", "W", "bias", "promote"):
        np.testing.assert_array_equal(getattr(first, name), getattr(resumed, name))


def test_base_trajectories_are_the_base_models_own_greedy_responses(pair, tmp_path):
    """--trajectories aligned+base adds positions on BASE's own responses: the same tokens
    llama.cpp's greedy decoding of the base GGUF produces (12 tokens, the chat format)."""
    from sali.extract import load_shards
    from sali.prompts import read_prompts, render

    out, cache = tmp_path / "both.npz", tmp_path / "cache"
    train(pair, out, cache, "--trajectories", "aligned+base")
    assert Head.load(out).meta["training"]["trajectories"] == "aligned+base"
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    data = load_shards(folder)
    assert set(np.unique(data["source"])) == {0, 1}
    prompts = [p.text for p in read_prompts(pair.train_prompts)]
    model = Model(pair.base_gguf, n_threads=1, n_ctx=256)
    try:
        rows = np.unique(data["row"][data["source"] == 1])
        for row in rows[:: max(1, len(rows) // 6)]:
            on_row = (data["row"] == row) & (data["source"] == 1)
            extracted = data["token"][on_row][np.argsort(data["step"][on_row])].tolist()
            text = render({"type": "chat"}, [{"role": "user", "content": prompts[row]}], chat_template=model.chat_template)
            greedy = model.complete(text, Sampling(max_tokens=12)).tokens
            assert extracted[: len(greedy)] == greedy
            assert extracted != data["token"][(data["row"] == row) & (data["source"] == 0)].tolist()
    finally:
        model.close()


# ---- bad input --------------------------------------------------------------------------------
def test_tokenizer_mismatch_is_refused_before_any_work(pair, tiny, tmp_path):
    done = run_sali("train", "--base", str(pair.base), "--aligned", str(tiny.hf_dir), "-P", str(pair.train_prompts),
                    "-o", str(tmp_path / "h.npz"), "--cache", str(tmp_path / "cache"))
    line = one_error_line(done)
    assert "tokenizers differ" in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "h.npz").exists()


def test_empty_prompt_file_and_unreadable_model_folder(pair, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = one_error_line(run_sali("train", "--base", str(pair.base), "--aligned", str(pair.aligned), "-P", str(empty),
                                   "-o", str(tmp_path / "h.npz")))
    assert "no prompts" in line
    broken = tmp_path / "broken"
    shutil.copytree(pair.base, broken)
    (broken / "config.json").write_text("{ this is not json")
    line = one_error_line(run_sali("train", "--base", str(broken), "--aligned", str(pair.aligned), "-P", str(pair.train_prompts),
                                   "-o", str(tmp_path / "h.npz")))
    assert "broken" in line
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    line = one_error_line(run_sali("train", "--base", str(folder), "--aligned", str(pair.aligned), "-P", str(pair.train_prompts),
                                   "-o", str(tmp_path / "h.npz")))
    assert "no config.json" in line


def test_training_options_that_do_not_fit_give_one_line(pair, tmp_path):
    common = ("train", "--base", str(pair.base), "--aligned", str(pair.aligned), "-P", str(pair.train_prompts), "-o", str(tmp_path / "h.npz"))
    line = one_error_line(run_sali(*common, "--kind", "lmhead", "--first-tokens", "4", "--first-weight", "4"))
    assert "--first-tokens" in line and "lmhead" in line
    line = one_error_line(run_sali(*common, "--kind", "lmhead", "--sharpen", "2"))
    assert "--sharpen" in line and "lmhead" in line
    line = one_error_line(run_sali(*common, "--kind", "lmhead", "--dead-zone", "1"))
    assert "--dead-zone" in line and "lmhead" in line
    assert "--dead-zone" in one_error_line(run_sali(*common, "--dead-zone-from", "3"))
    assert "--lr" in one_error_line(run_sali(*common, "--lr", "0"))
    assert "--only-agreeing" in one_error_line(run_sali(*common, "--keywords", str(ROOT / "sali" / "data" / "refusal_keywords.txt")))
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("How do I bake bread?\n")
    line = one_error_line(run_sali(*common[:-4], "-P", str(unlabelled), "-o", str(tmp_path / "h.npz"), "--only-agreeing"))
    assert "label" in line
    assert not (tmp_path / "h.npz").exists()


def test_only_agreeing_drops_exactly_the_prompts_whose_aligned_answer_disagrees_with_their_label(pair, trained, tmp_path):
    """Relabelling prompts the aligned model refuses as benign, and answered ones as harmful, makes
    --only-agreeing drop exactly those (and any the aligned model already got wrong), from the
    cached extraction: the head learns from the remaining positions only."""
    from collections import Counter

    from sali.extract import load_shards
    from sali.metrics import is_refusal, load_keywords

    cache = tmp_path / "cache"
    shutil.copytree(trained[1], cache)
    folder = min(cache.iterdir(), key=lambda f: json.loads((f / "settings.json").read_text())["hidden"])  # the top-k extraction
    shards = sorted(folder.glob("shard-*.npz"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    data = load_shards(folder)
    keywords = load_keywords(ROOT / "sali" / "data" / "refusal_keywords.txt")
    refused = {int(i): is_refusal(text, keywords) for i, text in data["responses"].items()}
    rows = [json.loads(line) for line in pair.train_prompts.read_text().splitlines()]
    wrong_already = {i for i, row in enumerate(rows) if i in refused and refused[i] != (row["label"] == "harmful")}
    right = [i for i in sorted(refused) if i not in wrong_already]
    relabelled = [i for i in right if refused[i]][:3] + [i for i in right if not refused[i]][:2]
    assert len(relabelled) == 5
    for i in relabelled:
        rows[i]["label"] = "benign" if refused[i] else "harmful"
    prompts = tmp_path / "relabelled.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "agreeing.npz"
    done = run_sali("train", "--base", str(pair.base), "--aligned", str(pair.aligned), "-P", str(prompts), "-o", str(out),
                    "--cache", str(cache), *TRAIN_ARGS, "--only-agreeing", timeout=600)
    assert done.returncode == 0, done.stderr
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # same prompt texts: the extraction is reused
    dropped = wrong_already | set(relabelled)
    figures = Head.load(out).meta["training"]
    assert figures["dropped_disagreeing"] == dict(Counter(rows[i]["label"] for i in dropped))
    assert figures["positions"] == int((~np.isin(data["row"], sorted(dropped))).sum()) < len(data["row"])
    assert "--only-agreeing dropped" in " ".join((done.stdout + done.stderr).split())


def test_prompt_file_formats(tmp_path):
    from sali.prompts import read_prompts

    (tmp_path / "a.txt").write_text("first\n\nsecond\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "q", "label": "harmful", "answer": "#### 4"}) + "\n")
    (tmp_path / "c.csv").write_text("goal,target\nDo a thing,Sure\n")
    (tmp_path / "d.csv").write_text("Question,Best Answer\nWhy?,Because\n")
    assert [p.text for p in read_prompts(tmp_path / "a.txt")] == ["first", "second"]
    row = read_prompts(tmp_path / "b.jsonl")[0]
    assert (row.text, row.label, row.answer) == ("q", "harmful", "#### 4")
    assert read_prompts(tmp_path / "c.csv")[0].text == "Do a thing"
    assert read_prompts(tmp_path / "d.csv")[0].text == "Why?"


def _shards(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    found = {}
    for path in sorted(cache.rglob("shard-*.npz")):
        with np.load(path, allow_pickle=False) as shard:
            found[f"{path.parent.name}/{path.name}"] = {name: shard[name] for name in shard.files}
    return found


def _same_heads(a: Path, b: Path) -> None:
    first, second = Head.load(a), Head.load(b)
    for name in ("U", "W", "bias", "promote"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_two_processes_through_accelerate_match_one_and_resume(pair, trained, tmp_path):
    """`sali train --processes 2` (accelerate's launcher, gloo on the CPU): the same shards, under
    the same cache key, and the same head as one process. A run that stopped with only some shards
    written (shards are written atomically, so this is what an interruption leaves, plus a
    half-written temporary file) resumes with 2 processes; then one process reuses them all."""
    reference, one_cache, _ = trained
    cache, out = tmp_path / "cache", tmp_path / "two.npz"
    done = train(pair, out, cache, "--processes", "2")
    assert "process 1 of 2" in done.stderr
    two = _shards(cache)
    folders = {name.split("/")[0] for name in two}  # the one-process cache may also hold a white-box run's
    one = {name: arrays for name, arrays in _shards(one_cache).items() if name.split("/")[0] in folders}
    assert len(folders) == 1 and list(one) == list(two) and len(two) >= 4
    for name, arrays in one.items():
        assert arrays.keys() == two[name].keys()
        for key in arrays:
            np.testing.assert_array_equal(arrays[key], two[name][key], err_msg=f"{name} {key}")
    _same_heads(reference, out)

    shard_paths = sorted(cache.rglob("shard-*.npz"))
    for path in shard_paths[1:3]:  # one shard of each process
        path.unlink()
    (shard_paths[1].parent / f".{shard_paths[1].name}.x1y2.npz.part").write_bytes(b"half")
    out.unlink()
    train(pair, out, cache, "--processes", "2")
    assert not list(cache.rglob("*.part"))
    resumed = _shards(cache)
    for name, arrays in one.items():
        for key in arrays:
            np.testing.assert_array_equal(arrays[key], resumed[name][key])
    _same_heads(reference, out)
    stamps = [p.stat().st_mtime_ns for p in shard_paths]
    again = tmp_path / "one.npz"
    train(pair, again, cache)
    assert [p.stat().st_mtime_ns for p in shard_paths] == stamps  # nothing extracted again
    _same_heads(reference, again)
