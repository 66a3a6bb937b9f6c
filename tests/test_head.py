"""The head file format and the NumPy head, checked against a direct dense computation."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sali.errors import SaliError
from sali.head import FORMAT_VERSION, Head, top_k_ids

V, R, K = 300, 6, 20


def random_head(seed=0, k=K, promote=(3, 7, 250), V=V, R=R) -> Head:
    rng = np.random.default_rng(seed)
    return Head.create(
        rng.standard_normal((V, R)),
        rng.standard_normal((V, R)),
        rng.standard_normal(V),
        promote,
        k=k,
        vocab_fingerprint=f"v{V}-test",
        base_format={"type": "template", "template": "Q: {prompt}\nA:"},
    )


def dense_reference(head: Head, logits: np.ndarray, alpha: float, dead_zone: float = 0.0) -> np.ndarray:
    """The head as DESIGN.md writes it, with full V x V algebra in float64 and a -inf mask; with a
    dead zone, each change soft-thresholded around the top k's probability-weighted mean change."""
    logits = logits.astype(np.float64)
    order = np.argsort(-logits, kind="stable")
    top = order[: head.k]
    # log-probs renormalised within the top k
    x = np.zeros(len(logits))
    x[top] = logits[top] - np.log(np.sum(np.exp(logits[top])))
    interaction = head.U.astype(np.float64) @ head.W.astype(np.float64).T  # (V, V): <U_i, W_j>
    change = head.bias + x @ interaction
    if dead_zone:
        centre = np.sum(np.exp(x[top]) * change[top])
        change = centre + np.sign(change - centre) * np.maximum(np.abs(change - centre) - dead_zone, 0.0)
    adjusted = logits + alpha * change
    candidates = np.zeros(len(logits), dtype=bool)
    candidates[top] = True
    candidates[head.promote] = True
    return np.where(candidates, adjusted, -np.inf)


def test_apply_matches_dense_reference():
    head = random_head()
    rng = np.random.default_rng(1)
    for alpha in (1.0, 0.5, 2.0):
        logits = (rng.standard_normal(V) * 4).astype(np.float32)
        expected = dense_reference(head, logits, alpha)
        ids, adjusted = head.apply(logits, alpha)
        assert len(set(ids.tolist())) == len(ids)  # no duplicate candidates
        got = np.full(V, -np.inf)
        got[ids] = adjusted
        assert np.array_equal(np.isfinite(got), np.isfinite(expected))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(head.apply_dense(logits, alpha)[finite], expected[finite], rtol=1e-4, atol=1e-3)


def with_dead_zone(head: Head, dead_zone: float) -> Head:
    return Head.create(head.U, head.W, head.bias, head.promote, **dict(head.meta, dead_zone=dead_zone))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 60), dead_zone=st.floats(0.01, 5), alpha=st.floats(0.1, 3))
def test_dead_zone_matches_dense_reference(seed, k, dead_zone, alpha):
    head = with_dead_zone(random_head(seed, k=k), dead_zone)
    logits = (np.random.default_rng(seed + 1).standard_normal(V) * 4).astype(np.float32)
    expected = dense_reference(head, logits, alpha, dead_zone)
    got = head.apply_dense(logits, alpha)
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(got), finite)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=2e-3)


