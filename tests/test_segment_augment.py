"""Test-time augmentation: sampled ranges, flips, affine and elastic maps and their inverses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from hsf_bids.segment import HSF_TTA, Augmentation, TTASettings, sample_augmentation

SHAPE = (24, 28, 20)


def _ramps(shape: tuple[int, int, int]) -> np.ndarray:
    """Three images, each the voxel coordinate along one axis (linear, so trilinear
    interpolation of them is exact and a round trip must return them)."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))


def _blob(shape, centre, sigma=2.0):
    grid = _ramps(shape)
    d2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def _centre_of_mass(image):
    grid = _ramps(image.shape)
    return np.array([(grid[a] * image).sum() / image.sum() for a in range(3)])


def _draw(kind: str, seed: int, spacing=(1.0, 1.0, 1.0), shape=SHAPE) -> Augmentation:
    rng = np.random.default_rng(seed)
    for _ in range(200):
        aug = sample_augmentation(rng, shape, spacing)
        if aug.kind == kind:
            return aug
    raise AssertionError(f"no {kind} augmentation drawn")


def test_parameters_stay_in_hsf_ranges_over_many_draws():
    rng = np.random.default_rng(123)
    augs = [sample_augmentation(rng, SHAPE, (1.0, 1.2, 0.9)) for _ in range(3000)]
    flips = np.mean([a.flip for a in augs])
    affine = [a for a in augs if a.kind == "affine"]
    elastic = [a for a in augs if a.kind == "elastic"]
    assert len(affine) + len(elastic) == len(augs)
    assert flips == pytest.approx(0.5, abs=0.04)
    assert len(affine) / len(augs) == pytest.approx(0.8, abs=0.03)
    scales = np.array([a.scales for a in affine])
    degrees = np.array([a.degrees for a in affine])
    translation = np.array([a.translation_mm for a in affine])
    control = np.stack([a.control_points for a in elastic])
    for values, low, high in [
        (scales, 0.8, 1.2),
        (degrees, -15.0, 15.0),
        (translation, -3.0, 3.0),
        (control, -4.0, 4.0),
    ]:
        assert values.min() >= low and values.max() <= high
        # The whole range is used, on every axis.
        span = high - low
        for axis in range(3):
            column = values[..., axis]
            assert column.min() < low + 0.02 * span and column.max() > high - 0.02 * span
    assert control.shape[1:] == (4, 4, 4, 3)
    # HSF's configuration locks no border: the outer control points move too.
    assert np.abs(control[:, 0]).max() > 3.5


def test_same_seed_same_parameters_different_seed_different():
    def params(seed):
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(10):
            a = sample_augmentation(rng, SHAPE, (1.0, 1.0, 1.0))
            cp = a.control_points if a.control_points is not None else np.zeros(1)
            out.append((a.flip, a.kind, a.scales, a.degrees, a.translation_mm, cp.tobytes()))
        return out

    assert params(7) == params(7)
    assert params(7) != params(8)


def test_flip_twice_is_identity_and_flip_composes_with_affine():
    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE).astype(np.float32)
    flip = Augmentation(shape=SHAPE, spacing=(1.0, 1.0, 1.0), flip=True, kind="none")
    np.testing.assert_array_equal(flip.apply(image), image[::-1])
    np.testing.assert_array_equal(flip.apply(flip.apply(image)), image)
    probs = rng.random((2, 3, *SHAPE)).astype(np.float32)
    np.testing.assert_array_equal(flip.invert(flip.invert(probs)), probs)
    # flip then affine == affine applied to the mirrored crop.
    aug = _draw("affine", 1)
    flipped = dataclasses.replace(aug, flip=not aug.flip)
    base = aug if not aug.flip else flipped
    mirrored = flipped if not aug.flip else aug
    np.testing.assert_allclose(mirrored.apply(image), base.apply(image[::-1].copy()), atol=1e-5)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.2, 0.8, 2.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_apply_then_invert_is_identity_in_the_interior(spacing, seed):
    aug = _draw("affine", seed, spacing)
    ramps = _ramps(SHAPE)
    augmented = np.stack([aug.apply(r) for r in ramps])
    back = aug.invert(augmented[None])[0]
    upper = np.reshape(SHAPE, (3, 1, 1, 1)) - 1
    target = aug.target_coords
    # Augmented voxels sampled from inside the crop, eroded so that their neighbours are too.
    src = aug.source_coords
    valid = ndimage.binary_erosion(np.all((src >= 0) & (src <= upper), axis=0), iterations=2)
    # Exact region: crop voxels whose augmented position lies in that valid region.
    nearest = tuple(np.clip(np.rint(target).astype(int), 0, upper))
    exact = np.all((target >= 0) & (target <= upper), axis=0) & valid[nearest]
    assert exact.sum() > 0.3 * np.prod(SHAPE)
    np.testing.assert_allclose(back[:, exact], ramps[:, exact], atol=2e-3)


