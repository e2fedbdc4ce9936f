"""Loading, validation and RAS+ reorientation of real head images."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from hsf_bids.image import (
    InvalidImageError,
    from_ras,
    load_anat,
    new_image,
    nonfinite_voxels,
    to_ras,
)

HEADS = [
    "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-02/anat/sub-02_T2w.nii.gz",
    "sub-03/anat/sub-03_T1w.nii.gz",
    "sub-03/anat/sub-03_T2w.nii.gz",
    "sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz",
    "sub-04/ses-02/anat/sub-04_ses-02_T1w.nii.gz",
]


def _world_of_voxels(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World position of every voxel, shape (*shape, 3)."""
    ijk = np.indices(shape, dtype=float).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T.reshape(*shape, 3)


@pytest.mark.parametrize("rel", HEADS)
def test_load_and_to_ras_every_head(ds_mini: Path, rel: str) -> None:
    img = load_anat(ds_mini / rel)
    raw = nib.load(ds_mini / rel)
    assert img.shape == raw.shape
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(raw.dataobj))
    ras, ornt = to_ras(img)
    assert aff2axcodes(ras.affine) == ("R", "A", "S")
    # Same voxel values at the same world positions: reorientation is a permutation only.
    data, ras_data = np.asarray(img.dataobj), np.asarray(ras.dataobj)
    assert sorted(ras.shape) == sorted(img.shape)
    back = from_ras(ras_data, ornt)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(
        from_ras(_world_of_voxels(ras.affine, ras.shape), ornt),
        _world_of_voxels(img.affine, img.shape),
        atol=1e-4,
    )
    assert ras.get_filename() == str(ds_mini / rel)


def test_qform_only_file_uses_qform(ds_mini: Path) -> None:
    path = ds_mini / "sub-01/anat/sub-01_T1w.nii.gz"
    hdr = nib.load(path).header
    assert int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) > 0
    img = load_anat(path)
    np.testing.assert_allclose(img.affine, hdr.get_qform(), atol=1e-6)
    assert aff2axcodes(img.affine) == ("L", "A", "S")


def test_sform_only_file_uses_sform(ds_mini: Path) -> None:
    path = ds_mini / "sub-02/anat/sub-02_T2w.nii.gz"
    hdr = nib.load(path).header
    assert int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) > 0
    img = load_anat(path)
    np.testing.assert_allclose(img.affine, hdr.get_sform(), atol=1e-6)


