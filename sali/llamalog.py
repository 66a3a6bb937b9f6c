"""llama.cpp's own reason when it refuses a model, captured from its log.

llama.cpp reports why a load failed (unknown architecture, a tensor of the wrong shape, a buffer
it could not allocate) only in its log; llama-cpp-python then raises a bare "Failed to load model
from file". :func:`capture_errors` records the error-level log lines while a model loads, and
:func:`load_error` turns them into one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from pathlib import Path
from typing import Iterator

from sali.errors import SaliError

_ERROR, _CONTINUE = 4, 5  # ggml_log_level values (0 none, 1 debug, 2 info, 3 warn, 4 error, 5 cont)
_callbacks: list = []  # ctypes callbacks must outlive their registration


@contextlib.contextmanager
def capture_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's error log lines (and their continuations) while the block runs;
    llama-cpp-python's own log callback is put back afterwards."""
    import llama_cpp
    import llama_cpp._logger

    lines: list[str] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        level = last[0] if level == _CONTINUE else level
        last[0] = level
        if level == _ERROR:
            lines.append(text.decode("utf-8", "replace"))

    _callbacks[:] = [callback]
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))


def load_error(path: Path, exc: BaseException, log: list[str]) -> SaliError:
    """One line for a failed load: llama.cpp's reason when it logged one, else the exception."""
    reasons = []
    for line in "".join(log).splitlines():
        text = re.sub(r"^\s*\w+: ", "", line.strip())  # drop the "llama_model_load: " prefix
        text = re.sub(r"^(error loading model: )+", "", text)
        if text and not text.startswith("failed to load model") and text not in reasons:
            reasons.append(text)
    if len(reasons) > 2:
        reasons = [reasons[0], reasons[-1]]  # the first cause and llama.cpp's conclusion
    if reasons:
        return SaliError(f"llama.cpp could not load {path}: {'; '.join(reasons)[:400]}")
    return SaliError(f"llama.cpp could not load {path}: truncated or corrupt GGUF? ({exc})")
