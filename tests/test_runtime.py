"""The head inside llama.cpp's sampler chain, on a real tiny GGUF."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from conftest import make_head

from sali.errors import SaliError
from sali.head import Head
from sali.runtime import HeadError, HeadSampler, Model, Sampling

GREEDY = Sampling(max_tokens=24)


def prompt_ids(model: Model, text: str = "The baker asked my friend about") -> list[int]:
    return model.tokenize(text)


def test_callback_sees_full_vocabulary_in_token_id_order(tiny_model):
    """verify=True checks, at every step, that llama.cpp's candidate array is the whole
    vocabulary in id order with exactly the raw logits the head reads."""
    hook = HeadSampler(None, 1.0, tiny_model._raw_logits, tiny_model.n_vocab, verify=True)
    tokens = list(tiny_model.sample_tokens(prompt_ids(tiny_model), GREEDY, stats=hook))
    assert hook.error is None and hook.calls == len(tokens) + (len(tokens) < GREEDY.max_tokens)


def test_with_a_head_the_callback_gets_exactly_the_top_k(tiny_model):
    """With a head, llama.cpp's native top-k runs first: verify=True checks at every step that
    the callback receives exactly the k largest raw logits with their ids."""
    head = make_head(tiny_model, k=12, promote=[3, 4])
    hook = HeadSampler(head, 1.0, tiny_model._raw_logits, tiny_model.n_vocab, verify=True)
    tokens = list(tiny_model.sample_tokens(prompt_ids(tiny_model), GREEDY, head, stats=hook))
    assert hook.error is None and len(tokens) > 0


def test_callback_logits_equal_llama_cpp_logits(tiny_model):
    """The logits the head sees equal those llama.cpp itself reports for the same tokens."""
    seen: list[np.ndarray] = []
    ids = prompt_ids(tiny_model)
    generated = list(tiny_model.sample_tokens(ids, Sampling(max_tokens=4), probe=seen.append))
    import llama_cpp

    other = llama_cpp.Llama(model_path=str(tiny_model.path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    other.eval(ids + generated)
    for step, logits in enumerate(seen):
        # one-token and batched evaluation sum in different orders: float32 rounding, up to ~5e-4 here
        np.testing.assert_allclose(logits, other.scores[len(ids) - 1 + step], atol=1e-3)
    other.close()


def test_head_that_favours_one_token_forces_it(tiny_model):
    target = 77
    bias = np.zeros(tiny_model.n_vocab, dtype=np.float32)
    bias[target] = 1000.0
    head = make_head(tiny_model, scale=0.0, bias=bias, promote=[target])
    plain = list(tiny_model.sample_tokens(prompt_ids(tiny_model), GREEDY))
    assert target not in plain[:3]
    forced = list(tiny_model.sample_tokens(prompt_ids(tiny_model), Sampling(max_tokens=8), head))
    assert forced == [target] * 8
    # also with temperature sampling after the head
    sampled = list(tiny_model.sample_tokens(prompt_ids(tiny_model), Sampling(max_tokens=8, temperature=1.0, seed=3), head))
    assert sampled == [target] * 8


def test_greedy_with_head_follows_numpy_head_argmax(tiny_model):
    """Each token generated with the head is the argmax of Head.apply on that step's logits."""
    head = make_head(tiny_model, k=8, rank=4, scale=1.0, promote=[5, 9, 40])
    seen: list[np.ndarray] = []
    tokens = list(tiny_model.sample_tokens(prompt_ids(tiny_model), GREEDY, head, probe=seen.append))
    for logits, token in zip(seen, tokens):
        ids, adjusted = head.apply(logits)
        assert ids[np.argmax(adjusted)] == token
    plain = list(tiny_model.sample_tokens(prompt_ids(tiny_model), GREEDY))
    assert tokens != plain  # the head changes something, or this test tests nothing


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=11)])
def test_alpha_zero_reproduces_plain_base_exactly(tiny_model, sampling):
    head = make_head(tiny_model, scale=2.0)
    plain = tiny_model.complete(prompt_ids(tiny_model), sampling)
    zero = tiny_model.complete(prompt_ids(tiny_model), sampling, head, alpha=0.0)
    full = tiny_model.complete(prompt_ids(tiny_model), sampling, head, alpha=1.0)
    assert zero.tokens == plain.tokens and zero.text == plain.text
    assert full.tokens != plain.tokens


