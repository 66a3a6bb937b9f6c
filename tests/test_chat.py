"""`sali chat` driven through stdin (scripted) and through a pseudo-terminal (interactive)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import ROOT, interruptible, make_head, run_sali


@pytest.fixture(scope="module")
def chat_head(tiny_model, tmp_path_factory):
    bias = np.zeros(tiny_model.n_vocab, dtype=np.float32)
    bias[77] = 1000.0
    path = tmp_path_factory.mktemp("chat") / "force77.npz"
    make_head(tiny_model, scale=0.0, bias=bias, promote=[77]).save(path)  # base format: chat template
    return path, tiny_model.llm.detokenize([77]).decode()


def test_scripted_chat_answers_resets_toggles_and_saves(tiny, chat_head, tmp_path):
    head_path, piece = chat_head
    transcript = tmp_path / "t.json"
    script = "\n".join(
        [
            "Hello there",
            "/head off",
            "Tell me about the river",
            "/head on",
            "/alpha 0",
            "And the baker?",
            "/alpha 1",
            "/reset",
            "/system You are terse.",
            "One more",
            f"/save {transcript}",
            "/exit",
            "never read",
        ]
    )
    done = run_sali("chat", str(tiny.f32), "-H", str(head_path), "-n", "5", "-t", "1", input=script + "\n")
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(replies) == 4
    assert replies[0] == piece * 5  # head on: forced token
    assert replies[1] != piece * 5  # head off: the plain model
    assert replies[2] != piece * 5  # alpha 0: the plain model
    assert replies[3] == piece * 5
    for note in ("head off", "head on", "alpha 0", "conversation reset", "saved"):
        assert note in done.stderr
    saved = json.loads(transcript.read_text())
    assert saved["system"] == "You are terse."
    # /reset and /system cleared the history: only the last exchange remains
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][0]["content"] == "One more"
    assert saved["messages"][1]["content"] == (piece * 5).strip()
    assert saved["head"] == str(head_path) and saved["format"] == {"type": "chat"}


def test_multi_turn_history_reaches_the_model(tiny, tmp_path):
    """A second turn is generated after the first exchange (rendered with the chat template)."""
    transcript = tmp_path / "t.json"
    done = run_sali("chat", str(tiny.f32), "-n", "4", "-t", "1", input=f"first\nsecond\n/save {transcript}\n")
    assert done.returncode == 0, done.stderr
    roles = [m["role"] for m in json.loads(transcript.read_text())["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_unknown_command_and_help(tiny):
    done = run_sali("chat", str(tiny.f32), "-n", "2", "-t", "1", input="/frobnicate\n/help\n")
    assert done.returncode == 0
    assert "unknown command /frobnicate" in done.stderr and "/reset" in done.stderr


def test_interactive_chat_in_a_pseudo_terminal(tiny, chat_head, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    head_path, piece = chat_head
    transcript = tmp_path / "pty.json"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "sali", "chat", str(tiny.f32), "-H", str(head_path), "-n", "5", "-t", "1"],
        cwd=str(ROOT),
        env={"COLUMNS": "100", "TERM": "dumb", "PATH": "/usr/bin:/bin"},
        encoding="utf-8",
        timeout=120,  # generous: a loaded 2-core CI machine can be slow to start Python and llama.cpp
    )
    try:
        child.expect("/help for commands")
        child.expect("you")
        child.sendline("Hello")
        child.expect_exact(piece * 5)
        child.expect("you")
        child.sendline("/head off")
        child.expect("head off")
        child.sendline(f"/save {transcript}")
        child.expect("saved")
        child.expect("you")
        # readline reads the ^D itself once it has switched the terminal to raw mode (echo off);
        # sent earlier, the line discipline may consume it as end-of-file before readline starts
        child.waitnoecho(timeout=60)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    messages = json.loads(transcript.read_text())["messages"]
    assert messages[0] == {"role": "user", "content": "Hello"}


@pytest.fixture(scope="module")
def steer_head(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-steer") / "steer.npz"
    make_head(tiny_model, k=8, rank=4, scale=1.0, promote=[5, 9, 40]).save(path)
    return path


def spawn_chat(*args: str):
    pexpect = pytest.importorskip("pexpect")
    # interruptible: under a shell's background job (CI may run so) SIGINT is ignored and the
    # child would inherit that, so Ctrl-C from the terminal would do nothing
    return pexpect.spawn(sys.executable, ["-m", "sali", "chat", *args], cwd=str(ROOT),
                         env={"COLUMNS": "100", "TERM": "dumb", "PATH": "/usr/bin:/bin"}, encoding="utf-8", timeout=120,
                         preexec_fn=interruptible)


def test_ctrl_c_stops_a_reply_and_leaves_no_state_behind(tiny, steer_head, tmp_path):
    """Ctrl-C mid-reply stops it and the chat goes on; the same question asked again after
    /reset gets exactly the reply a freshly started chat gives (same seed, same sampling)."""
    pexpect = pytest.importorskip("pexpect")
    # --ignore-eos: every reply runs to its 1500 tokens, so Ctrl-C always lands while the first is
    # being written (a reply that ended early lost that race)
    args = [str(tiny.f32), "-H", str(steer_head), "-n", "1500", "--ignore-eos", "--ctx", "2048", "-t", "1"]
    fresh = run_sali("chat", *args, input="Hello\n", timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    expected = fresh.stdout.strip()
    transcript = tmp_path / "pty.json"
    child = spawn_chat(*args)
    try:
        child.expect("temperature 0.8, top-k 40, top-p 0.95, min-p 0.05")  # the banner names the sampling
        child.expect("you")
        child.sendline("Hello")
        child.expect("assistant")
        child.expect(r"\S")  # the reply has started
        child.sendintr()
        child.expect_exact("(reply stopped)")
        child.expect("you")
        child.sendline("/reset")
        child.expect("conversation reset")
        child.sendline("Hello")
        child.expect("assistant")
        child.expect("you", timeout=300)  # the whole reply, then the next prompt
        child.sendline(f"/save {transcript}")
        child.expect("saved")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    messages = json.loads(transcript.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hello"
    # identical for the first ~600 tokens; far into a 1500-token sampled reply the two can drift apart
    # (seen once after 2,500 characters) from float rounding: llama.cpp evaluates the prompt in other
    # batches once the KV cache already holds a turn, and logits then differ by ~1e-4
    reply = messages[1]["content"]
    assert reply[:1500] == expected[:1500] and abs(len(reply) - len(expected)) < 0.2 * len(expected)


def test_long_chat_drops_oldest_turns_and_refuses_a_message_too_long(tiny, tmp_path):
    transcript = tmp_path / "long.json"
    turns = [f"turn {i}: tell me about the river and the baker and the window again" for i in range(8)]
    script = "\n".join(turns + ["river " * 300, f"/save {transcript}"]) + "\n"
    done = run_sali("chat", str(tiny.f32), "--system", "Be brief.", "-n", "8", "--ctx", "160", "-t", "1",
                    "--temperature", "0", input=script)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("older turns are dropped") == 1  # said once
    refusal = [line for line in done.stderr.splitlines() if "context holds 160" in line]
    assert len(refusal) == 1 and refusal[0].startswith("error: the message is ") and "too many" in refusal[0]
    saved = json.loads(transcript.read_text())
    assert saved["system"] == "Be brief."
    users = [m["content"] for m in saved["messages"] if m["role"] == "user"]
    assert users[-1] == turns[-1] and turns[0] not in users  # the oldest went, the newest stayed
    assert all("river river" not in u for u in users)  # the refused message was not kept
