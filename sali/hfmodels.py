"""Loading Hugging Face models and tokenizers for training: local folders, cached ids, GGUF files.

No code from a model folder runs unless ``trust_remote_code`` is set. Nothing is downloaded:
everything loads with ``local_files_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sali.errors import SaliError
from sali.vocab import fingerprint, hf_token_list


@dataclass
class Source:
    """Where a model comes from: ``folder`` (a local folder or cached hub id) and optional ``gguf_file``."""

    spec: str
    folder: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def name(self) -> str:
        """A short name for tables and metadata: the file or folder name, or the hub id."""
        if self.gguf_file:
            return Path(self.gguf_file).name
        path = Path(self.spec).expanduser()
        return path.resolve().name if path.exists() else self.spec


def resolve(spec: str) -> Source:
    """A local folder, a ``.gguf`` file, or a model id already in the local Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Source(spec, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SaliError(f"{spec}: not a Hugging Face model folder (no config.json)")
        return Source(spec, str(path))
    if path.exists():
        raise SaliError(f"{spec}: expected a model folder or a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(spec, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means: not in the local cache
            raise SaliError(f"{spec}: not a local folder and not in the local Hugging Face cache (sali never downloads)") from None
        return Source(spec, folder)
    raise SaliError(f"model not found: {spec}")


def quiet_transformers() -> None:
    """sali draws its own progress bars; silence transformers' loading bars and warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()

    try:
        return AutoTokenizer.from_pretrained(
            source.folder, local_files_only=True, trust_remote_code=trust_remote_code, **source.kwargs
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise SaliError(f"{source.spec}: could not load its tokenizer ({_first_line(exc)})") from None


def load_config(source: Source, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.folder, local_files_only=True, trust_remote_code=trust_remote_code, **source.kwargs)
    except Exception as exc:  # noqa: BLE001
        raise SaliError(f"{source.spec}: could not read its model config ({_first_line(exc)})") from None


def vocab_fingerprint(tokenizer, config) -> str:
    """The fingerprint of the token list padded to the model's embedding size (as in the GGUF)."""
    vocab_size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    return fingerprint(hf_token_list(tokenizer, vocab_size))


def load_model(
    source: Source,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM in eval mode. ``device_map="auto"`` spreads it over the devices (accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    placement = {"device_map": device_map} if device_map else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.folder,
            dtype=torch_dtype,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            **placement,
            **source.kwargs,
        )
    except Exception as exc:  # noqa: BLE001
        raise SaliError(f"{source.spec}: could not load the model ({_first_line(exc)})") from None
    if not device_map:
        model = model.to(device)
    return model.eval()


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise SaliError("--device cuda: no CUDA device is available")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise SaliError("--device mps: Metal (MPS) is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
