"""Load and validate anatomical NIfTI inputs, and move them to and from RAS+ voxel order.

Reorientation here is a pure axis permutation and flip (no resampling), so :func:`from_ras`
is the exact inverse of :func:`to_ras` and paste back reproduces the original voxels bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from hsf_bids.errors import EX_DATAERR, HsfBidsError

__all__ = [
    "InvalidImageError",
    "load_anat",
    "nonfinite_voxels",
    "to_ras",
    "from_ras",
    "ras_ornt",
    "image_name",
    "new_image",
]

# Voxel sizes outside this range are not MRI heads (or the header is in the wrong unit).
MIN_VOXEL_MM = 0.05
MAX_VOXEL_MM = 12.0
# Where load_anat records how many voxels were NaN or infinite (nibabel's ``extra`` mapping is
# meant for metadata the image format cannot store).
NONFINITE_VOXELS = "nonfinite_voxels"
# Below this the rows of the affine are close to linearly dependent (collapsed axes).
_MIN_ABS_COS = 1e-3


class InvalidImageError(HsfBidsError, ValueError):
    """An input image that cannot be segmented; the message names the file and the problem."""

    exit_code = EX_DATAERR


def image_name(img: nib.spatialimages.SpatialImage) -> str:
    """The file an image came from, or ``"<in-memory image>"``, for error messages."""
    name = img.get_filename() if hasattr(img, "get_filename") else None
    return str(name) if name else "<in-memory image>"


def _check_affine(affine: np.ndarray, name: str) -> None:
    """Raise :class:`InvalidImageError` if ``affine`` cannot place voxels in the world."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidImageError(f"{name}: the affine has non-finite values: {affine.tolist()}")
    lin = affine[:3, :3]
    zooms = np.linalg.norm(lin, axis=0)
    if np.any(zooms < MIN_VOXEL_MM) or np.any(zooms > MAX_VOXEL_MM):
        raise InvalidImageError(
            f"{name}: degenerate affine: voxel sizes {np.round(zooms, 4).tolist()} mm are outside "
            f"[{MIN_VOXEL_MM}, {MAX_VOXEL_MM}] mm"
        )
    # Normalised determinant: 1 for orthogonal axes, 0 when two axes collapse onto one.
    normdet = abs(np.linalg.det(lin)) / float(np.prod(zooms))
    if normdet < _MIN_ABS_COS:
        raise InvalidImageError(
            f"{name}: degenerate affine: the voxel axes are (nearly) collinear "
            f"(normalised determinant {normdet:.2e})"
        )


def _check_header_codes(img: nib.Nifti1Image, name: str) -> None:
    """Refuse NIfTI files whose orientation is unknown (left and right would be guessed), or
    whose qform, the affine in use, has no voxel size."""
    header = img.header
    if not isinstance(header, nib.Nifti1Header):
        return
    qcode = int(header["qform_code"])
    scode = int(header["sform_code"])
    if qcode == 0 and scode == 0:
        raise InvalidImageError(
            f"{name}: neither qform nor sform is set (both codes 0): the orientation is unknown, "
            "so left and right cannot be told apart"
        )
    if scode == 0:
        pixdim = _raw_pixdim(img)
        if pixdim is not None and not np.all(np.isfinite(pixdim) & (pixdim != 0)):
            raise InvalidImageError(
                f"{name}: the qform (in use: sform_code is 0) has voxel size "
                f"{[float(p) for p in pixdim]} (pixdim[1:4]): a zero or non-finite voxel size "
                "is unknown, not 1 mm"
            )


def _raw_pixdim(img: nib.Nifti1Image) -> np.ndarray | None:
    """``pixdim[1:4]`` as stored in the file. nibabel's loader replaces a zero by 1 (with only a
    log message), which would make volumes silently wrong; None when the header cannot be read
    again (the voxel data check reports the file)."""
    try:
        holder = img.file_map.get("header") or img.file_map["image"]
        with holder.get_prepare_fileobj(mode="rb") as fileobj:
            raw = type(img.header).from_fileobj(fileobj, check=False)
    except Exception:  # noqa: BLE001 - nibabel raises many types for corrupt files
        return None
    return np.asarray(raw["pixdim"][1:4], dtype=float)


