"""Locate the hippocampi in a head image: template registration, boxes, crops and paste back.

Contract steps 1-3 and 7. Every array here is in the RAS+ voxel order of the subject image
(see :func:`hsf_bids.image.to_ras`); boxes are voxel index ranges of that grid.

Registration: the MNI152NLin2009cSym template of the matching contrast (moving) is registered
affinely to the subject (fixed) with ANTs, on copies of both resampled to ``resolution`` mm
(default 2 mm, world-axis aligned, block-averaged first so fine images are not aliased). The
schedule runs at 12, 8 and 4 mm (shrink factors relative to ``resolution``) after a centre-of-mass
initialisation, with Mattes mutual information on a regular (seeded) sample grid. The CerebrA
hippocampus labels (48 right, 99 left) are then warped to the subject grid with nearest
neighbour, exactly as ``ants.apply_transforms(..., interpolator="nearestNeighbor")`` would,
but only inside a region around each label, so images of any size cost the same.

Determinism: ITK's multi-threaded metric is not reproducible with a fixed seed (measured), so
ANTs runs single-threaded by default (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``, set before
ITK's first use in the process; a value the user exported is respected). ANTs reads a seed of
0 as "seed from the clock", so ``seed`` is passed to it as ``seed + 1``.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage

from hsf_bids.image import image_name
from hsf_bids.templates import HIPPOCAMPUS_LABELS, load_atlas, load_template

__all__ = [
    "SIDES",
    "DEFAULT_MARGIN",
    "THICK_SLICE_MARGIN",
    "LocalisationError",
    "Box",
    "Localisation",
    "auto_margin",
    "register_template",
    "warp_label",
    "make_box",
    "locate",
    "assess",
    "crop",
    "paste_back",
    "register_to",
    "resample_to",
]

# Right first, as HSF processes it (the order is cosmetic).
SIDES: tuple[str, str] = ("right", "left")
DEFAULT_MARGIN: tuple[int, int, int] = (8, 8, 8)
# HSF's margin for coronal thick-slice T2 (thin, thick, thin): the thin axes get 16, the thick 4.
THICK_SLICE_MARGIN: tuple[int, int] = (16, 4)
# Voxel-size ratio from which an image counts as thick-slice.
ANISOTROPY_RATIO = 1.5

# Registration stages: transform, levels in mm (shrink factor = level / resolution),
# iterations and smoothing (voxels) per level. 20 iterations at 4 mm: on the ds-mini heads the
# result moves by at most 0.06 mm around the hippocampi compared with 50 (which only converges
# after ~30), for half a second less. A 4 mm grid for ANTs would save more but moves the
# hippocampi by 1-2 mm and lowers the local correlations (measured).
_STAGES = (("Affine", (12.0, 8.0, 4.0), (1000, 500, 20), (3, 2, 1)),)
# The retry when the fast route looks poor (see RETRY_CORRELATION): down to 2 mm, about 4x the
# time. On ds-mini only the thick-slice, 120 mm-slab sub-03 T2w ever needs it (seed-dependent).
_FINE_STAGES = (("Affine", (8.0, 4.0, 2.0), (500, 100, 20), (2, 1, 0)),)
_SAMPLING_RATE = 0.2

# QC thresholds on Pearson's r between template and subject intensities. Measured on ds-mini:
# around each hippocampus 0.58-0.74 when registered, 0.27-0.56 after a 5 mm shift, <= 0.31
# after 10 mm; over the whole brain 0.29-0.51 registered, <= 0.16 after 10 mm (a weak signal).
MIN_BRAIN_CORRELATION = 0.15
MIN_LOCAL_CORRELATION = 0.35
# Plausible volume ratio subject/template (the 2009c template is a large adult head) and
# per-axis scale range of the template-to-subject affine.
DETERMINANT_RANGE = (0.35, 1.8)
# Below this local correlation (either side) locate() registers again on the finer schedule and
# keeps the better of the two (by the lower of the two local correlations).
RETRY_CORRELATION = 0.5
SCALE_RANGE = (0.6, 1.35)
MAX_SCALE_RATIO = 1.4

_ITK_THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_itk_threads: int | None = None
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class LocalisationError(RuntimeError):
    """Registration could not run or gave an unusable transform."""


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


@dataclass
class Localisation:
    """Where the hippocampi are in one RAS+ head image, and how much to trust it.

    ``template_to_subject`` maps template world mm (RAS) to subject world mm (RAS); its linear
    part's determinant is the subject/template volume ratio (an eTIV-style scale). ``masks``
    holds, per side, ``(start, mask)``: the warped hippocampus label as a boolean array whose
    voxel ``(0, 0, 0)`` sits at index ``start`` of the subject grid (it may extend past the
    image). ``qc`` holds the numeric QC values, ``warnings`` human-readable notes, and
    ``doubtful_reasons`` why the localisation should not be trusted (empty when ``qc_ok``).
    """

    contrast: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    template_to_subject: np.ndarray
    boxes: dict[str, Box]
    masks: dict[str, tuple[tuple[int, int, int], np.ndarray]]
    qc: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    doubtful_reasons: list[str] = field(default_factory=list)
    seed: int = 0
    resolution: float = 2.0

    @property
    def qc_ok(self) -> bool:
        """True when nothing makes the localisation doubtful."""
        return not self.doubtful_reasons

    @property
    def doubtful(self) -> bool:
        """True when the localisation failed a QC check (see ``doubtful_reasons``)."""
        return bool(self.doubtful_reasons)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (no masks), for JSON reports and provenance."""
        return {
            "contrast": self.contrast,
            "shape": list(self.shape),
            "affine": np.asarray(self.affine).tolist(),
            "template_to_subject": np.asarray(self.template_to_subject).tolist(),
            "boxes": {side: box.to_dict() for side, box in self.boxes.items()},
            "qc": dict(self.qc),
            "qc_ok": self.qc_ok,
            "warnings": list(self.warnings),
            "doubtful_reasons": list(self.doubtful_reasons),
            "seed": self.seed,
            "resolution": self.resolution,
        }


