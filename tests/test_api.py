"""The Python API (`sali.load`) and the runtime behaviour it exposes, on the tiny GGUF."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
from conftest import THREADS, forcing_and_steering_heads, make_head, one_error_line, run_sali

import sali
from sali.api import ContextError
from sali.errors import SaliError
from sali.runtime import Model, Sampling, check_candidates, TOKEN_DATA

PROMPT = "The baker asked my friend about"


@pytest.fixture(scope="module")
def head_files(tiny_model, tmp_path_factory):
    return forcing_and_steering_heads(tiny_model, tmp_path_factory.mktemp("api-heads"))


@pytest.fixture(scope="module")
def handle(tiny, head_files):
    m = sali.load(tiny.f32, head=[str(head_files[1]), str(head_files[0])], n_threads=int(THREADS), n_ctx=512)
    yield m
    m.close()


def test_load_names_heads_and_generate_equals_chat(handle):
    assert handle.name == "tiny-f32" and list(handle.heads) == ["steer", "force77"]
    done = handle.generate(PROMPT, max_tokens=12)
    same = handle.chat([{"role": "user", "content": PROMPT}], head="steer", max_tokens=12)
    assert done.text == same.text and done.tokens == same.tokens
    assert done.finish_reason in ("length", "eos") and done.prompt_tokens > 5
    assert done.usage == {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
                          "total_tokens": done.prompt_tokens + len(done.tokens),
                          "prompt_tokens_details": {"cached_tokens": 0}}
    assert done.first_token_seconds is not None and 0 < done.first_token_seconds <= done.seconds
    plain = handle.generate(PROMPT, head=None, max_tokens=12)
    assert plain.tokens != done.tokens  # the default head (the first loaded) is on
    raw = handle.generate(PROMPT, raw=True, head=None, max_tokens=12)
    assert raw.tokens != plain.tokens  # raw: no chat template around the prompt


def test_stream_yields_the_text_and_its_completion(handle):
    stream = handle.generate(PROMPT, stream=True, max_tokens=12)
    pieces = list(stream)
    assert "".join(pieces) == stream.completion.text == handle.generate(PROMPT, max_tokens=12).text
    with pytest.raises(SaliError, match="unknown sampling setting"):
        handle.generate(PROMPT, max_tokns=3)
    with pytest.raises(SaliError, match="no head named 'nope'"):
        handle.generate(PROMPT, head="nope")


def test_only_a_continued_chat_turn_keeps_the_reply_it_generated_in_the_cache(handle):
    """A call reads its prompt as a new context would (a short prompt: all of it; the same
    conversation asked again gets the same reply, whatever came between); a chat's later turn
    keeps what its conversation left in the cache, the generated reply included."""
    from sali.session import Session

    first = [{"role": "user", "content": PROMPT}]
    one = handle.chat(first, max_tokens=8)
    assert one.cached_tokens == 0
    follow = first + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "And then?"}]
    two = handle.chat(follow, max_tokens=8, reuse_cache=True)
    assert one.prompt_tokens <= two.cached_tokens < two.prompt_tokens
    again = handle.chat(first, max_tokens=8)
    assert again.cached_tokens == 0 and again.tokens == one.tokens

    session = Session(engine=handle, sampling=Sampling(max_tokens=8))
    assert session.stream(first).finish().cached_tokens == 0
    assert session.stream(follow).finish().cached_tokens > 0


def test_a_second_open_generation_in_one_thread_is_refused_not_deadlocked(handle):
    first = handle.generate(PROMPT, stream=True, max_tokens=8)
    next(first)
    second = handle.generate(PROMPT, stream=True, max_tokens=8)
    with pytest.raises(SaliError, match="still open"):
        next(second)
    first.close()
    assert len(handle.generate(PROMPT, max_tokens=3).tokens) == 3  # closing freed the model


def test_cancel_from_another_thread_stops_a_generation(handle):
    cancel = threading.Event()
    stream = handle.generate(PROMPT, head="force77", stream=True, cancel=cancel, max_tokens=400)
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 3:
            threading.Thread(target=cancel.set).start()
    assert stream.completion.finish_reason == "cancelled" and 3 <= len(stream.completion.tokens) < 400


def test_running_out_of_context_is_reported_as_context_not_eos(tiny, head_files):
    with sali.load(tiny.f32, head=str(head_files[0]), n_threads=int(THREADS), n_ctx=64) as small:
        done = small.generate(PROMPT, max_tokens=500)
        assert done.finish_reason == "context"
        assert done.prompt_tokens + len(done.tokens) == small.n_ctx  # filled to the last slot


def test_fit_drops_oldest_turns_keeps_system_and_refuses_one_long_message(tiny):
    with sali.load(tiny.f32, n_threads=int(THREADS), n_ctx=128) as small:
        system = {"role": "system", "content": "Be brief."}
        turns = []
        for i in range(6):
            turns += [{"role": "user", "content": f"question {i} about the river and the baker"},
                      {"role": "assistant", "content": f"answer {i} about the window and the cat"}]
        asked = [system] + turns + [{"role": "user", "content": "last question"}]
        kept, dropped = small.fit(asked, max_tokens=16)
        assert dropped > 0 and kept[0] == system and kept[-1] == asked[-1]
        assert kept[1]["role"] == "user" and kept[1:] == asked[1 + dropped:]
        assert small.count_tokens(small.prompt(kept)) <= 128 - 16
        with pytest.raises(ContextError, match="context holds 128"):
            small.fit([system, {"role": "user", "content": "river " * 200}], max_tokens=16)


def test_min_p_one_is_greedy_and_penalties_break_repetition(handle):
    greedy = handle.generate(PROMPT, head=None, max_tokens=40)
    sampled = handle.generate(PROMPT, head=None, max_tokens=40, temperature=1.5, min_p=1.0, seed=9)
    assert sampled.tokens == greedy.tokens  # min-p 1 keeps only the most likely token
    assert max(Counter(greedy.tokens).values()) >= 3  # the tiny model repeats itself greedily
    penalised = handle.generate(PROMPT, head=None, max_tokens=40, repeat_penalty=1.5, frequency_penalty=1.0,
                                presence_penalty=0.5)
    assert penalised.tokens != greedy.tokens
    assert max(Counter(penalised.tokens).values()) < max(Counter(greedy.tokens).values())
    with pytest.raises(SaliError, match="repeat_penalty"):
        handle.generate(PROMPT, repeat_penalty=0.0)


def test_one_head_shared_by_generations_in_several_threads(tiny, tiny_model):
    """Two models decode at once in two threads with the same Head object: each gets exactly
    what it gets alone (the head's scratch buffers are per thread)."""
    head = make_head(tiny_model, k=8, rank=4, scale=1.0, promote=[5, 9, 40])
    prompts = [tiny_model.tokenize(f"{PROMPT} {word}") for word in ("the river", "a window")]
    alone = [tiny_model.complete(p, Sampling(max_tokens=60), head).tokens for p in prompts]
    models = [Model(tiny.f32, n_threads=1, n_ctx=256) for _ in prompts]
    together: dict[int, list[int]] = {}

    def run(i: int) -> None:
        together[i] = models[i].complete(prompts[i], Sampling(max_tokens=60), head).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for model in models:
        model.close()
    assert [together[0], together[1]] == alone


def test_sampler_contract_check_catches_what_the_head_relies_on():
    raw = np.array([0.5, 2.0, -1.0, 3.0], dtype=np.float32)
    whole = np.zeros(4, TOKEN_DATA)
    whole["id"], whole["logit"] = np.arange(4), raw
    check_candidates(whole, raw, 4, 0)
    with pytest.raises(RuntimeError, match="token-id order"):
        check_candidates(whole[::-1].copy(), raw, 4, 0)
    top = whole[[3, 1]]
    check_candidates(top, raw, 4, 2)
    with pytest.raises(RuntimeError, match="passed 3 candidates"):
        check_candidates(whole[[3, 1, 0]], raw, 4, 2)
    with pytest.raises(RuntimeError, match="not the k largest"):
        check_candidates(whole[[3, 2]], raw, 4, 2)


def test_gpu_layers_on_a_cpu_build_warn_once(tiny):
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build can offload: nothing to warn about")
    done = run_sali("generate", str(tiny.f32), "-ngl", "4", "-p", "hello", "-n", "2", "-t", THREADS)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "stays on the CPU" in lines[0]


def test_bad_sampling_on_the_command_line_is_one_error_line(tiny):
    one_error_line(run_sali("generate", str(tiny.f32), "-p", "hi", "--repeat-penalty", "0", "-t", THREADS))
