"""Distilling a head from extracted data (torch): datasets, the torch head, training, metrics.

The torch head computes exactly what :meth:`sali.head.Head.adjust` computes, on batches of
positions, from what extraction stored: the base's top-k token ids and full-vocabulary
log-probs. Features are those log-probs renormalised within the top k (as at run time); the
candidates' base values are the log-probs themselves (a softmax over the candidates is unchanged
by the log-sum-exp shift between logits and log-probs).

Loss: cross-entropy from the aligned model's top-K distribution ``p`` to the head's
distribution ``q`` over its candidates ``C``; aligned mass outside ``C`` cannot be reached and
is left out. An optional penalty on the size of the head's change keeps it quiet where the
aligned model differs from the base only by noise. An optional weight on the first response
tokens makes the few positions where the aligned model decides (refuse or answer) count for more
than the many easy ones after them. Optional sharpening shows the head half its training positions
with the base's logits scaled up, the target unchanged, so that it also learns to steer a base more
confident than the one it was distilled on (a derivative fine-tuned into compliance is one).
Validation is on held-out *prompts*, never sharpened; the best epoch is kept (early stopping).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from sali.errors import SaliError

NEG = -1e9  # a logit for candidates that must not count (duplicates)


@dataclass
class TrainSettings:
    k: int = 64
    rank: int = 32
    promote: int = 64  # largest promotion set |A|
    promote_min_count: int = 2
    epochs: int = 30
    lr: float = 1e-3  # 3e-3 stopped early at epoch 2 on SmolLM2 and carried less of the teacher's refusals
    weight_decay: float = 0.0
    batch_size: int = 512
    delta_penalty: float = 1.0  # weight of the mean-square (row-centred) change to the top-k logits
    first_tokens: int = 0  # the first response tokens whose loss counts `first_weight` times
    first_weight: float = 1.0
    sharpen: float = 1.0  # largest factor on the base's logits of a sharpened training position (1: off)
    dead_zone: float = 0.0  # nats: set on the trained head (run-time rule, not in the loss); the validation figures use it
    dead_zone_from: int = 0  # the first response step the zone applies at (the steps before are spared)
    val_fraction: float = 0.1
    patience: int = 4
    seed: int = 0
    device: str = "cpu"


@dataclass
class Positions:
    """Per-position training tensors for a given k and promotion set (all on one device).

    Attributes:
        top_ids: ``(N, k)`` long — base top-k ids; ``top_lp``: ``(N, k)`` their log-probs.
        promo_lp: ``(N, m)`` base log-probs of the promotion tokens (``NEG`` where a promotion
            token is already in the top k, so it is not counted twice).
        target: ``(N, k + m)`` aligned probability of each candidate (0 when outside its top-K).
        al_top1: ``(N,)`` aligned top-1 id; ``covered``: ``(N,)`` aligned mass inside ``C``.
        base_kl: ``(N,)`` KL(aligned top-K ‖ base), full-vocabulary base log-probs.
        step: ``(N,)`` long — the position's index in its response (0: the first token);
        ``weight``: ``(N,)`` its weight in the loss (1, or more for the first tokens).
    """

    top_ids: Any
    top_lp: Any
    promo_lp: Any
    target: Any
    al_top1: Any
    covered: Any
    base_kl: Any
    step: Any
    weight: Any

    def __len__(self) -> int:
        return int(self.top_ids.shape[0])

    def subset(self, index) -> "Positions":
        return Positions(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def split_prompts(rows: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over positions: True for positions of held-out prompts (a seeded prompt split)."""
    prompts = np.unique(rows)
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(len(prompts) * val_fraction))) if len(prompts) > 1 and val_fraction > 0 else 0
    held = rng.permutation(prompts)[:n_val]
    return np.isin(rows, held)


