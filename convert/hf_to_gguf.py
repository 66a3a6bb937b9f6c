"""Hugging Face causal-LM checkpoint -> GGUF file that llama.cpp loads.

    convert_checkpoint("SmolLM2-135M-Instruct/", "smollm2.gguf", "q8_0")

Llama-family architectures only (see :data:`ARCHITECTURES`). Tensors are streamed: the file's
header is written from the tensor shapes, then each tensor is loaded, converted and written
in turn, so memory holds one tensor at a time (plus what the checkpoint loader maps).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from sali.atomic import atomic_path
from sali.errors import SaliError

from .gguf_vocab import add_vocab

ARCHITECTURES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}

OUTTYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

Progress = Callable[[int, int], None]


@dataclass
class _Source:
    """One checkpoint tensor: its Hugging Face name, shape, and how to load it (a torch tensor)."""

    name: str
    shape: tuple[int, ...]
    load: Callable


def convert_checkpoint(hf_dir, out_path, outtype: str = "f16", *, pre: str | None = None,
                       progress: Progress | None = None) -> Path:
    """Convert the checkpoint folder `hf_dir` (config.json, weights, tokenizer) to `out_path`.

    `outtype` is ``f32``, ``f16`` or ``q8_0`` (1-D tensors always stay f32). `pre` overrides the
    detected llama.cpp pre-tokenizer name of a byte-level BPE tokenizer. `progress` is called
    with (tensors written, total tensors). Returns the output path.
    """
    folder = Path(hf_dir)
    if not (folder / "config.json").is_file():
        raise SaliError(f"{folder} is not a Hugging Face checkpoint: it has no config.json")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    _architecture(config)  # fail on the architecture before loading anything heavy
    tokenizer = _load_tokenizer(folder)
    return _write(config, _checkpoint_tensors(folder), tokenizer, out_path, outtype,
                  name=folder.resolve().name, spm_model=folder / "tokenizer.model",
                  pre=pre, progress=progress)


def convert_model(model, tokenizer, out_path, outtype: str = "f16", *, name: str | None = None,
                  spm_model: str | Path | None = None, pre: str | None = None,
                  progress: Progress | None = None) -> Path:
    """Convert a transformers model and tokenizer held in memory (e.g. fine-tuned) to a GGUF.

    `name` becomes ``general.name`` and ``sali.source`` (default: the folder the model was
    loaded from). A SentencePiece tokenizer needs its ``tokenizer.model``: `spm_model`, or the
    one in the folder the tokenizer was loaded from. A tokenizer that transformers rebuilt from
    a GGUF can lack pre-tokenizer steps (SmolLM2 loses its digit split): pass the source GGUF's
    ``tokenizer.ggml.pre`` as `pre`. Other arguments as in :func:`convert_checkpoint`.
    """
    config = model.config.to_dict()
    if not config.get("architectures"):  # e.g. a model transformers loaded from a GGUF
        config["architectures"] = [type(model).__name__]
    _architecture(config)
    tensors = [_Source(key, tuple(value.shape), lambda value=value: value)
               for key, value in model.state_dict().items()]
    loaded_from = getattr(tokenizer, "name_or_path", "")
    if spm_model is not None:
        spm_model = Path(spm_model)
    elif loaded_from:
        spm_model = Path(loaded_from) / "tokenizer.model"
    name = name or Path(config.get("_name_or_path") or "model").name
    return _write(config, tensors, tokenizer, out_path, outtype, name=name,
                  spm_model=spm_model, pre=pre, progress=progress)


def _architecture(config: dict) -> gguf.MODEL_ARCH:
    names = config.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        shown = ", ".join(names) or "none given in config.json"
        raise SaliError(
            f"unsupported architecture ({shown}); sali converts {', '.join(ARCHITECTURES)}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise SaliError(f"unsupported activation {config['hidden_act']!r}; llama.cpp expects silu")
    return ARCHITECTURES[names[0]]


def _load_tokenizer(folder: Path):
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise SaliError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        raise SaliError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def _checkpoint_tensors(folder: Path) -> list[_Source]:
    """The tensors of a safetensors or PyTorch-pickle checkpoint (sharded or not), unloaded."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            continue
        read = _safetensors if single.endswith(".safetensors") else _pickle
        return [tensor for path in files for tensor in read(path)]
    raise SaliError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")


def _safetensors(path: Path) -> list[_Source]:
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    return [_Source(key, tuple(handle.get_slice(key).get_shape()),
                    lambda key=key: handle.get_tensor(key)) for key in handle.keys()]


def _pickle(path: Path) -> list[_Source]:
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickles that run code, among others
        raise SaliError(f"cannot read the weights in {path}: {exc}") from exc
    return [_Source(key, tuple(value.shape), lambda value=value: value)
            for key, value in state.items()]