def test_same_seed_same_sample(tiny_model):
    sampling = Sampling(max_tokens=20, temperature=1.0, seed=5)
    head = make_head(tiny_model)
    a = tiny_model.complete(prompt_ids(tiny_model), sampling, head)
    b = tiny_model.complete(prompt_ids(tiny_model), sampling, head)
    assert a.tokens == b.tokens


def test_exception_in_head_stops_generation(tiny_model, monkeypatch):
    head = make_head(tiny_model)
    calls = {"n": 0}
    original = Head.adjust_into

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("boom in the head")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Head, "adjust_into", failing)
    produced = []
    hook = tiny_model.sampler(head, 1.0, native=False)  # the Python callback (combinations, --explain)
    with pytest.raises(HeadError, match="boom in the head"):
        for token in tiny_model.sample_tokens(prompt_ids(tiny_model), GREEDY, head, stats=hook):
            produced.append(token)
    assert len(produced) == 2  # the token sampled without the head is never emitted


def test_head_for_another_vocabulary_is_refused(tiny_model):
    head = make_head(tiny_model)
    head.meta["vocab_fingerprint"] = "v%d-0123456789abcdef" % tiny_model.n_vocab
    with pytest.raises(SaliError) as info:
        list(tiny_model.sample_tokens(prompt_ids(tiny_model), GREEDY, head))
    message = str(info.value)
    assert "0123456789abcdef" in message and tiny_model.fingerprint in message


