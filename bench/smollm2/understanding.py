"""Which part of an alignment is superficial? Three more siblings of SmolLM2-135M-Instruct, each
taught one kind of change, a head per sibling, and the figures side by side with SAFETY (issue 14).

    python bench/smollm2/understanding.py            # the whole study (84 minutes on 2 cores from an empty cache)
    python bench/smollm2/understanding.py --quick    # a small smoke run of every stage (work/understanding-quick/)

Kinds of change (each sibling is BASE, SmolLM2-135M-Instruct dequantized by ``siblings.base_folder()``,
fully fine-tuned by ``siblings.finetune``):

* STYLE (``style.py``): TruthfulQA *train* questions answered in a voice BASE never uses (every
  sentence a ``- `` point on a line of its own, nothing else), built from BASE's own answers so
  only the voice changes; metric: the check, ``sali compare --pass-regex``. Its head also learns
  on STYLE's answers to written everyday questions and requests (``prompts/style/everyday.txt``;
  that choice was made on ``dev.txt``) and is also run on two held-out sets (``heldout.txt``,
  ``heldout_forms.txt``; ``prompts/style/README.md``);
* ARITHMETIC (``arithmetic.py``): two-digit addition and subtraction in digits and in words,
  answered "47 + 28 = 75."; metric: exact match of the number (``--answer-match number``);
* FACTS (``facts.py``): invented facts (places, people, years), each trained on questions in
  three wordings and tested on a fourth; metric: the answer inside the response (``--answer-match text``).

Each sibling's training also holds BASE's own answers to unrelated prompts (the safety study's
benign training prompts, ``siblings.benign_train_prompts``; read from its cache
``work/base_responses.jsonl`` where it holds them, else generated), so its other behaviour stays
close to BASE's. Then, per kind: ``sali train`` (defaults) on the sibling's training prompts and
``sali compare`` (BASE Q4_1, BASE + head, the sibling as ``--aligned``) on its test prompts:
metric, superficial share, cover rate, top-1 agreement and KL by position.

SAFETY is the safety study's (``run.py``) main comparison: where that study has run, its
``sali compare`` is run again from its own response cache (the same prompts, models and head, so
nothing is generated anew) with today's sali, which adds the cover rates; otherwise SAFETY is left
out and the report says so. Building ALIGNED here would cost two hours, beyond this study's budget.

Outputs: ``work/understanding/`` (gitignored; a finished stage is skipped on rerun, and a kind whose
recipe changed is rebuilt), ``UNDERSTANDING.md`` and ``understanding.png`` beside this file, and the
STYLE head shipped as ``heads/smollm2-135m-style.npz`` with its model card when its superficial
share is at least 0.9 on the test questions and on each held-out set, and it leaves refusals and
the rest of BASE's behaviour as they were
(:func:`understanding_report.style_checks`).
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import arithmetic  # noqa: E402
import facts  # noqa: E402
import run  # noqa: E402
import siblings  # noqa: E402
import style  # noqa: E402
from bench.common import smollm2_gguf  # noqa: E402
from sali.atomic import write_text  # noqa: E402
from sali.metrics import is_refusal  # noqa: E402

KINDS = ("style", "arithmetic", "facts")
STYLE_PROMPTS = HERE / "prompts" / "style"
STYLE_EVERYDAY = STYLE_PROMPTS / "everyday.txt"  # head training
STYLE_DEV = STYLE_PROMPTS / "dev.txt"  # choosing the STYLE head's data and options
STYLE_HELDOUT = STYLE_PROMPTS / "heldout.txt"  # evaluation only: everyday questions in the training's forms, other topics
STYLE_HELDOUT_FORMS = STYLE_PROMPTS / "heldout_forms.txt"  # evaluation only: forms no training or development line uses
SEED = 14
SHIPPED_STYLE = ROOT / "heads" / "smollm2-135m-style.npz"


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run makes (counts of prompts, seconds)."""

    style_sources: int  # TruthfulQA train questions BASE answers, to be restyled
    style_test: int  # TruthfulQA test questions (label "question")
    style_other: int  # GSM8K test problems (label "math"): the format must stay off them
    style_everyday: int  # written everyday requests and questions (prompts/style/everyday.txt) the head also learns on
    arithmetic_train: int
    arithmetic_test: int
    facts_per_relation: int  # facts = 4 x this
    facts_phrasings: int  # training questions per fact, each in another template
    facts_test_per_relation: int
    mix: int  # BASE's own answers to unrelated prompts, per sibling
    head_prompts: int  # changed-kind training prompts the head is trained on (plus the mix prompts)
    budget_s: float  # wall-time cap of one fine-tune (a full run's recipe may set its own)


