"""Superficial heads: the `.npz` file format and the one NumPy implementation of a head.

A head reads only the base model's next-token logits ``l`` (shape ``(V,)``) and returns the
adjusted logits of a small candidate set ``C = S ∪ A``:

* ``S``: ids of the ``k`` largest logits; features ``x_i = l_i - logsumexp_{j∈S} l_j`` for
  ``i ∈ S`` (log-probs renormalised within the top k: invariant to logit shifts, and computable
  from the k values llama.cpp's native top-k sampler hands over, with no pass over the vocabulary);
* ``A``: a stored promotion set of tokens the aligned model likes but the base rarely ranks high;
* ``l'_j = l_j + α · (b_j + Σ_{i∈S} x_i ⟨U_i, W_j⟩)`` for ``j ∈ C``; every other token is masked.

``U, W`` have shape ``(V, r)``, ``b`` shape ``(V,)``. One call costs ``O((k + |A|) · r)`` plus one
top-k selection. α = 0 turns the head off entirely
(no masking either), so it reproduces the plain base model exactly.

A head may carry a *dead zone* ``d`` (metadata ``dead_zone``, nats, default 0): each change
``Δ_j = b_j + Σ_i x_i ⟨U_i, W_j⟩`` is then taken relative to its centre ``c = Σ_{i∈S} p_i Δ_i``
(``p``: the base's probabilities renormalised within the top k) and soft-thresholded,
``Δ'_j = c + sign(Δ_j - c) · max(|Δ_j - c| - d, 0)``, before α scales it: changes smaller than
``d`` vanish (on SmolLM2 they mostly flipped near-ties away from the aligned model's choice), large
ones stay. A shift common to every candidate changes nothing, so the centre keeps the rule
independent of it. The zone may spare the first response steps (metadata ``dead_zone_from``, a
whole number ``N``, default 0): steps are counted from 0 at the first token the model chooses in a
generation (prefilled tokens are not steps), and steps below ``N`` get the head's changes whole,
where a refusal is decided; a caller that does not know the step gets the zone.

File format (``format = "sali-head"``; version 1; 2 for a head with a dead zone; 3 for one whose
zone spares the first steps: an older sali must refuse such a file rather than apply it without
its rule), always loaded with ``allow_pickle=False``:

=========  ============  ==============================================================
array      dtype, shape  meaning
=========  ============  ==============================================================
meta       uint8 (n,)    UTF-8 JSON metadata (see :data:`REQUIRED_META`)
U          f16 (V, r)    read-side factor: the weight of top-k token ``i``'s log-prob
W          f16 (V, r)    write-side factor: how candidate ``j`` responds
bias       f16 (V,)      per-token bias
promote    i32 (m,)      the promotion set ``A``
=========  ============  ==============================================================
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sali import __version__
from sali.atomic import atomic_path
from sali.errors import SaliError
from sali.kernel import head_kernel, token_fields

FORMAT_NAME = "sali-head"
FORMAT_VERSION = 3  # the newest this sali reads; 2 added the dead zone, 3 its spared first steps (see format_version)
KINDS = ("topk",)
FEATURES = ("topk_logsoftmax",)
REQUIRED_META = ("format", "version", "kind", "k", "rank", "vocab_size", "vocab_fingerprint")
ARRAYS = ("U", "W", "bias", "promote")


class _HeadMeta:
    """What both head kinds read from their metadata, and how they are written."""

    meta: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.meta["vocab_fingerprint"])

    @property
    def base_format(self) -> dict[str, Any]:
        """How the base saw prompts in training: ``{"type": "plain"|"chat"|"template", ...}``."""
        fmt = self.meta.get("base_format")
        return dict(fmt) if fmt is not None else {"type": "chat"}

    def _write(self, path: str | Path, arrays: dict[str, np.ndarray], dtype: str) -> Path:
        """Write metadata + `arrays` (floating ones cast to `dtype`) atomically as a compressed .npz."""
        meta = dict(self.meta, weight_dtype=dtype)
        blob = np.frombuffer(json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        cast = {name: a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a for name, a in arrays.items()}
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, meta=blob, **cast)
        return Path(path)


@dataclass
class Head(_HeadMeta):
    """A loaded head: float32 weights in memory plus its metadata dict.

    Attributes:
        U, W: ``(V, r)`` float32 low-rank factors.
        bias: ``(V,)`` float32.
        promote: ``(m,)`` int64 ids of the promotion set ``A`` (unique, sorted).
        meta: the JSON metadata (``k``, ``rank``, ``vocab_size``, ``vocab_fingerprint``,
            ``base_format``, ``base_model``, ``aligned_model``, ``training`` ...).
    """

    U: np.ndarray
    W: np.ndarray
    bias: np.ndarray
    promote: np.ndarray
    meta: dict[str, Any]
    # per-thread scratch buffers: one head can serve several generations at once (sali serve)
    _scratch: threading.local = field(default_factory=threading.local, repr=False, compare=False)
    _w_bias_cache: np.ndarray | None = field(default=None, repr=False)
    _packed_cache: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        U: np.ndarray,
        W: np.ndarray,
        bias: np.ndarray,
        promote: np.ndarray | list[int] = (),
        *,
        k: int,
        vocab_fingerprint: str,
        **meta: Any,
    ) -> "Head":
        """Build a head from arrays; extra keyword arguments go into the metadata."""
        U = np.ascontiguousarray(U, dtype=np.float32)
        full_meta = {
            "format": FORMAT_NAME,
            "version": 1,  # set by save() to what the file needs (format_version)
            "kind": "topk",
            "features": "topk_logsoftmax",
            "k": int(k),
            "rank": int(U.shape[1]),
            "vocab_size": int(U.shape[0]),
            "vocab_fingerprint": vocab_fingerprint,
            "base_format": {"type": "chat"},
            "sali_version": __version__,
        }
        full_meta.update(meta)
        head = cls(
            U=U,
            W=np.ascontiguousarray(W, dtype=np.float32),
            bias=np.asarray(bias, dtype=np.float32),
            promote=np.unique(np.asarray(promote, dtype=np.int64)),
            meta=full_meta,
        )
        head.validate("<new head>")
        return head

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def rank(self) -> int:
        return int(self.meta["rank"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dead_zone(self) -> float:
        """Nats by which each change is soft-thresholded around its centre (0: none)."""
        return float(self.meta.get("dead_zone", 0.0))

    @property
    def dead_zone_from(self) -> int:
        """The first response step (0-based) the dead zone applies at: the steps before get the changes whole."""
        return int(self.meta.get("dead_zone_from", 0))

    def zone_at(self, step: int | None) -> float:
        """The dead zone in force at response step `step` (None: a step not known, taken as past the spared ones)."""
        return 0.0 if step is not None and step < self.dead_zone_from else self.dead_zone

    # ---- validation ---------------------------------------------------------------------
    def validate(self, source: str) -> None:
        """Raise :class:`SaliError` unless shapes, dtypes and values agree with the metadata."""
        meta = self.meta
        missing = [key for key in REQUIRED_META if key not in meta]
        if missing:
            raise SaliError(f"{source}: head metadata lacks {', '.join(missing)}")
        if meta["format"] != FORMAT_NAME:
            raise SaliError(f"{source}: not a sali head (format {meta['format']!r})")
        _check_version(meta["version"], source)
        if meta["kind"] not in KINDS:
            raise SaliError(f"{source}: unknown head kind {meta['kind']!r} (known: {', '.join(KINDS)})")
        if meta.get("features") not in FEATURES:
            raise SaliError(f"{source}: unknown head features {meta.get('features')!r}")
        V, r, k = (_count(meta, key, source) for key in ("vocab_size", "rank", "k"))
        check_format(meta.get("base_format"), source)
        expected = {"U": (V, r), "W": (V, r), "bias": (V,)}
        for name, shape in expected.items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise SaliError(
                    f"{source}: array {name} has shape {actual}, but the metadata says {shape} "
                    f"(vocab_size={V}, rank={r})"
                )
        if not 1 <= k <= V:
            raise SaliError(f"{source}: k={k} must be between 1 and vocab_size={V}")
        dead_zone = meta.get("dead_zone", 0.0)
        if isinstance(dead_zone, bool) or not isinstance(dead_zone, (int, float)) or not 0 <= dead_zone < math.inf:
            raise SaliError(f"{source}: head metadata dead_zone must be a number of nats ≥ 0, not {dead_zone!r:.60}")
        spared = meta.get("dead_zone_from", 0)
        if isinstance(spared, bool) or not isinstance(spared, int) or spared < 0:
            raise SaliError(f"{source}: head metadata dead_zone_from must be a whole number of response steps ≥ 0, not {spared!r:.60}")
        if self.promote.ndim != 1 or (self.promote.size and (self.promote.min() < 0 or self.promote.max() >= V)):
            raise SaliError(f"{source}: promotion ids must be a 1-D list of ids below vocab_size={V}")
        for name in ("U", "W", "bias"):
            if not np.isfinite(getattr(self, name)).all():
                raise SaliError(f"{source}: array {name} holds NaN or infinite values")

    # ---- files --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Head":
        """Load and validate a top-k head file. Never unpickles anything."""
        meta, arrays = read_archive(path, ARRAYS)
        if meta.get("kind") == "lmhead":
            raise SaliError(
                f"{path} is a white-box (lmhead) head: merge it into the base GGUF with "
                "`sali convert --merge-head` and run the merged model instead"
            )
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused by validate()
            head = cls(
                U=arrays["U"].astype(np.float32),
                W=arrays["W"].astype(np.float32),
                bias=arrays["bias"].astype(np.float32),
                promote=np.asarray(arrays["promote"], dtype=np.int64),
                meta=meta,
            )
        head.validate(str(path))
        return head

    def save(self, path: str | Path, dtype: str = "float16") -> Path:
        """Write the head atomically as a compressed `.npz` (weights in `dtype`)."""
        self.validate("<head being saved>")
        self.meta["version"] = format_version(self.meta)
        arrays = {"U": self.U, "W": self.W, "bias": self.bias, "promote": self.promote.astype(np.int32)}
        return self._write(path, arrays, dtype)

    # ---- application --------------------------------------------------------------------
    def check_vocab(self, model_fingerprint: str, model_name: str, head_name: str = "the head") -> None:
        """Refuse a model whose vocabulary differs from the one the head was trained on."""
        if model_fingerprint != self.fingerprint:
            raise SaliError(
                f"{head_name} was trained for vocabulary {self.fingerprint} "
                f"({self.meta.get('base_model', 'unknown base')}), but {model_name} has vocabulary "
                f"{model_fingerprint}; a head only works on models with the same token list"
            )

    def adjust(
        self, top_ids: np.ndarray, top_logits: np.ndarray, promote_logits: np.ndarray, alpha: float = 1.0,
        step: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The head itself, given the base's top k (computed by :meth:`adjust_into`).

        Args:
            top_ids: ``(k,)`` ids of the base's k largest logits (any order, any integer dtype).
            top_logits: ``(k,)`` float32 their logits.
            promote_logits: ``(m,)`` float32 base logits of the promotion set ``self.promote``.
            alpha: head strength.
            step: the response step being chosen (0: the first token the model chooses), for a
                dead zone that spares the first steps; None: not known (the zone applies).

        Returns:
            ``(ids, adjusted)``: ``(c,)`` int32 candidate ids ``C = S ∪ A`` (no duplicates) and
            their ``(c,)`` float32 adjusted logits; every other token is masked.
        """
        k = len(top_ids)
        ids, logits = token_fields(k + self.promote.size)
        ids[:k], logits[:k] = top_ids, top_logits
        promote_logits = np.ascontiguousarray(promote_logits, dtype=np.float32)
        count = self.adjust_into(ids[:k], logits[:k], promote_logits, np.arange(self.promote.size), ids, logits, alpha, step)
        return ids[:count].copy(), logits[:count].copy()

    def adjust_into(
        self, top_ids: np.ndarray, top_logits: np.ndarray, source: np.ndarray, source_at: np.ndarray,
        out_ids: np.ndarray, out_logits: np.ndarray, alpha: float = 1.0, step: int | None = None,
    ) -> int:
        """:meth:`adjust` written into ``out_ids[:c]`` and ``out_logits[:c]``; returns ``c``.

        The base logit of promoted token ``promote[a]`` is ``source[source_at[a]]`` (float32
        contiguous, int64 indices): the runtime passes llama.cpp's raw ``(V,)`` logits and
        ``self.promote``, so nothing is gathered in Python. ``step``: the response step, as in
        :meth:`adjust` (the runtime passes its count of this generation's earlier tokens).

        The id and logit arrays are views laid out as llama.cpp's candidate array
        (:func:`sali.kernel.token_fields`), and the outputs may be the very arrays the inputs are
        views of: the runtime rewrites llama.cpp's candidates in place. The arithmetic is the one
        compiled function :func:`sali.kernel.head_kernel`; this thread's scratch makes one head
        safe to use from several threads at once (sali serve).
        """
        scratch = self._scratch
        call = getattr(scratch, "call", 0) + 1
        if call == 1 or call >= 2**31 - 1:
            scratch.stamps = np.zeros(self.vocab_size, dtype=np.int32)
            call = 1
        scratch.call = call
        dead_zone = self.zone_at(step)
        needed = self.rank + 1 + (len(top_ids) if dead_zone > 0 else 0)  # with a dead zone: the top k's changes too
        if getattr(scratch, "mixed", None) is None or scratch.mixed.size < needed:
            scratch.mixed = np.ones(needed, dtype=np.float32)
        return head_kernel()(top_ids, top_logits, source, source_at, out_ids, out_logits, self.U, self._w_bias(),
                             self.promote, scratch.stamps, call, scratch.mixed, float(alpha), dead_zone)

    def apply(self, logits: np.ndarray, alpha: float = 1.0, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Apply the head to one full logits vector ``(V,)`` (token-id order) at response step
        `step` (see :meth:`adjust`): selects the top k, then :meth:`adjust`. Returns ``(ids,
        adjusted)`` as :meth:`adjust` does."""
        top = top_k_ids(logits, self.k)
        return self.adjust(top, logits[top], logits[self.promote], alpha, step)

    def apply_dense(self, logits: np.ndarray, alpha: float = 1.0, step: int | None = None) -> np.ndarray:
        """:meth:`apply` as a ``(V,)`` vector with ``-inf`` outside the candidate set."""
        ids, adjusted = self.apply(logits, alpha, step)
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        out[ids] = adjusted
        return out

    def _w_bias(self) -> np.ndarray:
        """``(V, r + 1)``: W with the bias as its last column (built once)."""
        if self._w_bias_cache is None:
            self._w_bias_cache = np.ascontiguousarray(np.concatenate((self.W, self.bias[:, None]), axis=1), dtype=np.float32)
        return self._w_bias_cache

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, promoted)`` for the compiled sampler (:mod:`sali.native`), built once: ``rows``
        ``(V, 2r + 1)`` float32, each token's ``[U | W | bias]`` side by side (one place in memory
        per candidate); ``promoted`` ``(m, r + 1)``, ``[W | bias]`` of the promotion set."""
        if self._packed_cache is None:
            w_bias = self._w_bias()
            rows = np.ascontiguousarray(np.concatenate((self.U, w_bias), axis=1), dtype=np.float32)
            self._packed_cache = (rows, np.ascontiguousarray(w_bias[self.promote]))
        return self._packed_cache

    def size_report(self) -> dict[str, int]:
        """Parameter counts: ``U``, ``W``, ``bias``, ``promote``, ``total``."""
        counts = {"U": self.U.size, "W": self.W.size, "bias": self.bias.size, "promote": self.promote.size}
        counts["total"] = sum(counts.values())
        return counts


def _count(meta: dict[str, Any], key: str, source: str) -> int:
    """A positive integer metadata field (a JSON number without fraction), else one clear error."""
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SaliError(f"{source}: head metadata {key} must be a positive whole number, not {value!r:.60}")
    return value


def dead_zone_meta(dead_zone: float, dead_zone_from: int = 0) -> dict[str, Any]:
    """The metadata that stores a run-time dead zone (``sali train``, ``sali head set``): only the
    keys that differ from their defaults, so a head without a zone stays format version 1. Raises
    :class:`SaliError` for spared steps without a zone."""
    if not dead_zone:
        if dead_zone_from:
            raise SaliError("--dead-zone-from says where the dead zone starts; it does nothing without --dead-zone")
        return {}
    return {"dead_zone": dead_zone, **({"dead_zone_from": dead_zone_from} if dead_zone_from else {})}


def format_version(meta: dict[str, Any]) -> int:
    """The oldest format version that holds everything in `meta`: 3 for a head whose dead zone
    spares the first response steps, 2 for one with a dead zone at every step (a sali that reads
    only older versions would apply the head without that rule, so it must refuse the file), else
    1, which every sali reads."""
    if not meta.get("dead_zone", 0):
        return 1
    return 3 if meta.get("dead_zone_from", 0) else 2


def _check_version(version: Any, source: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise SaliError(f"{source}: head format version must be a whole number, not {version!r:.60}")
    if version > FORMAT_VERSION:
        raise SaliError(
            f"{source}: head format version {version} is newer than this sali supports ({FORMAT_VERSION}); upgrade sali"
        )


def check_format(fmt: Any, source: str) -> None:
    """Refuse a stored prompt format (``base_format``; None means chat) that
    :func:`sali.prompts.render` cannot use."""
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in ("plain", "chat", "template"):
        raise SaliError(f"{source}: head metadata base_format must be plain, chat or a template, not {fmt!r:.60}")
    if fmt["type"] == "template" and not (isinstance(fmt.get("template"), str) and "{prompt}" in fmt["template"]):
        raise SaliError(f"{source}: head metadata base_format is a template without {{prompt}}")


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the `k` largest entries of ``logits`` (``(V,)``), in no particular order; exact.

    A full ``argpartition`` over 49k logits costs ~110 µs. Instead a threshold is estimated
    from a strided sample (the value expected to have ~4k entries above it), every entry at
    or above it is gathered with one vectorised comparison, and only those few are partitioned
    (~25 µs). If the estimate is too high to leave k entries, the exact full path runs.
    """
    size = logits.shape[0]
    if k >= size:
        return np.arange(size)
    stride = max(1, size // 1024)
    if stride > 1:
        sample = logits[::stride]
        rank = min(sample.shape[0], -(-4 * k // stride) + 2)
        if rank < sample.shape[0] // 2:
            threshold = np.partition(sample, sample.shape[0] - rank)[sample.shape[0] - rank]
            pool = np.flatnonzero(logits >= threshold)
            if pool.shape[0] >= k:
                return pool[np.argpartition(logits[pool], pool.shape[0] - k)[pool.shape[0] - k :]]
    return np.argpartition(logits, size - k)[size - k :]


def read_archive(path: str | Path, names: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read the metadata and the named arrays of a head file, refusing pickles and junk.

    Integer arrays are expected for ``promote``, floating-point arrays for everything else.
    """
    path = Path(path)
    if not path.is_file():
        raise SaliError(f"head file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - see _why
        raise SaliError(f"{path}: not a sali head file (not a readable .npz archive: {_why(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SaliError(f"{path}: not a sali head file (a bare .npy array, not an .npz archive)")
    with archive:
        if "meta" not in archive.files:
            raise SaliError(f"{path}: not a sali head file (no array 'meta')")
        meta = _decode_meta(_read_member(archive, "meta", path), path)
        if meta.get("kind") == "lmhead" and names == ARRAYS:
            return meta, {}
        arrays = {}
        for name in names:
            if name not in archive.files:
                raise SaliError(f"{path}: not a sali head file (no array {name!r})")
            array = _read_member(archive, name, path)
            wanted = np.integer if name == "promote" else np.floating
            if not np.issubdtype(array.dtype, wanted):
                raise SaliError(f"{path}: array {name!r} has dtype {array.dtype}, expected {wanted.__name__}")
            arrays[name] = array
    return meta, arrays


def update_meta(path: str | Path, changes: dict[str, Any]) -> Path:
    """Rewrite a head file with `changes` merged into its metadata, atomically; every array and
    every other metadata key stays exactly as it was (same dtypes, same values: nothing is cast,
    unlike :meth:`Head.save`). Used by ``sali calibrate --reference``."""
    path = Path(path)
    meta, _ = read_archive(path, ())
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: _read_member(archive, name, path) for name in archive.files if name != "meta"}
    meta.update(changes)
    blob = np.frombuffer(json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, meta=blob, **arrays)
    return path


def _read_member(archive, name: str, path: Path) -> np.ndarray:
    try:
        array = archive[name]
        if not isinstance(array, np.ndarray):  # NpzFile hands back raw bytes for a non-.npy member
            raise SaliError(f"{path}: member {name!r} is not a NumPy array")
        return array
    except SaliError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise SaliError(
                f"{path}: array {name!r} holds pickled Python objects; sali never "
                "unpickles head files — refusing to load it"
            ) from None
        raise SaliError(f"{path}: array {name!r} is unreadable ({_why(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - see _why
        raise SaliError(f"{path}: array {name!r} is unreadable ({_why(exc)})") from None


# A damaged archive fails inside zipfile, zlib or NumPy's .npy parser with almost any exception
# type (BadZipFile, zlib.error, NotImplementedError for an unknown compression method,
# RuntimeError for a set encryption bit, ValueError, MemoryError for a huge declared shape...):
# at this boundary every one of them means "this file is unreadable", never a bug in sali.
def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


def _decode_meta(array: np.ndarray, path: Path) -> dict[str, Any]:
    try:
        if array.dtype == np.uint8:
            text = array.tobytes().decode("utf-8")
        elif array.dtype.kind == "U" and array.ndim == 0:
            text = str(array[()])
        else:
            raise ValueError(f"dtype {array.dtype}")
        meta = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SaliError(f"{path}: head metadata is not UTF-8 JSON ({_why(exc)})") from None
    if not isinstance(meta, dict):
        raise SaliError(f"{path}: head metadata is not a JSON object")
    return meta


LM_ARRAYS = ("P", "Q")


@dataclass
class LMHead(_HeadMeta):
    """A white-box head file (``kind = "lmhead"``): ``P``: ``(V, r)``, ``Q``: ``(H, r)``, float32 in
    memory; the merged output projection is ``W_out + P Q^T`` (see :mod:`sali.lmhead`)."""

    P: np.ndarray
    Q: np.ndarray
    meta: dict[str, Any]

    def delta(self) -> np.ndarray:
        """The ``(V, H)`` float32 change of the output projection."""
        return self.P @ self.Q.T

    def validate(self, source: str) -> None:
        meta = self.meta
        for key in ("format", "version", "kind", "rank", "vocab_size", "hidden_size", "vocab_fingerprint"):
            if key not in meta:
                raise SaliError(f"{source}: head metadata lacks {key}")
        if meta["format"] != FORMAT_NAME or meta["kind"] != "lmhead":
            raise SaliError(f"{source}: not a sali white-box head")
        _check_version(meta["version"], source)
        V, H, r = (_count(meta, key, source) for key in ("vocab_size", "hidden_size", "rank"))
        check_format(meta.get("base_format"), source)
        for name, shape in (("P", (V, r)), ("Q", (H, r))):
            if getattr(self, name).shape != shape:
                raise SaliError(f"{source}: array {name} has shape {getattr(self, name).shape}, but the metadata says {shape}")
            if not np.isfinite(getattr(self, name)).all():
                raise SaliError(f"{source}: array {name} holds NaN or infinite values")

    @classmethod
    def load(cls, path: str | Path) -> "LMHead":
        meta, arrays = read_archive(path, LM_ARRAYS)
        with np.errstate(over="ignore"):  # beyond float32: inf, refused by validate()
            head = cls(P=arrays["P"].astype(np.float32), Q=arrays["Q"].astype(np.float32), meta=meta)
        head.validate(str(path))
        return head

    def save(self, path: str | Path, dtype: str = "float16") -> Path:
        self.validate("<head being saved>")
        return self._write(path, {"P": self.P, "Q": self.Q}, dtype)


def load_any(path: str | Path) -> Head | LMHead:
    """Load a head file of either kind."""
    meta, _ = read_archive(path, ())
    return LMHead.load(path) if meta.get("kind") == "lmhead" else Head.load(path)