def test_stop_strings_and_finish_reasons(tiny_model):
    full = tiny_model.complete(prompt_ids(tiny_model), Sampling(max_tokens=30))
    assert full.finish_reason in ("length", "eos")
    assert len(full.text) > 6
    stop = full.text[4:7]
    cut = tiny_model.complete(prompt_ids(tiny_model), Sampling(max_tokens=30, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


@pytest.mark.parametrize("read_chunk", [256, 4])
def test_a_prompt_reads_the_same_whatever_the_context_read_before(tiny, tiny_model, monkeypatch, read_chunk):
    """A prompt's logits are bit-identical to a new context's right after its own answer (a
    cache reused as it stands would decode its last token alone, which llama.cpp rounds
    differently) and after a prompt sharing its opening; whole read batches of that opening
    (4 tokens here) are kept, not read again."""
    monkeypatch.setattr(Model, "read_chunk", read_chunk)
    prompt = prompt_ids(tiny_model, "The cat sat on the warm window by the door")
    other = prompt_ids(tiny_model, "The cat sat on the warm window and the cold floor")
    shared = next(i for i, (a, b) in enumerate(zip(prompt, other)) if a != b)
    fresh_model = Model(tiny.f32, n_threads=1, n_ctx=512)
    want = fresh_model.prefill(prompt).copy()
    answered = fresh_model.complete(prompt, GREEDY)
    continued = prompt + answered.tokens[:10]  # e.g. a request holding an earlier reply
    want_continued = fresh_model.prefill(continued).copy()
    fresh_model.close()

    assert tiny_model.complete(prompt, GREEDY).tokens == answered.tokens
    # the cache now holds the answer's tokens decoded one at a time: they are read again
    np.testing.assert_array_equal(tiny_model.prefill(continued), want_continued)
    tiny_model.complete(prompt, GREEDY)
    assert tiny_model.stream(continued, GREEDY).finish().cached_tokens == len(prompt) // read_chunk * read_chunk
    tiny_model.complete(prompt, GREEDY)
    again = tiny_model.complete(prompt, GREEDY)
    assert again.tokens == answered.tokens
    assert again.cached_tokens == (len(prompt) - 1) // read_chunk * read_chunk
    np.testing.assert_array_equal(tiny_model.prefill(prompt), want)
    tiny_model.complete(other, GREEDY)
    after_other = tiny_model.complete(prompt, GREEDY)
    assert after_other.tokens == answered.tokens and after_other.cached_tokens == shared // read_chunk * read_chunk
    tiny_model.prefill(other)
    np.testing.assert_array_equal(tiny_model.prefill(prompt), want)
    if read_chunk == 4:
        assert shared >= 4  # the test reuses something


def test_a_continued_conversation_reuses_the_cache(tiny, tiny_model):
    """`reuse_cache` (a chat's later turns) evaluates only what the cache lacks, with the
    fresh model's answer."""
    first = prompt_ids(tiny_model, "The cat sat on the warm window")
    second = prompt_ids(tiny_model, "The cat sat on the cold floor and")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    tiny_model.complete(first, GREEDY)
    warm = tiny_model.stream(second, GREEDY, reuse_cache=True).finish()
    assert warm.cached_tokens == shared > 0
    fresh_model = Model(tiny.f32, n_threads=1, n_ctx=512)
    fresh = fresh_model.complete(second, GREEDY)
    fresh_model.close()
    assert warm.tokens == fresh.tokens


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    with pytest.raises(SaliError, match="context"):
        list(tiny_model.sample_tokens([5] * 600, GREEDY))


def test_fingerprint_matches_hf_tokenizer(tiny, tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    from sali.vocab import fingerprint, hf_token_list

    tokenizer = AutoTokenizer.from_pretrained(tiny.hf_dir)
    config = AutoConfig.from_pretrained(tiny.hf_dir)
    assert fingerprint(hf_token_list(tokenizer, config.vocab_size)) == tiny_model.fingerprint


class CtrlCAtTheEndOfTheCallback(HeadSampler):
    """Presses Ctrl-C on the way out of the sampler callback, after its own ``try``: a
    KeyboardInterrupt raised there is printed and dropped by ctypes."""

    def __call__(self, cur_p) -> None:
        super().__call__(cur_p)
        if self.calls == 3:
            signal.raise_signal(signal.SIGINT)


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler, as in a terminal (a shell's background job, as CI may run the
    suite, starts with SIGINT ignored, and Python then leaves it so)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_the_sampler_callback_is_never_lost(tiny_model, python_ctrl_c):
    head = make_head(tiny_model, k=8, promote=[5])
    hook = CtrlCAtTheEndOfTheCallback(head, 1.0, tiny_model._raw_logits, tiny_model.n_vocab)
    got: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        for token in tiny_model.sample_tokens(prompt_ids(tiny_model), Sampling(max_tokens=200, ignore_eos=True),
                                              head, stats=hook):
            got.append(token)
    assert len(got) == 2 and hook.calls == 3  # stopped at the token sampled while Ctrl-C was pressed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    assert list(tiny_model.sample_tokens(prompt_ids(tiny_model), Sampling(max_tokens=4), head))  # the model is free


def test_moving_to_the_next_prompt_of_a_batch_imports_nothing(tmp_path):
    """A Ctrl-C that lands inside an import can be lost (numpy.random's compiled modules catch
    exceptions while they initialise): `sali compare` once ran a whole batch to the end after
    one. So the work between two prompts (the next prompt's seed, the cache write) must find
    every module it needs loaded already. A fresh interpreter, as the CLI starts."""
    import subprocess
    import sys

    from conftest import ROOT

    script = f"""
import sys
from pathlib import Path
from sali.compare.cache import Cache, Result
from sali.compare.systems import System
from sali.runtime import Sampling

model = Path({str(tmp_path / "model.gguf")!r})
model.write_bytes(b"GGUF")
sampling = Sampling(temperature=0.8, seed=7)
cache = Cache(model.parent, System("base", model, "plain", {{"type": "plain"}}), sampling)
before = set(sys.modules)
for index in range(3):
    sampling.for_prompt(index)
    cache.add(f"prompt {{index}}", Result("answer", [1, 2], 0.1, "length"))
print(sorted(set(sys.modules) - before))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
