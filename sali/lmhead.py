"""The white-box head: a low-rank delta on the base's output projection.

``logits' = W_out h + P (Q^T h)`` with ``P: (V, r)``, ``Q: (H, r)``, ``h`` the final hidden
state (the input of the output projection). Model-specific and not transferable, but it
bounds what a shallow change of the last layer can do. It runs in llama.cpp by merging
``W_out + P Q^T`` into a copy of the base GGUF (``sali convert --merge-head``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sali.distill import fit, split_prompts
from sali.errors import SaliError


@dataclass
class LMTrainSettings:
    rank: int = 32
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 256
    val_fraction: float = 0.1
    patience: int = 4
    seed: int = 0
    device: str = "cpu"


@dataclass
class LMResult:
    head: Any
    history: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    seconds: float = 0.0
    promote: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def make_lm_head(vocab_size: int, hidden: int, rank: int, seed: int):
    import torch
    from torch import nn

    class LMHeadDelta(nn.Module):
        """``P``: ``(V, r)`` (starts at 0: the identity), ``Q``: ``(H, r)``."""

        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(seed)
            self.P = nn.Parameter(torch.zeros(vocab_size, rank))
            self.Q = nn.Parameter(torch.randn(hidden, rank, generator=generator) / math.sqrt(hidden))

        def forward(self, hidden_states, base_logits, alpha: float = 1.0):
            return base_logits + alpha * (hidden_states @ self.Q) @ self.P.T

    return LMHeadDelta()


def _batches(n: int, size: int, order=None):
    for start in range(0, n, size):
        yield order[start : start + size] if order is not None else slice(start, start + size)


def _tensors(data, index, output, device):
    import torch

    hidden = torch.from_numpy(data["hidden"][index].astype(np.float32)).to(device)
    al_ids = torch.from_numpy(data["al_ids"][index].astype(np.int64)).to(device)
    al_p = torch.softmax(torch.from_numpy(data["al_logits"][index].astype(np.float32)).to(device), dim=-1)
    base_logits = hidden @ output.T
    return hidden, base_logits, al_ids, al_p


def _evaluate(head, data, index: np.ndarray, output, device, batch: int = 512) -> dict[str, float]:
    import torch

    sums = {"top1_base": 0.0, "top1_head": 0.0, "kl_base": 0.0, "kl_head": 0.0}
    with torch.no_grad():
        for part in _batches(len(index), batch):
            hidden, base_logits, al_ids, al_p = _tensors(data, index[part], output, device)
            adjusted = head(hidden, base_logits)
            log_p = torch.log(al_p.clamp_min(1e-30))
            for name, logits in (("base", base_logits), ("head", adjusted)):
                log_q = torch.log_softmax(logits, dim=-1)
                sums[f"top1_{name}"] += (logits.argmax(-1) == al_ids[:, 0]).float().sum().item()
                sums[f"kl_{name}"] += (al_p * (log_p - log_q.gather(1, al_ids))).sum().item()
    n = max(len(index), 1)
    out = {key: value / n for key, value in sums.items()}
    out["loss"] = out["kl_head"]
    out["positions"] = len(index)
    return out


def train_lmhead(data: dict[str, np.ndarray], output, settings: LMTrainSettings, on_epoch: Callable | None = None) -> LMResult:
    """Train the low-rank output delta on extracted hidden states; best epoch by held-out KL."""
    import torch

    start = time.perf_counter()
    if "hidden" not in data or data["hidden"].ndim != 2:
        raise SaliError("the extracted data has no hidden states; extract again")
    vocab_size, hidden_size = output.shape
    if data["hidden"].shape[1] != hidden_size:
        raise SaliError(f"hidden size {data['hidden'].shape[1]} does not match the output projection ({hidden_size})")
    torch.manual_seed(settings.seed)
    output = output.to(settings.device)
    val_mask = split_prompts(data["row"], settings.val_fraction, settings.seed)
    train_index, val_index = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    if len(val_index) == 0:
        val_index = train_index
    head = make_lm_head(vocab_size, hidden_size, settings.rank, settings.seed).to(settings.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=0.0)
    before = _evaluate(head, data, val_index, output, settings.device)
    rng = np.random.default_rng(settings.seed)

    def epoch_batches():
        order = rng.permutation(train_index)
        for part in _batches(len(order), settings.batch_size, order):
            yield _tensors(data, part, output, settings.device)

    def batch_loss(batch):
        hidden, base_logits, al_ids, al_p = batch
        log_q = torch.log_softmax(head(hidden, base_logits), dim=-1).gather(1, al_ids)
        return -(al_p * log_q).sum(-1).mean(), len(hidden)

    history, best_epoch = fit(
        head, optimizer, epoch_batches, batch_loss,
        lambda: _evaluate(head, data, val_index, output, settings.device), settings.epochs, settings.patience, on_epoch,
    )
    after = _evaluate(head, data, val_index, output, settings.device)
    return LMResult(head=head, history=history, before=before, after=after, best_epoch=best_epoch, seconds=time.perf_counter() - start)
