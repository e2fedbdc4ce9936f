"""Z-score and pad/unpad of one crop (HSF contract steps 5 and 7)."""

from __future__ import annotations

import numpy as np
import pytest

from hsf_bids.segment import ConstantCropError, pad_to_multiple, unpad, zscore


def test_zscore_uses_unbiased_std_over_all_voxels():
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 500, size=(7, 9, 5)).astype(np.int16)
    out = zscore(crop)
    assert out.dtype == np.float32
    values = crop.astype(np.float64)
    expected = (values - values.mean()) / values.std(ddof=1)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # Unbiased std: the sample std of the output is 1, the population std slightly below.
    assert out.astype(np.float64).std(ddof=1) == pytest.approx(1.0, abs=1e-6)
    assert out.astype(np.float64).std() < 1.0


def test_zscore_constant_crop_is_a_clear_error():
    with pytest.raises(ConstantCropError, match="every voxel equals 3"):
        zscore(np.full((4, 4, 4), 3.0))
    with pytest.raises(ValueError, match="NaN"):
        zscore(np.array([[[1.0, np.nan]]]))


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((40, 53, 55), ((0, 0), (2, 1), (1, 0))),  # the demo report's MNI crop
        ((8, 16, 24), ((0, 0), (0, 0), (0, 0))),
        ((1, 9, 15), ((4, 3), (4, 3), (1, 0))),
    ],
)
def test_pad_to_multiple_splits_ceil_before_floor_after(shape, expected):
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    padded, pads = pad_to_multiple(array)
    assert pads == expected
    assert all(n % 8 == 0 for n in padded.shape)
    assert padded.sum() == pytest.approx(array.sum())
    np.testing.assert_array_equal(unpad(padded, pads), array)
    # The data sits exactly ceil(t/2) voxels after the start of each axis.
    nonzero = np.nonzero(padded)
    for axis, (before, _) in enumerate(pads):
        assert nonzero[axis].min() == before
        assert nonzero[axis].max() == before + shape[axis] - 1


def test_pad_and_unpad_act_on_the_last_three_axes():
    batch = np.ones((2, 6, 40, 53, 55), dtype=np.float32)
    padded, pads = pad_to_multiple(batch, multiple=8)
    assert padded.shape == (2, 6, 40, 56, 56)
    assert unpad(padded, pads).shape == batch.shape
    padded4, pads4 = pad_to_multiple(np.ones((3, 5, 6, 7)), multiple=4)
    assert padded4.shape == (3, 8, 8, 8)
    assert pads4 == ((2, 1), (1, 1), (1, 0))


def test_pad_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        pad_to_multiple(np.ones((4, 4)))
    with pytest.raises(ValueError, match="positive"):
        pad_to_multiple(np.ones((4, 4, 4)), multiple=0)
    with pytest.raises(ValueError, match="do not fit"):
        unpad(np.ones((4, 4, 4)), ((3, 3), (0, 0), (0, 0)))
