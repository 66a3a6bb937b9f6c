"""Heads in combination (sali/combine.py): the rule in NumPy, the same in llama.cpp, the syntax."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import THREADS, make_head, one_error_line, run_sali

import sali
from sali.combine import Combined, parse_spec, spec_name
from sali.errors import SaliError
from sali.runtime import ChainSampler, Model, Sampling

PROMPT = "The baker asked my friend about"


@pytest.fixture(scope="module")
def two_heads(tiny_model, tmp_path_factory):
    """A: k 16, lifts token 77 a little (bias 2.5, promoted); B: k 8 < |C_A|, random, promotes
    tokens that are often outside A's candidates (so the 'masked stays masked' rule acts)."""
    bias = np.zeros(tiny_model.n_vocab, dtype=np.float32)
    bias[77] = 2.5
    first = make_head(tiny_model, k=16, rank=4, seed=1, scale=0.4, bias=bias, promote=[77])
    second = make_head(tiny_model, k=8, rank=4, seed=2, scale=1.0, promote=[5, 9, 40, 200, 300])
    folder = tmp_path_factory.mktemp("combine")
    first.save(folder / "lift77.npz", dtype="float32")
    second.save(folder / "steer.npz", dtype="float32")
    return first, second, folder / "lift77.npz", folder / "steer.npz"


def rule_by_hand(first, a1, second, a2, logits):
    """The README's rule written out step by step with Head.apply / Head.adjust only."""
    ids, adjusted = first.apply(logits, a1)  # step 1: the first head on the base's logits
    order = np.argsort(-adjusted, kind="stable")[: second.k]  # step 2: B's top k of A's candidates
    dense = np.full(logits.shape, -np.inf, dtype=np.float32)
    dense[ids] = adjusted  # A's output as logits: -inf where A masked
    ids2, adjusted2 = second.adjust(ids[order], adjusted[order], dense[second.promote], a2)
    keep = np.isfinite(adjusted2)  # a promoted token A masked stays masked
    return ids2[keep], adjusted2[keep]


def test_llama_cpp_applies_two_heads_exactly_as_the_numpy_rule(tiny_model, two_heads):
    first, second, _, _ = two_heads
    combined = Combined(((first, 1.0), (second, 0.5)))
    seen: list[np.ndarray] = []
    hook = ChainSampler(combined, 1.0, tiny_model._raw_logits, tiny_model.n_vocab, record=True, probe=seen.append)
    steps = tiny_model.sample_tokens(tiny_model.tokenize(PROMPT), Sampling(max_tokens=24), combined, stats=hook)
    tokens, written, dropped = [], [], 0
    for token in steps:  # after each token the hook still holds what the heads wrote for it
        tokens.append(token)
        written.append(tuple(a.copy() for a in hook.adjusted()))
    assert len(tokens) == 24
    for logits, token, (ids, adjusted) in zip(seen, tokens, written):
        want_ids, want = rule_by_hand(first, 1.0, second, 0.5, logits)
        dropped += len(set(second.promote.tolist()) - set(first.apply(logits)[0].tolist()))
        assert sorted(ids.tolist()) == sorted(want_ids.tolist())
        np.testing.assert_allclose(adjusted[np.argsort(ids)], want[np.argsort(want_ids)], rtol=1e-5, atol=1e-5)
        assert want_ids[np.argmax(want)] == token
        np.testing.assert_allclose(combined.apply_dense(logits)[want_ids], want, rtol=1e-5, atol=1e-5)  # the library's rule too
    assert dropped > 0  # some of B's promoted tokens were masked by A and dropped: that path ran
    # the combination decodes differently from either head alone and from the other order
    alone = [list(tiny_model.sample_tokens(tiny_model.tokenize(PROMPT), Sampling(max_tokens=24), h, a))
             for h, a in ((first, 1.0), (second, 0.5))]
    swapped = list(tiny_model.sample_tokens(tiny_model.tokenize(PROMPT), Sampling(max_tokens=24),
                                            Combined(((second, 0.5), (first, 1.0)))))
    assert tokens not in alone and tokens != swapped


def test_strengths_multiply_and_zero_leaves_a_head_out(tiny_model, two_heads):
    first, second, _, _ = two_heads
    ids = tiny_model.tokenize(PROMPT)
    greedy = Sampling(max_tokens=16)
    only_first = tiny_model.complete(ids, greedy, first, 0.5)
    # strength 0 drops the second head entirely (no masking either): the first head alone, fast path
    assert tiny_model.complete(ids, greedy, Combined(((first, 1.0), (second, 0.0))), 0.5).tokens == only_first.tokens
    assert tiny_model.complete(ids, greedy, Combined(((first, 2.0), (second, 1.0))), 0.0).tokens == \
        tiny_model.complete(ids, greedy).tokens  # global alpha 0: the plain base
    # one head in a Combined at strength s runs exactly as the head alone at alpha·s
    assert tiny_model.complete(ids, greedy, Combined(((first, 0.5),)), 1.0).tokens == only_first.tokens


def test_api_cli_and_spec_syntax_agree(tiny, two_heads):
    _, _, lift, steer = two_heads
    with sali.load(tiny.f32, head=[str(lift), str(steer), "lift77+steer@0.5"], n_threads=int(THREADS), n_ctx=512) as m:
        assert list(m.heads) == ["lift77", "steer"] and list(m.choices) == ["lift77", "steer", "lift77+steer@0.5"]
        by_name = m.generate(PROMPT, head="lift77+steer@0.5", max_tokens=12)
        by_pairs = m.generate(PROMPT, head=[("lift77", 1.0), ("steer", 0.5)], max_tokens=12)
        single = m.generate(PROMPT, head="lift77", max_tokens=12)
        assert by_name.tokens == by_pairs.tokens != single.tokens
        with pytest.raises(SaliError, match="no head named 'other'"):
            m.generate(PROMPT, head="lift77+other")
        text = by_name.text
    done = run_sali("generate", str(tiny.f32), "-H", str(lift), "--head", f"{steer}@0.5", "-p", PROMPT, "-n", "12",
                    "-t", THREADS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == text


def test_parse_spec():
    assert parse_spec("a") == [("a", 1.0)]
    assert parse_spec("a@0.5+b") == [("a", 0.5), ("b", 1.0)]
    assert parse_spec("dir/x.npz@-1+y@2e-1") == [("dir/x.npz", -1.0), ("y", 0.2)]
    assert spec_name([("a", 1.0), ("b", 0.5)]) == "a+b@0.5"
    for bad, words in (("a@x", "must be a number, not 'x'"), ("a+", "empty head name"), ("@1", "no head name"),
                       ("a@nan", "finite")):
        with pytest.raises(SaliError, match=words):
            parse_spec(bad)


@pytest.mark.parametrize("args, words", [
    (["--head", "{steer}@x"], "must be a number, not 'x'"),
    (["--head", "{steer}+"], "empty head name"),
    (["--head", "{steer}", "--prefill", ""], "--prefill is empty"),
    (["--head", "{steer}", "--explain"], "add --out"),
])
def test_bad_head_and_prefill_options_give_one_clear_line(tiny, two_heads, args, words):
    steer = str(two_heads[3])
    done = run_sali("generate", str(tiny.f32), *[a.format(steer=steer) for a in args], "-p", PROMPT, "-n", "2", "-t", THREADS)
    assert words in one_error_line(done)
