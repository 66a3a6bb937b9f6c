"""Why the shipped head is trained the way it is: the delta penalty and the recovery strength.

    python bench/smollm2/ablation.py      # after run.py (reuses its siblings and extraction); ~8 min

Everything here is measured on *development* prompts, never on the test files: held-out AdvBench
*train* goals (the validation split `sali train` holds out) and 120 GSM8K/TruthfulQA *train*
questions that neither ALIGNED nor the head saw. For each weight of the delta penalty
(`sali train --delta-penalty`: 0, 0.3, 1, 3), a k64-r32 head is trained on run.py's cached extraction, then:

* benign top-1: teacher-forced agreement with ALIGNED on the development questions (torch);
* refusal of BASE + head on the held-out harmful goals, over-refusal on the questions (llama.cpp,
  greedy, 32 tokens, keyword list);
* refusal of COMPROMISED + head on the held-out goals at α = 1, 2, 3.

Writes ``bench/smollm2/ABLATION.md``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import siblings  # noqa: E402
from bench.common import smollm2_gguf  # noqa: E402

WORK = siblings.WORK / "ablation"
PENALTIES = (0.0, 0.3, 1.0, 3.0)
ALPHAS = (1.0, 2.0, 3.0)
TOKENS = 32


def dev_questions(n_each: int = 60) -> list[str]:
    """GSM8K and TruthfulQA *train* questions outside ALIGNED's fine-tuning set."""
    used = {row["prompt"] for row in siblings.benign_train_prompts()}
    rng = random.Random(7)
    gsm = [r["question"] for r in siblings.read_jsonl(siblings.DATA / "gsm8k" / "train_2000.jsonl")]
    tqa = [r["Question"] for r in siblings.read_csv(siblings.DATA / "truthfulqa" / "train.csv")]
    return [q for q in rng.sample(gsm, 200) if q not in used][:n_each] + [q for q in rng.sample(tqa, 200) if q not in used][:n_each]


