"""Training data for a head, extracted fast and cached in resumable shards.

For each batch of prompts:

1. ALIGNED generates greedy responses to the prompts in *its* chat format (batched, KV cache).
   With ``trajectories="aligned+base"`` BASE also generates its own greedy responses (in the
   base's format): the states the base reaches when a head fails to steer it, where ALIGNED's
   choices show how to steer back (e.g. into a refusal after a compliant opening). Steps 2 and 3
   then run on both sets of responses; a base response identical to ALIGNED's is skipped.
2. ALIGNED's top-K logits at every response position (the distillation target): on its own
   responses, the logits its generation already computed (kept by ``generate``, so no second
   pass); on the base's responses, one teacher-forced forward pass.
3. BASE reads the same response tokens after the prompt in *the base's* format, also in one
   teacher-forced pass: its full-vocabulary log-probs, of which only the top ``k_store``
   (ids + values) and the values at ALIGNED's top-K ids are kept, and for the white-box head
   (``--kind lmhead``) alone the final hidden state, the input of the output projection. A
   top-k run reuses a white-box run's cache (its shards hold everything a top-k head reads).

Prompts are left-padded and responses right-padded so every row's response starts in the same
column; ``logits_to_keep`` then computes logits only at response positions.

A shard holds one batch (float16 values, int32 ids) and is written atomically, so an
interrupted extraction resumes at the first missing shard, and a second ``sali train`` with
other training options reuses all of them. The cache folder name is a hash of everything that
determines the data (models, formats, prompts, lengths, batch size, dtype). ``sali train`` gives
each prompt file its own folder (:func:`load_extractions` joins them), so a job that adds a file
extracts only that file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sali.atomic import atomic_path, write_text
from sali.errors import SaliError
from sali.hfmodels import Source
from sali.prompts import render

EXTRACT_VERSION = 2
SHARD_ARRAYS = ("row", "source", "step", "token", "base_ids", "base_lp", "al_ids", "al_logits", "base_at_al", "hidden")


@dataclass
class ExtractSettings:
    """Everything that determines the extracted data (hashed into the cache key)."""

    base: str
    aligned: str
    base_identity: str
    aligned_identity: str
    base_format: dict[str, Any]
    prompts_sha: str
    n_prompts: int
    max_new_tokens: int
    k_store: int
    target_k: int
    batch_prompts: int
    dtype: str
    trajectories: str = "aligned"  # "aligned" or "aligned+base": whose responses are read
    version: int = EXTRACT_VERSION
    hidden: bool = True  # keep the base's final hidden states (only the white-box head reads them)

    def key(self) -> str:
        fields = asdict(self)
        if self.hidden:
            del fields["hidden"]  # the key every cache had before the field existed
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def arrays(self) -> tuple[str, ...]:
        """The :data:`SHARD_ARRAYS` a shard of these settings holds."""
        return SHARD_ARRAYS if self.hidden else tuple(n for n in SHARD_ARRAYS if n != "hidden")


def model_identity(source: Source) -> str:
    """A cheap identity for a model: its files' names, sizes and modification times."""
    folder = Path(source.folder)
    files = [folder / source.gguf_file] if source.gguf_file else sorted(p for p in folder.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def prompts_sha(prompts: list[str]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode("utf-8")).hexdigest()[:16]


# ---- prompt tokens ---------------------------------------------------------------------------
def format_ids(tokenizer, fmt: dict[str, Any], prompt: str) -> list[int]:
    """Token ids of `prompt` in format `fmt`, as llama.cpp's runtime produces them:
    rendered by :func:`sali.prompts.render`, special tokens parsed, BOS added when the tokenizer
    adds one and the text does not already start with it."""
    text = render(
        fmt,
        [{"role": "user", "content": prompt}],
        chat_template=tokenizer.chat_template,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )
    starts_with_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer(text, add_special_tokens=not starts_with_bos)["input_ids"]


def end_ids(tokenizer, model) -> set[int]:
    """Token ids that end a response (EOS and the generation config's extra stop ids)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


# ---- the extraction itself -------------------------------------------------------------------
def _left_pad(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def generate_responses(model, prompt_rows: list[list[int]], pad: int, stop: set[int], max_new_tokens: int,
                       keep_top: int = 0):
    """Greedy responses (ids, ending with the stop token when one was produced).

    With `keep_top` = K > 0, returns ``(responses, (values, ids))``: the model's K largest raw
    next-token logits at every generated step, ``(B, T, K)`` float32 and int64 (T = longest
    response), largest first. These are the positions :func:`teacher_forced` reads, taken on the
    way from the output projection (a forward hook sees each step's ``(B, 1, V)`` logits before
    any logits processor), so ALIGNED needs no second pass and only K of V values per position
    are held.
    """
    import torch

    ids, mask = _left_pad(prompt_rows, pad)
    device = next(model.parameters()).device
    kept: list[tuple[Any, Any]] = []

    def keep(module, args, output) -> None:
        kept.append(output[:, -1].float().topk(keep_top, dim=-1))

    hook = model.get_output_embeddings().register_forward_hook(keep) if keep_top else None
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(stop) or None,
            )
    finally:
        if hook is not None:
            hook.remove()
    responses = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in stop), len(row))
        responses.append(row[:cut])
    if not keep_top:
        return responses
    longest = max(len(r) for r in responses)
    if len(kept) < longest:  # a model whose generation does not call its output projection once a step
        raise SaliError(f"{type(model).__name__}: its generation made {len(kept)} output-projection calls for {longest} tokens")
    return responses, (torch.stack([v for v, _ in kept[:longest]], dim=1), torch.stack([i for _, i in kept[:longest]], dim=1))


FORCED_ROWS = 8  # responses per teacher-forced pass: bounds its (rows, T, V) logits whatever the extraction batch


def teacher_forced(model, prompt_rows: list[list[int]], responses: list[list[int]], pad: int):
    """One forward pass over left-padded prompts + right-padded responses.

    Returns ``(logits, hidden)``: ``(B, T, V)`` float32 logits and ``(B, T, H)`` final hidden
    states (in the model's dtype) at the positions that predict response tokens ``0..T-1`` (T = longest response).
    """
    import torch

    width = max(len(r) for r in prompt_rows)
    longest = max(len(r) for r in responses)
    batch = len(prompt_rows)
    ids = torch.full((batch, width + longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (prompt, response) in enumerate(zip(prompt_rows, responses)):
        row = prompt + response
        ids[i, width - len(prompt) : width - len(prompt) + len(row)] = torch.tensor(row)
        mask[i, width - len(prompt) : width - len(prompt) + len(row)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(width - 1, width - 1 + longest)
    captured: dict[str, Any] = {}
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: captured.__setitem__("hidden", args[0]))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=keep.to(device),
                use_cache=False,
            )
    finally:
        hook.remove()
    logits = out.logits.float()
    hidden = captured["hidden"]
    if logits.shape[1] != longest:  # a model that ignores logits_to_keep: cut the columns here
        logits, hidden = logits[:, keep], hidden[:, keep]
    return logits, hidden


TRAJECTORIES = ("aligned", "aligned+base")
SOURCES = {"aligned": 0, "base": 1}  # the ``source`` array: whose response a position is on


def extract_batch(base, aligned, base_rows, aligned_rows, pad, stops, settings: ExtractSettings) -> dict[str, np.ndarray]:
    """All arrays of one shard (see :data:`SHARD_ARRAYS`); one row per response position.

    `stops` maps ``"aligned"`` and ``"base"`` to each model's end-of-response ids. The shard's
    ``responses`` entry holds ALIGNED's responses (ids), one per prompt.
    """
    own_aligned, aligned_top = generate_responses(aligned, aligned_rows, pad, stops["aligned"], settings.max_new_tokens,
                                                  keep_top=settings.target_k)
    responses = {"aligned": own_aligned}
    if settings.trajectories == "aligned+base":
        own = generate_responses(base, base_rows, pad, stops["base"], settings.max_new_tokens)
        responses["base"] = [r if r != a else [] for r, a in zip(own, responses["aligned"])]
    parts = []
    for name, rows in responses.items():
        part = read_responses(base, aligned, base_rows, aligned_rows, rows, pad, settings,
                              aligned_top=aligned_top if name == "aligned" else None)
        if len(part["token"]):
            part["source"] = np.full(len(part["token"]), SOURCES[name], dtype=np.int8)
            parts.append(part)
    if not parts:
        return {name: np.zeros((0,)) for name in settings.arrays()} | {"responses": responses["aligned"]}
    out = {name: np.concatenate([part[name] for part in parts]) for name in settings.arrays()}
    out["responses"] = responses["aligned"]
    return out


def read_responses(base, aligned, base_rows, aligned_rows, responses, pad, settings: ExtractSettings,
                   aligned_top=None) -> dict[str, np.ndarray]:
    """Both models teacher-forced on `responses` (one list of ids per prompt; empty ones are
    skipped), :data:`FORCED_ROWS` responses per pass: every :data:`SHARD_ARRAYS` entry but
    ``source``, one row per response position. `aligned_top`: ALIGNED's top-K logits on these
    responses, ``(values, ids)`` each ``(B, T, K)``, when its generation kept them
    (:func:`generate_responses`); ALIGNED is then not run again."""
    keep_rows = [i for i, r in enumerate(responses) if r]
    if not keep_rows:
        return {name: np.zeros((0,)) for name in settings.arrays() if name != "source"}
    parts = [_read_rows(base, aligned, base_rows, aligned_rows, responses, keep_rows[start : start + FORCED_ROWS], pad,
                        settings, aligned_top)
             for start in range(0, len(keep_rows), FORCED_ROWS)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _read_rows(base, aligned, base_rows, aligned_rows, responses, rows, pad, settings: ExtractSettings, aligned_top):
    """:func:`read_responses` for the non-empty responses `rows` (indices), in one pass per model."""
    import torch

    lengths = [len(responses[i]) for i in rows]
    chosen = [responses[i] for i in rows]
    base_logits, hidden = teacher_forced(base, [base_rows[i] for i in rows], chosen, pad)
    select = torch.zeros((len(rows), max(lengths)), dtype=torch.bool)
    for j, n in enumerate(lengths):
        select[j, :n] = True
    select = select.to(base_logits.device)
    if aligned_top is not None:
        al_values, al_ids = (part[rows, : max(lengths)].to(select.device)[select] for part in aligned_top)
    else:
        al_logits, _ = teacher_forced(aligned, [aligned_rows[i] for i in rows], chosen, pad)
        al_values, al_ids = al_logits[select.to(al_logits.device)].topk(settings.target_k, dim=-1)
        del al_logits
    base_lp = torch.log_softmax(base_logits[select], dim=-1)
    del base_logits
    base_values, base_ids = base_lp.topk(settings.k_store, dim=-1)
    arrays = {
        "row": np.concatenate([np.full(n, i, dtype=np.int32) for i, n in zip(rows, lengths)]),
        "step": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        "token": np.concatenate([np.asarray(response, dtype=np.int32) for response in chosen]),
        "base_ids": base_ids.cpu().numpy().astype(np.int32),
        "base_lp": base_values.cpu().numpy().astype(np.float16),
        "al_ids": al_ids.cpu().numpy().astype(np.int32),
        "al_logits": al_values.cpu().numpy().astype(np.float16),
        "base_at_al": base_lp.gather(-1, al_ids.to(base_lp.device)).cpu().numpy().astype(np.float16),
    }
    if settings.hidden:
        arrays["hidden"] = hidden[select.to(hidden.device)].float().cpu().numpy().astype(np.float16)
    return arrays


def run_extraction(
    settings: ExtractSettings,
    cache_root: Path,
    prompts: list[str],
    load: Callable[[], tuple[Any, Any, Any, Any]],
    progress: Callable[[int, int, int], None] | None = None,
    part: tuple[int, int] = (0, 1),
) -> Path:
    """Extract every missing shard into ``cache_root/<key>`` and return that folder.

    `load` returns ``(base_model, aligned_model, base_tokenizer, aligned_tokenizer)``; it is only
    called when some shard is missing. `progress(prompts_done, prompts_total, positions)` is
    called after each shard. ``part = (rank, count)``: this process's share in a data-parallel
    run, the shards whose index ``b`` has ``b % count == rank`` (shards are named by their batch
    of prompts alone, so any number of processes writes the same files).
    """
    settings = _cached_settings(settings, cache_root)
    folder = Path(cache_root) / settings.key()
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "settings.json", json.dumps(asdict(settings), indent=2) + "\n")
    batches, mine = _shares(len(prompts), settings.batch_prompts, part)
    for b in mine:
        for stale in folder.glob(f".{shard_name(b)}.*.part"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    missing = [b for b in mine if not (folder / shard_name(b)).is_file()]
    positions = sum(_shard_positions(folder / shard_name(b)) for b in mine if b not in missing)
    total = sum(len(batches[b]) for b in mine)
    done_prompts = total - sum(len(batches[b]) for b in missing)
    if progress:
        progress(done_prompts, total, positions)
    if not missing:
        return folder
    base, aligned, base_tok, aligned_tok = load()
    pad = aligned_tok.pad_token_id if aligned_tok.pad_token_id is not None else aligned_tok.eos_token_id
    if pad is None:
        pad = 0
    stops = {"aligned": end_ids(aligned_tok, aligned), "base": end_ids(base_tok, base)}
    for b in missing:
        indices = batches[b]
        base_rows = [format_ids(base_tok, settings.base_format, prompts[i]) for i in indices]
        aligned_rows = [format_ids(aligned_tok, {"type": "chat"}, prompts[i]) for i in indices]
        arrays = extract_batch(base, aligned, base_rows, aligned_rows, pad, stops, settings)
        responses = arrays.pop("responses")
        arrays["row"] = np.asarray([indices[r] for r in arrays["row"]], dtype=np.int32) if len(arrays["row"]) else arrays["row"]
        arrays["responses_json"] = np.frombuffer(
            json.dumps({str(indices[j]): aligned_tok.decode(r, skip_special_tokens=True) for j, r in enumerate(responses)}).encode(),
            dtype=np.uint8,
        )
        with atomic_path(folder / shard_name(b), suffix=".npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
        positions += len(arrays["token"])
        done_prompts += len(indices)
        if progress:
            progress(done_prompts, total, positions)
    return folder


def _cached_settings(settings: ExtractSettings, cache_root: Path) -> ExtractSettings:
    """The settings whose cache folder serves `settings`: a cache that also holds hidden states
    serves a top-k head as well."""
    with_hidden = replace(settings, hidden=True)
    if not settings.hidden and (Path(cache_root) / with_hidden.key()).is_dir():
        return with_hidden
    return settings


def _shares(n_prompts: int, batch_prompts: int, part: tuple[int, int]) -> tuple[list[list[int]], list[int]]:
    """``(batches, mine)``: the prompt indices of every shard, and the shards process ``part``
    writes (see :func:`run_extraction`)."""
    rank, count = part
    batches = [list(range(i, min(i + batch_prompts, n_prompts))) for i in range(0, n_prompts, batch_prompts)]
    return batches, [b for b in range(len(batches)) if b % count == rank]


def share_size(settings: ExtractSettings, part: tuple[int, int] = (0, 1)) -> int:
    """How many prompts process ``part`` extracts (all of them in a one-process run)."""
    batches, mine = _shares(settings.n_prompts, settings.batch_prompts, part)
    return sum(len(batches[b]) for b in mine)


def cached_prompts(settings: ExtractSettings, cache_root: Path, part: tuple[int, int] = (0, 1)) -> int:
    """How many of process ``part``'s prompts already have their shard in the cache (what
    :func:`run_extraction` will skip), for progress displays that count only new work."""
    folder = Path(cache_root) / _cached_settings(settings, cache_root).key()
    batches, mine = _shares(settings.n_prompts, settings.batch_prompts, part)
    return sum(len(batches[b]) for b in mine if (folder / shard_name(b)).is_file())


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def _shard_positions(path: Path) -> int:
    with np.load(path, allow_pickle=False) as shard:
        return int(shard["token"].shape[0])


def load_extractions(folders: list[Path], n_prompts: list[int]) -> dict[str, np.ndarray]:
    """:func:`load_shards` of several folders (one per prompt file, `n_prompts` prompts each) as
    one data set: each folder's prompt indices (``row``, ``responses``) are shifted past the
    prompts of the folders before it, so that prompt indices stay unique across files."""
    parts = []
    offset = 0
    for folder, count in zip(folders, n_prompts):
        data = load_shards(folder, allow_empty=len(folders) > 1)
        if "row" in data:
            data["row"] = data["row"] + offset
        data["responses"] = {str(int(i) + offset): text for i, text in data["responses"].items()}  # type: ignore[union-attr]
        parts.append(data)
        offset += count
    if len(parts) == 1:
        return parts[0]
    with_rows = [d for d in parts if "token" in d]
    if not with_rows:
        raise SaliError("the aligned model produced no response tokens for any prompt")
    names = set.intersection(*(set(d) for d in with_rows)) - {"responses"}
    merged = {name: np.concatenate([d[name] for d in with_rows]) for name in names}
    merged["responses"] = {i: t for d in parts for i, t in d["responses"].items()}  # type: ignore[assignment]
    return merged


def load_shards(folder: Path, allow_empty: bool = False) -> dict[str, np.ndarray]:
    """Concatenate every shard of an extraction folder (one row per response position)."""
    paths = sorted(folder.glob("shard-*.npz"))
    if not paths:
        raise SaliError(f"{folder}: no extracted data")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SHARD_ARRAYS}
    responses: dict[str, str] = {}
    for path in paths:
        with np.load(path, allow_pickle=False) as shard:
            if shard["token"].shape[0]:
                for name in SHARD_ARRAYS:
                    if name in shard.files:  # "hidden" only where the settings kept it
                        parts[name].append(shard[name])
            responses.update(json.loads(shard["responses_json"].tobytes().decode("utf-8")))
    if not parts["token"] and not allow_empty:
        raise SaliError("the aligned model produced no response tokens for any prompt")
    data = {name: np.concatenate(chunks) for name, chunks in parts.items() if chunks}
    data["responses"] = responses  # type: ignore[assignment]
    return data
