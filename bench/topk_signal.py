"""How much of a prompt's label the base's top k says at the first response token.

A top-k head mostly decides between refusing and answering at the first response token, and all it
reads there is the base's top-k log-probs. So before training heads with a larger k, ask the data:
how well can a classifier tell the prompt's label (``--positive``, e.g. harmful, against every
other label) from those k values? Read from ``sali train``'s extraction cache, trained on the
prompts ``sali train`` trains on and scored on the ones it holds out for validation (same split,
same seed), for two classifiers on the same features (the top-k probabilities, renormalised, each
token embedded, as a head reads them):

* linear: a weighted sum of per-token weights, about what a head's change to one token's logit
  against another's can express;
* mlp: one hidden layer of 512, a ceiling for a shallow function of the same values.

Printed per k and classifier: the AUC and the share of positive validation prompts caught when
10% of the others are flagged (the threshold set on the others' scores).

    python bench/topk_signal.py --cache WORK/extract -P train.jsonl -P distill.jsonl --k 64 256
    python bench/topk_signal.py --smoke --cache CACHE -P train.jsonl --k 4 16   # the test suite's run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sali import extract  # noqa: E402
from sali.distill import TrainSettings, split_prompts  # noqa: E402
from sali.errors import SaliError  # noqa: E402
from sali.prompts import read_prompts  # noqa: E402
from sali.training import default_cache  # noqa: E402

FALSE_ALARMS = 0.10  # share of the other prompts flagged when the catch rate is read


def extractions(cache: Path, texts: list[str], k: int) -> dict[Path, dict]:
    """Every extraction folder in `cache` for these prompt texts with at least `k` base tokens a
    position, with its settings; one clear error when there is none."""
    sha = extract.prompts_sha(texts)
    found = {}
    for path in sorted(cache.glob("*/settings.json")):
        settings = json.loads(path.read_text())
        if settings.get("prompts_sha") == sha and settings.get("k_store", 0) >= k:
            found[path.parent] = settings
    if not found:
        raise SaliError(f"no extraction in {cache} for these {len(texts)} prompts with k_store >= {k}: run sali train on them first")
    return found


def find_folder(cache: Path, texts: list[str], k: int) -> Path:
    """The extraction folder in `cache` for these prompt texts with at least `k` base tokens a
    position; of several that differ only in how many they keep, the smallest (the least to read)."""
    found = extractions(cache, texts, k)
    if len({json.dumps({**s, "k_store": None}, sort_keys=True) for s in found.values()}) > 1:
        raise SaliError(f"{len(found)} extractions in {cache} hold these prompts ({', '.join(f.name for f in found)}): "
                        "name the one to read with --extraction")
    return min(found, key=lambda folder: found[folder]["k_store"])


def first_positions(cache: Path, prompt_files: list[Path], k: int, positive: str, val_fraction: float, seed: int,
                    folders: list[Path] | None = None):
    """Features and labels of each labelled prompt's first response token on ALIGNED's answer.

    Returns ``(ids (n, k) int64, log-probs (n, k) float32, y (n,) float32,
    held (n,) bool: True for prompts sali train holds out for validation)``. `folders`: the
    extraction folder of each prompt file, when not looked up in `cache`.
    """
    rows = [read_prompts(path) for path in prompt_files]
    if folders is None:
        folders = [find_folder(cache, [p.text for p in file_rows], k) for file_rows in rows]
    elif len(folders) != len(rows):
        raise SaliError(f"--extraction names {len(folders)} folders for {len(rows)} prompt files: one each, in the same order")
    data = extract.load_extractions(folders, [len(file_rows) for file_rows in rows])
    labels = np.array([p.label or "" for file_rows in rows for p in file_rows])
    held = split_prompts(data["row"], val_fraction, seed)  # over every position, as sali train splits
    first = data["step"] == 0
    if "source" in data:
        first &= data["source"] == extract.SOURCES["aligned"]
    first &= labels[data["row"]] != ""
    if not first.any():
        raise SaliError("no labelled prompt in these files (a 'label' field or column)")
    y = (labels[data["row"][first]] == positive).astype(np.float32)
    return data["base_ids"][first, :k].astype(np.int64), data["base_lp"][first, :k].astype(np.float32), y, held[first]


def renormalised(lp: np.ndarray) -> np.ndarray:
    """``(n, k)`` probabilities from ``(n, k)`` log-probs, renormalised within the k (as a head reads them)."""
    probs = np.exp(lp - lp.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def fit(ids, probs, y, train_rows, val_rows, vocab: int, hidden: int, epochs: int, seed: int):
    """Train a classifier of `y` on `train_rows` (AdamW, logistic loss) with early stopping on
    `val_rows`, and return ``score(rows) -> (len(rows),) float32``: the scores of those rows under
    the parameters of the epoch with the lowest validation loss.

    ``ids (n, m) int64`` token ids (< `vocab`), ``probs (n, m) float32`` their weights (each token
    embedded in 64 dimensions, the embeddings summed with these weights), ``y (n,)`` 0/1;
    `hidden` 0 for a linear read-out, else one ReLU layer of that width.
    """
    import copy

    import torch
    from torch import nn

    torch.manual_seed(seed)
    embed = nn.EmbeddingBag(vocab, 64, mode="sum")
    nn.init.normal_(embed.weight, std=0.05)
    out = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden else nn.Linear(64, 1)
    model = nn.ModuleList([embed, out])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    ids_t, probs_t, y_t = torch.from_numpy(ids), torch.from_numpy(probs), torch.from_numpy(y)
    train_rows, val_rows = np.asarray(train_rows), np.asarray(val_rows)
    rng = np.random.default_rng(seed)

    def scores(net, index):
        return net[1](net[0](ids_t[index], per_sample_weights=probs_t[index])).squeeze(-1)

    best_loss, best = np.inf, copy.deepcopy(model)
    for _ in range(epochs):
        order = train_rows[rng.permutation(len(train_rows))]
        for start in range(0, len(order), 256):
            batch = order[start : start + 256]
            loss = nn.functional.binary_cross_entropy_with_logits(scores(model, batch), y_t[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = nn.functional.binary_cross_entropy_with_logits(scores(model, val_rows), y_t[val_rows]).item()
        if val_loss < best_loss:
            best_loss, best = val_loss, copy.deepcopy(model)

    def score(rows) -> np.ndarray:
        with torch.no_grad():
            return scores(best, np.asarray(rows)).numpy()

    return score


def fit_and_score(ids, probs, y, held, vocab: int, hidden: int, epochs: int, seed: int) -> np.ndarray:
    """Train on the rows not `held` and return the held rows' scores from the epoch with the lowest
    held-out loss (early stopping on the held rows, as sali train stops: a ceiling, slightly
    optimistic, not a figure to ship on)."""
    val_rows = np.flatnonzero(held)
    return fit(ids, probs, y, np.flatnonzero(~held), val_rows, vocab, hidden, epochs, seed)(val_rows)


def auc_and_catch(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """AUC (ties count half) and the share of positives scored above the others' (1 - FALSE_ALARMS) quantile."""
    pos, neg = scores[y == 1], scores[y == 0]
    if not len(pos) or not len(neg):
        raise SaliError("the validation prompts need both the positive label and others")
    auc = float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))
    threshold = np.quantile(neg, 1 - FALSE_ALARMS)
    return auc, float((pos > threshold).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="sali train's extraction cache (its --cache); default: sali's own")
    parser.add_argument("--extraction", type=Path, action="append", help="an extraction folder to read instead, one per -P file, in order")
    parser.add_argument("-P", "--prompts", type=Path, action="append", required=True, help="a prompt file sali train read (repeatable, in its order)")
    parser.add_argument("--k", type=int, nargs="+", default=[64, 256], help="top-k sizes to read (default 64 256)")
    parser.add_argument("--positive", default="harmful", help="the label to tell from the others (default harmful)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few epochs, for the test suite")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    settings = TrainSettings()
    epochs = 3 if args.smoke else args.epochs
    try:
        # read once at the largest k; each smaller k is its leading columns (the stored top k is sorted)
        all_ids, all_lp, y, held = first_positions(args.cache or default_cache(), args.prompts, max(args.k), args.positive,
                                                   settings.val_fraction, settings.seed, args.extraction)
        print(f"{'k':>5}  {'classifier':<10} {'AUC':>6}  caught at {FALSE_ALARMS:.0%} false alarms")
        for k in args.k:
            ids, probs = all_ids[:, :k], renormalised(all_lp[:, :k])
            vocab = int(ids.max()) + 1
            for name, hidden in (("linear", 0), ("mlp", 512)):
                auc, caught = auc_and_catch(fit_and_score(ids, probs, y, held, vocab, hidden, epochs, settings.seed), y[held])
                print(f"{k:>5}  {name:<10} {auc:6.3f}  {caught:.0%}", flush=True)
        print(f"validation prompts: {int(y[held].sum())} {args.positive}, {int((1 - y[held]).sum())} others "
              f"(sali train's split: {settings.val_fraction:.0%} of the prompts, seed {settings.seed})")
    except SaliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
