"""Boxes: where each hippocampus is cropped, and the crop and paste between a head and a box.

Every array here is in the RAS+ voxel order of the subject image (see
:func:`hsf_bids.image.to_ras`); boxes are voxel index ranges of that grid. :func:`warp_label`
brings a template label onto that grid, :func:`make_box` grows its bounding box by a margin,
:func:`crop` and :func:`paste_back` move voxels between the head and a box exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hsf_bids.localisation.registration import LocalisationError

__all__ = [
    "ANISOTROPY_RATIO",
    "DEFAULT_MARGIN",
    "THICK_SLICE_MARGIN",
    "Box",
    "auto_margin",
    "check_margin",
    "crop",
    "make_box",
    "paste_back",
    "warp_label",
]

# Right first, as HSF processes it (the order is cosmetic).
DEFAULT_MARGIN: tuple[int, int, int] = (8, 8, 8)
# HSF's margin for coronal thick-slice T2 (thin, thick, thin): the thin axes get 16, the thick 4.
THICK_SLICE_MARGIN: tuple[int, int] = (16, 4)
# Voxel-size ratio from which an image counts as thick-slice.
ANISOTROPY_RATIO = 1.5


@dataclass(frozen=True)
class Box:
    """The crop region of one side, in voxels of the RAS+ subject grid.

    ``start``/``stop`` are half-open index ranges, already clamped to the image. ``label_start``
    and ``label_stop`` bound the warped template hippocampus (half-open, *not* clamped: negative or
    beyond the shape when the hippocampus leaves the field of view). ``margin`` is what was asked
    for; ``clipped_voxels`` counts, per axis, the margin voxels lost to the image edge (low + high).
    ``label_voxels`` counts the warped label's voxels, ``label_voxels_outside`` those outside the
    image.
    """

    side: str
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    label_start: tuple[int, int, int]
    label_stop: tuple[int, int, int]
    margin: tuple[int, int, int]
    clipped_voxels: tuple[int, int, int]
    label_voxels: int
    label_voxels_outside: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The crop's shape."""
        return tuple(int(b - a) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index the RAS+ array with these to get the crop."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def clipped(self) -> bool:
        """Whether the image edge cut into the requested margin (or the label itself)."""
        return any(self.clipped_voxels) or self.label_voxels_outside > 0

    @property
    def fraction_outside(self) -> float:
        """Fraction of the warped hippocampus lying outside the image (0 when fully inside)."""
        return self.label_voxels_outside / self.label_voxels if self.label_voxels else 1.0

    @property
    def label_inside_box(self) -> bool:
        """Whether every voxel of the warped hippocampus lies inside the box."""
        return self.label_voxels_outside == 0 and all(
            a <= ls and le <= b
            for a, b, ls, le in zip(
                self.start, self.stop, self.label_start, self.label_stop, strict=True
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for JSON reports."""
        return {
            "side": self.side,
            "start": list(self.start),
            "stop": list(self.stop),
            "shape": list(self.shape),
            "label_start": list(self.label_start),
            "label_stop": list(self.label_stop),
            "margin": list(self.margin),
            "clipped_voxels": list(self.clipped_voxels),
            "label_voxels": self.label_voxels,
            "label_voxels_outside": self.label_voxels_outside,
            "fraction_outside": self.fraction_outside,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Box:
        """The inverse of :meth:`to_dict` (derived values are recomputed, not read)."""
        tuples = ("start", "stop", "label_start", "label_stop", "margin", "clipped_voxels")
        return cls(
            side=str(values["side"]),
            **{key: tuple(int(v) for v in values[key]) for key in tuples},
            label_voxels=int(values["label_voxels"]),
            label_voxels_outside=int(values["label_voxels_outside"]),
        )


def auto_margin(
    zooms: Sequence[float],
    isotropic: Sequence[int] = DEFAULT_MARGIN,
    thick_slice: tuple[int, int] = THICK_SLICE_MARGIN,
) -> tuple[int, int, int]:
    """The default margin (voxels per RAS+ axis) for voxel sizes ``zooms`` (mm, RAS+ order).

    Nearly isotropic voxels (largest/smallest < 1.5): ``isotropic`` (HSF's ``[8, 8, 8]``). Thick
    slices: HSF's thick-slice rule generalised to any slice axis: ``thick_slice = (thin, thick)``
    voxels, ``thick`` along thick axes (size >= 1.5 x the smallest), ``thin`` along the others;
    with HSF's ``(16, 4)`` a coronal 0.4 x 2 x 0.4 mm T2 gets ``[16, 4, 16]`` as in HSF.
    """
    z = np.asarray(zooms, dtype=float)
    if z.shape != (3,) or np.any(z <= 0):
        raise ValueError(f"expected three positive voxel sizes, got {list(zooms)}")
    if z.max() / z.min() < ANISOTROPY_RATIO:
        return check_margin(isotropic)
    thin, thick = thick_slice
    return tuple(thick if zi >= ANISOTROPY_RATIO * z.min() else thin for zi in z)


def check_margin(margin: Sequence[int]) -> tuple[int, int, int]:
    """``margin`` as three non-negative ints; ValueError otherwise."""
    values = list(margin)
    if len(values) != 3 or any(isinstance(v, bool) or int(v) != v or v < 0 for v in values):
        raise ValueError(f"margin must be three non-negative integers, got {values}")
    return tuple(int(v) for v in values)


def make_box(
    side: str,
    mask_start: Sequence[int],
    mask: np.ndarray,
    shape: Sequence[int],
    margin: Sequence[int],
) -> Box:
    """The box of one side from its warped label.

    ``mask`` is the label (boolean) placed at index ``mask_start`` of a grid of ``shape`` (it may
    extend past the grid). The box is the label's bounding box inside the image, grown by
    ``margin`` voxels and clamped: ``[min - m, max + m)`` as in HSF, except that the last label
    voxel is always included (``stop >= max + 1`` even with a zero margin).
    """
    margin = check_margin(margin)
    shape = tuple(int(s) for s in shape)
    start0 = np.asarray(mask_start, dtype=int)
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise LocalisationError(f"the warped {side} hippocampus is empty")
    idx = idx + start0
    inside = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    total = int(len(idx))
    outside = int(total - inside.sum())
    label_lo = idx.min(axis=0)
    label_hi = idx.max(axis=0) + 1
    if not inside.any():
        raise LocalisationError(
            f"the warped {side} hippocampus lies entirely outside the image "
            f"(label voxels {label_lo.tolist()} to {label_hi.tolist()}, image shape {list(shape)})"
        )
    lo = idx[inside].min(axis=0)
    hi = idx[inside].max(axis=0)
    m = np.asarray(margin)
    want_lo = lo - m
    want_hi = hi + np.maximum(m, 1)
    start = np.maximum(want_lo, 0)
    stop = np.minimum(want_hi, np.asarray(shape))
    clipped = (start - want_lo) + (want_hi - stop)
    return Box(
        side=side,
        start=tuple(int(v) for v in start),
        stop=tuple(int(v) for v in stop),
        label_start=tuple(int(v) for v in label_lo),
        label_stop=tuple(int(v) for v in label_hi),
        margin=margin,
        clipped_voxels=tuple(int(v) for v in clipped),
        label_voxels=total,
        label_voxels_outside=outside,
    )


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """The crop of ``array`` (RAS+ grid, spatial axes first) inside ``box``, as a copy."""
    if array.ndim < 3:
        raise ValueError(f"crop expects an array with 3 spatial axes first, got {array.shape}")
    if any(b > s for b, s in zip(box.stop, array.shape[:3], strict=True)):
        raise ValueError(f"box {box.start}-{box.stop} does not fit array of shape {array.shape}")
    return np.array(array[box.slices], copy=True)


def paste_back(
    crop_array: np.ndarray,
    box: Box,
    shape: Sequence[int],
    *,
    out: np.ndarray | None = None,
    fill: float = 0,
) -> np.ndarray:
    """Put a crop back at its place in the RAS+ grid of ``shape`` (the inverse of :func:`crop`).

    Trailing axes beyond the three spatial ones are carried along. With ``out`` the crop is
    written into that array (e.g. to assemble both sides in one label image) and it is returned;
    otherwise a new array filled with ``fill`` is made, of the crop's dtype. Use
    :func:`hsf_bids.image.from_ras` on the result to return to the input's voxel order.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(crop_array.shape[:3]) != box.shape:
        raise ValueError(f"crop of shape {crop_array.shape} does not match box shape {box.shape}")
    full_shape = shape + tuple(crop_array.shape[3:])
    if out is None:
        out = np.full(full_shape, fill, dtype=crop_array.dtype)
    elif out.shape != full_shape:
        raise ValueError(f"out has shape {out.shape}, expected {full_shape}")
    out[box.slices] = crop_array
    return out


def warp_label(
    atlas: np.ndarray,
    atlas_affine: np.ndarray,
    label: int,
    template_to_subject: np.ndarray,
    affine: np.ndarray,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Nearest-neighbour warp of one atlas label to a subject grid, around the label only.

    Returns ``(start, mask)``: the boolean label on the subject voxels ``start + index`` (the
    region may extend past the subject image: it covers the whole warped label). Voxel centres
    are mapped to the atlas and rounded half up, as ITK's nearest-neighbour interpolator does.
    """
    idx = np.argwhere(atlas == label)
    if idx.size == 0:
        raise LocalisationError(f"label {label} is absent from the atlas")
    lo, hi = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])  # fmt: skip
    atlas_to_subject_vox = np.linalg.inv(affine) @ template_to_subject @ atlas_affine
    sub = (atlas_to_subject_vox @ corners.T)[:3]
    start = np.floor(sub.min(axis=1)).astype(int) - 1
    stop = np.ceil(sub.max(axis=1)).astype(int) + 2
    shape = tuple(int(v) for v in stop - start)
    if np.prod(shape) > 400**3:
        raise LocalisationError(
            f"the warped label {label} spans {shape} voxels: the registration scale is implausible"
        )
    back = np.linalg.inv(atlas_to_subject_vox)
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1) + start[:, None]
    pos = back[:3, :3] @ grid + back[:3, 3:4]
    near = np.floor(pos + 0.5).astype(np.int64)
    valid = np.all((near >= 0) & (near < np.asarray(atlas.shape)[:, None]), axis=0)
    values = np.zeros(near.shape[1], dtype=bool)
    values[valid] = atlas[near[0, valid], near[1, valid], near[2, valid]] == label
    return tuple(int(v) for v in start), values.reshape(shape)
