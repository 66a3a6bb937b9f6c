"""The torch head equals the NumPy head; extraction tokenizes prompts as llama.cpp does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sali.distill import (
    TrainSettings, build_positions, choose_promotions, loss_fn, make_torch_head, sharpened, split_prompts, train_topk,
)
from sali.head import Head


def test_torch_head_equals_numpy_head_on_the_same_logits():
    V, r, k = 400, 8, 24
    rng = np.random.default_rng(0)
    promote = np.array([3, 50, 399])
    torch_head = make_torch_head(V, r, promote, seed=0)
    with torch.no_grad():
        torch_head.U.copy_(torch.from_numpy(rng.standard_normal((V, r)).astype(np.float32)))
        torch_head.W.copy_(torch.from_numpy(rng.standard_normal((V, r)).astype(np.float32)))
        torch_head.bias.copy_(torch.from_numpy(rng.standard_normal(V).astype(np.float32)))
    numpy_head = Head.create(
        torch_head.U.detach().numpy(), torch_head.W.detach().numpy(), torch_head.bias.detach().numpy(), promote,
        k=k, vocab_fingerprint="t",
    )
    for trial in range(10):
        logits = (rng.standard_normal(V) * 3).astype(np.float32)
        if trial == 0:
            logits[3] = 50.0  # a promotion token inside the top k: must not count twice
        ids, adjusted = numpy_head.apply(logits)
        # the torch side gets what extraction stores: top-k ids and full-vocabulary log-probs
        log_probs = torch.log_softmax(torch.from_numpy(logits), -1)
        top_lp, top_ids = log_probs.topk(k)
        promo_lp = log_probs[torch.from_numpy(promote)].clone()
        promo_lp[torch.isin(torch.from_numpy(promote), top_ids)] = -1e9
        cand, torch_adjusted = torch_head(top_ids[None], top_lp[None], promo_lp[None])
        cand, torch_adjusted = cand[0].numpy(), torch_adjusted[0].detach().numpy()
        valid = torch_adjusted > -1e8
        assert sorted(cand[valid].tolist()) == sorted(ids.tolist())
        # equal up to the log-sum-exp shift between logits and log-probs
        by_id = dict(zip(cand[valid].tolist(), torch_adjusted[valid].tolist()))
        shift = float(torch.logsumexp(torch.from_numpy(logits), -1))
        np.testing.assert_allclose([by_id[i] + shift for i in ids.tolist()], adjusted, rtol=1e-4, atol=1e-3)
        # so both heads choose the same token and give the same distribution over candidates
        q_numpy = np.exp(adjusted - adjusted.max()) / np.exp(adjusted - adjusted.max()).sum()
        q_torch = torch.softmax(torch.tensor([by_id[i] for i in ids.tolist()]), 0).numpy()
        np.testing.assert_allclose(q_numpy, q_torch, atol=1e-5)


def synthetic_data(n=300, V=100, k_store=20, K=10, seed=0):
    rng = np.random.default_rng(seed)
    base_lp = np.sort(rng.standard_normal((n, k_store)) - 3, axis=1)[:, ::-1]
    base_ids = np.stack([rng.choice(V, k_store, replace=False) for _ in range(n)])
    al_ids = np.stack([rng.choice(V, K, replace=False) for _ in range(n)])
    return {
        "row": np.repeat(np.arange(n // 10), 10).astype(np.int32),
        "step": np.tile(np.arange(10), n // 10).astype(np.int32),
        "base_ids": base_ids.astype(np.int32),
        "base_lp": base_lp.astype(np.float16),
        "al_ids": al_ids.astype(np.int32),
        "al_logits": np.sort(rng.standard_normal((n, K)), axis=1)[:, ::-1].astype(np.float16),
        "base_at_al": (rng.standard_normal((n, K)) - 4).astype(np.float16),
    }


def test_validation_split_holds_out_whole_prompts():
    rows = np.repeat(np.arange(50), 7)
    held = split_prompts(rows, 0.2, seed=1)
    assert len(np.unique(rows[held])) == 10
    assert not set(rows[held]) & set(rows[~held])
    np.testing.assert_array_equal(held, split_prompts(rows, 0.2, seed=1))


def test_positions_targets_and_promotions():
    data = synthetic_data()
    k = 8
    train = np.ones(len(data["row"]), dtype=bool)
    promote = choose_promotions(data, train, k, limit=5, min_count=1)
    assert 0 < len(promote) <= 5
    pos = build_positions(data, k, promote)
    # targets are aligned probabilities of the candidates: never more than 1 in total
    assert torch.all(pos.target.sum(-1) <= 1 + 1e-5)
    # check one position by hand
    i = 7
    p = torch.softmax(torch.tensor(data["al_logits"][i].astype(np.float32)), 0)
    cand = list(data["base_ids"][i, :k]) + list(promote)
    for c, expected in zip(cand, pos.target[i].tolist()):
        hit = np.flatnonzero(data["al_ids"][i] == c)
        duplicate = c in data["base_ids"][i, :k] and cand.index(c) >= k
        want = 0.0 if duplicate or not len(hit) else float(p[hit[0]])
        assert expected == pytest.approx(want, abs=1e-6)


def test_delta_penalty_keeps_the_heads_changes_small():
    data = synthetic_data(n=600)
    data["token"] = data["al_ids"][:, 0]
    sizes = []
    for penalty in (0.0, 30.0):
        result = train_topk(data, 100, TrainSettings(k=8, rank=4, epochs=15, patience=15, lr=1e-2, delta_penalty=penalty))
        pos = result.val_positions
        with torch.no_grad():
            _, adjusted = result.head(pos.top_ids, pos.top_lp, pos.promo_lp)
            delta = adjusted[:, :8] - pos.top_lp
            sizes.append(float((delta - delta.mean(-1, keepdim=True)).pow(2).mean()))
            # without a penalty the loss is the plain cross-entropy; with one it only grows
            plain = float(loss_fn(result.head, pos))
            assert float(loss_fn(result.head, pos, delta_penalty=1.0)) == pytest.approx(plain + sizes[-1], rel=1e-4)
    assert sizes[1] < 0.2 * sizes[0]


def test_first_token_weight_moves_the_head_towards_the_first_tokens_choice():
    # every position looks the same to the head (same base top-k), but the aligned model picks
    # token 1 at the first response token and token 2 after it: the head can only compromise,
    # and weighting the first token decides which way
    n, V, k_store, K = 400, 30, 10, 3
    al_ids = np.tile(np.array([[2, 1, 5]]), (n, 1))
    step = np.tile(np.arange(10), n // 10)
    al_ids[step == 0] = [1, 2, 5]
    data = {
        "row": np.repeat(np.arange(n // 10), 10).astype(np.int32),
        "step": step.astype(np.int32),
        "base_ids": np.tile(np.arange(k_store), (n, 1)).astype(np.int32),
        "base_lp": np.tile(-np.arange(1.0, k_store + 1), (n, 1)).astype(np.float16),
        "al_ids": al_ids.astype(np.int32),
        "al_logits": np.tile(np.array([[8.0, 0.0, -8.0]]), (n, 1)).astype(np.float16),
        "base_at_al": np.full((n, K), -4.0, dtype=np.float16),
        "token": al_ids[:, 0].astype(np.int32),
    }
    share_of_token_1 = []
    for weight in (1.0, 16.0):
        settings = TrainSettings(k=8, rank=4, epochs=40, patience=40, lr=3e-2, delta_penalty=0.0, first_tokens=1, first_weight=weight)
        result = train_topk(data, V, settings)
        pos = result.val_positions
        with torch.no_grad():
            cand, adjusted = result.head(pos.top_ids[:1], pos.top_lp[:1], pos.promo_lp[:1])
            q = torch.softmax(adjusted[0], -1)
        share_of_token_1.append(float(q[cand[0] == 1].sum() / (q[cand[0] == 1].sum() + q[cand[0] == 2].sum())))
        # the weighted loss is the weighted mean of the per-position cross-entropies
        with torch.no_grad():
            _, adj = result.head(pos.top_ids, pos.top_lp, pos.promo_lp)
            per_position = -(pos.target * torch.log_softmax(adj, -1)).sum(-1)
            expected = (pos.weight * per_position).sum() / (pos.weight * pos.covered).sum()
            assert float(loss_fn(result.head, pos)) == pytest.approx(float(expected), rel=1e-5)
    # the optimum gives token 1 its weighted share of the positions: about 1/10 alike, 16/25 weighted
    assert share_of_token_1[0] < 0.25
    assert share_of_token_1[1] > 0.5


def test_format_ids_match_llama_cpp_tokenization(tiny, tiny_model):
    from transformers import AutoTokenizer

    from sali.extract import format_ids
    from sali.prompts import render

    tokenizer = AutoTokenizer.from_pretrained(tiny.hf_dir)
    for fmt in ({"type": "chat"}, {"type": "plain"}, {"type": "template", "template": "Question: {prompt}\nAnswer:"}):
        for prompt in ("How do I bake bread?", "The river is 12 km long, isn't it?", "  spaces  and\ttabs "):
            text = render(fmt, [{"role": "user", "content": prompt}], chat_template=tiny_model.chat_template,
                          bos_token=tiny_model.bos_text, eos_token=tiny_model.eos_text)
            assert format_ids(tokenizer, fmt, prompt) == tiny_model.tokenize(text), (fmt, prompt)


def test_top_logits_kept_by_generation_equal_a_teacher_forced_pass(tiny):
    """ALIGNED's distillation targets come from its generation (no second pass): its top-K
    logits there must be what a teacher-forced pass over prompt + response computes, left padding
    and responses of different lengths included."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sali.extract import end_ids, format_ids, generate_responses, teacher_forced

    tokenizer = AutoTokenizer.from_pretrained(tiny.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny.hf_dir, dtype=torch.float32).eval()
    rows = [format_ids(tokenizer, {"type": "chat"}, p) for p in ("Hi", "How do I bake sourdough bread at home?", "Why?")]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    free = generate_responses(model, rows, pad, end_ids(tokenizer, model), 12)
    stop = end_ids(tokenizer, model) | {free[0][4]}  # the first row stops early
    K = 20
    responses, (values, ids) = generate_responses(model, rows, pad, stop, 12, keep_top=K)
    assert len({len(r) for r in responses}) > 1
    forced, _ = teacher_forced(model, rows, responses, pad)
    longest = max(len(r) for r in responses)
    assert values.shape == ids.shape == (3, longest, K) and forced.shape[:2] == (3, longest)
    for i, response in enumerate(responses):
        n = len(response)
        want_values, want_ids = forced[i, :n].topk(K, dim=-1)
        torch.testing.assert_close(values[i, :n], want_values, rtol=1e-4, atol=1e-4)
        assert torch.equal(ids[i, :n], want_ids)
        assert ids[i, :n, 0].tolist() == response  # greedy: each step's best is the token taken