FULL = Sizes(style_sources=200, style_test=60, style_other=20, style_everyday=113, arithmetic_train=1024, arithmetic_test=80,
             facts_per_relation=25, facts_phrasings=3, facts_test_per_relation=20, mix=24, head_prompts=120, budget_s=660)
QUICK = Sizes(style_sources=12, style_test=6, style_other=3, style_everyday=4, arithmetic_train=24, arithmetic_test=8,
              facts_per_relation=6, facts_phrasings=2, facts_test_per_relation=2, mix=4, head_prompts=12, budget_s=60)

# Fine-tune settings: full fine-tunes with AdamW (siblings.finetune), about 120 trained tokens a
# second on 2 cores (the first study run: STYLE 27.5k tokens in 268 s, ARITHMETIC 31k in 258 s);
# the budget cap (Sizes.budget_s, or a recipe's own `budget_s` in a full run) stops a slower run
# and the report says so.
RECIPES = {
    # ~130-token examples (BASE's TruthfulQA answers, laid out); a consistent layout is learned fast
    "style": dict(epochs=1.5, lr=1e-4, batch_tokens=1024),
    # ~56-token examples: 1024 problems twice (120k tokens). With 256 problems twice at lr 1e-4 the
    # training loss fell to 0.08 while the test problems were 46% right: memorised, not learned
    "arithmetic": dict(epochs=2.0, lr=2e-4, batch_tokens=512, budget_s=1200),
    # ~50-token examples: memorising needs repeats and a larger step: 100 facts, each asked in 3
    # wordings, seen 4 times (71k tokens). 200 facts in one wording seen 2.5 times stalled at loss
    # 0.43 and 9% recall in new words
    "facts": dict(epochs=4.0, lr=3e-4, batch_tokens=512, budget_s=900),
}
# BASE's answers mixed into each sibling's training, by source in siblings.benign_train_prompts:
# prompts unrelated to the change (no math for ARITHMETIC; STYLE's questions are TruthfulQA's, so
# its mix is math word problems, answered as BASE does, which the format must leave alone)
MIX_SOURCES = {
    "style": ("gsm8k",),
    "arithmetic": ("truthfulqa", "benign_written", "alarming_written"),
    "facts": ("gsm8k", "benign_written", "alarming_written"),
}
MIX_TOKENS = 48  # mixed-in answers are cut to this many tokens (a cut answer is trained without its end token)
# BASE's answers to the STYLE questions, as long as the comparison's (EVAL["style"]["tokens"]): an
# answer BASE ended is trained with its end token, one cut at this limit without, so the sibling
# stops where BASE stops and only the layout changes. (Cut at 72 tokens, the sibling also learned
# to stop after two or three sentences, a change of length that the head carried badly: in that
# run 9 of its 15 misses were answers that stopped after one point.)
SOURCE_TOKENS = 128
# sali compare per kind: new tokens, sali train's --max-new-tokens, the metric's options, the
# summary key of the metric and the label it is read on ("" = all prompts)
EVAL = {
    "style": dict(tokens=128, extract=112, options=("--pass-regex", style.PATTERN), metric="pass_question", label="question"),
    "arithmetic": dict(tokens=48, extract=24, options=("--answer-match", "number"), metric="exact_match", label=""),
    "facts": dict(tokens=32, extract=24, options=("--answer-match", "text"), metric="exact_match", label=""),
}