# --------------------------------------------------------------------------------------------
# Margins, boxes, crops


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
        return _check_margin(isotropic)
    thin, thick = thick_slice
    return tuple(thick if zi >= ANISOTROPY_RATIO * z.min() else thin for zi in z)


def _check_margin(margin: Sequence[int]) -> tuple[int, int, int]:
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
    margin = _check_margin(margin)
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


# --------------------------------------------------------------------------------------------
# Resampling helpers (world RAS mm, explicit affines)


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def _block_average(
    data: np.ndarray, affine: np.ndarray, factors: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Average non-overlapping blocks of ``factors`` voxels (anti-aliasing before subsampling)."""
    f = [max(1, int(v)) for v in factors]
    if f == [1, 1, 1]:
        return data, affine
    n = [s // k for s, k in zip(data.shape, f, strict=True)]
    d = data[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]]
    d = d.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    scale = np.diag([*f, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = [(k - 1) / 2.0 for k in f]
    return d.astype(np.float32), affine @ shift @ scale


def _world_grid(
    data: np.ndarray, affine: np.ndarray, resolution: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` (linear) onto a world-axis-aligned grid of ``resolution`` mm covering it.

    Block-averages first by the integer part of ``resolution / voxel size`` per axis.
    """
    factors = [int(math.floor(resolution / z + 1e-6)) for z in _zooms(affine)]
    data, affine = _block_average(np.asarray(data, dtype=np.float32), affine, factors)
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, data.shape[0] - 1)
            for j in (0, data.shape[1] - 1)
            for k in (0, data.shape[2] - 1)
        ]
    )
    world = (affine @ corners.T)[:3]
    lo, hi = world.min(axis=1), world.max(axis=1)
    shape = tuple(int(v) for v in np.floor((hi - lo) / resolution) + 1)
    out_affine = np.diag([resolution, resolution, resolution, 1.0])
    out_affine[:3, 3] = lo
    vox = np.linalg.inv(affine) @ out_affine
    out = ndimage.affine_transform(
        data,
        vox[:3, :3],
        offset=vox[:3, 3],
        output_shape=shape,
        order=1,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )
    return out.astype(np.float32), out_affine


