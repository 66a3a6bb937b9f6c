"""Vocabulary fingerprints: one short hash of a tokenizer's token list.

A head reads and writes logits by token id, so it only makes sense on a model whose
id -> token-string table is identical to the one it was trained with. The fingerprint is
computed the same way from a Hugging Face tokenizer (trainer, converter) and from a GGUF's
``tokenizer.ggml.tokens`` (runtime), so the two can be compared.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def pad_token_name(token_id: int) -> str:
    """Name given to an embedding row that has no token in the tokenizer (vocab padding)."""
    return f"[PAD{token_id}]"


def fingerprint(tokens: Sequence[str]) -> str:
    """Return ``"v<N>-<16 hex>"``: vocabulary size plus a SHA-256 prefix of the token strings.

    Tokens are the raw vocabulary strings (e.g. ``"Ġthe"`` for byte-level BPE, ``"▁the"`` for
    SentencePiece), in id order, including special and padding tokens.
    """
    digest = hashlib.sha256()
    for token in tokens:
        digest.update(token.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return f"v{len(tokens)}-{digest.hexdigest()[:16]}"


def hf_token_list(tokenizer, vocab_size: int | None = None) -> list[str]:
    """Token strings of a Hugging Face tokenizer in id order, padded to `vocab_size`.

    Ids with no token (the model's embedding is larger than the tokenizer) get
    :func:`pad_token_name`, as the GGUF converter writes them.
    """
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    size = max(vocab_size or 0, max(by_id) + 1)
    return [by_id.get(i, pad_token_name(i)) for i in range(size)]