@dataclass
class Setup:
    """One run's BASE, folders and sizes."""

    base_dir: Path  # BASE as an HF folder (fine-tuning, sali train)
    base_gguf: Path  # BASE as llama.cpp runs it (its answers, sali compare)
    work: Path
    sizes: Sizes
    default_base: bool  # BASE is SmolLM2-135M-Instruct: the safety study's caches apply, STYLE may ship
    quick: bool

    @property
    def pre(self) -> str | None:
        """The siblings' GGUF pre-tokenizer: SmolLM2's, else the tokenizer's own."""
        return "smollm" if self.default_base else None

    def folder(self, kind: str) -> Path:
        return self.work / kind


# ---- BASE's answers ---------------------------------------------------------------------------
def truthful_rows(split: str) -> list[dict]:
    with open(siblings.DATA / "truthfulqa" / f"{split}.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def style_questions(n: int) -> list[str]:
    """`n` TruthfulQA *train* questions (seeded) that the safety study neither trained on nor
    used for development."""
    used = set(siblings.truthful_questions(siblings.DATA / "truthfulqa" / "train.csv", siblings.N_TRUTHFUL_TRAIN))
    used |= set(siblings.truthful_questions(siblings.DATA / "truthfulqa" / "train.csv", 200, seed=siblings.SEED + 3))
    free = [r["Question"] for r in truthful_rows("train") if r["Question"] not in used]
    return random.Random(SEED).sample(free, n)


def mix_prompts(kind: str, n: int) -> list[dict]:
    """`n` of the safety study's benign training prompts (seeded per kind) from `kind`'s sources."""
    pool = [item for item in siblings.benign_train_prompts() if item["source"] in MIX_SOURCES[kind]]
    return random.Random(SEED + KINDS.index(kind)).sample(pool, n)


def keyed(setup: Setup, name: str, prompts: list[str]) -> Path:
    """``<work>/base/<name>-<hash of the prompts>.jsonl``: another selection of prompts is another file."""
    digest = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:10]
    return setup.work / "base" / f"{name}-{digest}.jsonl"


def base_mix(setup: Setup) -> dict[str, dict]:
    """BASE's greedy answers (96 tokens, as ``siblings.base_responses``) to every kind's mix
    prompts, by prompt: taken from the safety study's cache where it holds them (BASE =
    SmolLM2), the rest generated; kept in ``<work>/base/mix-<hash>.jsonl``."""
    wanted = list({item["prompt"]: item for kind in KINDS for item in mix_prompts(kind, setup.sizes.mix)}.values())
    path = keyed(setup, "mix", [item["prompt"] for item in wanted])
    if not path.is_file():
        cached = siblings.WORK / "base_responses.jsonl"
        known = {r["prompt"]: r for r in siblings.read_jsonl(cached)} if setup.default_base and cached.is_file() else {}
        todo = [item for item in wanted if item["prompt"] not in known]
        if todo:
            fresh = siblings.generate(setup.base_gguf, todo, siblings.RESPONSE_TOKENS, path.with_name(path.stem + "-generated.jsonl"),
                                      "BASE, answers to mix in")
            known.update({r["prompt"]: r for r in fresh})
        siblings.write_jsonl(path, [known[item["prompt"]] for item in wanted])
    return {r["prompt"]: r for r in siblings.read_jsonl(path)}


def style_sources(setup: Setup) -> list[dict]:
    """BASE's greedy answers (`SOURCE_TOKENS`) to the STYLE questions, in ``<work>/base/``."""
    questions = style_questions(setup.sizes.style_sources)
    path = keyed(setup, f"style-sources-{SOURCE_TOKENS}", questions)
    return siblings.generate(setup.base_gguf, [{"prompt": q} for q in questions], SOURCE_TOKENS, path, "BASE, STYLE sources")


