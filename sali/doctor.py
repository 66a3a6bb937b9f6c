"""`sali doctor`: what this installation was built with, and whether it can generate at all.

It prints llama.cpp's own build report (CPU features compiled in, GPU offload support), the
llama-cpp-python and torch builds, and runs the generation canary (:mod:`sali.canary`) in a
subprocess. A build compiled for instructions this CPU cannot run dies there of a signal
(SIGILL), and doctor names it and prints the portable rebuild command (:data:`REBUILD`).
Nothing here runs on any other command's path.
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
PORTABLE_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
REBUILD = (
    f'CMAKE_ARGS="{PORTABLE_FLAGS}" pip install --force-reinstall --no-deps --no-cache-dir '
    f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
)
CANARY_ENV = "SALI_DOCTOR_CANARY"  # a command line that replaces the canary (tests, diagnosis)
CANARY_TIMEOUT = 300  # seconds; a real model on a slow machine loads and decodes well within it


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_report() -> list[tuple[str, str]]:
    """``[(name, value)]``: platform, CPU flags of this machine, llama.cpp and torch builds."""
    import llama_cpp

    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("cpu", _cpu_summary()),
        ("llama-cpp-python", f"{_version('llama-cpp-python')} (sali is tested with {LLAMA_CPP_PYTHON})"),
        ("llama.cpp system info", llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()),
        ("GPU offload (-ngl)", "supported" if llama_cpp.llama_supports_gpu_offload() else "not in this build: layers stay on the CPU"),
        ("memory mapping", "supported" if llama_cpp.llama_supports_mmap() else "not supported"),
    ]
    rows.append(("torch", _torch_summary()))
    return rows


def _cpu_summary() -> str:
    """The CPU model and the vector extensions it advertises (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")
    shown = " ".join(flag for flag in wanted if flag in flags) or "none of AVX/AVX2/AVX-512/AMX"
    return f"{model or 'unknown'} · {os.cpu_count()} logical CPUs · {shown}"


def _torch_summary() -> str:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "not installed (needed for sali train only: pip install 'sali[train]')"
    import torch

    parts = [torch.__version__]
    parts.append(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible" if torch.version.cuda else "CPU build")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        parts.append("Apple MPS available")
    return " · ".join(parts)


def canary_command(model: Path | None) -> list[str]:
    """The canary's command line: ``$SALI_DOCTOR_CANARY`` when set, else ``python -m sali.canary``."""
    override = os.environ.get(CANARY_ENV)
    if override:
        return shlex.split(override) + ([str(model)] if model else [])
    return [sys.executable, "-m", "sali.canary"] + ([str(model)] if model else [])


def run_canary(model: Path | None) -> tuple[bool, list[str]]:
    """Run the canary in a subprocess. Returns ``(passed, lines to print)``."""
    command = canary_command(model)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CANARY_TIMEOUT, errors="replace")
    except subprocess.TimeoutExpired:
        return False, [f"the generation canary did not finish within {CANARY_TIMEOUT} s (a hang in llama.cpp?)"]
    except OSError as exc:
        return False, [f"the generation canary could not start: {exc}"]
    if done.returncode == 0:
        return True, [done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "ok"]
    if done.returncode < 0:
        number = -done.returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        what = {
            "SIGILL": "illegal instruction: this llama.cpp build uses CPU instructions this machine cannot run, "
            "e.g. a native build made on another host, or llama.cpp's AMX kernels on some Xeons",
            "SIGSEGV": "segmentation fault inside llama.cpp",
            "SIGBUS": "bus error inside llama.cpp (a truncated or changing model file?)",
            "SIGFPE": "arithmetic fault inside llama.cpp",
            "SIGKILL": "killed (out of memory?)",
        }.get(name, "killed by a signal")
        return False, [
            f"the generation canary died of {name} ({what})",
            "rebuild llama-cpp-python for a portable CPU baseline:",
            f"  {REBUILD}",
        ]
    tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
    return False, [f"the generation canary failed (exit {done.returncode}): {tail[-1] if tail else 'no output'}"]
