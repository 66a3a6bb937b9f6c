"""What a dead zone does to a trained head's choices, read offline from sali train's extraction cache.

A head's small changes flip near-ties; its large ones carry what it learned (a refusal's first
token). A dead zone ``d`` (``sali train --dead-zone``) drops the changes within ``d`` nats of their
centre and shrinks the rest by ``d``. This script scores one trained head at several zones without
generating anything: the teacher-forced top-1 agreement with ALIGNED of BASE, and of BASE + head at
each zone, on

* the prompts ``sali train`` held out for validation from the head's own training files (the
  head's split: its seed and validation share), per prompt label, at the first ``--steps``
  response tokens, where refusing is decided, and at the later ones;
* optionally ``--questions``: prompt files the head never trained on, extracted by ``sali train``
  with the same models (e.g. benign questions with long answers; the longest extraction of each), at
  every response position, and before and past the head's own training length.

With ``--from-step N`` the zone spares the first N response steps (``sali head set
--dead-zone-from``). The base here is the Hugging Face model ``sali train`` read (not a quantised
GGUF), so these are screening figures for choosing a zone on development data, not a substitute
for ``sali compare``.

    python bench/dead_zone.py --head H.npz --cache WORK/extract -P train.jsonl -P distill.jsonl --questions qa.jsonl
    python bench/dead_zone.py --head H.npz --cache CACHE -P train.jsonl --zones 0 1   # the test suite's run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.topk_signal import extractions, find_folder  # noqa: E402
from sali import extract  # noqa: E402
from sali.distill import build_positions, make_torch_head, split_prompts  # noqa: E402
from sali.errors import SaliError  # noqa: E402
from sali.head import Head  # noqa: E402
from sali.prompts import read_prompts  # noqa: E402
from sali.training import default_cache  # noqa: E402

ZONES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def longest_folder(cache: Path, texts: list[str], k: int) -> Path:
    """The extraction folder in `cache` for these prompts with at least `k` base tokens a position
    and the longest answers (``--file-setting FILE:max-new-tokens=N`` can leave several)."""
    found = extractions(cache, texts, k)
    return max(found, key=lambda folder: (found[folder].get("max_new_tokens", 0), -found[folder]["k_store"]))


def torch_twin(head: Head):
    """The torch module of `head`'s weights (dead zone 0; set ``.dead_zone`` to try one)."""
    import torch

    twin = make_torch_head(head.vocab_size, head.rank, head.promote, seed=0)
    with torch.no_grad():
        for name in ("U", "W", "bias"):
            getattr(twin, name).copy_(torch.from_numpy(getattr(head, name)))
    return twin


def hits(twin, positions, zone: float, from_step: int = 0) -> np.ndarray:
    """``(N,)`` bool: where BASE + head's greedy choice at dead zone `zone`, applied from response
    step `from_step` on, is ALIGNED's token."""
    import torch

    twin.dead_zone, twin.dead_zone_from = zone, from_step
    with torch.no_grad():
        cand, adjusted = twin(positions.top_ids, positions.top_lp, positions.promo_lp, 1.0, positions.step)
        best = cand.gather(1, adjusted.argmax(-1, keepdim=True)).squeeze(1)
    return (best == positions.al_top1).numpy()


def aligned_only(data: dict, keep: np.ndarray | None = None) -> dict:
    """The positions of ALIGNED's own answers (not the base's, with ``--trajectories aligned+base``), within `keep`."""
    mask = np.ones(len(data["token"]), dtype=bool) if keep is None else keep.copy()
    if "source" in data:
        mask &= data["source"] == extract.SOURCES["aligned"]
    return {name: value[mask] for name, value in data.items() if isinstance(value, np.ndarray) and len(value) == len(mask)}