# ---- the kinds' data ------------------------------------------------------------------------
def kind_data(setup: Setup, kind: str) -> tuple[list[dict], list[dict]]:
    """(changed training rows ``{prompt, response, label}``, test rows ``{prompt, label, answer?}``)."""
    sizes, words = setup.sizes, siblings.keywords()
    if kind == "style":
        rows = []
        for r in style_sources(setup):
            answer = style.restyle(r["response"], chunks=setup.quick)
            if answer is not None and not is_refusal(r["response"], words):
                rows.append({"prompt": r["prompt"], "response": answer, "label": "style", "end": r["finish"] == "eos"})
        rng = random.Random(SEED + 20)
        test = [{"prompt": r["Question"], "label": "question"} for r in rng.sample(truthful_rows("test"), sizes.style_test)]
        gsm = siblings.read_jsonl(siblings.DATA / "gsm8k" / "test.jsonl")
        test += [{"prompt": r["question"], "label": "math"} for r in rng.sample(gsm, sizes.style_other)]
        return rows, test
    if kind == "arithmetic":
        train, test = arithmetic.split(sizes.arithmetic_train, sizes.arithmetic_test, SEED)
        return ([{"prompt": p["prompt"], "response": p["response"], "label": p["label"]} for p in train],
                [{"prompt": p["prompt"], "label": p["label"], "answer": p["answer"]} for p in test])
    made = facts.make_facts(sizes.facts_per_relation, SEED)
    train = facts.training_items(made, SEED + 1, sizes.facts_phrasings)
    return ([{"prompt": t["prompt"], "response": t["response"], "label": t["label"]} for t in train],
            facts.test_items(made, sizes.facts_test_per_relation, SEED + 2))


HEAD_SIZES = ("head_prompts", "style_everyday")  # sizes that decide a head's prompts, not its sibling


def recipe(setup: Setup, kind: str) -> dict:
    """The settings that decide a kind's sibling and its test prompts: a change rebuilds the kind
    (a change to the generators' code does not: remove ``<work>/<kind>/`` then)."""
    sizes = {k: v for k, v in asdict(setup.sizes).items()
             if (k.startswith(kind) or k in ("mix", "budget_s")) and k not in HEAD_SIZES}
    return {"sizes": sizes, "finetune": RECIPES[kind], "eval": EVAL[kind],
            "mix_sources": MIX_SOURCES[kind], "mix_tokens": MIX_TOKENS, "seed": SEED,
            **({"source_tokens": SOURCE_TOKENS} if kind == "style" else {}),
            "base": [str(setup.base_dir), str(setup.base_gguf)]}


def head_recipe(setup: Setup, kind: str) -> dict:
    """The settings that decide a kind's head (its prompts; ``sali train`` runs with its defaults) but not its
    sibling: a change trains the head again and reruns its comparisons, and keeps the sibling."""
    return {"head_prompts": setup.sizes.head_prompts, **({"everyday": setup.sizes.style_everyday} if kind == "style" else {})}


def everyday_prompts(n: int) -> list[str]:
    """The first `n` lines of ``prompts/style/everyday.txt``: everyday questions and requests in
    the forms users type (imperatives, lowercase lines, first-person situations), written for the
    STYLE head's training; their topics appear in no development or held-out line."""
    return siblings.read_lines(STYLE_EVERYDAY)[:n]


