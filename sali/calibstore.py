"""The calibration store: the head strength α that `sali calibrate` chose for one head on one model.

One JSON file, ``calibrations.json`` in sali's folder (:func:`sali.paths.cache_root`:
``$SALI_CACHE``, else ``~/.cache/sali``), written atomically::

    {"format": "sali-calibrations", "version": 1,
     "records": {"h-<16 hex>/m-<16 hex>": {"alpha": 2.6, "met": true, "head": ..., "model": ..., ...}}}

A record is keyed by two identities, so that it follows the files rather than their names:

* **head identity** (:func:`head_identity`): SHA-256 over the head's arrays and its metadata
  (canonical JSON, the calibration reference included). A copy of the file anywhere has the
  same identity; a head with other weights, or whose reference was measured again with another
  result, is another head and has no record.
* **model identity** (:func:`model_identity`): a cheap fingerprint of the GGUF file, its size, the
  SHA-256 of its first and last 4 MiB, and its vocabulary fingerprint. Hashing a multi-GB file at
  every start would cost seconds; the first MiB hold the header, metadata and tensor table, the
  last ones tensor data, so a fine-tune, a requantisation or another conversion changes it.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sali import __version__
from sali.atomic import write_text
from sali.errors import SaliError
from sali.head import Head

FORMAT_NAME = "sali-calibrations"
FORMAT_VERSION = 1
ENDS = 4 << 20  # bytes hashed at each end of a GGUF file


def store_path() -> Path:
    from sali.paths import cache_root

    return cache_root() / "calibrations.json"


def head_identity(head: Head) -> str:
    """``"h-<16 hex>"``: SHA-256 of the head's arrays (as loaded: float32 weights, int64 ids) and
    its metadata as canonical JSON."""
    digest = hashlib.sha256()
    digest.update(json.dumps(head.meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    for name in ("U", "W", "bias", "promote"):
        array = np.ascontiguousarray(getattr(head, name))
        digest.update(f"\x00{name}:{array.dtype.str}:{array.shape}\x00".encode())
        digest.update(memoryview(array).cast("B"))
    return "h-" + digest.hexdigest()[:16]


def model_identity(path: str | Path, vocab_fingerprint: str) -> str:
    """``"m-<16 hex>"``: the GGUF's size, SHA-256 of its first and last :data:`ENDS` bytes, and
    `vocab_fingerprint` (:attr:`sali.runtime.Model.fingerprint`). Reads at most 8 MiB (a few
    milliseconds), so it is computed afresh on every lookup rather than cached."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        digest.update(f"{size}\x00{vocab_fingerprint}\x00".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(ENDS))
            handle.seek(max(0, size - ENDS))
            digest.update(handle.read(ENDS))
    except OSError as exc:
        raise SaliError(f"cannot read {path}: {exc.strerror or exc}") from None
    return "m-" + digest.hexdigest()[:16]


def key(head_id: str, model_id: str) -> str:
    return f"{head_id}/{model_id}"


def read_store(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The records (key -> record); an absent file holds none. A damaged file raises SaliError."""
    path = path or store_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SaliError(f"the calibration store {path} is unreadable ({type(exc).__name__}); remove it and calibrate again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or not isinstance(data.get("records"), dict):
        raise SaliError(f"{path} is not a sali calibration store; remove it and calibrate again")
    if not isinstance(data.get("version"), int) or data["version"] > FORMAT_VERSION:
        raise SaliError(f"the calibration store {path} was written by a newer sali; upgrade sali")
    return {k: v for k, v in data["records"].items() if isinstance(v, dict) and _alpha(v) is not None}


def record(head_id: str, model_id: str, entry: dict[str, Any], path: Path | None = None) -> Path:
    """Add or replace the record for (head, model); the whole file is rewritten atomically."""
    path = path or store_path()
    records = read_store(path)
    records[key(head_id, model_id)] = dict(entry, recorded=time.strftime("%Y-%m-%dT%H:%M:%S%z"), sali_version=__version__)
    text = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "records": records}, indent=1,
                      sort_keys=True, ensure_ascii=False)
    write_text(path, text + "\n")
    return path


def lookup(head: Head, model_path: str | Path, vocab_fingerprint: str) -> dict[str, Any] | None:
    """The record for `head` on the GGUF at `model_path`, or None. A damaged store is warned
    about (once per call) and treated as empty: it must not stop a chat."""
    from sali.runtime import SaliWarning

    path = store_path()
    if not path.is_file():
        return None
    try:
        records = read_store(path)
    except SaliError as exc:
        warnings.warn(f"{exc} (running without calibrations)", SaliWarning, stacklevel=2)
        return None
    return records.get(key(head_identity(head), model_identity(model_path, vocab_fingerprint)))


def _alpha(entry: dict[str, Any]) -> float | None:
    value = entry.get("alpha")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        return None
    return float(value)


def alpha_of(entry: dict[str, Any] | None) -> float | None:
    """A record's α (None without a record)."""
    return None if entry is None else _alpha(entry)


def describe_alpha(alpha: float) -> str:
    """How commands announce a calibrated strength (once, when they start)."""
    return f"alpha {alpha:g}, calibrated for this model (sali calibrate; --alpha or --no-calibration to override)"

