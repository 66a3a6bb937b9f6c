"""The head as compiled code inside llama.cpp (sali.native), against the Python callback path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_head

from sali import native
from sali.kernel import token_fields
from sali.runtime import HeadError, HeadSampler, Sampling

PROMPT = "The baker asked my friend about"


def _tokens(model, head, sampling, hook) -> list[int]:
    return list(model.sample_tokens(model.tokenize(PROMPT), sampling, head, stats=hook))


@pytest.mark.parametrize("sampling", [Sampling(max_tokens=24), Sampling(max_tokens=24, temperature=1.0, seed=5),
                                      Sampling(max_tokens=24, temperature=1.0, seed=7, top_k=0, top_p=1.0, min_p=0.0)],
                         ids=["greedy", "sampled", "sampled-in-candidate-order"])
def test_compiled_and_python_paths_choose_the_same_tokens(tiny_model, sampling):
    head = make_head(tiny_model, k=12, promote=[3, 4, 5, 200])
    plain = _tokens(tiny_model, None, sampling, None)
    _tokens(tiny_model, head, sampling, None)  # same KV-cache history before each compared run
    compiled = tiny_model.sampler(head, 1.0)
    assert isinstance(compiled, native.NativeSampler)
    by_native = _tokens(tiny_model, head, sampling, compiled)
    by_python = _tokens(tiny_model, head, sampling, tiny_model.sampler(head, 1.0, native=False))
    assert by_native == by_python
    assert by_native != plain  # the head changed the text, so the comparison means something
    assert compiled.error is None and compiled.calls >= len(by_native)


def test_compiled_kernel_equals_the_reference_kernel():
    """Random heads and candidates, promoted tokens inside and outside the top k, with and without
    a dead zone: the packed kernel writes the same candidates as Head.adjust_into."""
    rng = np.random.default_rng(0)
    V, k, rank = 300, 16, 6
    for trial in range(40):
        raw = rng.standard_normal(V).astype(np.float32) * 3
        top = np.argsort(-raw)[:k]
        promote = np.unique(np.concatenate([rng.choice(V, 10, replace=False), top[rng.integers(0, k, 3)]]))
        head = make_head(_Vocab(V), k=k, rank=rank, seed=trial, promote=promote,
                         bias=rng.standard_normal(V).astype(np.float32), dead_zone=float(rng.uniform(0.1, 2)) if trial % 2 else 0.0)
        alpha = float(rng.uniform(0.2, 3))
        ref_ids, ref_logits = token_fields(V)
        ref_ids[:k], ref_logits[:k] = top, raw[top]
        count = head.adjust_into(ref_ids[:k], ref_logits[:k], raw, head.promote, ref_ids, ref_logits, alpha)
        rows, promoted = head.packed()
        whole = np.zeros(V, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        whole["id"][:k], whole["logit"][:k] = top, raw[top]
        words = whole.view(np.int32)
        got = native._kernel(words, words.view(np.float32)[1:], k, raw, head.promote.astype(np.int64), rows, promoted,
                             np.zeros(rank + 1 + k, np.float32), alpha, head.dead_zone)
        assert got == count
        assert np.array_equal(whole["id"][:got], ref_ids[:count])
        np.testing.assert_allclose(whole["logit"][:got], ref_logits[:count], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 7, 64])
def test_compiled_top_k_selection_leaves_the_k_largest_first_in_order(k):
    """What llama.cpp's top-k sampler would leave: the k largest, largest first, ids with them;
    on shuffled, ascending and descending logits."""
    rng = np.random.default_rng(k)
    n = 2000
    for order in ("shuffled", "ascending", "descending"):
        values = rng.permutation(n).astype(np.float32) * 0.01 - 7  # distinct
        if order != "shuffled":
            values = np.sort(values) if order == "ascending" else -np.sort(-values)
        ids = rng.permutation(n).astype(np.int32)
        whole = np.zeros(n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        whole["id"], whole["logit"] = ids, values
        words = whole.view(np.int32)
        native._select_top_k(words, words.view(np.float32)[1:], n, k, np.zeros(k, np.int32), np.zeros(k, np.float32))
        best = np.argsort(-values)[:k]
        assert np.array_equal(whole["logit"][:k], values[best]), order
        assert np.array_equal(whole["id"][:k], ids[best]), order


@pytest.mark.parametrize("k", [1, 5, 64, 256])
def test_top_k_from_the_raw_logits_by_blocks_equals_a_full_sort(k):
    """The block-maximum search (only blocks that reach the k-th largest block maximum are read)
    finds the same k as a full sort: random logits, a vocabulary that does not fill its last
    block, the top k crowded into as few blocks as hold them, ties, -inf logits; and declines,
    leaving the candidates as they were, when fewer than k are finite."""
    rng = np.random.default_rng(k)
    size = max(6000, 3 * native.BLOCK * k)
    cases = {"random": rng.standard_normal(size).astype(np.float32) * 3,
             "ragged": rng.standard_normal(native.BLOCK * max(70, 3 * k) + 7).astype(np.float32),
             "ties": rng.integers(0, 4, size).astype(np.float32)}
    crowded = rng.standard_normal(size).astype(np.float32)
    crowded[128:128 + max(native.BLOCK, k)] += 50  # every one of the top k in the fewest blocks
    cases["crowded"] = crowded
    masked = rng.standard_normal(size).astype(np.float32)
    masked[rng.choice(size, size * 5 // 6, replace=False)] = -np.inf
    cases["masked"] = masked
    for name, raw in cases.items():
        V = raw.size
        whole = np.zeros(V, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        whole["id"], whole["logit"] = np.arange(V), raw
        words = whole.view(np.int32)
        blocks = np.zeros(-(-V // native.BLOCK), np.float32)
        assert native._select_top_k_raw(raw, words, words.view(np.float32)[1:], k, blocks, np.zeros(k, np.int32),
                                        np.zeros(k, np.float32)), name
        best = np.argsort(-raw, kind="stable")[:k]
        assert np.array_equal(whole["logit"][:k], raw[best]), name
        assert np.array_equal(raw[whole["id"][:k]], whole["logit"][:k]), name
        if name != "ties":
            assert set(whole["id"][:k].tolist()) == set(best.tolist()), name
    few = np.full(300, -np.inf, np.float32)
    few[:3] = 1.0
    whole = np.zeros(300, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
    whole["id"], whole["logit"] = np.arange(300), few
    before = whole.copy()
    words = whole.view(np.int32)
    assert not native._select_top_k_raw(few, words, words.view(np.float32)[1:], 5, np.zeros(5, np.float32),
                                        np.zeros(5, np.int32), np.zeros(5, np.float32))
    assert np.array_equal(whole, before)
    assert not native._select_top_k_raw(few, words, words.view(np.float32)[1:], 6, np.zeros(5, np.float32),
                                        np.zeros(6, np.int32), np.zeros(6, np.float32))  # 6 > 5 blocks


def test_compiled_sampler_handed_the_wrong_count_stops_before_emitting(tiny_model):
    head = make_head(tiny_model, k=12)
    hook = native.NativeSampler(head, 1.0, tiny_model.llama_context, tiny_model.n_vocab)
    V = tiny_model.n_vocab
    hook._context[native._TOP_K] = V + 1  # llama.cpp hands over the whole vocabulary, V
    with pytest.raises(HeadError, match=f"expects between {V + 1} and {V} candidates, llama.cpp passed {V}"):
        for _ in tiny_model.sample_tokens(tiny_model.tokenize(PROMPT), Sampling(max_tokens=8), head, stats=hook):
            pytest.fail("a token sampled without the head was emitted")


def test_compiled_sampler_times_each_call_when_asked(tiny_model):
    head = make_head(tiny_model, k=12)
    hook = native.NativeSampler(head, 1.0, tiny_model.llama_context, tiny_model.n_vocab, keep_times=5)
    tokens = _tokens(tiny_model, head, Sampling(max_tokens=12, ignore_eos=True), hook)
    assert hook.calls == len(tokens) == 12
    assert len(hook.durations) == 5 and all(0 < d < 1 for d in hook.durations)
    untimed = native.NativeSampler(head, 1.0, tiny_model.llama_context, tiny_model.n_vocab)
    _tokens(tiny_model, head, Sampling(max_tokens=4, ignore_eos=True), untimed)
    assert untimed.calls == 4 and untimed.durations == []


def test_plain_decoding_puts_no_callback_in_the_chain(tiny_model):
    assert not tiny_model.sampler(None, 1.0).needed
    assert not tiny_model.sampler(make_head(tiny_model), 0.0).needed
    checking = tiny_model.sampler(None, 1.0, verify=True)
    assert type(checking) is HeadSampler and checking.needed


class _Vocab:
    """Just enough of a model for make_head: a vocabulary size and names."""

    def __init__(self, n_vocab: int):
        self.n_vocab, self.fingerprint, self.name = n_vocab, f"v{n_vocab}-0000000000000000", "none"


@pytest.mark.parametrize("native_path", [True, False], ids=["compiled", "python"])
def test_dead_zone_in_real_decoding(tiny_model, native_path):
    """On the tiny GGUF, greedy: a steering head changes the text; the same weights with a dead zone
    wider than every change leave the plain model's text (compiled sampler and Python callback alike)."""
    sampling = Sampling(max_tokens=24)
    plain = _tokens(tiny_model, None, sampling, None)

    def run(dead_zone):
        head = make_head(tiny_model, k=12, promote=[3, 4, 5, 200], dead_zone=dead_zone)
        hook = tiny_model.sampler(head, 1.0, native=native_path)
        tokens = _tokens(tiny_model, head, sampling, hook)
        assert hook.error is None
        return tokens

    assert run(0.0) != plain
    assert run(1e6) == plain