def prepare(setup: Setup, kind: str) -> Path:
    """``<work>/<kind>/``: ``train.jsonl`` (changed rows, then the mix, ``label`` "mix", with
    BASE's tokens), ``test.jsonl`` and ``head_prompts.jsonl`` (a sample of the changed rows'
    prompts, STYLE's everyday prompts, the mix's prompts); a folder made under another recipe is
    removed first, and a head made under another head recipe with its comparisons."""
    folder = setup.folder(kind)
    identity = json.loads(json.dumps(recipe(setup, kind)))
    stamp = folder / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != identity:
        print(f"{kind}: the recipe changed since {folder} was built; building it again", flush=True)
        shutil.rmtree(folder)
    if not (folder / "train.jsonl").is_file():
        changed, test = kind_data(setup, kind)
        if not changed:
            sys.exit(f"{kind}: no training example could be built from BASE's answers")
        mix = base_mix(setup)
        words = siblings.keywords()
        mixed = [dict(mix[item["prompt"]], label="mix") for item in mix_prompts(kind, setup.sizes.mix)]
        mixed = [r for r in mixed if not is_refusal(r["response"], words)]  # as ALIGNED's recipe: no refusal taught
        folder.mkdir(parents=True, exist_ok=True)
        siblings.write_jsonl(folder / "test.jsonl", test)
        siblings.write_jsonl(folder / "train.jsonl", changed + mixed)
        write_text(stamp, json.dumps(identity, indent=1))
    head_identity = json.loads(json.dumps(head_recipe(setup, kind)))
    head_stamp = folder / "head_recipe.json"
    trained_under = json.loads(head_stamp.read_text()) if head_stamp.is_file() else None
    if (folder / "head_prompts.jsonl").is_file() and trained_under != head_identity:
        print(f"{kind}: the head recipe changed since its head was trained; training it again", flush=True)
        for stale in (folder / "head_prompts.jsonl", folder / f"{kind}.npz"):
            stale.unlink(missing_ok=True)
        seconds = folder / "seconds.json"
        if seconds.is_file():  # the sibling's time still holds
            kept = {step: took for step, took in json.loads(seconds.read_text()).items() if step == "sibling"}
            write_text(seconds, json.dumps(kept, indent=1))
        for stale in (folder / "compare", *(folder / name for name in STYLE_HELDOUT_SETS)):
            shutil.rmtree(stale, ignore_errors=True)
    if not (folder / "head_prompts.jsonl").is_file():
        rows = siblings.read_jsonl(folder / "train.jsonl")
        changed, mixed = [r for r in rows if r["label"] != "mix"], [r for r in rows if r["label"] == "mix"]
        head = [{"prompt": r["prompt"], "label": r["label"]}
                for r in random.Random(SEED + 30).sample(changed, min(setup.sizes.head_prompts, len(changed)))]
        if kind == "style":
            head += [{"prompt": line, "label": "style"} for line in everyday_prompts(setup.sizes.style_everyday)]
        head += [{"prompt": r["prompt"], "label": r["label"]} for r in mixed]
        siblings.write_jsonl(folder / "head_prompts.jsonl", head)
        write_text(head_stamp, json.dumps(head_identity, indent=1))
    return folder


# ---- siblings, heads, comparisons -------------------------------------------------------------
def build_sibling(setup: Setup, kind: str) -> tuple[Path, Path]:
    """``<work>/<kind>/<kind>/`` (HF folder, ``training.json``) and ``<kind>.f16.gguf``: BASE
    fine-tuned on the kind's ``train.jsonl``; resumes from its checkpoint."""
    folder = setup.folder(kind)
    model_dir, gguf_path = folder / kind, folder / f"{kind}.f16.gguf"
    if (model_dir / "config.json").is_file() and gguf_path.is_file():
        return model_dir, gguf_path
    model, tokenizer = siblings.load_hf(setup.base_dir)
    rows = siblings.read_jsonl(folder / "train.jsonl")
    examples = []
    for r in rows:
        if r["label"] == "mix":
            cut = r["tokens"][:MIX_TOKENS]
            examples.append(siblings.encode(tokenizer, r["prompt"], response_ids=cut, end=r["finish"] == "eos" and len(cut) == len(r["tokens"])))
        else:
            examples.append(siblings.encode(tokenizer, r["prompt"], r["response"], end=r.get("end", True)))
    settings = dict(RECIPES[kind])
    if setup.quick or "budget_s" not in settings:
        settings["budget_s"] = setup.sizes.budget_s
    figures = siblings.finetune(model, examples, label=kind, pad_id=tokenizer.pad_token_id, seed=SEED,
                                checkpoint=folder / "checkpoint.pt", **settings)
    figures.update(examples=len(examples), changed=sum(r["label"] != "mix" for r in rows), mix=sum(r["label"] == "mix" for r in rows),
                   tokens=sum(len(p) + len(a) for p, a in examples), **settings)
    siblings.save_sibling(model, tokenizer, kind, figures, work=folder, pre=setup.pre)
    del model
    gc.collect()
    return model_dir, gguf_path