def _validated(img: nib.spatialimages.SpatialImage, name: str) -> nib.Nifti1Image:
    """Check shape, values and affine of an image; return a 3D float image in its own grid."""
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) != 3:
        raise InvalidImageError(
            f"{name}: expected a 3D image (or 4D with one volume), got shape {tuple(img.shape)}"
        )
    if min(shape) < 2:
        raise InvalidImageError(f"{name}: an image of shape {tuple(shape)} is not a volume")
    affine = np.asarray(img.affine, dtype=float)
    _check_affine(affine, name)
    data = np.asarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InvalidImageError(f"{name}: voxel type {data.dtype} is not a real scalar type")
    data = data.reshape(shape)
    finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else None
    if finite is not None and not finite.any():
        raise InvalidImageError(f"{name}: every voxel is NaN or infinite")
    nonfinite = 0
    if finite is not None and not finite.all():
        # Registration and z-scoring cannot cope with NaN; background is the only sane fill.
        # The count is kept so that the run can warn and flag the image's results.
        nonfinite = int(finite.size - np.count_nonzero(finite))
        data = np.where(finite, data, 0)
    if not np.any(data):
        raise InvalidImageError(f"{name}: every voxel is zero")
    if np.ptp(data) == 0:
        raise InvalidImageError(f"{name}: every voxel has the same value {data.flat[0]}")
    out = new_image(data, affine, code=_xform_code(img))
    out.extra[NONFINITE_VOXELS] = nonfinite
    if name != "<in-memory image>":
        out.set_filename(name)
    return out


def nonfinite_voxels(img: nib.spatialimages.SpatialImage) -> int:
    """How many voxels of an image read by :func:`load_anat` were NaN or infinite in the file
    (now 0, background); 0 for other images."""
    return int(img.extra.get(NONFINITE_VOXELS, 0))


def _xform_code(img: nib.spatialimages.SpatialImage) -> int:
    """The NIfTI xform code to carry over (sform's if set, else qform's, else 1 = scanner)."""
    header = img.header
    if isinstance(header, nib.Nifti1Header):
        scode, qcode = int(header["sform_code"]), int(header["qform_code"])
        return scode or qcode or 1
    return 1


def new_image(data: np.ndarray, affine: np.ndarray, code: int = 1) -> nib.Nifti1Image:
    """A NIfTI image whose qform and sform both hold ``affine`` (so every reader agrees)."""
    out = nib.Nifti1Image(data, affine)
    out.set_sform(affine, code=code)
    out.set_qform(affine, code=code)
    out.set_data_dtype(data.dtype)
    return out


def load_anat(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Load and validate an anatomical head image.

    Input: a NIfTI-1/2 file (``.nii`` or ``.nii.gz``). Output: a 3D :class:`nibabel.Nifti1Image`
    in the file's own voxel order, with the affine nibabel picks (sform when its code is set,
    else qform), scaled data (``scl_slope`` applied) and non-finite voxels set to 0 (background;
    :func:`nonfinite_voxels` says how many there were).

    Raises :class:`InvalidImageError` naming the file when it is missing or unreadable, not 3D
    (4D is accepted only with one volume), all zeros, all NaN, constant, has no qform/sform, has
    a degenerate affine, or takes its affine from a qform with a zero voxel size.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidImageError(f"{path}: no such file")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InvalidImageError(f"{path}: cannot be read as a NIfTI image: {exc}") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InvalidImageError(f"{path}: not a NIfTI image ({type(img).__name__})")
    _check_header_codes(img, str(path))
    try:
        return _validated(img, str(path))
    except (OSError, EOFError, ValueError) as exc:
        if isinstance(exc, InvalidImageError):
            raise
        raise InvalidImageError(f"{path}: the voxel data cannot be read: {exc}") from exc


def ras_ornt(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform taking voxel axes of ``affine`` to RAS+ order.

    The closest axis is chosen for oblique affines, as :func:`nibabel.as_closest_canonical` does.
    """
    return io_orientation(affine)


def to_ras(img: nib.spatialimages.SpatialImage) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Reorder the voxels of a 3D image to RAS+ (axis 0 left to right, 1 posterior to anterior,
    2 inferior to superior) without resampling.

    Returns ``(ras_img, ornt)``: the reordered image (same world positions, adjusted affine) and
    the nibabel orientation array to pass to :func:`from_ras` to undo the reordering.
    """
    name = image_name(img)
    affine = np.asarray(img.affine, dtype=float)
    _check_affine(affine, name)
    if len(img.shape) != 3:
        raise InvalidImageError(f"{name}: to_ras expects a 3D image, got shape {img.shape}")
    ornt = ras_ornt(affine)
    data = np.asarray(img.dataobj)
    ras_data = apply_orientation(data, ornt)
    ras_affine = affine @ inv_ornt_aff(ornt, img.shape)
    ras_img = new_image(ras_data, ras_affine, code=_xform_code(img))
    if name != "<in-memory image>":
        ras_img.set_filename(name)
    return ras_img, ornt


def from_ras(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Put an array in RAS+ voxel order back in the original voxel order.

    ``ornt`` is the orientation returned by :func:`to_ras`. Extra trailing axes (e.g. classes)
    are carried along. The result is an exact permutation/flip of ``array`` (a view when possible).
    """
    # The original array has orientation ``ornt`` relative to RAS; the RAS array has identity.
    back = ornt_transform(_RAS_IDENTITY, np.asarray(ornt, dtype=float))
    return apply_orientation(array, back)


_RAS_IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
