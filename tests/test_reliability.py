"""sali doctor, llama.cpp's own load errors, names that look like markup, file permissions,
progress lines in logs, compare's vocabulary check, the shipped keyword list, teacher forcing."""

from __future__ import annotations

import os
import stat
import sys

import numpy as np
import pytest

from conftest import ROOT, THREADS, make_head, one_error_line, run_sali

from sali.doctor import REBUILD


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    from sali.canary import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("canary") / "tiny.gguf")


# ---- doctor ---------------------------------------------------------------------------------------
def test_doctor_reports_the_build_and_passes_the_canary():
    done = run_sali("doctor", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "llama.cpp system info:" in done.stdout and "CPU :" in done.stdout
    assert "GPU offload (-ngl):" in done.stdout and "torch:" in done.stdout
    assert "ok: tiny canary model, 64 prompt tokens, 8 generated" in done.stdout


def test_doctor_runs_the_canary_on_a_given_model(tiny):
    done = run_sali("doctor", str(tiny.q8_0), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok: {tiny.q8_0.name}, 64 prompt tokens" in done.stdout


def test_doctor_names_a_canary_killed_by_sigill_and_prints_the_rebuild_command():
    # a real process that dies of SIGILL stands in for a llama.cpp build this CPU cannot run
    killer = f"{sys.executable} -c 'import os, signal; os.kill(os.getpid(), signal.SIGILL)'"
    done = run_sali("doctor", env={"SALI_DOCTOR_CANARY": killer}, timeout=300)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert any(line.startswith("the generation canary died of SIGILL (illegal instruction") for line in lines), done.stdout
    assert f"  {REBUILD}" in lines
    assert REBUILD == ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install '
                       "--force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36")
    assert "Traceback" not in done.stderr


def test_readme_troubleshooting_shows_the_rebuild_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Troubleshooting" in readme and REBUILD in readme


# ---- llama.cpp's reasons ------------------------------------------------------------------------------
def test_llama_cpp_refusals_carry_its_own_reason(tmp_path, canary):
    from sali.canary import write_tiny_gguf

    alien = write_tiny_gguf(tmp_path / "alien.gguf", arch="frobnicator")
    line = one_error_line(run_sali("generate", str(alien), "-p", "hi", "--format", "plain", "-t", THREADS))
    assert "unknown model architecture: 'frobnicator'" in line and "corrupt" not in line


@pytest.mark.parametrize("ctx", ["200000000", "2000000000"])
def test_a_context_larger_than_the_machine_is_refused_before_llama_cpp_tries(canary, ctx):
    """At 2e9 tokens llama.cpp's allocation succeeded on paper and the kernel killed the process
    when the pages were touched: exit 137 and not a word. Now one line says how much it needs."""
    line = one_error_line(run_sali("generate", str(canary), "-p", "hi", "--format", "plain", "-t", THREADS, "--ctx", ctx))
    assert f"a context of {int(ctx):,} tokens needs about" in line and "lower --ctx" in line


# ---- names are text, never markup ---------------------------------------------------------------------
def test_names_with_brackets_print_as_they_are(tiny_model, tmp_path, tiny):
    head_path = tmp_path / "a[x]b[/x].npz"
    head = make_head(tiny_model)
    head.meta["base_model"] = "base [bold]model[/bold]"
    head.save(head_path)
    done = run_sali("head", "info", str(head_path))
    assert done.returncode == 0, done.stderr
    assert "a[x]b[/x].npz" in done.stdout and "base [bold]model[/bold]" in done.stdout
    out = tmp_path / "out[/x].jsonl"
    done = run_sali("generate", str(tiny.f32), "-H", str(head_path), "-p", "hello", "-n", "2", "-t", THREADS, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"to {out}" in done.stderr.replace("\n", "")


# ---- files ----------------------------------------------------------------------------------------------
def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from sali.atomic import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_unwritable_target_is_one_sali_error(tmp_path):
    from sali.atomic import write_text
    from sali.errors import SaliError

    with pytest.raises(SaliError, match="cannot write"):
        write_text(tmp_path, "a folder is not a file")
    with pytest.raises(SaliError, match="cannot write"):
        write_text(tmp_path / "nul\x00name", "x")


def test_shipped_keyword_list_matches_the_shared_one():
    shipped = ROOT / "sali" / "data" / "refusal_keywords.txt"
    shared = ROOT.parent / "shared" / "data" / "refusal_keywords.txt"
    if not shared.is_file():
        shared = ROOT.parent.parent / "shared" / "data" / "refusal_keywords.txt"
    assert shipped.read_text(encoding="utf-8").strip()
    if shared.is_file():  # shared/ is the source of truth for the content
        assert shipped.read_text(encoding="utf-8") == shared.read_text(encoding="utf-8")


# ---- progress lines when stderr is a log file -----------------------------------------------------------
def test_generate_to_file_prints_plain_progress_lines(tiny, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n", encoding="utf-8")
    done = run_sali("generate", str(tiny.f32), "-P", str(prompts), "-n", "2", "-t", THREADS, "--format", "plain",
                    "-o", str(tmp_path / "o.jsonl"), env={"SALI_PROGRESS_INTERVAL": "0"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("progress: generating")]
    assert lines[0].startswith("progress: generating 0/3 (0%) · elapsed 0:00:")
    assert lines[-1].startswith("progress: generating 3/3 (100%)")
    assert any("left" in line for line in lines[1:-1])


# ---- compare refuses models with another vocabulary ------------------------------------------------------
def test_compare_refuses_a_model_with_another_vocabulary(tiny, canary, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n", encoding="utf-8")
    from sali.ggufcheck import vocab_fingerprint

    base_fp, other_fp = vocab_fingerprint(tiny.f32), vocab_fingerprint(canary)
    for option in (["--also", str(canary)], ["--aligned", str(canary)], ["--proxy", str(tiny.f16), str(canary)]):
        line = one_error_line(run_sali("compare", "--base", str(tiny.f32), "--harmful", str(prompts), *option,
                                       "--cache", str(tmp_path / "cache"), "-t", THREADS))
        assert base_fp in line and other_fp in line and option[0] in line


def test_gguf_fingerprint_read_without_llama_cpp_matches_the_loaded_model(tiny_model, tiny):
    from sali.ggufcheck import vocab_fingerprint

    assert vocab_fingerprint(tiny.f32) == tiny_model.fingerprint


# ---- teacher forcing equals step-by-step decoding -----------------------------------------------------
def test_teacher_forced_logits_equal_step_by_step_decoding(tiny):
    from sali.runtime import Model

    model = Model(tiny.f32, n_threads=int(THREADS), n_ctx=512, seed=0)  # its own: decoding here moves the KV cache
    prompt = model.tokenize("The cat sat on the warm window sill")
    response = model.tokenize("and watched the birds in the garden.")[1:] if model.llm._model.add_bos_token() else model.tokenize(
        "and watched the birds in the garden.")
    forced = model.teacher_forced_logits(prompt, response)
    assert forced.shape == (len(response), model.n_vocab)
    stepwise = []
    model.llm.reset()
    model.llm.eval(prompt)
    stepwise.append(model._raw_logits().copy())
    for token in response[:-1]:
        model.llm.eval([token])
        stepwise.append(model._raw_logits().copy())
    model.llm.reset()
    stepwise = np.stack(stepwise)
    # batched and one-token decoding sum in different orders: equal up to float32 rounding
    np.testing.assert_allclose(forced, stepwise, rtol=0, atol=2e-3)
    assert (forced.argmax(-1) == stepwise.argmax(-1)).all()
    model.close()


# ---- the GGUF check reads what the gguf package's reader reads -----------------------------------------
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_gguf_header_walk_agrees_with_the_gguf_reader(tiny, canary, outtype):
    import gguf

    from sali.ggufcheck import check_gguf

    for path in (tiny.gguf(outtype), canary):
        header, reader = check_gguf(path), gguf.GGUFReader(path)
        assert set(header.fields) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
        assert [(t[0], list(t[1]), t[2], header.data_offset + t[3]) for t in header.tensors] == \
            [(t.name, t.shape.tolist(), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors]
        tokens = reader.fields["tokenizer.ggml.tokens"]
        assert header.fields["tokenizer.ggml.tokens"] == [bytes(tokens.parts[i]) for i in tokens.data]