def test_dead_zone_keeps_large_changes_and_drops_small_ones():
    """A head whose only changes are +0.3 for one top-k token and +6 for another: a dead zone of 1
    drops the first and keeps the second, less 1 nat (changes measured from their centre, the
    probability-weighted mean change, which a shift common to all candidates does not move)."""
    logits = np.zeros(V, dtype=np.float32)
    logits[:K] = np.linspace(5, 3, K)  # the top k: tokens 0..K-1
    bias = np.full(V, 2.0, dtype=np.float32)  # a shift common to every candidate: changes nothing
    bias[4] += 0.3
    bias[9] += 6.0
    plain = Head.create(np.zeros((V, R)), np.zeros((V, R)), bias, (), k=K, vocab_fingerprint="v")
    shrunk = with_dead_zone(plain, 1.0)
    ids, base_adjusted = plain.apply(logits)
    ids2, adjusted = shrunk.apply(logits)
    assert np.array_equal(ids, ids2)
    change = dict(zip(ids.tolist(), (adjusted - logits[ids]).tolist()))
    p = np.exp(logits[:K] - logits[:K].max())
    p /= p.sum()
    centre = 2.0 + 0.3 * p[4] + 6.0 * p[9]
    assert change[4] == pytest.approx(centre)  # 2.3 lies within 1 of the centre: no change of its own
    assert change[9] == pytest.approx(8.0 - 1.0)  # 8 is more than 1 above the centre: kept, less 1
    assert change[0] == pytest.approx(centre)
    assert ids[np.argmax(base_adjusted)] == 9 and ids[np.argmax(adjusted)] == 9  # the large push still wins


def test_a_dead_zone_wider_than_every_change_keeps_the_base_distribution():
    head = with_dead_zone(random_head(3), 1e6)
    logits = (np.random.default_rng(4).standard_normal(V) * 4).astype(np.float32)
    ids, adjusted = head.apply(logits, 2.0)
    shift = adjusted - logits[ids]
    np.testing.assert_allclose(shift, shift[0], atol=1e-3)  # one shift for all: softmax as the base's
    assert ids[np.argmax(adjusted)] == np.argmax(logits)


@pytest.mark.parametrize("value", [float("nan"), -0.5, "1", True, None])
def test_bad_dead_zone_is_refused(tmp_path, value):
    arrays = good_arrays(random_head(), dead_zone=value)
    with pytest.raises(SaliError, match="dead_zone must be a number of nats"):
        Head.load(write_npz(tmp_path / "dz.npz", **arrays))


def test_format_version_says_whether_a_dead_zone_is_needed(tmp_path):
    """A head with a dead zone is written as format 2, which a sali that would apply it without
    one refuses; a head without one stays format 1, which every sali reads."""
    head = random_head()
    for dead_zone, version in ((0.0, 1), (0.7, 2)):
        path = with_dead_zone(head, dead_zone).save(tmp_path / f"v{version}.npz")
        with np.load(path, allow_pickle=False) as arrays:
            assert json.loads(bytes(arrays["meta"]).decode())["version"] == version
        assert Head.load(path).dead_zone == dead_zone
    # a zone that spares the first steps: format 3 (a format-2 sali would apply the zone at every step)
    spared = Head.create(head.U, head.W, head.bias, head.promote, **dict(head.meta, dead_zone=0.7, dead_zone_from=3))
    path = spared.save(tmp_path / "v3.npz")
    with np.load(path, allow_pickle=False) as arrays:
        assert json.loads(bytes(arrays["meta"]).decode())["version"] == 3 == FORMAT_VERSION
    assert Head.load(path).dead_zone_from == 3


def test_a_zone_from_step_n_spares_the_steps_before_it():
    """dead_zone_from 3: steps 0-2 get the head's changes whole (the head without a zone), steps
    3 on and an unknown step get the zone; combined heads pass the step on to each head."""
    from sali.combine import Combined

    plain = random_head(5)
    zoned = Head.create(plain.U, plain.W, plain.bias, plain.promote, **dict(plain.meta, dead_zone=0.7))
    spared = Head.create(plain.U, plain.W, plain.bias, plain.promote, **dict(plain.meta, dead_zone=0.7, dead_zone_from=3))
    logits = (np.random.default_rng(6).standard_normal(V) * 4).astype(np.float32)
    without, within = plain.apply_dense(logits, 1.5), zoned.apply_dense(logits, 1.5)
    assert not np.allclose(without, within)  # the zone matters here, so the comparisons below mean something
    for step in (0, 1, 2):
        np.testing.assert_array_equal(spared.apply_dense(logits, 1.5, step), without)
    for step in (3, 4, 100, None):
        np.testing.assert_array_equal(spared.apply_dense(logits, 1.5, step), within)
    pair = Combined(((spared, 1.0), (zoned, 0.5)))
    early, late = Combined(((plain, 1.0), (zoned, 0.5))), Combined(((zoned, 1.0), (zoned, 0.5)))
    np.testing.assert_array_equal(pair.apply_dense(logits, 1.0, 1), early.apply_dense(logits, 1.0, 1))
    np.testing.assert_array_equal(pair.apply_dense(logits, 1.0, 7), late.apply_dense(logits, 1.0, 7))


