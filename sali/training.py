"""`sali train`: extraction (cached) -> distillation -> export, with rich progress and a summary."""

from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sali import __version__
from sali.errors import SaliError
from sali.head import dead_zone_meta
from sali.progress import progress as progress_display
from sali.prompts import parse_format, read_prompts


@dataclass
class TrainJob:
    base: str
    aligned: str
    prompt_files: list[Path]
    out: Path
    base_format: str = "chat"
    kind: str = "topk"
    k: int = 64
    rank: int = 32
    promote: int = 64
    k_store: int = 256
    target_k: int = 256
    max_new_tokens: int = 128
    epochs: int = 30
    lr: float | None = None  # None: each head kind's own default (TrainSettings, LMTrainSettings)
    batch_size: int = 512
    extract_batch: int = 32
    trajectories: str = "aligned"
    delta_penalty: float = 1.0
    first_tokens: int = 0
    first_weight: float = 1.0
    sharpen: float = 1.0  # --sharpen: largest factor on the base's logits in training (1: off)
    dead_zone: float = 0.0  # --dead-zone: nats, stored in the head (a run-time rule; training is unchanged)
    dead_zone_from: int = 0  # --dead-zone-from: the first response step the zone applies at
    agreeing_keywords: Path | None = None  # --only-agreeing: learn only from answers that agree with their label
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    cache: Path | None = None
    trust_remote_code: bool = False
    threads: int | None = None
    # --file-setting: extraction settings of single prompt files, by the file's resolved path,
    # e.g. {"/data/qa.jsonl": {"max_new_tokens": 64}} (keys: FILE_SETTINGS' values)
    file_settings: dict[str, dict[str, Any]] = field(default_factory=dict)


TRAJECTORIES = ("aligned", "aligned+base")  # whose responses a head may learn on (--trajectories)
# what --file-setting FILE:KEY=VALUE may set for one prompt file: KEY -> the ExtractSettings field it sets
FILE_SETTINGS = {"max-new-tokens": "max_new_tokens", "trajectories": "trajectories"}


def parse_file_setting(text: str, prompt_files: list[Path]) -> tuple[str, str, Any]:
    """One ``FILE:KEY=VALUE`` of ``--file-setting``: ``(resolved FILE, ExtractSettings field, value)``.
    FILE must be one of `prompt_files` (-P); KEY one of :data:`FILE_SETTINGS`."""
    name, colon, assignment = text.rpartition(":")
    key, equals, value = assignment.partition("=")
    if not colon or not equals or not name:
        raise SaliError(f"--file-setting {text!r}: write FILE:KEY=VALUE, e.g. qa.jsonl:max-new-tokens=64")
    if key not in FILE_SETTINGS:
        raise SaliError(f"--file-setting {text!r}: KEY must be one of {', '.join(FILE_SETTINGS)}, not {key!r}")
    path = Path(name).resolve()
    if path not in {p.resolve() for p in prompt_files}:
        raise SaliError(f"--file-setting {text!r}: {name} is not one of the -P prompt files")
    if key == "max-new-tokens":
        if not value.isdigit() or int(value) < 1:
            raise SaliError(f"--file-setting {text!r}: max-new-tokens must be a whole number of at least 1")
        return str(path), FILE_SETTINGS[key], int(value)
    if value not in TRAJECTORIES:
        raise SaliError(f"--file-setting {text!r}: trajectories must be aligned or aligned+base")
    return str(path), FILE_SETTINGS[key], value


def default_cache() -> Path:
    from sali.paths import cache_root

    return cache_root() / "extract"