def choose_promotions(data: dict[str, np.ndarray], train_mask: np.ndarray, k: int, limit: int, min_count: int) -> np.ndarray:
    """Tokens the aligned model picks (top-1) while the base does not rank them in its top k,
    most frequent first, seen at least `min_count` times in training positions."""
    al_top1 = data["al_ids"][train_mask, 0]
    in_top = (data["base_ids"][train_mask, :k] == al_top1[:, None]).any(axis=1)
    missed = al_top1[~in_top]
    if missed.size == 0 or limit <= 0:
        return np.zeros(0, dtype=np.int64)
    ids, counts = np.unique(missed, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    chosen = ids[order][counts[order] >= min_count][:limit]
    return np.sort(chosen).astype(np.int64)


def build_positions(
    data: dict[str, np.ndarray], k: int, promote: np.ndarray, device: str = "cpu", chunk: int = 2048,
    first_tokens: int = 0, first_weight: float = 1.0,
) -> Positions:
    """Assemble :class:`Positions` from extracted arrays (see :mod:`sali.extract`); positions
    whose response step is below `first_tokens` weigh `first_weight` in the loss, the rest 1."""
    import torch

    k_store = data["base_ids"].shape[1]
    if k > k_store:
        raise SaliError(f"--k {k} is larger than the {k_store} base tokens stored per position; extract again with --k-store ≥ {k}")
    n = data["base_ids"].shape[0]
    m = len(promote)
    top_ids = torch.from_numpy(data["base_ids"][:, :k].astype(np.int64))
    top_lp = torch.from_numpy(data["base_lp"][:, :k].astype(np.float32))
    al_ids = torch.from_numpy(data["al_ids"].astype(np.int64))
    al_logits = torch.from_numpy(data["al_logits"].astype(np.float32))
    al_p = torch.softmax(al_logits, dim=-1)
    base_at_al = torch.from_numpy(data["base_at_al"].astype(np.float32))
    base_kl = (al_p * (torch.log(al_p.clamp_min(1e-30)) - base_at_al)).sum(-1)
    promo_lp = torch.zeros((n, m))
    target = torch.zeros((n, k + m))
    promote_t = torch.from_numpy(np.asarray(promote, dtype=np.int64))
    all_ids = torch.from_numpy(data["base_ids"].astype(np.int64))
    all_lp = torch.from_numpy(data["base_lp"].astype(np.float32))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        cand = torch.cat([top_ids[sl], promote_t.expand(sl.stop - sl.start, m)], dim=1)  # (c, k+m)
        match = cand[:, :, None] == al_ids[sl][:, None, :]  # (c, k+m, K)
        target[sl] = (match * al_p[sl][:, None, :]).sum(-1)
        if m:
            # base log-prob of each promotion token: from the stored top k_store, else from the
            # values at the aligned top-K ids, else bounded by the smallest stored log-prob
            floor = all_lp[sl, -1:].expand(-1, m).clone()
            hit_al = promote_t[None, :, None] == al_ids[sl][:, None, :]  # (c, m, K)
            from_al = torch.where(hit_al, base_at_al[sl][:, None, :], torch.full_like(base_at_al[sl][:, None, :], -math.inf)).amax(-1)
            hit_top = promote_t[None, :, None] == all_ids[sl][:, None, :]  # (c, m, k_store)
            from_top = torch.where(hit_top, all_lp[sl][:, None, :], torch.full_like(all_lp[sl][:, None, :], -math.inf)).amax(-1)
            value = torch.where(torch.isfinite(from_top), from_top, torch.where(torch.isfinite(from_al), from_al, floor))
            duplicate = (promote_t[None, :, None] == top_ids[sl][:, None, :]).any(-1)  # (c, m)
            promo_lp[sl] = torch.where(duplicate, torch.full_like(value, NEG), value)
            target[sl, k:] = torch.where(duplicate, torch.zeros_like(value), target[sl, k:])
    covered = target.sum(-1)
    step = torch.from_numpy(data["step"].astype(np.int64))
    weight = torch.where(step < first_tokens, float(first_weight), 1.0)
    return Positions(
        top_ids=top_ids.to(device),
        top_lp=top_lp.to(device),
        promo_lp=promo_lp.to(device),
        target=target.to(device),
        al_top1=al_ids[:, 0].to(device),
        covered=covered.to(device),
        base_kl=base_kl.to(device),
        step=step.to(device),
        weight=weight.to(device),
    )


def sharpened(batch: Positions, max_factor: float, generator) -> Positions:
    """`batch` with the base's logits of a random half of its positions multiplied by a factor
    drawn log-uniformly from ``[1, max_factor]`` (top-k and promotion values alike; duplicates
    stay masked). Log-probs scaled this way are the scaled logits up to a per-position shift,
    which neither the renormalised features nor a softmax over the candidates see."""
    import torch

    n = len(batch)
    factor = torch.exp(torch.rand(n, generator=generator) * math.log(max_factor))
    factor = torch.where(torch.rand(n, generator=generator) < 0.5, factor, torch.ones_like(factor))
    factor = factor.to(batch.top_lp.device)[:, None]
    promo = torch.where(batch.promo_lp <= NEG / 2, batch.promo_lp, batch.promo_lp * factor)
    return replace(batch, top_lp=batch.top_lp * factor, promo_lp=promo)


def make_torch_head(vocab_size: int, rank: int, promote: np.ndarray, seed: int):
    """The torch twin of :class:`sali.head.Head` (defined lazily so NumPy-only installs work)."""
    import torch
    from torch import nn

    class TorchHead(nn.Module):
        """``U, W``: ``(V, r)``; ``bias``: ``(V,)``; starts as the identity (W = 0, bias = 0).
        ``dead_zone``: nats, and ``dead_zone_from``: the first response step it applies at, as
        :class:`sali.head.Head`'s (no zone in training)."""

        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(seed)
            self.U = nn.Parameter(torch.randn(vocab_size, rank, generator=generator) * 0.05)
            self.W = nn.Parameter(torch.zeros(vocab_size, rank))
            self.bias = nn.Parameter(torch.zeros(vocab_size))
            self.register_buffer("promote", torch.as_tensor(np.asarray(promote, dtype=np.int64)))
            self.dead_zone = 0.0
            self.dead_zone_from = 0

        def forward(self, top_ids, top_lp, promo_lp, alpha: float = 1.0, step=None):
            """Candidate ids ``(N, k+m)`` and adjusted logits ``(N, k+m)``; ``step``: ``(N,)`` long,
            each position's response step (None: not known, the zone applies everywhere)."""
            n = top_ids.shape[0]
            cand = torch.cat([top_ids, self.promote.expand(n, -1)], dim=1)
            base = torch.cat([top_lp, promo_lp], dim=1)
            features = top_lp - torch.logsumexp(top_lp, dim=-1, keepdim=True)  # renormalised in the top k
            mixed = torch.einsum("nk,nkr->nr", features, self.U[top_ids])
            delta = torch.einsum("nr,ncr->nc", mixed, self.W[cand]) + self.bias[cand]
            if self.dead_zone > 0:  # soft threshold around the top k's probability-weighted mean change
                centre = (torch.softmax(top_lp, dim=-1) * delta[:, : top_ids.shape[1]]).sum(-1, keepdim=True)
                off = delta - centre
                zone = self.dead_zone
                if step is not None and self.dead_zone_from > 0:
                    zone = torch.where(step >= self.dead_zone_from, zone, 0.0).to(delta.dtype)[:, None]
                delta = centre + off.sign() * (off.abs() - zone).clamp_min(0.0)
            adjusted = base + alpha * delta
            return cand, torch.where(base <= NEG / 2, torch.full_like(adjusted, NEG), adjusted)

    return TorchHead()


def loss_fn(head, batch: Positions, delta_penalty: float = 0.0):
    """Cross-entropy to the aligned distribution on the candidates (each position weighted by
    ``batch.weight``), plus `delta_penalty` times
    the mean square of the head's change to the top-k logits (centred per position, since a
    shift common to all candidates changes nothing)."""
    import torch

    _, adjusted = head(batch.top_ids, batch.top_lp, batch.promo_lp)
    log_q = torch.log_softmax(adjusted, dim=-1)
    loss = -(batch.weight * (batch.target * log_q).sum(-1)).sum() / (batch.weight * batch.covered).sum().clamp_min(1e-9)
    if delta_penalty:
        delta = adjusted[:, : batch.top_ids.shape[1]] - batch.top_lp
        loss = loss + delta_penalty * (delta - delta.mean(-1, keepdim=True)).pow(2).mean()
    return loss


def evaluate(head, pos: Positions, alpha: float = 1.0, batch_size: int = 4096) -> dict[str, float]:
    """Held-out figures: top-1 agreement with aligned (base / base + head; also on the first
    response token alone, where refusing is decided), KL, cover rates.

    KL(aligned ‖ base) uses the full-vocabulary base distribution over the aligned top-K.
    The two "on candidates" KLs restrict aligned, base and head to the head's candidates ``C``
    (the only tokens base + head can emit), renormalised.
    """
    import torch

    if len(pos) == 0:
        return {}
    sums = {"top1_base": 0.0, "top1_head": 0.0, "kl_base": 0.0, "kl_base_c": 0.0, "kl_head_c": 0.0, "cover_top1": 0.0, "cover_mass": 0.0}
    first = {"top1_base_first": 0.0, "top1_head_first": 0.0, "n": 0.0}  # the first response token alone
    loss, loss_weight = 0.0, 0.0
    k = pos.top_ids.shape[1]
    with torch.no_grad():
        for start in range(0, len(pos), batch_size):
            b = pos.subset(slice(start, start + batch_size))
            cand, adjusted = head(b.top_ids, b.top_lp, b.promo_lp, alpha, b.step)
            best = cand.gather(1, adjusted.argmax(-1, keepdim=True)).squeeze(1)
            head_hit, base_hit, at_first = best == b.al_top1, b.top_ids[:, 0] == b.al_top1, b.step == 0
            sums["top1_head"] += head_hit.float().sum().item()
            sums["top1_base"] += base_hit.float().sum().item()
            first["top1_head_first"] += (head_hit & at_first).float().sum().item()
            first["top1_base_first"] += (base_hit & at_first).float().sum().item()
            first["n"] += at_first.float().sum().item()
            sums["cover_top1"] += (b.top_ids == b.al_top1[:, None]).any(-1).float().sum().item()
            sums["cover_mass"] += b.covered.sum().item()
            sums["kl_base"] += b.base_kl.sum().item()
            p = b.target / b.covered.clamp_min(1e-9)[:, None]
            log_p = torch.log(p.clamp_min(1e-30))
            log_q_base = torch.log_softmax(torch.cat([b.top_lp, b.promo_lp], dim=1), dim=-1)
            log_q_head = torch.log_softmax(adjusted, dim=-1)
            sums["kl_base_c"] += (p * (log_p - log_q_base)).sum().item()
            sums["kl_head_c"] += (p * (log_p - log_q_head)).sum().item()
            loss += -(b.weight * (b.target * log_q_head).sum(-1)).sum().item()
            loss_weight += (b.weight * b.covered).sum().item()
    n = len(pos)
    out = {key: value / n for key, value in sums.items()}
    out.update({key: first[key] / first["n"] if first["n"] else float("nan") for key in ("top1_base_first", "top1_head_first")})
    out["loss"] = loss / max(loss_weight, 1e-9)
    out["positions"] = n
    out["k"] = k
    return out


@dataclass
class TrainResult:
    head: Any
    promote: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    seconds: float = 0.0
    val_positions: Any = None


@contextlib.contextmanager
def deterministic_on_cpu(module):
    """torch's deterministic kernels while a CPU-resident `module` trains, the previous setting after.

    Without them, with more than one thread, a backward pass adds some gradients up in an order that
    depends on thread timing: on SmolLM2's extraction two runs with one seed differed by 1e-6 in a
    weight after 2 epochs and by up to 0.08 after 13, each a different head. On that data the
    deterministic kernels cost no time (15.7 s against 15.6 s for 2 epochs, 2 threads). GPUs are
    left as they are: deterministic cuBLAS needs settings made before CUDA starts."""
    import torch

    if next(module.parameters()).device.type != "cpu":
        yield
        return
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def fit(head, optimizer, epoch_batches, batch_loss, evaluate_fn, epochs: int, patience: int, on_epoch=None):
    """The training loop both head kinds share: Adam steps over `epoch_batches()`, a held-out
    evaluation after each epoch, early stopping after `patience` epochs without improvement of
    its ``loss``, and the best epoch's weights restored at the end.

    `batch_loss(batch)` returns ``(loss tensor, weight)``; the epoch's mean training loss is
    recorded as ``train_loss``. Returns ``(history, best_epoch)``. Bit-reproducible for one seed on
    CPU (:func:`deterministic_on_cpu`).
    """
    with deterministic_on_cpu(head):
        return _fit(head, optimizer, epoch_batches, batch_loss, evaluate_fn, epochs, patience, on_epoch)


def _fit(head, optimizer, epoch_batches, batch_loss, evaluate_fn, epochs: int, patience: int, on_epoch=None):
    best = (math.inf, 0, {name: t.detach().clone() for name, t in head.state_dict().items()})
    history: list[dict[str, float]] = []
    stale = 0
    for epoch in range(1, epochs + 1):
        head.train()
        total, weight = 0.0, 0
        for batch in epoch_batches():
            loss, size = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, weight = total + loss.item() * size, weight + size
        head.eval()
        figures = evaluate_fn()
        figures["train_loss"] = total / max(weight, 1)
        figures["epoch"] = epoch
        history.append(figures)
        if on_epoch:
            on_epoch(epoch, figures)
        if figures["loss"] < best[0] - 1e-5:
            best, stale = (figures["loss"], epoch, {name: t.detach().clone() for name, t in head.state_dict().items()}), 0
        else:
            stale += 1
            if stale >= patience:
                break
    head.load_state_dict(best[2])
    head.eval()
    return history, best[1]


def train_topk(
    data: dict[str, np.ndarray],
    vocab_size: int,
    settings: TrainSettings,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a top-k head on extracted data; returns the best head (by held-out loss)."""
    import torch

    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    val_mask = split_prompts(data["row"], settings.val_fraction, settings.seed)
    train_mask = ~val_mask
    if not train_mask.any():
        raise SaliError("no training positions left after holding out validation prompts")
    promote = choose_promotions(data, train_mask, settings.k, settings.promote, settings.promote_min_count)
    pos = build_positions(data, settings.k, promote, settings.device, first_tokens=settings.first_tokens, first_weight=settings.first_weight)
    train_pos = pos.subset(torch.from_numpy(np.flatnonzero(train_mask)).to(settings.device))
    val_pos = pos.subset(torch.from_numpy(np.flatnonzero(val_mask)).to(settings.device)) if val_mask.any() else train_pos
    head = make_torch_head(vocab_size, settings.rank, promote, settings.seed).to(settings.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    before = evaluate(head, val_pos)
    generator = torch.Generator().manual_seed(settings.seed)

    def epoch_batches():
        order = torch.randperm(len(train_pos), generator=generator).to(settings.device)
        for s in range(0, len(train_pos), settings.batch_size):
            batch = train_pos.subset(order[s : s + settings.batch_size])
            yield sharpened(batch, settings.sharpen, generator) if settings.sharpen > 1.0 else batch

    history, best_epoch = fit(
        head, optimizer, epoch_batches, lambda batch: (loss_fn(head, batch, settings.delta_penalty), len(batch)),
        lambda: evaluate(head, val_pos), settings.epochs, settings.patience, on_epoch,
    )
    _zero_unused_rows(head, data, train_mask, settings.k, promote)
    head.dead_zone, head.dead_zone_from = settings.dead_zone, settings.dead_zone_from  # run time only; the figures below include them
    after = evaluate(head, val_pos)
    return TrainResult(
        head=head,
        promote=promote,
        history=history,
        before=before,
        after=after,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - start,
        val_positions=val_pos,
    )


def _zero_unused_rows(head, data, train_mask, k, promote) -> None:
    """Rows of tokens that never appeared in a training top-k (U) or candidate set (W, bias)
    received no gradient; zero them so they cost nothing and compress to nothing."""
    import torch

    seen = np.zeros(head.U.shape[0], dtype=bool)
    seen[np.unique(data["base_ids"][train_mask, :k])] = True
    with torch.no_grad():
        head.U[torch.from_numpy(~seen)] = 0.0
        seen[np.asarray(promote, dtype=np.int64)] = True
        head.W[torch.from_numpy(~seen)] = 0.0
        head.bias[torch.from_numpy(~seen)] = 0.0