@dataclass
class _HParams:
    """The numbers llama.cpp needs, read from a config.json dict."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    n_vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> "_HParams":
        n_head = config["num_attention_heads"]
        # transformers >= 5 keeps rope settings in rope_parameters, older ones at the top level
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or rope
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return cls(
            n_layer=config["num_hidden_layers"],
            n_embd=config["hidden_size"],
            n_ff=config["intermediate_size"],
            n_head=n_head,
            n_head_kv=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            n_ctx=config.get("max_position_embeddings", 2048),
            n_vocab=config["vocab_size"],
            rms_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            rope_scaling=None if kind == "default" else {**scaling, "rope_type": kind},
            tied=bool(config.get("tie_word_embeddings", False)),
        )


def _write(config: dict, sources: list[_Source], tokenizer, out_path, outtype: str, *,
           name: str, spm_model: Path | None, pre: str | None,
           progress: Progress | None) -> Path:
    if outtype not in OUTTYPES:
        raise SaliError(f"unknown output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    arch = _architecture(config)
    try:
        hp = _HParams.from_config(config)
    except KeyError as exc:
        raise SaliError(f"the model config lacks {exc.args[0]!r}") from exc
    tensors = _plan_tensors(sources, arch, hp, outtype)
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            _add_metadata(writer, hp, name, outtype)
            add_vocab(writer, tokenizer, hp.n_vocab, spm_model=spm_model, pre=pre)
            for gguf_name, shape, qtype, _ in tensors:
                writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32),
                                       _nbytes(shape, qtype), raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            if progress:
                progress(0, len(tensors))
            for done, (_, _, qtype, load) in enumerate(tensors, start=1):
                writer.write_tensor_data(_encode(load(), qtype))
                if progress:
                    progress(done, len(tensors))
        finally:
            writer.close()
    return out_path


def _add_metadata(writer: gguf.GGUFWriter, hp: _HParams, name: str, outtype: str) -> None:
    writer.add_name(name)
    writer.add_string("sali.source", name)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_vocab_size(hp.n_vocab)
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope_scaling["factor"])
    writer.add_file_type(OUTTYPES[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _plan_tensors(sources: list[_Source], arch: gguf.MODEL_ARCH, hp: _HParams, outtype: str):
    """[(gguf name, shape, GGML type, loader returning float32 numpy)] in writing order."""
    names = gguf.get_tensor_name_map(arch, hp.n_layer)
    plan = []
    for source in sources:
        if source.name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer recomputed from rope_theta, not a weight
        if source.name == "lm_head.weight" and hp.tied:
            continue  # tied: llama.cpp reuses token_embd when there is no output tensor
        gguf_name = names.get_name(source.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SaliError(f"cannot convert tensor {source.name!r}: llama.cpp has no place for it")
        if gguf_name == "token_embd.weight" and source.shape[0] != hp.n_vocab:
            raise SaliError(f"embedding has {source.shape[0]} rows but vocab_size is {hp.n_vocab}")
        load = _loader(source, _rows_permutation(source.name, arch, hp))
        plan.append((gguf_name, source.shape, _ggml_type(source.shape, outtype), load))
    if hp.rope_scaling and hp.rope_scaling["rope_type"] != "linear":
        plan.append(_rope_freqs(hp))
    return plan


def _rows_permutation(hf_name: str, arch: gguf.MODEL_ARCH, hp: _HParams) -> int | None:
    """Head count whose q/k rows need reordering, or None.

    HF Llama rotates dimension i of each head with i + head_dim/2 ("rotate half"), llama.cpp's
    LLAMA arch rotates neighbours 2i and 2i+1; reordering the rows of q and k makes the same
    pairs neighbours. Qwen2 runs with llama.cpp's rotate-half (NEOX) rope and needs nothing.
    """
    if arch != gguf.MODEL_ARCH.LLAMA:
        return None
    if ".q_proj." in hf_name:
        return hp.n_head
    if ".k_proj." in hf_name:
        return hp.n_head_kv
    return None


def _loader(source: _Source, permute_heads: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import torch

        data = source.load().detach().to("cpu", torch.float32).numpy()
        if permute_heads:
            rest = data.shape[1:]
            data = data.reshape(permute_heads, 2, -1, *rest).swapaxes(1, 2).reshape(data.shape)
        return data

    return load


def _ggml_type(shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """F32 for 1-D tensors and f32 output; Q8_0 for 2-D rows of whole 32-blocks; else F16."""
    if len(shape) == 1 or outtype == "f32":
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if outtype == "q8_0" and len(shape) == 2 and shape[-1] % block == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * block_bytes


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _rope_freqs(hp: _HParams):
    """Llama-3 rope scaling as llama.cpp wants it: a per-frequency divisor tensor (head_dim/2)."""
    scaling = hp.rope_scaling
    if scaling["rope_type"] != "llama3":
        raise SaliError(
            f"unsupported rope scaling {scaling['rope_type']!r}; sali handles linear and llama3"
        )
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    freqs = hp.rope_theta ** -(np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    # smooth = 1: short waves, unscaled; smooth = 0: long waves, divided by factor
    divisor = (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return name, divisor.shape, gguf.GGMLQuantizationType.F32, lambda: divisor