@pytest.mark.parametrize("value", [-1, 1.5, "3", True, None])
def test_bad_dead_zone_from_is_refused(tmp_path, value):
    arrays = good_arrays(random_head(), dead_zone=1.0, dead_zone_from=value)
    with pytest.raises(SaliError, match="dead_zone_from must be a whole number of response steps"):
        Head.load(write_npz(tmp_path / "dzf.npz", **arrays))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 60), shift=st.floats(-50, 50), alpha=st.floats(-2, 2))
def test_apply_property(seed, k, shift, alpha):
    """Random heads and logits: equals the dense reference, and a shift of all logits by a
    constant shifts every adjusted logit by the same constant (log-prob features)."""
    head = random_head(seed=seed, k=k, promote=np.random.default_rng(seed).choice(V, 5, replace=False))
    logits = (np.random.default_rng(seed + 1).standard_normal(V) * 3).astype(np.float32)
    expected = dense_reference(head, logits, alpha)
    ids, adjusted = head.apply(logits, alpha)
    np.testing.assert_allclose(adjusted, expected[ids], rtol=1e-4, atol=2e-3)
    ids2, adjusted2 = head.apply(logits + np.float32(shift), alpha)
    assert set(ids.tolist()) == set(ids2.tolist())
    order, order2 = np.argsort(ids), np.argsort(ids2)
    np.testing.assert_allclose(adjusted2[order2] - adjusted[order], shift, atol=2e-3 + abs(shift) * 1e-5)


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 70_000), k=st.integers(1, 600), seed=st.integers(0, 1000), heavy=st.booleans())
def test_top_k_ids_exact(size, k, seed, heavy):
    """The fast selection returns exactly the k largest values (ties aside), at any size."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(size) * (10 if heavy else 1)).astype(np.float32)
    if heavy:
        logits[rng.integers(0, size, size=min(size, 5))] = 40.0  # a few dominant tokens, as in real LLMs
    k = min(k, size)
    ids = top_k_ids(logits, k)
    assert len(ids) == k and len(set(ids.tolist())) == k
    np.testing.assert_array_equal(np.sort(logits[ids]), np.sort(logits)[size - k :])


def test_alpha_zero_keeps_base_logits_on_candidates():
    head = random_head()
    logits = np.random.default_rng(2).standard_normal(V).astype(np.float32)
    ids, adjusted = head.apply(logits, 0.0)
    np.testing.assert_array_equal(adjusted, logits[ids])


def test_promotion_set_joins_the_candidates_once():
    logits = np.linspace(-5, 5, V).astype(np.float32)  # top k = the last K ids
    outside, inside = 10, V - 1
    ids, _ = random_head(promote=(outside,)).apply(logits)
    assert outside in ids and len(ids) == K + 1
    ids, _ = random_head(promote=(inside,)).apply(logits)
    assert inside in ids and len(ids) == K  # already in the top k: no duplicate


def test_save_load_roundtrip_float16(tmp_path):
    head = random_head()
    path = head.save(tmp_path / "h.npz")
    loaded = Head.load(path)
    assert loaded.meta["vocab_fingerprint"] == head.fingerprint
    assert loaded.base_format == {"type": "template", "template": "Q: {prompt}\nA:"}
    assert loaded.meta["weight_dtype"] == "float16"
    np.testing.assert_array_equal(loaded.promote, head.promote)
    np.testing.assert_allclose(loaded.U, head.U, rtol=1e-3, atol=1e-3)
    # no temporary files left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["h.npz"]
    # the archive holds only plain numeric arrays and the JSON metadata
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["U.npy", "W.npy", "bias.npy", "meta.npy", "promote.npy"]


def test_float16_storage_changes_decisions_negligibly(tmp_path):
    head = random_head(seed=5)
    loaded = Head.load(head.save(tmp_path / "h.npz"))
    rng = np.random.default_rng(3)
    for _ in range(20):
        logits = (rng.standard_normal(V) * 4).astype(np.float32)
        a, b = head.apply_dense(logits), loaded.apply_dense(logits)
        assert np.argmax(a) == np.argmax(b)
        finite = np.isfinite(a)
        change = np.max(np.abs(a[finite] - logits[finite]))  # size of the head's adjustment
        assert np.max(np.abs(a[finite] - b[finite])) < 1e-3 * change


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    head = random_head()

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", explode)
    with pytest.raises(KeyboardInterrupt):
        head.save(tmp_path / "h.npz")
    assert list(tmp_path.iterdir()) == []


# ---- bad head files -------------------------------------------------------------------------
def write_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def good_arrays(head: Head, **meta_changes):
    meta = dict(head.meta, **meta_changes)
    return dict(
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        U=head.U.astype(np.float16),
        W=head.W.astype(np.float16),
        bias=head.bias.astype(np.float16),
        promote=head.promote.astype(np.int32),
    )


def test_object_array_is_refused_without_unpickling(tmp_path):
    head = random_head()
    arrays = good_arrays(head)
    sentinel = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    arrays["U"] = np.array([Boom()], dtype=object)
    path = write_npz(tmp_path / "evil.npz", **arrays)
    with pytest.raises(SaliError, match="pickled"):
        Head.load(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused(tmp_path, value):
    arrays = good_arrays(random_head())
    arrays["W"] = arrays["W"].copy()
    arrays["W"][3, 1] = value
    with pytest.raises(SaliError, match="NaN or infinite"):
        Head.load(write_npz(tmp_path / "bad.npz", **arrays))


def test_shapes_must_match_metadata(tmp_path):
    arrays = good_arrays(random_head(), rank=R + 1)
    with pytest.raises(SaliError, match="shape"):
        Head.load(write_npz(tmp_path / "bad.npz", **arrays))


def test_future_version_is_refused(tmp_path):
    arrays = good_arrays(random_head(), version=FORMAT_VERSION + 1)
    with pytest.raises(SaliError, match="newer than this sali supports"):
        Head.load(write_npz(tmp_path / "future.npz", **arrays))


def test_not_an_npz(tmp_path):
    path = tmp_path / "h.npz"
    path.write_text("hello")
    with pytest.raises(SaliError, match="not a sali head"):
        Head.load(path)
    with pytest.raises(SaliError, match="not found"):
        Head.load(tmp_path / "missing.npz")


def test_missing_array_and_bad_metadata(tmp_path):
    arrays = good_arrays(random_head())
    del arrays["bias"]
    with pytest.raises(SaliError, match="no array 'bias'"):
        Head.load(write_npz(tmp_path / "a.npz", **arrays))
    arrays = good_arrays(random_head())
    arrays["meta"] = np.frombuffer(b"\xff\xfe not json", dtype=np.uint8)
    with pytest.raises(SaliError, match="metadata"):
        Head.load(write_npz(tmp_path / "b.npz", **arrays))


def test_unicode_metadata_array_is_accepted(tmp_path):
    head = random_head()
    arrays = good_arrays(head)
    arrays["meta"] = np.array(json.dumps(head.meta))
    assert Head.load(write_npz(tmp_path / "u.npz", **arrays)).k == K


def test_vocab_check_names_both_fingerprints():
    head = random_head()
    with pytest.raises(SaliError) as info:
        head.check_vocab("v300-other", "model.gguf")
    assert "v300-test" in str(info.value) and "v300-other" in str(info.value)
