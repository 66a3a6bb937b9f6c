"""Check a GGUF file before llama.cpp sees it, so a damaged file gives one line, not a crash.

llama.cpp trusts much of what a GGUF header says: a flipped bit in a count, a tensor offset or a
head count can make it read past the end of the mapping, divide by zero or abort on an assertion
(a signal, no message). :func:`check_gguf` reads the whole header once (memory-mapped, tensor
data never touched) and refuses, with one :class:`~sali.errors.SaliError` line:

1. what a GGUF reader refuses: bad magic or version, counts and lengths running past the end of
   the file, unknown value or tensor types (the ``gguf`` package's own enums and block sizes),
   duplicate keys or tensor names, a bad ``general.alignment``;
2. what a reader accepts but llama.cpp should never be handed: tensors whose data lies outside
   the file (a cut-off download) or overlaps another tensor's, rows that are not whole
   quantisation blocks, more than 4 dimensions, misaligned offsets, zero or non-integer model
   sizes (block count, embedding length, head counts that do not divide), token tables whose
   lengths disagree or that list a token twice (llama.cpp aborts on an assertion).

The ``gguf`` package's :class:`gguf.GGUFReader` parses the same header (the tests check that
both agree), but it builds NumPy views of every array element: over a 49k-token vocabulary that
took 15 s on a loaded 2-core machine, against well under a second for this walk, and the check
runs before every model load.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sali.errors import SaliError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
# gguf.GGUFValueType: id -> struct format of one scalar; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_KEEP = 1 << 22  # array elements kept in memory for the checks below (token lists are longer)
# model sizes llama.cpp divides by or allocates with: must be positive whole numbers
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: llama.cpp aborts on more
# types llama.cpp can hold but not compute a model with (integer tensors, F64, the dot-product-only
# Q8_1 / Q8_K): a weight of one of these aborts in the first matrix product
_NOT_WEIGHTS = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}
_POSITIVE = (".block_count", ".embedding_length", ".context_length", ".feed_forward_length",
             ".attention.head_count", ".attention.head_count_kv", ".attention.key_length",
             ".attention.value_length", ".vocab_size")


class _Bad(Exception):
    """A reason a GGUF file is refused (turned into one SaliError line)."""


@dataclass
class Header:
    """What :func:`read_header` found: ``fields`` maps a key to its value (a number, ``bytes``
    for a string, a list for an array); ``tensors`` holds ``(name, dims, type id, offset)``;
    ``data_offset`` is where tensor data starts."""

    fields: dict[str, Any] = field(default_factory=dict)
    types: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key -> (type,) or (9, item type)
    tensors: list[tuple[str, tuple[int, ...], int, int]] = field(default_factory=list)
    alignment: int = 32
    data_offset: int = 0
    size: int = 0


def check_gguf(path: str | Path) -> Header:
    """Raise :class:`SaliError` (one line naming `path`) unless `path` is a GGUF file that
    llama.cpp can be handed safely (see the module docstring); returns its header."""
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
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                header = read_header(data)
            _check_tensors(header)
            _check_fields(header)
        except _Bad as exc:
            raise SaliError(f"{path} is a damaged GGUF file: {exc}; download or convert it again") from None
    return header


def read_header(data) -> Header:
    """Parse the header of the GGUF bytes `data` (any buffer), checking every length against the
    bytes left and every type against the known ones. Raises ``_Bad``."""
    size = len(data)
    if size < 24:
        raise _Bad(f"only {size} bytes, shorter than a GGUF header")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version}")
    if n_kv > (size - 24) // 13:  # key length 8, key >= 1 byte, type 4
        raise _Bad(f"{n_kv} metadata entries cannot fit in {size} bytes")
    if n_tensors > (size - 24) // 25:  # name length 8, name >= 1, n_dims 4, dim 8, type 4, offset 8
        raise _Bad(f"{n_tensors} tensors cannot fit in {size} bytes")
    header = Header(size=size)
    offset = 24
    unpack = struct.unpack_from

    def string(what: str) -> bytes:
        nonlocal offset
        if offset + 8 > size:
            raise _Bad(f"{what} runs past the end of the file")
        (length,) = unpack("<Q", data, offset)
        end = offset + 8 + length
        if end > size:
            raise _Bad(f"{what} runs past the end of the file")
        text = data[offset + 8 : end]
        offset = end
        return text

    def scalar(kind: int, what: str):
        nonlocal offset
        fmt = "<" + _SCALARS[kind]
        width = struct.calcsize(fmt)
        if offset + width > size:
            raise _Bad(f"{what} runs past the end of the file")
        (value,) = unpack(fmt, data, offset)
        offset += width
        return value

    for index in range(n_kv):
        key_bytes = string(f"metadata key {index}")
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"metadata key {index} is not UTF-8 text") from None
        if key in header.fields:
            raise _Bad(f"metadata key {key[:80]!r} appears twice")
        kind = scalar(4, f"metadata entry {key[:80]!r}")
        what = f"metadata entry {key[:80]!r}"
        if kind == _STRING:
            header.fields[key], header.types[key] = string(what), (kind,)
        elif kind in _SCALARS:
            header.fields[key], header.types[key] = scalar(kind, what), (kind,)
        elif kind == _ARRAY:
            item, count = scalar(4, what), scalar(10, what)
            header.types[key] = (kind, item)
            if item == _STRING:
                if count * 8 > size - offset:
                    raise _Bad(f"{what} holds more strings than the file has bytes")
                # the hot loop of the whole check (token lists, merges): kept flat
                keep = key == "tokenizer.ggml.tokens"
                values = []
                append = values.append
                for _ in range(count):
                    if offset + 8 > size:
                        raise _Bad(f"{what} runs past the end of the file")
                    start = offset + 8
                    offset = start + unpack("<Q", data, offset)[0]
                    if offset > size:
                        raise _Bad(f"{what} runs past the end of the file")
                    append(data[start:offset] if keep else None)
            elif item in _SCALARS:
                width = struct.calcsize("<" + _SCALARS[item])
                if count * width > size - offset:
                    raise _Bad(f"{what} runs past the end of the file")
                kept = min(count, _KEEP)
                values = list(unpack(f"<{kept}{_SCALARS[item]}", data, offset))
                offset += count * width
            else:
                raise _Bad(f"{what} is an array of unknown or nested type {item}")
            header.fields[key] = values
        else:
            raise _Bad(f"{what} has unknown value type {kind}")
    alignment = header.fields.get("general.alignment", 32)
    if header.types.get("general.alignment", (4,)) != (4,) or alignment < 1 or alignment & (alignment - 1):
        raise _Bad("general.alignment must be a power of two (uint32)")
    header.alignment = alignment
    names = set()
    for index in range(n_tensors):
        name_bytes = string(f"tensor {index} name")
        name = name_bytes.decode("utf-8", "replace")
        if name in names:
            raise _Bad(f"tensor {name[:80]!r} appears twice")
        names.add(name)
        n_dims = scalar(4, f"tensor {name[:80]!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name[:80]!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        if offset + 8 * n_dims + 12 > size:
            raise _Bad(f"tensor {name[:80]!r} runs past the end of the file")
        dims = unpack(f"<{n_dims}Q", data, offset)
        kind, start = unpack("<IQ", data, offset + 8 * n_dims)
        offset += 8 * n_dims + 12
        header.tensors.append((name, dims, kind, start))
    header.data_offset = -(-offset // alignment) * alignment
    return header


def _check_tensors(header: Header) -> None:
    import gguf

    if not header.tensors:
        raise _Bad("it holds no tensors")
    known = {int(t): t for t in gguf.GGMLQuantizationType}
    spans = []
    for name, dims, kind, start in header.tensors:
        name = name[:80]
        if kind not in known or known[kind] not in gguf.GGML_QUANT_SIZES:
            raise _Bad(f"tensor {name!r} has unknown type {kind}")
        if known[kind].name in _NOT_WEIGHTS:
            raise _Bad(f"tensor {name!r} has type {known[kind].name}, which no model weight can have")
        if any(d < 1 for d in dims):
            raise _Bad(f"tensor {name!r} has an empty dimension {list(dims)}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[known[kind]]
        if dims[0] % block:
            raise _Bad(f"tensor {name!r}: rows of {dims[0]} values are not whole blocks of {block}")
        if start % header.alignment:
            raise _Bad(f"tensor {name!r} starts at an offset not aligned to {header.alignment} bytes")
        count = 1
        for d in dims:
            count *= d
        begin = header.data_offset + start
        end = begin + count // block * block_bytes
        if end > header.size:
            raise _Bad(f"the file ends at byte {header.size} but tensor {name!r} needs bytes up to {end} (truncated?)")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise _Bad(f"tensors {name!r} and {other!r} overlap")


def _numbers(header: Header, key: str) -> list:
    """The numbers a scalar or numeric-array field holds (empty for strings)."""
    value = header.fields[key]
    kinds = header.types[key]
    if kinds[-1] == _STRING:
        return []
    return list(value) if isinstance(value, list) else [value]


def kv_cache_bytes_per_token(header: Header) -> int | None:
    """Bytes of llama.cpp's default (f16) KV cache per context position, from the header's
    layer count, key/value heads and head sizes; None when a field it needs is missing."""
    arch = header.fields.get("general.architecture")
    if not isinstance(arch, bytes):
        return None
    arch = arch.decode("utf-8", "replace")

    def largest(key: str, default: int | None = None) -> int:
        """The field's largest number (per-layer arrays included); `default` when it is absent."""
        if default is not None and f"{arch}.{key}" not in header.fields:
            return default
        return max(_numbers(header, f"{arch}.{key}"))

    try:
        layers, heads = largest("block_count"), largest("attention.head_count")
        kv_heads = largest("attention.head_count_kv", heads)
        head_size = largest("embedding_length") // heads
        key, value = largest("attention.key_length", head_size), largest("attention.value_length", head_size)
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return None
    return int(layers * kv_heads * (key + value) * 2)