def table(title: str, columns: dict[str, np.ndarray], base: np.ndarray, per_zone: dict[float, np.ndarray]) -> None:
    """Print the agreement of BASE and each zone within each column's mask (a share of positions)."""
    print(title)
    print(f"  {'':<10}" + "".join(f"{name:>14}" for name in columns))
    print(f"  {'':<10}" + "".join(f"{int(mask.sum()):>14,}" for mask in columns.values()) + "  positions")
    for name, hit in (("BASE", base), *((f"zone {zone:g}", h) for zone, h in per_zone.items())):
        print(f"  {name:<10}" + "".join(f"{hit[mask].mean():>14.4f}" if mask.any() else f"{'—':>14}" for mask in columns.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", type=Path, required=True, help="a trained top-k head (.npz)")
    parser.add_argument("--cache", type=Path, help="sali train's extraction cache (its --cache); default: sali's own")
    parser.add_argument("-P", "--prompts", type=Path, action="append", required=True,
                        help="a prompt file the head was trained on (repeatable, in sali train's order)")
    parser.add_argument("--questions", type=Path, action="append", default=[], help="a prompt file it never trained on (repeatable)")
    parser.add_argument("--zones", type=float, nargs="+", default=list(ZONES), help="dead zones to score, in nats")
    parser.add_argument("--steps", type=int, default=3,
                        help="the validation prompts' first response tokens, scored apart from the later ones (default 3)")
    parser.add_argument("--from-step", type=int, default=0, help="the first response step each zone applies at (default 0: every step)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cache = args.cache or default_cache()
    try:
        if any(zone < 0 for zone in args.zones):
            raise SaliError("a dead zone is a number of nats >= 0")
        if args.from_step < 0 or args.steps < 1:
            raise SaliError("--from-step must be >= 0 and --steps >= 1")
        head = Head.load(args.head)
        training = head.meta.get("training") or {}
        twin = torch_twin(head)
        rows = [read_prompts(path) for path in args.prompts]
        data = extract.load_extractions([find_folder(cache, [p.text for p in file_rows], head.k) for file_rows in rows],
                                        [len(file_rows) for file_rows in rows])
        labels = np.array([p.label or "unlabelled" for file_rows in rows for p in file_rows])
        held = split_prompts(data["row"], float(training.get("val_fraction", 0.1)), int(training.get("seed", 0)))
        data = aligned_only(data, held)
        if not len(data.get("token", ())):
            raise SaliError("no validation positions: are these the head's training files, in its order?")
        positions = build_positions(data, head.k, head.promote)
        label_of, early = labels[data["row"]], data["step"] < args.steps
        columns = {f"{label} {span}": (label_of == label) & (early if span.startswith("0") else ~early)
                   for label in sorted(set(label_of)) for span in (f"0-{args.steps - 1}", f"{args.steps}+")}
        base = (positions.top_ids[:, 0] == positions.al_top1).numpy()
        spared = f", each zone from step {args.from_step}" if args.from_step else ""
        table(f"validation prompts of the head's split, by response steps: top-1 agreement with ALIGNED{spared}",
              columns, base, {zone: hits(twin, positions, zone, args.from_step) for zone in args.zones})
        trained_steps = int(training.get("max_new_tokens", 32))
        for path in args.questions:
            texts = [p.text for p in read_prompts(path)]
            questions = aligned_only(extract.load_shards(longest_folder(cache, texts, head.k)))
            positions = build_positions(questions, head.k, head.promote)
            step = questions["step"]
            columns = {"all": np.ones(len(step), dtype=bool), f"steps<{trained_steps}": step < trained_steps,
                       f"steps>={trained_steps}": step >= trained_steps}
            base = (positions.top_ids[:, 0] == positions.al_top1).numpy()
            table(f"{path.name} ({len(texts)} prompts, every response position): top-1 agreement with ALIGNED{spared}",
                  columns, base, {zone: hits(twin, positions, zone, args.from_step) for zone in args.zones})
    except SaliError as exc:
        sys.exit(f"error: {exc}")  # one line on stderr, exit status 1
    return 0


if __name__ == "__main__":
    main()