def train_head(setup: Setup, kind: str, sibling_dir: Path) -> Path:
    """``<work>/<kind>/<kind>.npz``: ``sali train`` with its defaults on the head prompts."""
    folder = setup.folder(kind)
    head = folder / f"{kind}.npz"
    if not head.is_file():
        run.sali("train", "--base", str(setup.base_dir), "--aligned", str(sibling_dir), "-P", str(folder / "head_prompts.jsonl"),
                 "-o", str(head), "--cache", str(setup.work / "extract"), "--max-new-tokens", str(EVAL[kind]["extract"]),
                 "--extract-batch", "16", "--threads", str(siblings.THREADS),
                 "--lr", "3e-3",  # what UNDERSTANDING.md's heads were trained at (sali train's default before 1e-3)
                 log=folder / "train.log")
    return head


def compare(setup: Setup, kind: str, head: Path, sibling_gguf: Path) -> dict:
    """``sali compare`` of BASE, BASE + head and the sibling (``--aligned``) on the test prompts."""
    folder = setup.folder(kind)
    return run.compare(folder / "compare", folder / "test.jsonl", setup.base_gguf, [head], sibling_gguf, [], EVAL[kind]["tokens"],
                       cache=setup.work / "compare-cache", extra=EVAL[kind]["options"])


# STYLE's held-out prompt sets, by name: (file, what it is, whether the sibling is also run under
# sampling: on one set only, for the study's time budget)
STYLE_HELDOUT_SETS = {
    "heldout": (STYLE_HELDOUT, "everyday questions and requests in the forms of the everyday training prompts, other topics", False),
    "heldout_forms": (STYLE_HELDOUT_FORMS, "questions and requests in forms no training or development prompt uses (fragments, "
                                           "\"Is it true that…\", \"Compare…\", \"In simple terms…\", \"Quick question:\")", True),
}


def style_heldout(setup: Setup, name: str, head: Path, sibling_gguf: Path) -> dict:
    """STYLE on one of `STYLE_HELDOUT_SETS` (evaluation only: nothing was chosen on them):
    ``sali compare`` greedy (BASE, BASE + head, the sibling) in ``<work>/style/<name>/greedy/``,
    then BASE + head (and the sibling, where the set says so) under llama.cpp's default sampling
    (``run.sampled``), one run per seed of ``run.SAMPLING_SEEDS``. Returns ``{"path", "what",
    "greedy": summary, "sampled": [share of BASE + head's answers passing the check, per seed],
    "sampled_sibling": [the same for the sibling, or none]}``."""
    path, what, sibling_sampled = STYLE_HELDOUT_SETS[name]
    folder = setup.folder("style") / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = siblings.read_lines(path)
    prompts = folder / "prompts.jsonl"
    siblings.write_jsonl(prompts, [{"prompt": line, "label": "question"} for line in (lines[::8] if setup.quick else lines)])
    tokens = EVAL["style"]["tokens"]
    greedy = run.compare(folder / "greedy", prompts, setup.base_gguf, [head], sibling_gguf, [], tokens,
                         cache=setup.work / "compare-cache", extra=EVAL["style"]["options"])
    runs = [("head", "sampled-{seed}.jsonl", setup.base_gguf, head)]
    if sibling_sampled:
        runs.append(("sibling", "sampled-sibling-{seed}.jsonl", sibling_gguf, None))
    passed: dict[str, list[float]] = {"head": [], "sibling": []}
    for seed in run.SAMPLING_SEEDS:
        for who, name_pattern, model, with_head in runs:
            answers = run.sampled(folder / name_pattern.format(seed=seed), prompts, model, with_head, seed, tokens)
            passed[who].append(sum(style.passes(r["response"]) for r in answers) / len(answers))
    return {"path": str(path.relative_to(ROOT)), "what": what, "greedy": greedy, "sampled": passed["head"],
            "sampled_sibling": passed["sibling"]}