def _ants_library():  # noqa: ANN202 - antspyx's compiled module
    """antspyx's compiled ANTs library, loaded without the ``ants`` Python package.

    ``import ants`` costs about 3 s of start-up (its ``__init__`` imports matplotlib,
    scikit-learn and statsmodels for plotting and learning helpers); registration needs only the
    compiled ``antsRegistration``. The module is registered as ``ants.lib``, the name the
    package imports it by, so a later ``import ants`` in the same process uses this one rather
    than initialising the library a second time.
    """
    module = sys.modules.get("ants.lib")
    if module is not None:
        return module
    spec = importlib.util.find_spec("ants")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "lib" + suffix)
            if os.path.isfile(path):
                lib_spec = importlib.util.spec_from_file_location("ants.lib", path)
                module = importlib.util.module_from_spec(lib_spec)
                lib_spec.loader.exec_module(module)
                sys.modules["ants.lib"] = module
                return module
    from ants import lib  # an antspyx laid out differently: the slow, supported way

    return lib


def _write_grid(data: np.ndarray, affine: np.ndarray, path: str) -> str:
    """An uncompressed float32 NIfTI of a registration grid, for ANTs to read."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


def _read_ants_affine(path: str) -> np.ndarray:
    """The 4x4 RAS point map (fixed world -> moving world) stored in an ANTs ``.mat`` file.

    ITK writes a MATLAB v4 file: 12 parameters (3x3 matrix row by row, then translation) under
    the transform's name and the centre of rotation under ``fixed``, both in LPS.
    """
    from scipy.io import loadmat

    stored = loadmat(path)
    names = [k for k in stored if k.startswith(("AffineTransform", "MatrixOffsetTransformBase"))]
    if len(names) != 1 or "fixed" not in stored:
        raise LocalisationError(f"unexpected ANTs transform file {path}: {sorted(stored)}")
    params = np.asarray(stored[names[0]], dtype=float).ravel()
    centre = np.asarray(stored["fixed"], dtype=float).ravel()
    matrix = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = params[9:12] + centre - matrix @ centre
    return _LPS @ lps @ _LPS


def _claim_itk_threads(threads: int | None) -> None:
    """Fix ITK's thread count before its first use in this process (it is read only once)."""
    global _itk_threads
    if _itk_threads is None:
        if threads is None:
            threads = int(os.environ.get(_ITK_THREADS_ENV, "1") or 1)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        os.environ[_ITK_THREADS_ENV] = str(threads)
        _itk_threads = threads
    elif threads is not None and threads != _itk_threads:
        warnings.warn(
            f"ANTs already runs with {_itk_threads} thread(s) in this process (ITK reads the "
            f"count once); threads={threads} is ignored",
            RuntimeWarning,
            stacklevel=3,
        )