def _is_count(value, lowest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


def _check_fields(header: Header) -> None:
    fields = header.fields
    arch = fields.get("general.architecture")
    if not isinstance(arch, bytes):
        raise _Bad("it lacks a general.architecture string")
    for key in fields:
        if key.endswith(_POSITIVE):
            values = _numbers(header, key)
            # a scalar must be positive; per-layer arrays may hold 0 (layers without attention)
            lowest = 1 if not isinstance(fields[key], list) else 0
            if not values or not all(_is_count(v, lowest) for v in values):
                raise _Bad(f"{key} must be positive whole numbers")
        if key.endswith(("layer_norm_rms_epsilon", "layer_norm_epsilon")):
            value = fields[key]
            if isinstance(value, (list, bytes)) or not (0 <= value < float("inf")):
                raise _Bad(f"{key} must be a non-negative number")
    prefix = arch.decode("utf-8", "replace") + "."
    layers = fields.get(prefix + "block_count")
    if isinstance(layers, int) and layers > MAX_LAYERS:
        raise _Bad(f"{prefix}block_count is {layers}; llama.cpp holds at most {MAX_LAYERS} layers")
    heads = _numbers(header, prefix + "attention.head_count") if prefix + "attention.head_count" in fields else []
    heads_kv = _numbers(header, prefix + "attention.head_count_kv") if prefix + "attention.head_count_kv" in fields else []
    if len(heads_kv) == 1:
        heads_kv = heads_kv * len(heads)
    for h, kv in zip(heads, heads_kv):
        if h and kv and h % kv:
            raise _Bad(f"{h} attention heads cannot be shared by {kv} key/value heads")
    width = fields.get(prefix + "embedding_length")
    if len(heads) == 1 and isinstance(width, int) and prefix + "attention.key_length" not in fields and width % heads[0]:
        raise _Bad(f"embedding length {width} is not divisible by {heads[0]} heads")
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if header.types["tokenizer.ggml.tokens"] != (_ARRAY, _STRING) or not tokens:
            raise _Bad("tokenizer.ggml.tokens must be a non-empty list of strings")
        if len(set(tokens)) != len(tokens):  # llama.cpp aborts on an assertion
            raise _Bad("tokenizer.ggml.tokens lists a token twice")
        for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in fields and (not isinstance(fields[key], list) or len(fields[key]) != len(tokens)):
                raise _Bad(f"{key} has {len(fields[key]) if isinstance(fields[key], list) else 1} entries for {len(tokens)} tokens")


def vocab_fingerprint(path: str | Path) -> str:
    """The vocabulary fingerprint (:func:`sali.vocab.fingerprint`) of a GGUF's token list, read
    without llama.cpp; equal to :attr:`sali.runtime.Model.fingerprint` of the loaded model."""
    from sali.vocab import fingerprint

    tokens = check_gguf(path).fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise SaliError(f"{path} has no token list (tokenizer.ggml.tokens)")
    return fingerprint([token.decode("utf-8", "surrogateescape") for token in tokens])
