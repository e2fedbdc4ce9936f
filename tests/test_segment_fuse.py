"""ca_mode merging, vote/mean fusion, entropy and the accumulator's fixed memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from hsf_bids.segment import FusionAccumulator, UnknownFusionError, entropy, merge_ca, n_classes
from hsf_bids.vocabulary import CaModeError, label_names


def _random_probs(rng: np.random.Generator, shape: tuple[int, ...], axis: int = 0) -> np.ndarray:
    logits = rng.normal(size=shape).astype(np.float32)
    e = np.exp(logits)
    return e / e.sum(axis=axis, keepdims=True)


def _one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    return (np.arange(n)[:, None, None, None] == labels[None]).astype(np.float32)


def test_merge_ca_sums_channels_as_the_contract_table():
    rng = np.random.default_rng(1)
    p = _random_probs(rng, (6, 3, 4, 5))
    assert merge_ca(p, "1/2/3") is p
    m = merge_ca(p, "1/23")
    np.testing.assert_array_equal(m[[0, 1, 2, 4]], p[[0, 1, 2, 5]])
    np.testing.assert_allclose(m[3], p[3] + p[4])
    m = merge_ca(p, "123")
    assert m.shape == (4, 3, 4, 5)
    np.testing.assert_allclose(m[2], p[2] + p[3] + p[4])
    np.testing.assert_array_equal(m[3], p[5])
    m = merge_ca(p, "")
    np.testing.assert_array_equal(m[0], p[0])
    np.testing.assert_allclose(m[1], 1.0 - p[0], atol=1e-6)
    for mode in ("1/2/3", "1/23", "123", ""):
        merged = merge_ca(p, mode)
        assert merged.shape[0] == n_classes(mode) == len(label_names(mode))
        np.testing.assert_allclose(merged.sum(0), 1.0, atol=1e-5)


def test_merge_ca_on_batches_matches_per_item():
    rng = np.random.default_rng(2)
    batch = _random_probs(rng, (3, 6, 2, 3, 4), axis=1)
    for mode in ("1/23", "123", ""):
        merged = merge_ca(batch, mode)
        for b in range(3):
            np.testing.assert_array_equal(merged[b], merge_ca(batch[b], mode))


def test_label_names_and_unknown_modes():
    assert label_names("1/2/3") == ("background", "DG", "CA1", "CA2", "CA3", "SUB")
    assert label_names("1/23") == ("background", "DG", "CA1", "CA23", "SUB")
    assert label_names("123") == ("background", "DG", "CA", "SUB")
    assert label_names("") == ("background", "HC")
    with pytest.raises(CaModeError, match="'1/3'"):
        merge_ca(np.zeros((6, 1, 1, 1)), "1/3")
    with pytest.raises(ValueError, match="6 model channels"):
        merge_ca(np.zeros((5, 1, 1, 1)), "123")


def test_vote_ties_go_to_the_lower_label():
    shape = (1, 1, 4)
    acc = FusionAccumulator(shape, 4)
    # Per voxel over the 4 predictions: voxel 0 gets 2,1,2,1 (tie -> 1); voxel 1 gets 3,3,0,0
    # (tie -> 0); voxel 2 gets 2,2,1,2 (plurality 2, not the lower 1); voxel 3 gets 3,2,1,3 (3).
    predictions = [
        np.array([2, 3, 2, 3]),
        np.array([1, 3, 2, 2]),
        np.array([2, 0, 1, 1]),
        np.array([1, 0, 2, 3]),
    ]
    for labels in predictions:
        acc.add(_one_hot(labels.reshape(shape), 4) * 0.7 + 0.075)
    result, _ = acc.result("vote")
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result.ravel(), [1, 0, 2, 3])
    np.testing.assert_array_equal(acc.vote_counts()[:, 0, 0, 1], [2, 0, 0, 2])


def test_vote_differs_from_mean_when_it_should():
    # Two confident votes for 1 against one very confident 2: the vote says 1, the mean says 2.
    acc = FusionAccumulator((1, 1, 1), 3)
    acc.add(np.array([0.0, 0.51, 0.49]).reshape(3, 1, 1, 1))
    acc.add(np.array([0.0, 0.51, 0.49]).reshape(3, 1, 1, 1))
    acc.add(np.array([0.0, 0.0, 1.0]).reshape(3, 1, 1, 1))
    assert acc.result("vote")[0].item() == 1
    assert acc.result("mean")[0].item() == 2
    with pytest.raises(UnknownFusionError):
        acc.result("median")


def test_uncertainty_is_the_entropy_of_the_mean_probability():
    rng = np.random.default_rng(3)
    preds = [_random_probs(rng, (4, 3, 3, 3)) for _ in range(5)]
    acc = FusionAccumulator((3, 3, 3), 4)
    for p in preds:
        acc.add(p)
    labels, uncertainty = acc.result("vote")
    mean = np.mean(np.stack(preds).astype(np.float64), axis=0)
    expected = np.clip(-np.sum(mean * np.log(mean + 1e-5), axis=0), 0, None)
    assert uncertainty.dtype == np.float32
    np.testing.assert_allclose(uncertainty, expected, rtol=1e-5)
    np.testing.assert_allclose(acc.mean_probabilities(), mean, rtol=1e-6)
    votes = np.zeros((4, 3, 3, 3), dtype=int)
    for p in preds:
        votes += _one_hot(p.argmax(0), 4).astype(int)
    np.testing.assert_array_equal(labels, votes.argmax(0))
    np.testing.assert_array_equal(acc.result("mean")[0], mean.argmax(0))
    assert acc.count == 5


def test_entropy_values():
    certain = np.zeros((3, 1, 1, 2))
    certain[0] = 1.0
    # ln(1 + 1e-5) > 0 would give a tiny negative entropy: clipped to exactly 0.
    np.testing.assert_array_equal(entropy(certain), 0.0)
    uniform = np.full((4, 1, 1, 1), 0.25)
    assert entropy(uniform).item() == pytest.approx(-np.log(0.25 + 1e-5), rel=1e-6)
    half = np.array([0.5, 0.5]).reshape(2, 1, 1, 1)
    assert entropy(half).item() == pytest.approx(np.log(2), rel=1e-4)


def test_accumulator_memory_does_not_grow_with_predictions():
    rng = np.random.default_rng(4)
    shape = (24, 24, 24)
    acc = FusionAccumulator(shape, 6)
    pred = _random_probs(rng, (6, *shape))
    nbytes = acc.nbytes
    acc.add(pred)  # warm up any lazily allocated temporaries
    tracemalloc.start()
    for _ in range(30):
        acc.add(pred)
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert acc.nbytes == nbytes
    # Keeping 30 predictions would hold 30 x 6 x 24^3 float32 = 10 MB; we keep < one map.
    assert current < pred.nbytes
    assert acc.count == 31


def test_add_sum_and_mode_guards():
    acc = FusionAccumulator((2, 2, 2), 2, votes=False)
    p = np.full((2, 2, 2, 2), 0.5, dtype=np.float32)
    acc.add_sum(p * 3, 3)
    assert acc.count == 3
    np.testing.assert_allclose(acc.mean_probabilities(), 0.5)
    with pytest.raises(RuntimeError, match="votes=True"):
        acc.result("vote")
    with pytest.raises(RuntimeError, match="incomplete"):
        FusionAccumulator((2, 2, 2), 2).add_sum(p, 1)
    with pytest.raises(ValueError, match="does not match"):
        acc.add(np.zeros((3, 2, 2, 2)))
    with pytest.raises(RuntimeError, match="no prediction"):
        FusionAccumulator((2, 2, 2), 2).result("vote")
