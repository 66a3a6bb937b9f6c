"""Fuzzed inputs (hypothesis, a bounded number of examples): each works or gives sali's error.

The damage itself is made by bench/fuzz.py (the long-running fuzzer), driven here by
hypothesis-controlled random generators so failures shrink and replay.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, THREADS, one_error_line, run_sali

sys.path.insert(0, str(ROOT))
from bench import fuzz  # noqa: E402

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Path:
    from sali.canary import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("canary") / "tiny.gguf")


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> list[bytes]:
    return fuzz._head_files(tmp_path_factory.mktemp("heads"))


@pytest.fixture(scope="module")
def prompt_checker(canary):
    checker = fuzz.PromptChecker(canary)
    yield checker
    checker.model.close()


def _ok(outcome: tuple[str, str]) -> None:
    assert outcome[0] in ("accepted", "refused"), outcome


@FAST
@given(rng=st.randoms(use_true_random=False))
def test_damaged_head_files_load_or_give_sali_error(heads, tmp_path, rng: random.Random):
    path = tmp_path / "head.npz"
    path.write_bytes(fuzz.mutate_head(heads, rng))
    _ok(fuzz.in_process(fuzz.check_head, path))


@FAST
@given(rng=st.randoms(use_true_random=False))
def test_damaged_prompt_files_read_or_give_sali_error(prompt_checker, tmp_path, rng: random.Random):
    suffix, data = fuzz.make_prompt_file(rng)
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(data)
    _ok(fuzz.in_process(prompt_checker, path))


@FAST
@given(rng=st.randoms(use_true_random=False))
def test_damaged_gguf_headers_pass_or_give_sali_error(canary, tmp_path, rng: random.Random):
    from sali.ggufcheck import check_gguf

    path = tmp_path / "model.gguf"
    path.write_bytes(fuzz.mutate_gguf(canary.read_bytes(), fuzz.gguf_regions(canary), rng))
    _ok(fuzz.in_process(check_gguf, path))


def test_corrupt_ggufs_never_crash_llama_cpp(canary, tmp_path):
    """Damaged files that the check refuses, and ones it lets through (damage in the token
    strings or tensor data), each run by the real `sali generate` in a subprocess: output or
    sali's one error line, never a signal."""
    from sali.ggufcheck import check_gguf

    data = canary.read_bytes()
    regions = fuzz.gguf_regions(canary)
    rng = random.Random(7)
    let_through, refused = [], []
    while len(let_through) < 2 or len(refused) < 2:
        damaged = fuzz.mutate_gguf(data, regions, rng)
        path = tmp_path / f"damaged-{len(let_through) + len(refused)}.gguf"
        path.write_bytes(damaged)
        outcome, _ = fuzz.in_process(check_gguf, path)
        (let_through if outcome == "accepted" else refused).append(path)
    for path in let_through[:2] + refused[:2]:
        done = run_sali("generate", str(path), "-p", "hello", "--format", "plain", "-n", "2", "-t", THREADS)
        assert done.returncode >= 0, f"{path.name} killed llama.cpp by signal {-done.returncode}"
        if done.returncode:
            one_error_line(done)


def test_random_chat_lines_through_piped_stdin(canary, tmp_path):
    from sali.head import Head
    from sali.runtime import Model

    import numpy as np

    model = Model(canary, n_threads=1, n_ctx=64)
    rng = np.random.default_rng(0)
    V = model.n_vocab
    head = Head.create(rng.standard_normal((V, 4)), rng.standard_normal((V, 4)), np.zeros(V), [3], k=16,
                       vocab_fingerprint=model.fingerprint).save(tmp_path / "head.npz")
    model.close()
    for seed in range(2):
        outcome = fuzz.run_chat(canary, head, fuzz.chat_script(random.Random(seed)), tmp_path)
        _ok(outcome)


def test_fuzz_benchmark_smoke_run():
    """bench/fuzz.py's own smoke run: a table, exit 0 (no other exceptions, crashes or hangs)."""
    done = subprocess.run([sys.executable, "bench/fuzz.py", "--examples", "60"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    header = done.stdout.splitlines()[0].split()
    assert header[:2] == ["kind", "inputs"] and "crash" in header and "hang" in header
    rows = [line.split() for line in done.stdout.splitlines()[1:7]]
    assert [row[0] for row in rows] == ["head", "prompt", "gguf", "chat", "http", "all"]
    assert int(rows[-1][1]) >= 60  # at least --examples inputs (a chat session counts its 20 lines)


def test_ggufs_found_by_the_fuzzer_to_abort_llama_cpp_are_refused(canary, tmp_path):
    """Two files the 20,000-input run let through and llama.cpp then aborted on (SIGABRT): a
    weight stored as I8 (aborts in the first matrix product) and a block count of 4,194,306
    (over llama.cpp's 512 layers). Both now get sali's one error line from the real CLI."""
    import struct

    data = canary.read_bytes()
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # uint32 value type
    layers = data[:at + 4] + struct.pack("<I", 4194306) + data[at + 8:]
    name = b"blk.1.ffn_down.weight"
    at = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    int8 = data[:type_at] + struct.pack("<I", 24) + data[type_at + 4:]  # GGML type 24 = I8
    for label, damaged in (("layers", layers), ("int8", int8)):
        path = tmp_path / f"{label}.gguf"
        path.write_bytes(damaged)
        done = run_sali("generate", str(path), "-p", "hello", "--format", "plain", "-n", "2", "-t", THREADS)
        assert done.returncode == 1, (label, done.returncode, done.stderr[-500:])
        assert "damaged GGUF" in one_error_line(done)
