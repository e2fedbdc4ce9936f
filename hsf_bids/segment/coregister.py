"""The second contrast of a multispectral job onto the first one's grid, so that its crops join
the same vote (``--contrast both``: late fusion in :func:`hsf_bids.segment.segment_crop`).

In: two nibabel images of one head (e.g. a T2w and its session's T1w, both RAS+); out: the
moving-to-fixed world map (:func:`register_to`) and the moving image resampled onto the fixed
grid (:func:`resample_to`). Unlike the rest of ``segment``, this module runs ANTs (through
:mod:`hsf_bids.localisation.registration`, which writes its grids to a temporary folder).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from hsf_bids.localisation.registration import ants_affine, world_grid, zooms

__all__ = ["register_to", "resample_to"]


def register_to(
    moving_img: nib.spatialimages.SpatialImage,
    fixed_img: nib.spatialimages.SpatialImage,
    seed: int = 0,
    *,
    kind: str = "rigid",
    resolution: float | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Register another image of the same head (e.g. a T2w) to ``fixed_img`` (e.g. the T1w).

    Mattes mutual information (contrast-agnostic), centre-of-mass start, levels at 4x, 2x and 1x
    ``resolution`` (default: the fixed image's smallest voxel size, at least 2 mm). ``kind`` is
    ``"rigid"`` (default: one head, 6 degrees of freedom) or ``"affine"`` (HSF's choice).
    Returns the 4x4 map from moving world mm to fixed world mm (RAS):
    ``fixed_point = A @ moving_point``.
    """
    transforms = {"rigid": "Rigid", "affine": "Affine"}
    if kind not in transforms:
        raise ValueError(f"kind must be one of {sorted(transforms)}, got {kind!r}")
    if resolution is None:
        resolution = max(2.0, float(zooms(fixed_img.affine).min()))
    fixed = world_grid(np.asarray(fixed_img.dataobj), np.asarray(fixed_img.affine), resolution)
    moving = world_grid(np.asarray(moving_img.dataobj), np.asarray(moving_img.affine), resolution)
    fixed_to_moving = ants_affine(
        fixed,
        moving,
        stages=[(transforms[kind], (4, 2, 1), (300, 100, 20), (2, 1, 0))],
        seed=seed,
        threads=threads,
    )
    return np.linalg.inv(fixed_to_moving)


def resample_to(
    moving_img: nib.spatialimages.SpatialImage,
    fixed_img: nib.spatialimages.SpatialImage,
    moving_to_fixed: np.ndarray | None = None,
    *,
    order: int = 1,
) -> nib.Nifti1Image:
    """Resample ``moving_img`` onto the grid of ``fixed_img`` (linear by default).

    ``moving_to_fixed`` is the world map returned by :func:`register_to` (identity when None).
    Voxels falling outside the moving image are 0. Returns a float32 image with the fixed
    image's shape and affine.
    """
    a = np.eye(4) if moving_to_fixed is None else np.asarray(moving_to_fixed, dtype=float)
    fixed_affine = np.asarray(fixed_img.affine, dtype=float)
    vox = np.linalg.inv(np.asarray(moving_img.affine, dtype=float)) @ np.linalg.inv(a)
    vox = vox @ fixed_affine
    data = np.asarray(moving_img.dataobj, dtype=np.float32)
    out = ndimage.affine_transform(
        data, vox[:3, :3], offset=vox[:3, 3], output_shape=tuple(fixed_img.shape[:3]),
        order=order, mode="constant", cval=0.0, prefilter=order > 1,
    )  # fmt: skip
    img = nib.Nifti1Image(out.astype(np.float32), fixed_affine)
    img.set_sform(fixed_affine, code=1)
    img.set_qform(fixed_affine, code=1)
    return img
