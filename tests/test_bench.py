"""Every benchmark's smoke mode runs on the tiny test models, so a change that breaks one fails here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, THREADS


def _run(*args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_decode_overhead_smoke(tiny):
    out = _run("bench/decode_overhead.py", "--smoke", "--model", str(tiny.f32), "--threads", THREADS)
    assert "ratio head/plain: median" in out and "head call: median" in out


def test_extract_speed_smoke(tiny):
    out = _run("bench/extract_speed.py", "--smoke", "--model", str(tiny.hf_dir))
    assert "median speed-up:" in out and "head file, V=" in out


def test_compare_memory_smoke(pair):
    out = _run("bench/compare_memory.py", "--quick", "--base", str(pair.base_gguf), "--aligned", str(pair.aligned_gguf))
    ratio = float(out.split("peak memory ratio")[1].split(":")[1].split()[0])
    assert 0.9 < ratio < 1.2, out


def test_gpu_check_smoke_on_the_cpu(pair):
    """No CUDA machine here: the script's CPU path on the tiny pair; CPU against CPU is exact."""
    out = _run("bench/gpu_check.py", "--device", "cpu", "--size", "tiny", "--pair", str(pair.folder),
               "--prompts", "24", "--tokens", "8", timeout=600)
    assert "positions/s" in out and "largest weight difference 0.00e+00" in out and "100.0%" in out, out


@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "bench" / "smollm2").glob("*.py")))
def test_smollm2_study_scripts_import(module):
    """The study's scripts take minutes to hours (run.py --quick: several minutes), so the suite
    checks that each still imports against today's sali: renamed or removed functions fail here."""
    _run("-c", f"import bench.smollm2.{module}")


def test_smollm2_run_arguments():
    assert "--quick" in _run("bench/smollm2/run.py", "--help")


def test_smollm2_ablation_arguments():
    """ablation.py parses its command line and describes what it measures (a real run needs run.py's outputs)."""
    assert "delta penalty" in _run("bench/smollm2/ablation.py", "--help")
