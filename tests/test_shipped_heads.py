"""The heads shipped in heads/: valid files, small, for the vocabulary they claim, documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from sali.head import Head
from sali.session import resolve_head_path, shipped_heads

HEADS = Path(__file__).resolve().parent.parent / "heads"
SMOLLM2_VOCAB = "v49152-4ca839f11927b889"  # SmolLM2-135M-Instruct's token list, as llama.cpp reads it


def test_smollm2_safety_head_is_shipped_and_found_by_name():
    assert "smollm2-135m-safety" in shipped_heads()
    assert resolve_head_path("smollm2-135m-safety") == HEADS / "smollm2-135m-safety.npz"


@pytest.mark.parametrize("path", sorted(HEADS.glob("*.npz")), ids=lambda p: p.stem)
def test_shipped_head_is_valid_small_and_documented(path):
    head = Head.load(path)
    assert path.stat().st_size <= 8_000_000
    assert head.meta["training"]["positions"] > 1000
    card = (HEADS / "README.md").read_text(encoding="utf-8")
    assert f"## {path.stem}" in card
    if path.stem.startswith("smollm2-135m"):
        assert head.fingerprint == SMOLLM2_VOCAB