def safety(setup: Setup) -> dict | None:
    """The safety study's main comparison (``work/main/``), read as it is where it carries the
    cover rates (or in a quick run), else run again by today's ``sali compare`` from its own
    response cache so that it does; None where it has not run."""
    main = siblings.WORK / "main" / "summary.json"
    if not setup.default_base or not main.is_file():
        return None
    summary = json.loads(main.read_text())
    system = next(name for name, row in summary["systems"].items() if row.get("kind") == "head" and name.startswith("base+"))
    head = siblings.WORK / "heads" / Path(summary["systems"][system]["head"]).with_suffix(".npz").name
    prompts, aligned = siblings.WORK / "prompts" / "eval.jsonl", siblings.WORK / "aligned.f16.gguf"
    recomputed, out = None, setup.work / "safety"
    has_cover = "cover_vs_aligned_harmful" in summary["systems"]["base"]
    if not has_cover and head.is_file() and prompts.is_file() and aligned.is_file() and not setup.quick:
        if (out / "summary.json").is_file() and (out / "summary.json").stat().st_mtime < main.stat().st_mtime:
            shutil.rmtree(out)  # the safety study ran again since
        recomputed = run.compare(out, prompts, setup.base_gguf, [head], aligned, [], 48, cache=siblings.WORK / "compare-cache")
    from sali.head import Head

    return {"summary": recomputed or summary, "recomputed": recomputed is not None, "system": system,
            "head": head, "training": Head.load(head).meta["training"] if head.is_file() else {}}


# ---- the run ----------------------------------------------------------------------------------
STEPS = ("sibling", "head", "comparison")
KIND_STEPS = "(siblings, heads, comparisons)"  # the stage the kinds' steps replace in the stage times


def timed(setup: Setup, kind: str, step: str, work):
    """``work()``; its time is remembered in ``<work>/<kind>/seconds.json`` when the step's
    output was not there before (it computed, rather than read its cache)."""
    folder = setup.folder(kind)
    output = {"sibling": folder / f"{kind}.f16.gguf", "head": folder / f"{kind}.npz", "comparison": folder / "compare" / "summary.json"}[step]
    cached = output.is_file()
    began = time.perf_counter()
    out = work()
    if not cached:
        path = folder / "seconds.json"
        known = json.loads(path.read_text()) if path.is_file() else {}
        write_text(path, json.dumps(dict(known, **{step: round(time.perf_counter() - began, 1)}), indent=1))
    return out


def kind_seconds(setup: Setup, result: dict) -> dict[str, tuple[float, bool]]:
    """Seconds each step of a kind took on the run that computed it, and whether that time is
    whole: from ``seconds.json``, else (a folder built before it was kept) from the times the
    tools recorded themselves (the fine-tune, extraction plus head training, ``sali compare``),
    which leave out loading and converting the models."""
    import understanding_report

    path = result["folder"] / "seconds.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    training = understanding_report._head_training(result["head"])
    recorded = {"sibling": result["sibling"].get("seconds"),
                "head": (training.get("extract_seconds") or 0) + (training.get("train_seconds") or 0) or None,
                "comparison": result["summary"].get("seconds")}
    return {step: (known[step], True) if step in known else (recorded[step] or 0.0, False) for step in STEPS}