def _ants_affine(
    fixed: tuple[np.ndarray, np.ndarray],
    moving: tuple[np.ndarray, np.ndarray],
    *,
    stages: Sequence[tuple[str, Sequence[int], Sequence[int], Sequence[float]]],
    seed: int,
    threads: int | None,
) -> np.ndarray:
    """Run antsRegistration (linear stages after a centre-of-mass start); return the 4x4 RAS
    map from fixed world to moving world.

    Each stage is ``(transform, shrink factors, iterations, smoothing sigmas in voxels)``.
    """
    _claim_itk_threads(threads)
    lib = _ants_library()
    with tempfile.TemporaryDirectory(prefix="hsf_bids_reg_") as tmp:
        f = _write_grid(*fixed, os.path.join(tmp, "fixed.nii"))
        m = _write_grid(*moving, os.path.join(tmp, "moving.nii"))
        prefix = os.path.join(tmp, "reg_")
        args = [
            "--dimensionality", "3",
            "--float", "1",
            "--collapse-output-transforms", "1",
            "--output", prefix,
            "--interpolation", "Linear",
            "--use-histogram-matching", "0",
            "--winsorize-image-intensities", "[0.005,0.995]",
            # ANTs takes a seed of 0 as "seed from the clock": shift so every seed is fixed.
            "--random-seed", str(_ants_seed(seed)),
            "--initial-moving-transform", f"[{f},{m},1]",
        ]  # fmt: skip
        for transform, shrink, iterations, smoothing in stages:
            args += [
                "--transform", f"{transform}[0.25]",
                "--metric", f"MI[{f},{m},1,32,Regular,{_SAMPLING_RATE}]",
                "--convergence", f"[{'x'.join(str(int(i)) for i in iterations)},1e-6,10]",
                "--shrink-factors", "x".join(str(int(s)) for s in shrink),
                "--smoothing-sigmas", "x".join(f"{s:g}" for s in smoothing) + "vox",
            ]  # fmt: skip
        code = lib.antsRegistration(args)
        files = sorted(glob.glob(prefix + "*GenericAffine.mat"))
        if code != 0 or len(files) != 1:
            raise LocalisationError(f"antsRegistration failed (exit code {code}, outputs {files})")
        result = _read_ants_affine(files[0])
    if not np.all(np.isfinite(result)) or abs(np.linalg.det(result[:3, :3])) < 1e-6:
        raise LocalisationError(f"registration returned a degenerate transform {result.tolist()}")
    return result


def _ants_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**31 - 1:
        raise ValueError(f"seed must be in [0, 2**31 - 1), got {seed}")
    return seed + 1


def _template_stages(
    resolution: float, stages: Sequence[tuple]
) -> list[tuple[str, list[int], list[int], list[float]]]:
    """A registration schedule with shrink factors taken relative to ``resolution``."""
    out = []
    for transform, levels, iterations, smoothing in stages:
        shrink = [max(1, int(round(level / resolution))) for level in levels]
        out.append((transform, shrink, list(iterations), list(smoothing)))
    return out


_template_cache: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}


def _template_grid(contrast: str, resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """The template of ``contrast`` on its ``resolution`` mm grid (cached per process)."""
    key = (contrast, float(resolution))
    if key not in _template_cache:
        tpl = load_template(contrast)
        _template_cache[key] = _world_grid(np.asarray(tpl.dataobj), tpl.affine, resolution)
    return _template_cache[key]


def register_template(
    ras_img: nib.spatialimages.SpatialImage,
    contrast: str,
    *,
    seed: int = 0,
    resolution: float = 2.0,
    threads: int | None = None,
    fine: bool = False,
) -> np.ndarray:
    """Affine registration of the ``contrast`` template to a head image.

    ``fine`` selects the slower schedule that ends at 2 mm instead of 4 mm.

    Returns the 4x4 map from template world mm to subject world mm (both RAS). Deterministic
    for a given ``seed`` when ANTs is single-threaded (the default; see module docstring).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    subject = _world_grid(np.asarray(ras_img.dataobj), np.asarray(ras_img.affine), resolution)
    template = _template_grid(contrast, resolution)
    subject_to_template = _ants_affine(
        subject,
        template,
        stages=_template_stages(resolution, _FINE_STAGES if fine else _STAGES),
        seed=seed,
        threads=threads,
    )
    return np.linalg.inv(subject_to_template)


# --------------------------------------------------------------------------------------------
# Label warping and QC


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


def _sample_linear(data: np.ndarray, affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Linear samples of ``data`` at world points ``world`` (3 x n); NaN outside the image."""
    vox = np.linalg.inv(affine) @ np.vstack([world, np.ones(world.shape[1])])
    inside = np.all((vox[:3] >= 0) & (vox[:3] <= np.asarray(data.shape)[:, None] - 1), axis=0)
    out = np.full(world.shape[1], np.nan, dtype=np.float64)
    if inside.any():
        out[inside] = ndimage.map_coordinates(
            data, vox[:3, inside], order=1, mode="nearest", prefilter=False
        )
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson's r over the points where both are finite, and the fraction of such points."""
    ok = np.isfinite(a) & np.isfinite(b)
    frac = float(ok.mean()) if ok.size else 0.0
    if ok.sum() < 50:
        return float("nan"), frac
    a, b = a[ok], b[ok]
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 0.0, frac
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb)), frac


