"""Heads in combination: the ``A@1+B@0.5`` syntax and the one rule for applying several heads.

**The rule: composition, in the order given.** A head maps the base's logits to the adjusted
logits of its candidate set ``C`` and masks everything else (``-inf``). Several heads are applied
one after another, each reading the previous one's output as if it were a model's logits:

1. The first head reads the base's logits ``l`` exactly as it does alone: its top-k ``S_1``, its
   promotion set ``A_1``; out come the candidates ``C_1 = S_1 ∪ A_1`` with logits ``l_1``.
2. Head ``n`` (n > 1) reads ``l_{n-1}``: its ``S_n`` is the ``k_n`` best of ``C_{n-1}`` by ``l_{n-1}``
   (all of ``C_{n-1}`` when it holds fewer), its features are ``l_{n-1}`` renormalised within
   ``S_n``, and a promoted token ``j ∈ A_n`` starts from ``l_{n-1, j}``: a token an earlier head
   masked stays masked (``-inf`` plus anything is ``-inf``) and is dropped, so a later head can
   lift only tokens still among the candidates. ``C_n = S_n ∪ (A_n ∩ C_{n-1})``.

So each head re-ranks the candidate set the previous one left, and the set only shrinks. Order
matters: the first head decides which tokens are in play. Strengths: head ``n`` runs at
``α · s_n`` (``α`` the global ``--alpha``, ``s_n`` the ``@`` strength, default 1); a head at strength
0 is left out entirely, as a single head at α = 0 is (no masking either).

:func:`apply_chain` is the NumPy reference; the runtime's :class:`sali.runtime.ChainSampler`
does the same inside llama.cpp's sampler chain, and a test holds them equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sali.errors import SaliError
from sali.head import Head, top_k_ids


@dataclass(frozen=True)
class Combined:
    """Several heads applied in turn (see the module docstring), each with its strength ``s``."""

    parts: tuple[tuple[Head, float], ...]

    def active(self, alpha: float) -> list[tuple[Head, float]]:
        """The heads that act at global strength `alpha`, with their effective strengths ``alpha · s``."""
        return [(head, alpha * s) for head, s in self.parts if alpha * s != 0.0]

    def apply(self, logits: np.ndarray, alpha: float = 1.0, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The combined heads on one ``(V,)`` logits vector at response step `step`: ``(ids,
        adjusted)`` as :meth:`Head.apply`."""
        return apply_chain(self.active(alpha), logits, step)

    def apply_dense(self, logits: np.ndarray, alpha: float = 1.0, step: int | None = None) -> np.ndarray:
        """:meth:`apply` as a ``(V,)`` vector with ``-inf`` outside the candidate set."""
        parts = self.active(alpha)
        if not parts:
            return np.asarray(logits, dtype=np.float32).copy()
        ids, adjusted = apply_chain(parts, logits, step)
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        out[ids] = adjusted
        return out


def apply_chain(parts: Sequence[tuple[Head, float]], logits: np.ndarray, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The composition rule in NumPy: `parts` (head, effective strength) in order, none at 0, on
    the base's ``(V,)`` logits at response step `step` (see :meth:`Head.adjust`). Returns the final
    candidates' ids and adjusted logits."""
    first, strength = parts[0]
    ids, adjusted = first.apply(logits, strength, step)
    for head, strength in parts[1:]:
        ids, adjusted = follow(head, strength, ids, adjusted, logits.shape[0], step)
    return ids, adjusted


def follow(head: Head, strength: float, ids: np.ndarray, adjusted: np.ndarray, vocab_size: int,
           step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One later head on the candidates ``(ids, adjusted)`` an earlier head left (rule step 2)."""
    chosen = top_k_ids(adjusted, head.k)
    dense = np.full(vocab_size, -np.inf, dtype=np.float32)
    dense[ids] = adjusted
    new_ids, new_logits = head.adjust(ids[chosen], adjusted[chosen], dense[head.promote], strength, step)
    keep = np.isfinite(new_logits)
    return new_ids[keep], new_logits[keep]


# ---- the --head syntax ------------------------------------------------------------------------
def parse_spec(text: str) -> list[tuple[str, float]]:
    """``"A"``, ``"A@0.5"`` or ``"A@1+B@0.5"`` → ``[(name or path, strength), ...]``.

    A name is a head file or a shipped head's name. A file whose own name holds ``+`` or ``@``
    is taken as one head when it exists. Raises :class:`SaliError` with one clear line.
    """
    text = str(text)
    if Path(text).is_file():
        return [(text, 1.0)]
    parts = []
    for piece in text.split("+"):
        if not piece.strip():
            raise SaliError(f"head {text!r}: an empty head name (use A+B to combine heads A and B)")
        parts.append(_part(piece.strip(), text))
    return parts


def _part(piece: str, whole: str) -> tuple[str, float]:
    name, at, tail = piece.rpartition("@")
    if not at or Path(piece).is_file():
        return piece, 1.0
    if not name:
        raise SaliError(f"head {whole!r}: no head name before @{tail}")
    try:
        strength = float(tail)
    except ValueError:
        raise SaliError(f"head {whole!r}: the strength after @ must be a number, not {tail!r} (e.g. {name}@0.5)") from None
    if not math.isfinite(strength):
        raise SaliError(f"head {whole!r}: the strength after @ must be a finite number, not {tail!r}")
    return name, strength


def spec_name(parts: Sequence[tuple[str, float]]) -> str:
    """``[("A", 1.0), ("B", 0.5)]`` → ``"A+B@0.5"`` (the strength shown only when it is not 1)."""
    return "+".join(name if s == 1.0 else f"{name}@{s:g}" for name, s in parts)
