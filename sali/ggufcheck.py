"""Check a GGUF file before llama.cpp sees it, so a damaged file gives one line, not a crash.

llama.cpp trusts much of what a GGUF header says: a flipped bit in a count, a tensor offset or a
head count can make it read past the end of the mapping or divide by zero (a signal, no
message). :func:`check_gguf` therefore refuses, with one :class:`~sali.errors.SaliError` line:

1. what the ``gguf`` package's :class:`gguf.GGUFReader` would loop on or misread: counts and
   array lengths larger than the bytes left in the file, unknown value types (a quick walk over
   the key/value section, no allocation);
2. what :class:`gguf.GGUFReader` itself refuses (bad magic, version, alignment, duplicate keys
   or tensor names, unknown tensor types);
3. what the reader accepts but llama.cpp should never be handed: tensors whose data lies
   outside the file or overlaps another tensor's, rows that are not whole quantisation blocks,
   more than 4 dimensions, misaligned offsets, zero or non-integer model sizes (block count,
   embedding length, head counts that do not divide), token tables whose lengths disagree or
   that list a token twice.

Checks cost one pass over the header (the tensor data is never read).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from sali.errors import SaliError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
# value type id -> size in bytes of one scalar (8: string = uint64 length + bytes; 9: array)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# model sizes llama.cpp divides by or allocates with: must be positive whole numbers
_POSITIVE = (".block_count", ".embedding_length", ".context_length", ".feed_forward_length",
             ".attention.head_count", ".attention.head_count_kv", ".attention.key_length",
             ".attention.value_length", ".vocab_size")


def check_gguf(path: str | Path) -> None:
    """Raise :class:`SaliError` (one line naming `path`) unless `path` is a GGUF file that
    llama.cpp can be handed safely (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise SaliError(f"model file not found: {path}")
    if not path.is_file():
        raise SaliError(f"not a file: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise SaliError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        _walk_header(_bytes(path))
        reader = _read(path)
        _check_tensors(reader, path.stat().st_size)
        _check_fields(reader)
    except _Bad as exc:
        raise SaliError(f"{path} is a damaged GGUF file: {exc}; download or convert it again") from None


class _Bad(Exception):
    """A reason a GGUF file is refused (turned into one SaliError line)."""


def _bytes(path: Path):
    """The file's bytes, memory-mapped (only the header pages are ever touched)."""
    return np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else b""


def _walk_header(data) -> None:
    """Walk magic, version, counts and every key/value without building anything: each length
    must fit in the bytes left, each type must be known (what the reader does not check)."""
    size = len(data)
    if size < 24:
        raise _Bad(f"only {size} bytes, shorter than a GGUF header")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version}")
    offset = 24
    if n_kv > (size - offset) // 13:  # key length 8, key >= 1 byte, type 4
        raise _Bad(f"{n_kv} metadata entries cannot fit in {size} bytes")
    if n_tensors > (size - offset) // 25:  # name length 8, name >= 1, n_dims 4, dim 8, type 4
        raise _Bad(f"{n_tensors} tensors cannot fit in {size} bytes")

    def need(count: int, what: str) -> None:
        if count > size - offset:
            raise _Bad(f"{what} at byte {offset} runs past the end of the file")

    def string(what: str) -> bytes:
        nonlocal offset
        need(8, what)
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        need(length, what)
        offset += length
        return bytes(data[offset - length : offset]) if length <= 256 else b""

    def value(kind: int, what: str, nested: bool = False) -> None:
        nonlocal offset
        if kind == _STRING:
            string(what)
        elif kind in _SCALAR_SIZE:
            need(_SCALAR_SIZE[kind], what)
            offset += _SCALAR_SIZE[kind]
        elif kind == _ARRAY and not nested:
            need(12, what)
            item, count = struct.unpack_from("<IQ", data, offset)
            offset += 12
            if item == _STRING:
                need(8 * count, what)
                for _ in range(count):
                    string(what)
            elif item in _SCALAR_SIZE:
                need(_SCALAR_SIZE[item] * count, what)
                offset += _SCALAR_SIZE[item] * count
            else:
                raise _Bad(f"{what} is an array of unknown type {item}")
        else:
            raise _Bad(f"{what} has unknown value type {kind}")

    alignment = 32
    for index in range(n_kv):
        key = string(f"metadata key {index}")
        need(4, f"metadata entry {index}")
        (kind,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if key == b"general.alignment" and kind == 4:  # uint32
            need(4, "general.alignment")
            (alignment,) = struct.unpack_from("<I", data, offset)
        value(kind, f"metadata entry {index}")
    tensors = []
    for index in range(n_tensors):
        string(f"tensor {index} name")
        need(4, f"tensor {index}")
        (n_dims,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {index} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        need(8 * n_dims + 12, f"tensor {index}")
        dims = struct.unpack_from(f"<{n_dims}Q", data, offset)
        kind, start = struct.unpack_from("<IQ", data, offset + 8 * n_dims)
        tensors.append((dims, kind, start))
        offset += 8 * n_dims + 12
    _check_data_end(tensors, offset, alignment, size)


def _check_data_end(tensors, header_end: int, alignment: int, size: int) -> None:
    """The file must hold every tensor's bytes (a cut-off download ends early)."""
    import gguf

    if alignment < 1 or alignment & (alignment - 1):
        return  # the reader names this one
    data_start = -(-header_end // alignment) * alignment
    end = data_start
    known = {int(t) for t in gguf.GGML_QUANT_SIZES}
    for dims, kind, start in tensors:
        if kind not in known:
            continue  # the reader refuses unknown types
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        count = 1
        for d in dims:
            count *= d
        end = max(end, data_start + start + count // block * block_bytes)
    if end > size:
        raise _Bad(f"the file ends at byte {size} but its tensors need {end} bytes (truncated?)")


def _read(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, KeyError, IndexError...
        text = str(exc).strip().splitlines()
        raise _Bad(f"the gguf reader refuses it ({type(exc).__name__}: {text[0][:160] if text else ''})") from None


def _check_tensors(reader, file_size: int) -> None:
    import gguf

    if not reader.tensors:
        raise _Bad("it holds no tensors")
    spans = []
    for tensor in reader.tensors:
        name = tensor.name[:80]
        dims = [int(d) for d in tensor.shape]
        if any(d < 1 for d in dims):
            raise _Bad(f"tensor {name!r} has an empty dimension {dims}")
        block, _ = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        if dims[0] % block:
            raise _Bad(f"tensor {name!r}: rows of {dims[0]} values are not whole blocks of {block}")
        start = int(tensor.data_offset)
        if (start - reader.data_offset) % reader.alignment:
            raise _Bad(f"tensor {name!r} starts at an offset not aligned to {reader.alignment} bytes")
        end = start + int(tensor.n_bytes)
        if end > file_size:
            raise _Bad(f"tensor {name!r} needs bytes {start}..{end}, but the file has {file_size}")
        spans.append((start, end, name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise _Bad(f"tensors {name!r} and {other!r} overlap")


def _scalar(field) -> Any:
    """A field's single value, or None when it is not a scalar number/bool."""
    if len(field.data) != 1 or not field.types or field.types[0] in (_gtype("STRING"), _gtype("ARRAY")):
        return None
    return field.parts[field.data[0]][0]


def _gtype(name: str):
    import gguf

    return getattr(gguf.GGUFValueType, name)


def _numbers(field) -> list:
    """Every number a scalar or numeric-array field holds."""
    if not field.types or field.types[-1] == _gtype("STRING"):
        return []
    return [field.parts[i][0] for i in field.data]


def _is_int(value) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.integer)


def _check_fields(reader) -> None:
    fields = reader.fields
    arch = fields.get("general.architecture")
    if arch is None or arch.types[:1] != [_gtype("STRING")]:
        raise _Bad("it lacks a general.architecture string")
    for key, field in fields.items():
        if key.endswith(_POSITIVE):
            values = _numbers(field)
            # a scalar must be positive; per-layer arrays may hold 0 (layers without attention)
            lowest = 1 if len(values) == 1 else 0
            if not values or any(not _is_int(v) or int(v) < lowest for v in values):
                raise _Bad(f"{key} must be positive whole numbers")
        if key.endswith("layer_norm_rms_epsilon") or key.endswith("layer_norm_epsilon"):
            value = _scalar(field)
            if value is None or not np.isfinite(value) or value < 0:
                raise _Bad(f"{key} must be a non-negative number")
    prefix = f"{bytes(arch.parts[arch.data[0]]).decode('utf-8', 'replace')}."
    heads = _numbers(fields[prefix + "attention.head_count"]) if prefix + "attention.head_count" in fields else []
    heads_kv = _numbers(fields[prefix + "attention.head_count_kv"]) if prefix + "attention.head_count_kv" in fields else []
    if len(heads_kv) == 1:
        heads_kv = heads_kv * len(heads)
    for h, kv in zip(heads, heads_kv):
        if int(h) and int(kv) and int(h) % int(kv):
            raise _Bad(f"{int(h)} attention heads cannot be shared by {int(kv)} key/value heads")
    embd = fields.get(prefix + "embedding_length")
    if len(heads) == 1 and embd is not None and prefix + "attention.key_length" not in fields:
        if int(_numbers(embd)[0]) % int(heads[0]):
            raise _Bad(f"embedding length {int(_numbers(embd)[0])} is not divisible by {int(heads[0])} heads")
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if tokens.types != [_gtype("ARRAY"), _gtype("STRING")] or not tokens.data:
            raise _Bad("tokenizer.ggml.tokens must be a non-empty list of strings")
        n_tokens = len(tokens.data)
        if len({bytes(tokens.parts[i]) for i in tokens.data}) != n_tokens:  # llama.cpp aborts on these
            raise _Bad("tokenizer.ggml.tokens lists a token twice")
        for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in fields and len(fields[key].data) != n_tokens:
                raise _Bad(f"{key} has {len(fields[key].data)} entries for {n_tokens} tokens")


def vocab_fingerprint(path: str | Path) -> str:
    """The vocabulary fingerprint (:func:`sali.vocab.fingerprint`) of a GGUF's token list, read
    without llama.cpp; equal to :attr:`sali.runtime.Model.fingerprint` of the loaded model."""
    from sali.vocab import fingerprint

    check_gguf(path)
    field = _read(Path(path)).fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise SaliError(f"{path} has no token list (tokenizer.ggml.tokens)")
    return fingerprint([bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data])