def run(job: TrainJob, console: Console) -> dict[str, Any]:
    """Run a whole training job; returns the head's metadata."""
    import torch

    from sali import extract, hfmodels, parallel

    if job.threads:
        torch.set_num_threads(job.threads)
    if job.kind not in ("topk", "lmhead"):
        raise SaliError(f"--kind must be topk or lmhead, not {job.kind!r}")
    if job.k > job.k_store:
        job.k_store = job.k
    fmt = parse_format(job.base_format)
    # one extraction cache per prompt file: adding a file to a job reuses the others' extraction
    rows = [read_prompts(path) for path in job.prompt_files]
    files = [[p.text for p in file_rows] for file_rows in rows]
    prompts = [text for texts in files for text in texts]
    labels = [p.label for file_rows in rows for p in file_rows]
    keywords = None
    if job.agreeing_keywords is not None:
        from sali.metrics import load_keywords

        keywords = load_keywords(job.agreeing_keywords)
        if not any(labels):
            raise SaliError("--only-agreeing keeps the answers that agree with their prompt's label, "
                            "but no prompt has a label (a 'label' field or column)")
    base_src, aligned_src = hfmodels.resolve(job.base), hfmodels.resolve(job.aligned)
    base_tok = hfmodels.load_tokenizer(base_src, job.trust_remote_code)
    aligned_tok = hfmodels.load_tokenizer(aligned_src, job.trust_remote_code)
    base_cfg = hfmodels.load_config(base_src, job.trust_remote_code)
    aligned_cfg = hfmodels.load_config(aligned_src, job.trust_remote_code)
    base_fp = hfmodels.vocab_fingerprint(base_tok, base_cfg)
    aligned_fp = hfmodels.vocab_fingerprint(aligned_tok, aligned_cfg)
    if base_fp != aligned_fp:
        raise SaliError(
            f"the base and aligned tokenizers differ ({base_src.name}: {base_fp}, {aligned_src.name}: {aligned_fp}); "
            "a head needs both models to share one token list"
        )
    if not aligned_tok.chat_template:
        raise SaliError(f"{aligned_src.name} has no chat template; the aligned model must be a chat model")
    if fmt["type"] == "chat" and not base_tok.chat_template:
        raise SaliError(f"{base_src.name} has no chat template; use --base-format plain or a template with {{prompt}}")
    device = hfmodels.pick_device(job.device)
    processes = parallel.current(device)  # under `accelerate launch`: this process's share and GPU
    device = processes.device or device
    if not processes.main:
        console = Console(quiet=True)  # the main process reports
    dtype = job.dtype if job.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16" if device.startswith("cuda") else "float16")
    settings = extract.ExtractSettings(
        base=base_src.name,
        aligned=aligned_src.name,
        base_identity=extract.model_identity(base_src),
        aligned_identity=extract.model_identity(aligned_src),
        base_format=fmt,
        prompts_sha="",  # set per prompt file below
        n_prompts=0,
        max_new_tokens=job.max_new_tokens,
        k_store=max(job.k_store, job.k),
        target_k=job.target_k,
        batch_prompts=job.extract_batch,
        dtype=dtype,
        trajectories=job.trajectories,
        hidden=job.kind == "lmhead",  # a top-k head never reads hidden states: smaller shards
    )
    cache_root = job.cache or default_cache()
    per_file = [replace(settings, prompts_sha=extract.prompts_sha(texts), n_prompts=len(texts), **job.file_settings.get(str(path.resolve()), {}))
                for path, texts in zip(job.prompt_files, files)]
    for file_settings in per_file:
        console.print(f"[dim]extraction cache: {escape(str(cache_root / file_settings.key()))}[/]")

    def load():
        kwargs = dict(dtype=dtype, device=device, device_map=job.device_map, trust_remote_code=job.trust_remote_code)
        return (hfmodels.load_model(base_src, **kwargs), hfmodels.load_model(aligned_src, **kwargs), base_tok, aligned_tok)

    part = (processes.rank, processes.count)
    start = time.perf_counter()
    with progress_display(
        console,
        TextColumn("extracting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts · {task.fields[positions]:,} positions · {task.fields[rate]:.0f} pos/s"),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        # this process's share of every file; prompts already in the cache count as done from the
        # start, so that the speed and the time left reflect new work only
        total = sum(extract.share_size(fs, part) for fs in per_file)
        cached = sum(extract.cached_prompts(fs, cache_root, part) for fs in per_file)
        task = progress.add_task("extracting (prompts)", total=total, completed=cached, positions=0, rate=0.0)
        counted = {"new": 0, "fresh_positions": 0, "earlier_positions": 0}  # over every file so far
        last: dict[str, int] = {}  # the current file's previous report
        load_once = functools.cache(load)  # the models load once, and only if some shard is missing
        begun = time.perf_counter()

        def report(done: int, _total: int, positions: int) -> None:
            if last:  # a file's first report only says what its cache already held
                counted["new"] += done - last["done"]
                counted["fresh_positions"] += positions - last["positions"]
            last.update(done=done, positions=positions)
            elapsed = time.perf_counter() - begun
            progress.update(task, completed=cached + counted["new"], positions=counted["earlier_positions"] + positions,
                            rate=counted["fresh_positions"] / elapsed if elapsed > 0 else 0.0)

        folders = []
        for file_settings, texts in zip(per_file, files):
            last.clear()
            folders.append(extract.run_extraction(file_settings, cache_root, texts, load_once, report, part=part))
            counted["earlier_positions"] += last["positions"]
    if processes.count > 1:
        console.print(f"[dim]process {processes.rank + 1} of {processes.count} extracted its share; waiting for the others[/]")
    processes.wait_for_everyone()  # every shard exists from here on
    if not processes.main:
        return {}
    extract_seconds = time.perf_counter() - start
    data = extract.load_extractions(folders, [len(texts) for texts in files])
    dropped = None
    if keywords is not None:
        data, dropped = keep_agreeing(data, labels, keywords)
    vocab_size = int(getattr(base_cfg, "vocab_size", 0) or len(base_tok))

    meta: dict[str, Any] = {
        "vocab_fingerprint": base_fp,
        "base_model": base_src.name,
        "aligned_model": aligned_src.name,
        "base_format": fmt,
        "sali_version": __version__,
    }
    if job.kind == "topk":
        from sali.convert.head_to_npz import export_topk
        from sali.distill import TrainSettings, train_topk

        train_settings = TrainSettings(
            k=job.k, rank=job.rank, promote=job.promote, epochs=job.epochs, lr=TrainSettings.lr if job.lr is None else job.lr, batch_size=job.batch_size,
            val_fraction=job.val_fraction, seed=job.seed, device=device if device != "mps" else "cpu",
            delta_penalty=job.delta_penalty, first_tokens=job.first_tokens, first_weight=job.first_weight,
            sharpen=job.sharpen, dead_zone=job.dead_zone, dead_zone_from=job.dead_zone_from,
        )
        meta.update(dead_zone_meta(job.dead_zone, job.dead_zone_from))
        result = _train_with_progress(console, job.epochs, lambda cb: train_topk(data, vocab_size, train_settings, cb))
        meta["training"] = _figures(result, data, extract_seconds, len(prompts), job, train_settings.lr, dropped)
        path, written = export_topk(result.head, job.k, meta, job.out, result.val_positions)
    else:
        from sali.convert.head_to_npz import export_lmhead
        from sali.lmhead import LMTrainSettings, train_lmhead

        output = load_output_matrix(base_src, job.trust_remote_code)
        lm_settings = LMTrainSettings(
            rank=job.rank, epochs=job.epochs, lr=LMTrainSettings.lr if job.lr is None else job.lr, batch_size=min(job.batch_size, 256),
            val_fraction=job.val_fraction, seed=job.seed, device=device if device != "mps" else "cpu",
        )
        result = _train_with_progress(console, job.epochs, lambda cb: train_lmhead(data, output, lm_settings, cb))
        meta["training"] = _figures(result, data, extract_seconds, len(prompts), job, lm_settings.lr, dropped)
        path, written = export_lmhead(result.head, meta, job.out)
    _print_summary(console, written["training"], path)
    return written


def keep_agreeing(data: dict[str, Any], labels: list[str | None], keywords: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
    """`data` (one row per response position, ``row`` its prompt's index into `labels`) without the
    positions of the prompts whose aligned answer disagrees with the prompt's label: no refusal
    where the label is ``harmful``, a refusal where it is any other. Unlabelled prompts stay.
    Also returns how many prompts were dropped, per label."""
    from sali.metrics import is_refusal

    responses = data["responses"]
    drop = {i for i, label in enumerate(labels)
            if label is not None and str(i) in responses and is_refusal(responses[str(i)], keywords) != (label == "harmful")}
    keep = ~np.isin(data["row"], np.fromiter(drop, dtype=np.int64, count=len(drop)))
    if not keep.any():
        raise SaliError("--only-agreeing left no response position: every aligned answer disagreed with its prompt's label")
    kept = {name: value[keep] if isinstance(value, np.ndarray) and len(value) == len(keep) else value for name, value in data.items()}
    kept["responses"] = {i: text for i, text in responses.items() if int(i) not in drop}
    return kept, dict(Counter(labels[i] for i in drop))


def load_output_matrix(source, trust_remote_code: bool):
    """The base's output projection ``(V, H)`` as float32 (for the white-box head)."""
    from sali import hfmodels

    model = hfmodels.load_model(source, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
    weight = model.get_output_embeddings().weight.detach().clone()
    del model
    return weight


def _train_with_progress(console: Console, epochs: int, train):
    with progress_display(
        console,
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs · held-out loss {task.fields[loss]:.4f} · top-1 {task.fields[top1]:.3f}"),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("training (epochs)", total=epochs, loss=float("nan"), top1=float("nan"))

        def on_epoch(epoch: int, figures: dict[str, float]) -> None:
            progress.update(task, completed=epoch, loss=figures["loss"], top1=figures.get("top1_head", float("nan")))

        result = train(on_epoch)
        progress.update(task, total=len(result.history) or epochs, completed=len(result.history) or epochs)
    return result


def _figures(result, data, extract_seconds: float, n_prompts: int, job: TrainJob, lr: float,
             dropped: dict[str, int] | None = None) -> dict[str, Any]:
    before, after = result.before, result.after
    figures = {
        "kind": job.kind,
        "prompts": n_prompts,
        "positions": int(len(data["token"])),
        "heldout_positions": int(after.get("positions", 0)),
        "val_fraction": job.val_fraction,
        "top1_agreement_base": round(before.get("top1_base", float("nan")), 4),
        "top1_agreement_head": round(after.get("top1_head", float("nan")), 4),
        "kl_base": round(after.get("kl_base", float("nan")), 4),
        "kl_head": round(after.get("kl_head", after.get("kl_head_c", float("nan"))), 4),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "extract_seconds": round(extract_seconds, 1),
        "train_seconds": round(result.seconds, 1),
        "max_new_tokens": job.max_new_tokens,
        "trajectories": job.trajectories,
        "lr": lr,
        "seed": job.seed,
    }
    if job.file_settings:  # --file-setting: by file name, what differs from the job's own settings
        figures["file_settings"] = {Path(path).name: dict(values) for path, values in job.file_settings.items()}
    if dropped is not None:  # --only-agreeing: prompts whose aligned answer disagreed with their label
        figures["dropped_disagreeing"] = dict(sorted(dropped.items()))
    if job.kind == "topk":
        figures.update(
            cover_rate=round(after.get("cover_top1", float("nan")), 4),
            cover_mass=round(after.get("cover_mass", float("nan")), 4),
            kl_base_on_candidates=round(after.get("kl_base_c", float("nan")), 4),
            promotion_set=int(len(result.promote)),
            delta_penalty=job.delta_penalty,
            top1_agreement_base_first_token=round(before.get("top1_base_first", float("nan")), 4),
            top1_agreement_head_first_token=round(after.get("top1_head_first", float("nan")), 4),
        )
        if job.first_tokens and job.first_weight != 1.0:
            figures.update(first_tokens=job.first_tokens, first_weight=job.first_weight)
        if job.sharpen != 1.0:
            figures.update(sharpen=job.sharpen)
    return figures


def _print_summary(console: Console, figures: dict[str, Any], path: Path) -> None:
    table = Table(title=f"head written to {escape(str(path))}", title_justify="left")
    table.add_column("held-out figure")
    table.add_column("base", justify="right")
    table.add_column("base + head", justify="right")
    table.add_row("top-1 agreement with aligned", f"{figures['top1_agreement_base']:.3f}", f"{figures['top1_agreement_head']:.3f}")
    if "top1_agreement_head_first_token" in figures:
        table.add_row("… on the first response token (refuse or answer)",
                      f"{figures['top1_agreement_base_first_token']:.3f}", f"{figures['top1_agreement_head_first_token']:.3f}")
    if "kl_base_on_candidates" in figures:
        table.add_row("KL(aligned ‖ ·), full vocabulary", f"{figures['kl_base']:.3f}", "—")
        table.add_row("KL(aligned ‖ ·), on the head's candidates", f"{figures['kl_base_on_candidates']:.3f}", f"{figures['kl_head']:.3f}")
        table.add_row("cover rate (aligned top-1 in base top-k)", f"{figures['cover_rate']:.3f}", "")
    else:
        table.add_row("KL(aligned ‖ ·)", f"{figures['kl_base']:.3f}", f"{figures['kl_head']:.3f}")
    console.print(table)
    if "dropped_disagreeing" in figures:
        counts = ", ".join(f"{label} {n}" for label, n in figures["dropped_disagreeing"].items()) or "none"
        console.print(f"[dim]--only-agreeing dropped the prompts whose aligned answer disagreed with their label: {counts}[/]")
    console.print(
        f"[dim]{figures['prompts']} prompts · {figures['positions']:,} positions ({figures['heldout_positions']:,} held out) · "
        f"extraction {figures['extract_seconds']} s · training {figures['train_seconds']} s (best epoch {figures['best_epoch']})[/]"
    )