def test_sharpened_batches_scale_half_the_positions_within_the_range():
    data = synthetic_data(n=400)
    promote = np.array([int(data["base_ids"][0, 0]), 99])  # the first is in position 0's top k: masked there
    pos = build_positions(data, 8, promote)
    out = sharpened(pos, 4.0, torch.Generator().manual_seed(0))
    factor = (out.top_lp / pos.top_lp)[:, 0]
    np.testing.assert_allclose((out.top_lp / pos.top_lp).numpy(), factor[:, None].expand(-1, 8).numpy(), rtol=1e-5)
    assert 0.35 < float((factor == 1).float().mean()) < 0.65
    assert float(factor.min()) >= 1.0 and float(factor.max()) <= 4.0 + 1e-5 and float(factor.max()) > 3.0
    assert float(out.promo_lp[0, 0]) == pytest.approx(-1e9)  # a duplicate stays masked, unscaled
    assert torch.equal(out.target, pos.target) and torch.equal(out.top_ids, pos.top_ids)


def test_sharpen_teaches_the_head_to_steer_a_more_confident_base():
    # the aligned model always picks the base's third token; trained with half its positions
    # sharpened, the head picks it both from the plain base and from one whose gaps are 4x wider
    n, V, k_store = 400, 30, 10
    data = {
        "row": np.repeat(np.arange(n // 10), 10).astype(np.int32),
        "step": np.tile(np.arange(10), n // 10).astype(np.int32),
        "base_ids": np.tile(np.arange(k_store), (n, 1)).astype(np.int32),
        "base_lp": np.tile(-np.arange(1.0, k_store + 1), (n, 1)).astype(np.float16),
        "al_ids": np.tile(np.array([[2, 0, 1]]), (n, 1)).astype(np.int32),
        "al_logits": np.tile(np.array([[8.0, 0.0, -8.0]]), (n, 1)).astype(np.float16),
        "base_at_al": np.full((n, 3), -4.0, dtype=np.float16),
        "token": np.full(n, 2, dtype=np.int32),
    }
    picks = {}
    for factor in (1.0, 4.0):
        settings = TrainSettings(k=8, rank=4, epochs=30, patience=30, lr=3e-2, delta_penalty=1.0, sharpen=factor)
        head = train_topk(data, V, settings).head
        pos = build_positions(data, 8, np.zeros(0, dtype=np.int64))
        with torch.no_grad():
            for scale in (1.0, 4.0):
                cand, adjusted = head(pos.top_ids[:1], pos.top_lp[:1] * scale, pos.promo_lp[:1])
                picks[factor, scale] = int(cand[0, adjusted[0].argmax()])
    assert picks[4.0, 1.0] == 2 and picks[4.0, 4.0] == 2
    assert picks[1.0, 1.0] == 2


def test_one_seed_gives_one_head_with_two_threads():
    """Two trainings with one seed on 40,000 positions give bit-identical weights with 2 torch
    threads (without deterministic kernels they differed by about 1e-7 after one epoch here, and on
    SmolLM2's extraction by up to 0.08 after 13)."""
    data = synthetic_data(n=40_000, V=3000, k_store=64, K=16, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        heads = [train_topk(data, 3000, TrainSettings(k=64, rank=16, epochs=1)).head for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for name in ("U", "W", "bias"):
        assert torch.equal(getattr(heads[0], name), getattr(heads[1], name)), name
    assert not torch.are_deterministic_algorithms_enabled()  # the setting is the caller's again


def test_torch_twin_applies_the_dead_zone_as_the_numpy_head_does():
    """The dead zone in training's validation figures (the torch twin) is the run-time one, the
    spared first steps included."""
    V, r, k = 300, 6, 20
    rng = np.random.default_rng(3)
    twin = make_torch_head(V, r, np.array([5, 250]), seed=0)
    with torch.no_grad():
        for name, shape in (("U", (V, r)), ("W", (V, r)), ("bias", (V,))):
            getattr(twin, name).copy_(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
    twin.dead_zone, twin.dead_zone_from = 0.8, 4
    numpy_head = Head.create(twin.U.detach().numpy(), twin.W.detach().numpy(), twin.bias.detach().numpy(), [5, 250],
                             k=k, vocab_fingerprint="t", dead_zone=0.8, dead_zone_from=4)
    for step in range(10):  # steps 0-3 spared, 4-9 zoned
        logits = (rng.standard_normal(V) * 3).astype(np.float32)
        ids, adjusted = numpy_head.apply(logits, 1.0, step)
        log_probs = torch.log_softmax(torch.from_numpy(logits), -1)
        top_lp, top_ids = log_probs.topk(k)
        promo_lp = log_probs[torch.tensor([5, 250])].clone()
        promo_lp[torch.isin(torch.tensor([5, 250]), top_ids)] = -1e9
        with torch.no_grad():
            cand, out = twin(top_ids[None], top_lp[None], promo_lp[None], 1.0, torch.tensor([step]))
        by_id = {int(c): float(v) for c, v in zip(cand[0], out[0]) if v > -1e8}
        shift = float(torch.logsumexp(torch.from_numpy(logits), -1))
        np.testing.assert_allclose([by_id[i] + shift for i in ids.tolist()], adjusted, rtol=1e-4, atol=1e-3)
