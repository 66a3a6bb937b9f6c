"""--explain: per generated token, the base's top-1, the chosen token, its rank and the head's change."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import THREADS, make_head, read_jsonl, run_sali
from rich.console import Console

import sali
from sali.chat import Chat
from sali.native import NativeSampler
from sali.runtime import Sampling
from sali.session import Session

PROMPT = "The baker asked my friend about"
LIFT = 2.5  # the head's bias for token 77: enough to win at some positions, not at all


@pytest.fixture(scope="module")
def lift77(tiny_model, tmp_path_factory):
    """A head whose only effect is +LIFT nats on token 77 (U = W = 0, 77 promoted)."""
    bias = np.zeros(tiny_model.n_vocab, dtype=np.float32)
    bias[77] = LIFT
    path = tmp_path_factory.mktemp("explain") / "lift77.npz"
    make_head(tiny_model, k=16, scale=0.0, bias=bias, promote=[77]).save(path, dtype="float32")
    return path


@pytest.fixture(scope="module")
def handle(tiny, lift77):
    m = sali.load(tiny.f32, head=str(lift77), n_threads=int(THREADS), n_ctx=512)
    yield m
    m.close()


def test_explain_marks_exactly_the_positions_the_head_changed(handle):
    done = handle.generate(PROMPT, max_tokens=32, explain=True)
    assert handle.generate(PROMPT, max_tokens=32).tokens == done.tokens  # explaining changes nothing
    assert [t.token for t in done.explained] == done.tokens and [t.position for t in done.explained] == list(range(32))
    # the base's own logits at each position, independently: one teacher-forced pass over the response
    prompt_ids = handle.model.tokenize(handle.prompt([{"role": "user", "content": PROMPT}]))
    base = handle.model.teacher_forced_logits(prompt_ids, done.tokens)
    changed = []
    for t, logits in zip(done.explained, base):
        assert t.base_top1 == int(np.argmax(logits)) and t.base_text == handle.model.token_text(t.base_top1)
        assert t.head_top1 == t.token  # greedy: the chosen token is the head's top-1
        assert t.changed == (t.token == 77 and t.base_top1 != 77)
        assert t.logit_change == pytest.approx(LIFT if t.token == 77 else 0.0, abs=1e-6)
        rank = 1 + int(np.sum(logits > logits[t.token]))
        assert t.rank == (rank if rank <= 16 else None)
        changed.append(t.changed)
    assert 0 < sum(changed) < len(changed)  # the head won some positions and not others
    record = done.explained[changed.index(True)].as_dict()
    assert record["token"] == {"id": 77, "text": handle.model.token_text(77)} and record["changed"] is True


def test_explain_without_a_head_and_the_fast_path_without_explain(handle):
    plain = handle.generate(PROMPT, head=None, max_tokens=8, explain=True)
    assert all(not t.changed and t.logit_change == 0.0 and t.rank == 1 for t in plain.explained)
    assert handle.generate(PROMPT, max_tokens=4).explained is None
    head = handle.head().head
    assert type(handle.model.sampler(head, 1.0)) is NativeSampler  # no recording: the compiled single-head path


def test_generate_explain_writes_the_tokens_into_jsonl(tiny, lift77, handle, tmp_path):
    out = tmp_path / "out.jsonl"
    done = run_sali("generate", str(tiny.f32), "-H", str(lift77), "-p", PROMPT, "-p", "The river", "-n", "16",
                    "-t", THREADS, "-o", str(out), "--explain")
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    want = handle.generate(PROMPT, max_tokens=16, explain=True)
    assert rows[0]["explain"] == [t.as_dict() for t in want.explained]
    assert all(len(r["explain"]) == r["tokens"] for r in rows)
    assert set(rows[0]["explain"][0]) == {"position", "token", "base_top1", "head_top1", "rank", "logit_change", "changed"}


def test_chat_explain_colours_changed_tokens_and_why_lists_them(tiny, lift77, handle):
    want = handle.generate(PROMPT, max_tokens=16, explain=True)
    n_changed = sum(t.changed for t in want.explained)
    script = f"/why\n/explain on\n{PROMPT}\n/why\n/explain off\n"
    done = run_sali("chat", str(tiny.f32), "-H", str(lift77), "-n", "16", "-t", THREADS, "--temperature", "0", input=script)
    assert done.returncode == 0, done.stderr
    assert "no explained reply yet" in done.stderr and "explain on" in done.stderr
    assert f"the head changed {n_changed} of 16 tokens" in done.stdout
    listed = [line for line in done.stdout.splitlines() if "←" in line]
    assert len(listed) == n_changed and all(repr(handle.model.token_text(77)) in line for line in listed)
    # on a terminal the changed tokens are coloured, the others are not
    session = Session.open(tiny.f32, [str(lift77)], None, Sampling(max_tokens=16), threads=int(THREADS), ctx=512)
    try:
        session.explain = True
        buffer = io.StringIO()
        chat = Chat(session, Console(file=buffer, force_terminal=True, color_system="standard", width=200), interactive=True)
        chat.turn(PROMPT)
        shown = buffer.getvalue()
        assert shown.count("\x1b[1;35m") == n_changed  # bold magenta, once per changed token
        assert "".join(t.text for t in chat.last_explained) in shown.replace("\x1b[1;35m", "").replace("\x1b[0m", "")
    finally:
        session.engine.close()
