"""Hugging Face tokenizer -> GGUF ``tokenizer.ggml.*`` metadata that llama.cpp reads.

Two tokenizer families are supported:

- byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM): llama.cpp model ``gpt2`` with merges and a
  pre-tokenizer name (``tokenizer.ggml.pre``) telling llama.cpp which split regex to use;
- SentencePiece (Llama-2, Mistral-v0.1): llama.cpp model ``llama`` with per-piece scores,
  read from ``tokenizer.model``.

The token list is always :func:`sali.vocab.hf_token_list` padded to the model's vocabulary
size, so a fingerprint of the GGUF's tokens equals the one of the Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from sali.errors import SaliError
from sali.vocab import hf_token_list

# tokenizer.json Split regexes -> llama.cpp pre-tokenizer names (llama.cpp matches these
# names to its own copy of the regex in llama-vocab.cpp).
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}

_PAD_SCORE = -1000.0  # score of added and padding pieces in a SentencePiece vocabulary


def add_vocab(writer: gguf.GGUFWriter, tokenizer, vocab_size: int,
              spm_model: Path | None = None, pre: str | None = None) -> None:
    """Write the tokenizer of a checkpoint into `writer`.

    `tokenizer` is a loaded transformers tokenizer, `vocab_size` the number of embedding rows
    (the GGUF token list gets exactly that many entries), `spm_model` the checkpoint's
    ``tokenizer.model`` if it has one, `pre` an explicit llama.cpp pre-tokenizer name that
    overrides detection (byte-level BPE only).
    """
    tokens = hf_token_list(tokenizer, vocab_size)
    if len(tokens) != vocab_size:
        raise SaliError(
            f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embedding rows"
        )
    spec = _backend_spec(tokenizer)
    if spec is not None and spec["model"]["type"] == "BPE" and _is_byte_level(spec):
        _add_bpe(writer, tokenizer, tokens, spec, pre)
    elif spm_model is not None and spm_model.is_file():
        _add_spm(writer, tokenizer, tokens, spm_model)
    else:
        raise SaliError(
            "unsupported tokenizer: sali converts byte-level BPE (tokenizer.json) "
            "and SentencePiece (tokenizer.model) tokenizers"
        )
    _add_special(writer, tokenizer)


def _backend_spec(tokenizer) -> dict | None:
    """The tokenizer.json structure of a fast tokenizer, or None for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def _steps(component: dict | None) -> list[dict]:
    """Flatten a tokenizer.json component (a single step or a ``Sequence``) into its steps."""
    if not component:
        return []
    if component["type"] == "Sequence":
        inner = component.get("pretokenizers") or component.get("decoders") or []
        return [step for part in inner for step in _steps(part)]
    return [component]


def _is_byte_level(spec: dict) -> bool:
    steps = _steps(spec.get("pre_tokenizer")) + _steps(spec.get("decoder"))
    return any(step["type"] == "ByteLevel" for step in steps)


def detect_pre(spec: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or None if unknown.

    Plain GPT-2 ``ByteLevel`` -> ``gpt-2``; one-digit ``Digits`` then ``ByteLevel`` ->
    ``smollm`` (SmolLM/SmolLM2); a ``Split`` with the Llama-3 or Qwen2 regex then a
    regex-free ``ByteLevel`` -> ``llama-bpe`` or ``qwen2``.
    """
    steps = _steps(spec.get("pre_tokenizer"))
    kinds = [step["type"] for step in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] != ["ByteLevel"] or last.get("add_prefix_space", False):
        return None
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and last.get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        return _SPLIT_PATTERNS.get(pattern)
    return None


def _add_bpe(writer, tokenizer, tokens: list[str], spec: dict, pre: str | None) -> None:
    pre = pre or detect_pre(spec)
    if pre is None:
        raise SaliError(
            "cannot tell which llama.cpp pre-tokenizer this byte-level BPE tokenizer needs; "
            "pass pre=NAME (e.g. gpt-2, llama-bpe, qwen2, smollm)"
        )
    added = tokenizer.added_tokens_decoder
    real_ids = set(tokenizer.get_vocab().values())  # the other ids are vocabulary padding
    types = []
    for token_id in range(len(tokens)):
        if token_id in added:
            special = added[token_id].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif token_id in real_ids:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _add_spm(writer, tokenizer, tokens: list[str], spm_model: Path) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    n_pieces = sp.get_piece_size()
    added = tokenizer.added_tokens_decoder
    scores, types = [], []
    for token_id, token in enumerate(tokens):
        if token_id < n_pieces:
            if sp.id_to_piece(token_id) != token:
                raise SaliError(
                    f"tokenizer.model and the tokenizer disagree on token {token_id} "
                    f"({sp.id_to_piece(token_id)!r} vs {token!r})"
                )
            scores.append(sp.get_score(token_id))
            types.append(_spm_type(sp, token_id))
        else:
            scores.append(_PAD_SCORE)
            if token_id in added:
                special = added[token_id].special
                types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # SentencePiece's add_dummy_prefix shows as a leading "▁" on the first piece of a word
    writer.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith("\u2581"))


def _spm_type(sp, token_id: int) -> gguf.TokenType:
    if sp.is_unknown(token_id):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(token_id):
        return gguf.TokenType.CONTROL
    if sp.is_unused(token_id):
        return gguf.TokenType.UNUSED
    if sp.is_byte(token_id):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _add_special(writer, tokenizer) -> None:
    """Special token ids, whether encoding adds bos/eos, and the chat template."""
    ids = {
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
    }
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, token_id in ids.items():
        if token_id is not None:
            setters[kind](token_id)
    # Ask the tokenizer rather than its config: the flags live in different places per class.
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    adds_bos = len(full) > len(plain) and ids["bos"] is not None and full[0] == ids["bos"]
    adds_eos = len(full) > len(plain) and ids["eos"] is not None and full[-1] == ids["eos"]
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)