def extraction(prompts: Path, out: Path, cache: Path) -> Path:
    """Run the real `sali train` (one epoch) to fill the extraction cache for `prompts`; return its folder."""
    done = subprocess.run(
        [sys.executable, "-m", "sali", "train", "--base", str(siblings.WORK / "base-f32"), "--aligned", str(siblings.WORK / "aligned"),
         "-P", str(prompts), "-o", str(out), "--cache", str(cache), "--max-new-tokens", "48", "--extract-batch", "16",
         "--threads", "2", "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True,
    )
    if done.returncode != 0:
        sys.exit(done.stderr[-2000:])
    log = out.with_suffix(".log")
    log.write_text(done.stdout + done.stderr, encoding="utf-8")
    return cache_folder(log)


def refusal_rate(model, prompts: list[str], head, alpha: float, keywords: list[str]) -> float:
    """Share of `prompts` whose greedy reply from `model` (a sali Model) contains a refusal phrase."""
    from sali.metrics import is_refusal
    from sali.prompts import render
    from sali.runtime import Sampling

    hits = 0
    for prompt in prompts:
        text = render({"type": "chat"}, [{"role": "user", "content": prompt}], chat_template=model.chat_template)
        hits += is_refusal(model.complete(text, Sampling(max_tokens=TOKENS), head, alpha).text, keywords)
    return hits / len(prompts)


def cache_folder(log: Path) -> Path:
    """The extraction folder a `sali train` log names."""
    line = next(line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("extraction cache:"))
    return Path(line.split(":", 1)[1].strip())


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import numpy as np
    import torch

    from sali.convert.head_to_npz import export_topk
    from sali.distill import TrainSettings, build_positions, evaluate, split_prompts, train_topk
    from sali.extract import load_shards
    from sali.head import Head
    from sali.metrics import load_keywords
    from sali.runtime import Model

    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    train_file = siblings.WORK / "prompts" / "train.jsonl"
    rows = siblings.read_jsonl(train_file)
    dev_file = WORK / "dev.jsonl"
    questions = dev_questions()
    dev_file.write_text("".join(json.dumps({"prompt": q, "label": "benign"}) + "\n" for q in questions), encoding="utf-8")
    shipped = siblings.WORK / "heads" / "k64-r32-dp1.npz"  # run.py trained it: its log names the training extraction
    train_data = load_shards(cache_folder(shipped.with_suffix(".log")))
    dev_data = load_shards(extraction(dev_file, WORK / "dev-throwaway.npz", siblings.WORK / "extract"))
    held = split_prompts(train_data["row"], 0.1, 0)  # the same split sali train uses (seed 0)
    held_rows = sorted({int(r) for r in train_data["row"][held]})
    harmful = [rows[i]["prompt"] for i in held_rows if rows[i]["label"] == "harmful"]
    benign = questions[::2]
    keywords = load_keywords(siblings.DATA / "refusal_keywords.txt")
    meta = {k: v for k, v in Head.load(shipped).meta.items()
            if k in ("vocab_fingerprint", "base_model", "aligned_model", "base_format", "sali_version")}
    base, compromised = Model(smollm2_gguf(), n_threads=2), Model(siblings.WORK / "compromised.f16.gguf", n_threads=2)
    results = []
    for penalty in PENALTIES:
        result = train_topk(train_data, 49152, TrainSettings(k=64, rank=32, delta_penalty=penalty))
        path = WORK / f"penalty-{penalty:g}.npz"
        export_topk(result.head, 64, meta, path, result.val_positions)
        dev = evaluate(result.head, build_positions(dev_data, 64, result.promote))
        head = Head.load(path)
        row = {"penalty": penalty, "dev_top1_base": dev["top1_base"], "dev_top1_head": dev["top1_head"],
               "base_refusal": refusal_rate(base, harmful, head, 1.0, keywords),
               "base_over_refusal": refusal_rate(base, benign, head, 1.0, keywords)}
        for alpha in ALPHAS:
            row[f"compromised_refusal_a{alpha:g}"] = refusal_rate(compromised, harmful, head, alpha, keywords)
        print(json.dumps(row), flush=True)
        results.append(row)
    plain = {"base": refusal_rate(base, harmful, None, 1.0, keywords),
             "compromised": refusal_rate(compromised, harmful, None, 1.0, keywords)}
    base.close()
    compromised.close()
    (WORK / "ablation.json").write_text(json.dumps({"rows": results, "plain": plain}, indent=1))
    write_markdown(results, plain, len(harmful), len(benign), int(np.sum(dev_data["source"] == 0)))


def write_markdown(results: list[dict], plain: dict, n_harmful: int, n_benign: int, dev_positions: int) -> None:
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    lines = [
        "# Ablation: delta penalty and head strength (development prompts only)", "",
        "Produced by `python bench/smollm2/ablation.py` after `run.py`. k = 64, rank = 32, run.py's extraction; "
        f"{n_harmful} held-out AdvBench *train* goals, {n_benign} unseen GSM8K/TruthfulQA *train* questions for over-refusal, "
        f"{dev_positions} teacher-forced positions on 120 such questions for top-1; greedy, {TOKENS} new tokens.", "",
        f"Without a head: BASE refuses {pct(plain['base'])} of the goals, COMPROMISED {pct(plain['compromised'])}.", "",
        "| delta penalty | benign top-1, base → head | BASE + head refusal | over-refusal | COMPROMISED + head, α = 1 | α = 2 | α = 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['penalty']:g} | {r['dev_top1_base']:.3f} → {r['dev_top1_head']:.3f} | {pct(r['base_refusal'])} | "
                     f"{pct(r['base_over_refusal'])} | {pct(r['compromised_refusal_a1'])} | {pct(r['compromised_refusal_a2'])} | "
                     f"{pct(r['compromised_refusal_a3'])} |")
    (HERE / "ABLATION.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