def ship_style(result: dict) -> None:
    """Copy the STYLE head into heads/ and write its model card."""
    import understanding_report

    shutil.copy(result["head"], SHIPPED_STYLE)
    understanding_report.write_style_card(result, SHIPPED_STYLE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run of every stage (work/understanding-quick/)")
    parser.add_argument("--base-dir", type=Path, help="BASE as an HF folder (default: SmolLM2-135M-Instruct, dequantized)")
    parser.add_argument("--base-gguf", type=Path, help="BASE as a GGUF (default: SmolLM2-135M-Instruct Q4_1); with --base-dir")
    parser.add_argument("--work", type=Path, help="folder for every output, the report included (default: work/understanding/)")
    args = parser.parse_args(argv)
    if (args.base_dir is None) != (args.base_gguf is None):
        parser.error("--base-dir and --base-gguf go together")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def say(name: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {name}", flush=True)

    def stage(name: str) -> None:
        timings[name] = time.perf_counter()
        say(name)

    stage("base")
    default_base = args.base_dir is None
    setup = Setup(base_dir=args.base_dir or siblings.base_folder(), base_gguf=args.base_gguf or smollm2_gguf(),
                  work=args.work or siblings.WORK / ("understanding-quick" if args.quick else "understanding"),
                  sizes=QUICK if args.quick else FULL, default_base=default_base, quick=args.quick)
    stage("data: BASE's answers, training and test prompts")
    for kind in KINDS:
        prepare(setup, kind)
    timings[KIND_STEPS] = time.perf_counter()  # ends where "safety" begins; timed per kind and step instead
    say("siblings")
    built = {kind: timed(setup, kind, "sibling", lambda: build_sibling(setup, kind)) for kind in KINDS}
    say("heads")
    heads = {kind: timed(setup, kind, "head", lambda: train_head(setup, kind, built[kind][0])) for kind in KINDS}
    say("comparisons")
    results = {}
    for kind in KINDS:
        summary = timed(setup, kind, "comparison", lambda: compare(setup, kind, heads[kind], built[kind][1]))
        results[kind] = {"summary": summary, "head": heads[kind],
                         "sibling": json.loads((built[kind][0] / "training.json").read_text()),
                         "folder": setup.folder(kind), "eval": EVAL[kind], "recipe": RECIPES[kind], "mix_sources": MIX_SOURCES[kind],
                         "mix_tokens": MIX_TOKENS, "source_tokens": SOURCE_TOKENS,
                         "everyday": setup.sizes.style_everyday if kind == "style" else 0}
    stage("STYLE on its held-out questions, greedy and sampled")
    results["style"]["heldout"] = {name: style_heldout(setup, name, heads["style"], built["style"][1]) for name in STYLE_HELDOUT_SETS}
    stage("safety (the safety study's comparison, from its cache)")
    safety_result = safety(setup)
    stage("report")
    import understanding_report

    staged = run.stage_durations(timings, time.perf_counter() - started, setup.work / "stage_seconds.json")
    durations: dict[str, tuple[float, bool]] = {}
    for name, seconds in staged.items():
        if name == KIND_STEPS:
            for kind in KINDS:
                durations.update({f"{kind}: {step}": took for step, took in kind_seconds(setup, results[kind]).items()})
        else:
            durations[name] = (seconds, True)
    official = default_base and not args.quick and args.work is None
    report = understanding_report.write_report(results, safety_result, setup, durations, official)
    checks = understanding_report.style_checks(results["style"])
    if official and all(ok for _, _, ok in checks):
        ship_style(results["style"])
        print(f"shipped the STYLE head as {SHIPPED_STYLE}")
    print(f"done in {time.perf_counter() - started:.0f} s; see {report}")


if __name__ == "__main__":
    main()