def _reoriented_variants(img: nib.Nifti1Image) -> dict[str, nib.Nifti1Image]:
    """The same head stored in other voxel orders (same world positions, no resampling)."""
    data = np.asarray(img.dataobj)
    affine = img.affine
    shape = np.array(data.shape)
    out = {}
    # LAS: flip axis 0.
    flip0 = np.eye(4)
    flip0[0, 0], flip0[0, 3] = -1, shape[0] - 1
    out["LAS"] = new_image(data[::-1].copy(), affine @ flip0)
    # LPS: flip axes 0 and 1.
    flip01 = flip0.copy()
    flip01[1, 1], flip01[1, 3] = -1, shape[1] - 1
    out["LPS"] = new_image(data[::-1, ::-1].copy(), affine @ flip01)
    # ASL-like: axes permuted (stored as sagittal slices, PA first) and flipped.
    perm = np.transpose(data, (1, 2, 0))[:, :, ::-1].copy()
    p = np.zeros((4, 4))
    p[3, 3] = 1
    # new index (a, b, c) -> old index (i, j, k) = (shape0-1-c, a, b)
    p[0, 2], p[0, 3] = -1, shape[0] - 1
    p[1, 0] = 1
    p[2, 1] = 1
    out["permuted"] = new_image(perm, affine @ p)
    # Oblique: rotate the voxel axes 20 degrees about I-S in world (grid rotation, same data).
    t = np.deg2rad(20)
    rot = np.array(
        [[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    )
    out["oblique"] = new_image(data[::-1].copy(), rot @ affine @ flip0)
    return out


def test_reorientation_round_trip_ras_las_lps_permuted_oblique(ds_mini: Path) -> None:
    img = load_anat(ds_mini / HEADS[4])  # stored RAS
    ras0, _ = to_ras(img)
    ras0_data = np.asarray(ras0.dataobj)
    for name, variant in _reoriented_variants(img).items():
        ras, ornt = to_ras(variant)
        assert aff2axcodes(ras.affine) == ("R", "A", "S"), name
        if name != "oblique":
            # Every non-oblique variant is one RAS array at one place in the world.
            np.testing.assert_array_equal(np.asarray(ras.dataobj), ras0_data, err_msg=name)
            np.testing.assert_allclose(ras.affine, ras0.affine, atol=1e-9, err_msg=name)
        back = from_ras(np.asarray(ras.dataobj), ornt)
        np.testing.assert_array_equal(back, np.asarray(variant.dataobj), err_msg=name)


def test_from_ras_carries_trailing_axes(ds_mini: Path) -> None:
    img = load_anat(ds_mini / HEADS[5])  # stored LPS, oblique
    ras, ornt = to_ras(img)
    stack = np.stack([np.asarray(ras.dataobj), np.asarray(ras.dataobj) + 1], axis=-1)
    back = from_ras(stack, ornt)
    np.testing.assert_array_equal(back[..., 0], np.asarray(img.dataobj))
    np.testing.assert_array_equal(back[..., 1], np.asarray(img.dataobj) + 1)


def _save(tmp_path: Path, name: str, data: np.ndarray, affine=None, codes=(1, 1)) -> Path:
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=codes[0])
    img.set_qform(affine, code=codes[1])
    path = tmp_path / name
    nib.save(img, path)
    return path


def _head_like(rng: np.random.Generator, shape=(20, 22, 18)) -> np.ndarray:
    return rng.random(shape).astype(np.float32)


def test_4d_with_one_volume_is_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = _head_like(rng)[..., None]
    img = load_anat(_save(tmp_path, "one.nii.gz", data))
    assert img.shape == data.shape[:3]
    np.testing.assert_array_equal(np.asarray(img.dataobj), data[..., 0])


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("four_d.nii.gz", lambda r: np.stack([_head_like(r)] * 2, axis=-1), "3D image"),
        ("two_d.nii.gz", lambda r: _head_like(r)[:, :, 0], "3D image"),
        ("zeros.nii.gz", lambda r: np.zeros((10, 10, 10), np.float32), "every voxel is zero"),
        ("nan.nii.gz", lambda r: np.full((10, 10, 10), np.nan, np.float32), "NaN"),
        ("flat.nii.gz", lambda r: np.full((10, 10, 10), 3, np.int16), "same value"),
    ],
)
def test_bad_voxels_are_refused_with_the_file_name(tmp_path: Path, name, make, message) -> None:
    path = _save(tmp_path, name, make(np.random.default_rng(1)))
    with pytest.raises(InvalidImageError, match=message) as info:
        load_anat(path)
    assert str(path) in str(info.value)


def test_partial_nan_becomes_zero(tmp_path: Path) -> None:
    data = _head_like(np.random.default_rng(2))
    data[0, 0, :] = np.nan
    img = load_anat(_save(tmp_path, "partnan.nii.gz", data))
    out = np.asarray(img.dataobj)
    assert np.all(np.isfinite(out)) and np.all(out[0, 0, :] == 0)
    np.testing.assert_array_equal(out[1:], data[1:])
    assert nonfinite_voxels(img) == data.shape[2]  # counted for the warning and the QC flag
    assert nonfinite_voxels(load_anat(_save(tmp_path, "finite.nii.gz", out))) == 0


@pytest.mark.parametrize(
    ("affine", "message"),
    [
        (np.diag([1.0, 0.0, 1.0, 1.0]), "degenerate affine"),
        (np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1.0]]), "degenerate"),
        (np.diag([50.0, 1.0, 1.0, 1.0]), "degenerate affine"),
    ],
)
def test_degenerate_affine_is_refused(tmp_path: Path, affine, message) -> None:
    path = tmp_path / "degenerate.nii.gz"
    img = nib.Nifti1Image(_head_like(np.random.default_rng(3)), None)
    # sform only: nibabel cannot even store such an affine as a qform.
    img.header.set_sform(affine, code=1)
    img.header["qform_code"] = 0
    nib.save(img, path)
    with pytest.raises(InvalidImageError, match=message) as info:
        load_anat(path)
    assert str(path) in str(info.value)


def test_no_orientation_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, "nocodes.nii.gz", _head_like(np.random.default_rng(4)), codes=(0, 0))
    with pytest.raises(InvalidImageError, match="neither qform nor sform"):
        load_anat(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="no such file"):
        load_anat(tmp_path / "absent.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti at all")
    with pytest.raises(InvalidImageError, match="junk.nii.gz"):
        load_anat(junk)