def test_affine_moves_in_millimetres_about_the_crop_centre():
    shape = (31, 31, 31)
    spacing = (1.5, 1.0, 0.5)
    centre = np.array([15.0, 15.0, 15.0])
    image = _blob(shape, centre)
    shift = Augmentation(
        shape=shape, spacing=spacing, flip=False, kind="affine", translation_mm=(3.0, 2.0, -1.0)
    )
    moved = shift.apply(image)
    np.testing.assert_allclose(_centre_of_mass(moved) - centre, [2.0, 2.0, -2.0], atol=0.05)
    # Scaling and rotation about the crop centre keep a centred blob in place.
    spin = Augmentation(
        shape=shape,
        spacing=spacing,
        flip=False,
        kind="affine",
        scales=(1.2, 0.8, 1.1),
        degrees=(10.0, -12.0, 14.0),
    )
    np.testing.assert_allclose(_centre_of_mass(spin.apply(image)), centre, atol=0.05)
    # A 1.2x scale makes objects look 1.2x larger: the blob's variance grows by 1.44.
    grow = Augmentation(
        shape=shape, spacing=(1.0, 1.0, 1.0), flip=False, kind="affine", scales=(1.2, 1.2, 1.2)
    )
    wide = _blob(shape, centre, sigma=3.0)
    grid = _ramps(shape)
    for axis in range(3):

        def variance(img, axis=axis):
            return ((grid[axis] - centre[axis]) ** 2 * img).sum() / img.sum()

        assert variance(grow.apply(wide)) / variance(wide) == pytest.approx(1.44, rel=0.03)


def test_fill_values_outside_the_field_of_view():
    rng = np.random.default_rng(5)
    image = rng.uniform(10, 20, size=SHAPE).astype(np.float32)
    far = Augmentation(
        shape=SHAPE,
        spacing=(1.0, 1.0, 1.0),
        flip=False,
        kind="affine",
        translation_mm=(10.0, 0.0, 0.0),
    )
    out = far.apply(image)
    # The first 10 slices along x come from outside the crop: the crop minimum, like torchio.
    np.testing.assert_array_equal(out[:9], image.min())
    np.testing.assert_allclose(out[12:], image[2:-10], atol=1e-4)
    probs = np.zeros((3, *SHAPE), dtype=np.float32)
    probs[2] = 1.0  # everything "CA1"-like on the augmented grid
    back = far.invert(probs)
    # The last 10 crop slices were pushed out of the augmented grid: background.
    np.testing.assert_array_equal(back[0, -9:], 1.0)
    np.testing.assert_array_equal(back[1:, -9:], 0.0)
    np.testing.assert_allclose(back[2, :12], 1.0, atol=1e-6)
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_elastic_inverse_is_accurate(seed):
    spacing = (1.0, 1.1, 0.9)
    aug = _draw("elastic", seed, spacing)
    mm = aug.displacement_voxel * np.reshape(spacing, (3, 1, 1, 1))
    # Displacements are B-spline blends of control points within +-4 mm.
    assert 0.3 < np.abs(mm).max() <= 4.0
    assert aug.inversion_residual < 1e-3
    ramps = _ramps(SHAPE)
    augmented = np.stack([aug.apply(r) for r in ramps])
    back = aug.invert(augmented[None])[0]
    interior = (slice(5, -5),) * 3
    error = np.abs(back - ramps)[(slice(None), *interior)]
    # The field is smooth, so linear interpolation of the warped ramps is nearly exact.
    assert error.max() < 0.02
    # And the deformation is not the identity.
    assert np.abs(augmented - ramps)[(slice(None), *interior)].max() > 0.3


def test_locked_borders_and_settings_guards():
    rng = np.random.default_rng(0)
    settings = TTASettings(locked_borders=1, affine_probability=0.0, elastic_probability=1.0)
    aug = sample_augmentation(rng, SHAPE, (1, 1, 1), settings)
    cp = aug.control_points
    assert aug.kind == "elastic"
    for axis in range(3):
        assert not np.take(cp, [0, 3], axis=axis).any()
    assert np.abs(cp[1:3, 1:3, 1:3]).max() > 0
    with pytest.raises(ValueError, match="identity"):
        TTASettings(locked_borders=2)
    assert HSF_TTA.locked_borders == 0 and HSF_TTA.num_control_points == 4
    with pytest.raises(ValueError, match="does not match"):
        aug.apply(np.zeros((3, 3, 3)))
