"""Merge a white-box head into a GGUF: a copy of the base with ``output.weight = W_out + P Q^T``.

Every metadata field and tensor is copied unchanged (quantized tensors byte for byte), except
the output projection, which is written in float16 (float32 if the base stored it so). A base
with tied embeddings gets its own ``output.weight``, which llama.cpp then uses instead of the
token embedding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sali.atomic import atomic_path
from sali.errors import SaliError
from sali.head import LMHead
from sali.vocab import fingerprint

OUTPUT = "output.weight"
EMBEDDING = "token_embd.weight"
SKIP_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture")


def merge_lmhead(base_gguf: str | Path, head_path: str | Path, out: str | Path, alpha: float = 1.0, progress=None) -> Path:
    """Write `out`: `base_gguf` with the head's delta (times `alpha`) merged into its output matrix."""
    import gguf

    from sali.ggufcheck import check_gguf

    base_gguf, out = Path(base_gguf), Path(out)
    check_gguf(base_gguf)
    head = LMHead.load(head_path)
    try:
        reader = gguf.GGUFReader(base_gguf)
    except Exception as exc:  # noqa: BLE001 - the reader raises many types on bad files
        raise SaliError(f"{base_gguf}: unreadable GGUF ({exc})") from None
    tokens = [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for f in [reader.fields["tokenizer.ggml.tokens"]] for i in f.data]
    model_fp = fingerprint(tokens)
    if model_fp != head.fingerprint:
        raise SaliError(f"{head_path} was trained for vocabulary {head.fingerprint}, but {base_gguf.name} has {model_fp}")
    tensors = {t.name: t for t in reader.tensors}
    source = tensors.get(OUTPUT) or tensors.get(EMBEDDING)
    if source is None:
        raise SaliError(f"{base_gguf.name} has neither {OUTPUT} nor {EMBEDDING}")
    weight = gguf.quants.dequantize(source.data, source.tensor_type).reshape(int(source.shape[1]), int(source.shape[0]))
    if weight.shape != (head.P.shape[0], head.Q.shape[0]):
        raise SaliError(f"{base_gguf.name}: output matrix {weight.shape} does not match the head ({head.P.shape[0]}, {head.Q.shape[0]})")
    merged = weight.astype(np.float32) + np.float32(alpha) * head.delta()
    out_type = np.float32 if source.tensor_type == gguf.GGMLQuantizationType.F32 else np.float16
    arch = str(reader.fields["general.architecture"].contents())
    with atomic_path(out, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            for field in reader.fields.values():
                if field.name in SKIP_FIELDS:
                    continue
                value_type = field.types[0]
                sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
            writer.add_string("sali.merged_head", Path(head_path).name)
            writer.add_float32("sali.merged_alpha", float(alpha))
            for tensor in reader.tensors:
                if tensor.name == OUTPUT:
                    continue
                writer.add_tensor(tensor.name, tensor.data, raw_shape=_raw_shape(tensor), raw_dtype=tensor.tensor_type)
            writer.add_tensor(OUTPUT, merged.astype(out_type))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()
    return out


def _raw_shape(tensor) -> list[int]:
    """The shape `GGUFWriter.add_tensor` expects for raw data: the stored array's own shape."""
    return list(tensor.data.shape)