@pytest.mark.parametrize("path", ["compiled", "python", "chain"])
def test_a_zone_from_step_n_acts_only_from_that_step(tiny_model, path):
    """On the tiny GGUF, greedy, a zone wider than every change from step 5: the first 5 tokens are
    the steering head's own, the rest are what the plain model says after them (compiled sampler,
    Python callback and the chain of the explain path alike)."""
    sampling = Sampling(max_tokens=16)
    prompt = tiny_model.tokenize(PROMPT)
    steered = _tokens(tiny_model, make_head(tiny_model, k=12, promote=[3, 4, 5, 200]), sampling, None)
    assert steered[:5] != _tokens(tiny_model, None, Sampling(max_tokens=5), None)  # the head acts in the spared steps
    head = make_head(tiny_model, k=12, promote=[3, 4, 5, 200], dead_zone=1e6, dead_zone_from=5)
    hook = tiny_model.sampler(head, 1.0, native=path == "compiled", record=path == "chain")
    assert isinstance(hook, native.NativeSampler) == (path == "compiled")
    tokens = _tokens(tiny_model, head, sampling, hook)
    assert hook.error is None
    assert tokens[:5] == steered[:5]
    after = list(tiny_model.sample_tokens(prompt + steered[:5], Sampling(max_tokens=11), None))
    assert tokens[5:] == after