_points_cache: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _template_points(resolution: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World positions (3 x n), CerebrA labels and flat grid indices of the template grid
    points inside the brain (atlas label > 0), cached per resolution."""
    key = float(resolution)
    if key not in _points_cache:
        tpl, tpl_affine = _template_grid("T1w", resolution)
        shape = tpl.shape
        atlas = load_atlas()
        ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
        world = tpl_affine[:3, :3] @ ijk + tpl_affine[:3, 3:4]
        avox = np.linalg.inv(atlas.affine) @ np.vstack([world, np.ones(world.shape[1])])
        near = np.floor(avox[:3] + 0.5).astype(int)
        inside = np.all((near >= 0) & (near < np.asarray(atlas.shape)[:, None]), axis=0)
        labels = np.zeros(world.shape[1], dtype=np.int16)
        data = np.asarray(atlas.dataobj)
        labels[inside] = data[near[0, inside], near[1, inside], near[2, inside]]
        flat = np.flatnonzero(labels > 0)
        _points_cache[key] = (world[:, flat], labels[flat], flat)
    return _points_cache[key]


def _similarity_qc(
    data: np.ndarray,
    affine: np.ndarray,
    contrast: str,
    template_to_subject: np.ndarray,
    resolution: float,
) -> dict[str, float]:
    """Correlation between the registered template and the subject, over the template brain and
    over the brain within 16 mm of each hippocampus box (template points mapped into the
    subject)."""
    tpl, _ = _template_grid(contrast, resolution)
    tpl_world, labels, flat = _template_points(resolution)
    values = tpl.reshape(-1)[flat]
    qc: dict[str, float] = {}
    subj_world = template_to_subject[:3, :3] @ tpl_world + template_to_subject[:3, 3:4]
    brain = labels > 0
    r, frac = _correlation(values[brain], _sample_linear(data, affine, subj_world[:, brain]))
    qc["brain_correlation"] = r
    qc["brain_fraction_in_image"] = frac
    for side in SIDES:
        hip = tpl_world[:, labels == HIPPOCAMPUS_LABELS[side]]
        lo, hi = hip.min(axis=1) - 16.0, hip.max(axis=1) + 16.0
        near_hip = np.all((tpl_world >= lo[:, None]) & (tpl_world <= hi[:, None]), axis=0)
        r, frac = _correlation(
            values[near_hip], _sample_linear(data, affine, subj_world[:, near_hip])
        )
        qc[f"{side}_correlation"] = r
        qc[f"{side}_fraction_in_image"] = frac
    return qc


def _transform_qc(template_to_subject: np.ndarray) -> dict[str, float]:
    lin = template_to_subject[:3, :3]
    scales = np.linalg.svd(lin, compute_uv=False)
    return {
        "determinant": float(np.linalg.det(lin)),
        "scale_min": float(scales.min()),
        "scale_max": float(scales.max()),
    }


def _judge(qc: dict[str, float], boxes: dict[str, Box], name: str) -> tuple[list[str], list[str]]:
    """Warnings and doubtful reasons from QC values and boxes."""
    notes: list[str] = []
    doubts: list[str] = []
    det = qc["determinant"]
    if det <= 0:
        doubts.append(f"the template-to-subject affine mirrors the head (determinant {det:.3f})")
    elif not DETERMINANT_RANGE[0] <= det <= DETERMINANT_RANGE[1]:
        doubts.append(
            f"implausible head size: template-to-subject volume ratio {det:.2f} outside "
            f"{list(DETERMINANT_RANGE)}"
        )
    smin, smax = qc["scale_min"], qc["scale_max"]
    if smin < SCALE_RANGE[0] or smax > SCALE_RANGE[1] or smax / max(smin, 1e-9) > MAX_SCALE_RATIO:
        doubts.append(
            f"implausible scaling of the template: axis scales {smin:.2f} to {smax:.2f} "
            f"(expected within {list(SCALE_RANGE)}, ratio <= {MAX_SCALE_RATIO})"
        )
    r = qc["brain_correlation"]
    if not np.isfinite(r) or r < MIN_BRAIN_CORRELATION:
        doubts.append(
            f"template and image disagree over the brain (correlation {r:.2f} < "
            f"{MIN_BRAIN_CORRELATION})"
        )
    for side, box in boxes.items():
        r = qc[f"{side}_correlation"]
        if not np.isfinite(r) or r < MIN_LOCAL_CORRELATION:
            doubts.append(
                f"{side} hippocampus: template and image disagree around it (correlation "
                f"{r:.2f} < {MIN_LOCAL_CORRELATION})"
            )
        if box.label_voxels_outside:
            msg = (
                f"{side} hippocampus partly outside the field of view of {name}: "
                f"{box.fraction_outside:.1%} of the warped template hippocampus "
                f"({box.label_voxels_outside} of {box.label_voxels} voxels) is missing"
            )
            notes.append(msg)
            doubts.append(msg)
        elif any(box.clipped_voxels):
            notes.append(
                f"{side} box clamped by the image edge of {name}: margin voxels lost per axis "
                f"{list(box.clipped_voxels)} (the hippocampus itself is inside)"
            )
    if "right" in boxes and "left" in boxes:
        # In RAS+ the right hippocampus has the larger x; the opposite means a left-right swap.
        cr = np.mean([boxes["right"].label_start[0], boxes["right"].label_stop[0]])
        cl = np.mean([boxes["left"].label_start[0], boxes["left"].label_stop[0]])
        if cr <= cl:
            doubts.append("the right hippocampus was found left of the left one")
    return notes, doubts


def _check_ras(img: nib.spatialimages.SpatialImage) -> None:
    ornt = io_orientation(np.asarray(img.affine))
    if not np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        raise ValueError(
            f"{image_name(img)}: expected an image in RAS+ voxel order (use "
            "hsf_bids.image.to_ras first)"
        )
    if len(img.shape) != 3:
        raise ValueError(f"{image_name(img)}: expected a 3D image, got shape {img.shape}")


def locate(
    ras_img: nib.spatialimages.SpatialImage,
    contrast: str,
    *,
    margin: Sequence[int] | None = None,
    seed: int = 0,
    resolution: float = 2.0,
    threads: int | None = None,
) -> Localisation:
    """Find both hippocampi in a head image in RAS+ voxel order.

    ``contrast`` picks the template (``"T1w"`` or ``"T2w"``). ``margin``: three voxel counts
    along the RAS+ axes, default :func:`auto_margin` of the voxel sizes. ``seed`` seeds ANTs'
    sampling, ``resolution`` is the registration grid in mm, ``threads`` ANTs' thread count
    (default 1, for reproducibility). Returns a :class:`Localisation` (see :func:`assess`).

    When either local correlation is below ``RETRY_CORRELATION`` the registration is run again
    on the finer schedule and the better result kept (``qc["retried"]`` is then 1).
    """
    _check_ras(ras_img)
    template_to_subject = register_template(
        ras_img, contrast, seed=seed, resolution=resolution, threads=threads
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loc = assess(ras_img, contrast, template_to_subject, margin=margin, resolution=resolution)
    loc.qc["retried"] = 0.0
    if _local_correlation(loc) < RETRY_CORRELATION:
        # The fast route can stop in a poor optimum on thin slabs: try the finer schedule.
        fine_tx = register_template(
            ras_img, contrast, seed=seed, resolution=resolution, threads=threads, fine=True
        )
        with warnings.catch_warnings(record=True) as caught_fine:
            warnings.simplefilter("always")
            fine = assess(ras_img, contrast, fine_tx, margin=margin, resolution=resolution)
        if _local_correlation(fine) > _local_correlation(loc):
            loc, caught = fine, caught_fine
        loc.qc["retried"] = 1.0
    for item in caught:
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    loc.seed = seed
    return loc


def _local_correlation(loc: Localisation) -> float:
    values = [loc.qc.get(f"{side}_correlation", float("nan")) for side in SIDES]
    return float(np.nan_to_num(min(values), nan=-1.0))


def assess(
    ras_img: nib.spatialimages.SpatialImage,
    contrast: str,
    template_to_subject: np.ndarray,
    *,
    margin: Sequence[int] | None = None,
    resolution: float = 2.0,
) -> Localisation:
    """Boxes and QC of a head image (RAS+ voxel order) for a given template-to-subject affine.

    Warps the CerebrA hippocampi with ``template_to_subject`` (4x4, template world mm to subject
    world mm), makes one :class:`Box` per side (``"right"`` then ``"left"``) and measures the
    QC values. A hippocampus partly outside the image produces a warning (also issued with
    :func:`warnings.warn`) naming how much is missing, and marks the result doubtful, as do an
    implausible affine or a poor template/image correlation.
    """
    _check_ras(ras_img)
    name = image_name(ras_img)
    affine = np.asarray(ras_img.affine, dtype=float)
    template_to_subject = np.asarray(template_to_subject, dtype=float)
    if template_to_subject.shape != (4, 4) or not np.all(np.isfinite(template_to_subject)):
        raise ValueError(f"template_to_subject must be a finite 4x4 matrix: {template_to_subject}")
    shape = tuple(int(s) for s in ras_img.shape)
    margin = auto_margin(_zooms(affine)) if margin is None else _check_margin(margin)
    qc = _transform_qc(template_to_subject)
    if abs(qc["determinant"]) < 1e-3:
        raise LocalisationError(f"{name}: the template-to-subject affine is degenerate")
    atlas = load_atlas()
    atlas_data = np.asarray(atlas.dataobj)
    boxes: dict[str, Box] = {}
    masks: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}
    for side in SIDES:
        try:
            start, mask = warp_label(
                atlas_data, atlas.affine, HIPPOCAMPUS_LABELS[side], template_to_subject, affine
            )
            boxes[side] = make_box(side, start, mask, shape, margin)
        except LocalisationError as exc:
            raise LocalisationError(f"{name}: {exc}") from exc
        masks[side] = (start, mask)
    data = np.asarray(ras_img.dataobj, dtype=np.float32)
    qc.update(_similarity_qc(data, affine, contrast, template_to_subject, resolution))
    for side, box in boxes.items():
        qc[f"{side}_fraction_outside"] = box.fraction_outside
    notes, doubts = _judge(qc, boxes, name)
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return Localisation(
        contrast=contrast,
        shape=shape,
        affine=affine,
        template_to_subject=template_to_subject,
        boxes=boxes,
        masks=masks,
        qc=qc,
        warnings=notes,
        doubtful_reasons=doubts,
        resolution=resolution,
    )


# --------------------------------------------------------------------------------------------
# Multispectral: a second image of the same head onto the first one's grid


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
        resolution = max(2.0, float(_zooms(fixed_img.affine).min()))
    fixed = _world_grid(np.asarray(fixed_img.dataobj), np.asarray(fixed_img.affine), resolution)
    moving = _world_grid(np.asarray(moving_img.dataobj), np.asarray(moving_img.affine), resolution)
    fixed_to_moving = _ants_affine(
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
