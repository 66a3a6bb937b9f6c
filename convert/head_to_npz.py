"""Trained torch head -> compact `.npz` head file (float16 where that changes no decision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sali.head import Head


def float16_agreement(head, positions) -> float:
    """Share of held-out positions whose head top-1 token is unchanged when the weights are
    rounded to float16 (1.0 = lossless for greedy decoding), with the head's dead zone."""
    import torch

    if positions is None or len(positions) == 0:
        return 1.0
    rounded = {name: t.detach().half().float() for name, t in head.state_dict().items() if t.is_floating_point()}
    original = {name: t.detach().clone() for name, t in head.state_dict().items()}
    with torch.no_grad():
        cand, adjusted = head(positions.top_ids, positions.top_lp, positions.promo_lp, 1.0, positions.step)
        before = cand.gather(1, adjusted.argmax(-1, keepdim=True))
        head.load_state_dict({**original, **rounded})
        cand, adjusted = head(positions.top_ids, positions.top_lp, positions.promo_lp, 1.0, positions.step)
        after = cand.gather(1, adjusted.argmax(-1, keepdim=True))
        head.load_state_dict(original)
    return float((before == after).float().mean().item())


def export_topk(head, k: int, meta: dict[str, Any], out: str | Path, positions=None) -> tuple[Path, dict[str, Any]]:
    """Write `head` (a :func:`sali.distill.make_torch_head` module) to `out` atomically.

    Weights are stored in float16 when rounding changes no held-out greedy decision,
    else in float32. Returns the path and the metadata written.
    """
    agreement = float16_agreement(head, positions)
    dtype = "float16" if agreement >= 0.999 else "float32"
    meta = dict(meta, float16_top1_agreement=round(agreement, 5))
    numpy_head = Head.create(
        head.U.detach().cpu().numpy(),
        head.W.detach().cpu().numpy(),
        head.bias.detach().cpu().numpy(),
        head.promote.cpu().numpy(),
        k=k,
        **meta,
    )
    path = numpy_head.save(out, dtype=dtype)
    return path, numpy_head.meta


def export_lmhead(head, meta: dict[str, Any], out: str | Path) -> tuple[Path, dict[str, Any]]:
    """Write a white-box head (:func:`sali.lmhead.make_lm_head` module) to `out` atomically."""
    from sali import __version__
    from sali.head import FORMAT_NAME, LMHead, format_version

    P = head.P.detach().cpu().numpy().astype(np.float32)
    Q = head.Q.detach().cpu().numpy().astype(np.float32)
    full = {
        "format": FORMAT_NAME,
        "version": format_version(meta),
        "kind": "lmhead",
        "rank": int(P.shape[1]),
        "vocab_size": int(P.shape[0]),
        "hidden_size": int(Q.shape[0]),
        "sali_version": __version__,
        **meta,
    }
    file = LMHead(P=P, Q=Q, meta=full)
    path = file.save(out)
    return path, file.meta
