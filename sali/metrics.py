"""Response metrics for `sali compare`, all in one place.

* refusal: a response refuses when it contains any phrase of the keyword list (case-sensitive
  substring, as in the AdvBench keyword attack-success-rate metric);
* exact match, ``number`` (default): the last number in the response equals the number after
  ``####`` in the answer (GSM8K style; a bare number is accepted as the answer too);
* exact match, ``text``: the answer, normalised (case-folded, every run of characters other
  than letters and digits made one space), occurs in the normalised response as whole words
  ("Paris" matches "It is paris." but not "Parisian");
* pass: the response (stripped) holds a match of a regular expression (Python ``re.search``;
  anchor with ``\\A`` and ``\\Z`` to test the whole response), e.g. a format check;
* token F1: bag-of-words F1 between a response and a reference response (lower-cased words,
  punctuation stripped);
* superficial share: ``(system - base) / (aligned - base)``, only where the denominator is
  meaningful (``|aligned - base| >= min_gap``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from sali.errors import SaliError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
WORD = re.compile(r"[a-z0-9]+")
NOT_WORD = re.compile(r"[\W_]+")
ANSWER_MATCHES = ("number", "text")


def load_keywords(path: str | Path) -> list[str]:
    """One phrase a line; blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise SaliError(f"refusal keyword file not found: {path}")
    try:
        phrases = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise SaliError(f"{path}: not UTF-8 text") from None
    if not phrases:
        raise SaliError(f"{path}: no refusal phrases in the file")
    return phrases


def is_refusal(response: str, keywords: Sequence[str]) -> bool:
    return any(phrase in response for phrase in keywords)


def _number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def gold_number(answer: str) -> float | None:
    """The number after ``####`` (GSM8K), else the last number in the answer."""
    _, sep, tail = answer.rpartition("####")
    return _number(tail if sep else answer)


def exact_match(response: str, answer: str) -> bool:
    gold, got = gold_number(answer), _number(response)
    return gold is not None and got is not None and abs(gold - got) < 1e-6


def normalise_text(text: str) -> str:
    """Case-folded (NFKC) text with every run of characters other than letters and digits
    turned into one space, trimmed: ``"  Port-Élan!"`` -> ``"port élan"``."""
    return NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_match(response: str, answer: str) -> bool:
    """The normalised answer occurs in the normalised response as whole words; an answer with
    no letters or digits never matches."""
    gold = normalise_text(answer)
    return bool(gold) and f" {gold} " in f" {normalise_text(response)} "


def answer_match(response: str, answer: str, mode: str = "number") -> bool:
    """Exact match of a response against a prompt's answer: ``number`` (:func:`exact_match`) or
    ``text`` (:func:`text_match`)."""
    if mode == "text":
        return text_match(response, answer)
    if mode == "number":
        return exact_match(response, answer)
    raise SaliError(f"answer match must be one of {', '.join(ANSWER_MATCHES)}, not {mode!r}")


def pass_pattern(pattern: str) -> re.Pattern:
    """A compiled ``--pass-regex``; an empty or invalid expression is refused with the reason."""
    if not pattern:
        raise SaliError("--pass-regex is empty: give a regular expression a passing response matches")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise SaliError(f"--pass-regex {pattern!r} is not a valid regular expression: {exc}") from None


def passes(response: str, pattern: re.Pattern) -> bool:
    """The (stripped) response holds a match of `pattern` (``re.search``)."""
    return pattern.search(response.strip()) is not None


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def token_f1(response: str, reference: str) -> float:
    """Bag-of-words F1 in [0, 1]; two empty texts agree fully."""
    a, b = words(response), words(reference)
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def superficial_share(system: float, base: float, aligned: float, min_gap: float = 0.05) -> float | None:
    """Share of the base → aligned change that `system` recovers; None when aligned ≈ base."""
    gap = aligned - base
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in (system, base, aligned)) or abs(gap) < min_gap:
        return None
    return (system - base) / gap


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion of `successes` out of `n`;
    (nan, nan) when n is 0. Unlike the normal approximation it stays inside [0, 1] and is
    honest at 0% or 100% on small sets (0 of 50 gives 0.0–7.1%)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact ends: no rounding past 0 or 1
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def repeated_sentence_loop(response: str, min_repeats: int = 3) -> bool:
    """True when some sentence (≥ 3 words) occurs `min_repeats` times: the degenerate loop
    small models fall into."""
    sentences = [" ".join(words(s)) for s in re.split(r"[.!?\n]+", response)]
    counts = Counter(s for s in sentences if len(s.split()) >= 3)
    return any(c >= min_repeats for c in counts.values())


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``(..., V)`` logits in float64; ``-inf`` entries stay ``-inf``."""
    logits = np.asarray(logits, dtype=np.float64)
    top = np.max(logits, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return logits - top - np.log(np.sum(np.exp(logits - top), axis=-1, keepdims=True))


def kl_rows(aligned_log_probs: np.ndarray, system_logits: np.ndarray, floor: float = 1e-10) -> np.ndarray:
    """KL(aligned ‖ system) in nats per row: ``(T,)`` from ``(T, V)`` aligned log-probs and
    ``(T, V)`` system logits; ``-inf`` system logits (tokens a head masks) get probability `floor`."""
    log_q = np.maximum(log_softmax_rows(system_logits), math.log(floor))
    p = np.exp(aligned_log_probs)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (aligned_log_probs - log_q), 0.0)
    return terms.sum(axis=-1)



def top_k_targets(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the KL on a reference model's top k needs, from its ``(T, V)`` logits:

    ``(top1, ids, log_probs, tail)``: ``(T,)`` int32 argmax; ``(T, k)`` int32 ids of the k most
    likely tokens; ``(T, k)`` float32 their log-probs (normalised over the whole vocabulary);
    ``(T,)`` float64 the probability mass outside them. ``k`` is capped at ``V``."""
    logits = np.asarray(logits)
    T, V = logits.shape
    k = min(k, V)
    ids = np.argpartition(logits, V - k, axis=-1)[:, V - k:] if k < V else np.broadcast_to(np.arange(V), (T, V))
    log_probs = np.take_along_axis(log_softmax_rows(logits), ids, axis=-1)
    tail = np.clip(1.0 - np.exp(log_probs).sum(axis=-1), 0.0, 1.0)
    return logits.argmax(-1).astype(np.int32), ids.astype(np.int32), log_probs.astype(np.float32), tail


def kl_top_k(ids: np.ndarray, log_probs: np.ndarray, tail: np.ndarray, system_logits: np.ndarray,
             floor: float = 1e-10) -> np.ndarray:
    """KL(reference ‖ system) in nats per row over the reference's top k plus one bucket for the rest
    of the vocabulary: ``Σ_{i∈K} p_i log(p_i/q_i) + p_rest log(p_rest/q_rest)``.

    ``ids``, ``log_probs``, ``tail``: as :func:`top_k_targets` returns them; ``system_logits``:
    ``(T, V)``; ``-inf`` logits (tokens a head masks) get probability `floor`, as does an empty
    rest. A lower bound on the full KL (merging tokens never raises it), equal to it when the k
    tokens hold all of the reference's mass."""
    log_q = np.take_along_axis(log_softmax_rows(system_logits), ids, axis=-1)
    log_q = np.maximum(log_q, math.log(floor))
    log_p = log_probs.astype(np.float64)
    p = np.exp(log_p)
    head = (p * (log_p - log_q)).sum(axis=-1)
    q_rest = np.maximum(1.0 - np.exp(log_q).sum(axis=-1), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(tail > 0, tail * (np.log(tail) - np.log(q_rest)), 0.0)
    return head + rest
