"""Affine registration with ANTs: the compiled library, its thread state, its ``.mat`` files,
the registration grids and the schedules.

In: images as ``(data, affine)`` pairs (world RAS mm); out: 4x4 world maps (RAS mm). Nothing here
knows about hippocampi: :mod:`hsf_bids.localisation.localise` registers the template with
:func:`register_template`, :mod:`hsf_bids.segment.coregister` a second contrast with
:func:`ants_affine`.

Grids: both images are resampled (linear) onto world-axis-aligned grids of ``resolution`` mm
(default 2 mm), block-averaged first so fine images are not aliased.

Determinism: ITK's multi-threaded metric is not reproducible with a fixed seed (measured), so
ANTs runs single-threaded by default (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``, set before
ITK's first use in the process; a value the user exported is respected). ANTs reads a seed of
0 as "seed from the clock", so ``seed`` is passed to it as ``seed + 1``.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from hsf_bids.faults import fault_point
from hsf_bids.templates import load_template

__all__ = [
    "FAST_SCHEDULE",
    "FINE_SCHEDULE",
    "SAMPLING_RATE",
    "LocalisationError",
    "Schedule",
    "ants_affine",
    "register_template",
    "template_grid",
    "world_grid",
    "zooms",
]

LOGGER = logging.getLogger(__name__)


class LocalisationError(RuntimeError):
    """Registration could not run or gave an unusable transform, or a hippocampus could not be
    placed in the image."""

    # Crash messages name the class by its module: the package users import it from.
    __module__ = "hsf_bids.localisation"


@dataclass(frozen=True)
class Schedule:
    """One linear registration stage: its transform and, per level, the grid in mm (the shrink
    factor is ``level / resolution``), the iterations and the smoothing (voxels)."""

    name: str
    transform: str
    levels_mm: tuple[float, ...]
    iterations: tuple[int, ...]
    smoothing_vox: tuple[float, ...]

    def stages(self, resolution: float) -> list[tuple[str, list[int], list[int], list[float]]]:
        """The schedule for :func:`ants_affine`, shrink factors taken relative to ``resolution``."""
        shrink = [max(1, int(round(level / resolution))) for level in self.levels_mm]
        return [(self.transform, shrink, list(self.iterations), list(self.smoothing_vox))]

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for provenance (read back by the methods text)."""
        return {
            "name": self.name,
            "transform": self.transform,
            "levels_mm": list(self.levels_mm),
            "iterations": list(self.iterations),
            "smoothing_vox": list(self.smoothing_vox),
        }


# 20 iterations at 4 mm: on the ds-mini heads the result moves by at most 0.06 mm around the
# hippocampi compared with 50 (which only converges after ~30), for half a second less. A 4 mm
# grid for ANTs would save more but moves the hippocampi by 1-2 mm and lowers the local
# correlations (measured).
FAST_SCHEDULE = Schedule("fast", "Affine", (12.0, 8.0, 4.0), (1000, 500, 20), (3, 2, 1))
# The retry when the fast route looks poor (see localise.RETRY_CORRELATION): down to 2 mm, about
# 4x the time. On ds-mini only the thick-slice, 120 mm-slab sub-03 T2w ever needs it
# (seed-dependent).
FINE_SCHEDULE = Schedule("fine", "Affine", (8.0, 4.0, 2.0), (500, 100, 20), (2, 1, 0))
SAMPLING_RATE = 0.2

_ITK_THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_itk_threads: int | None = None
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------
# Registration grids (world RAS mm, explicit affines)


def zooms(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the voxel axes of ``affine``."""
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


def world_grid(
    data: np.ndarray, affine: np.ndarray, resolution: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` (linear) onto a world-axis-aligned grid of ``resolution`` mm covering it.

    Block-averages first by the integer part of ``resolution / voxel size`` per axis. Returns
    the float32 grid and its affine.
    """
    factors = [int(math.floor(resolution / z + 1e-6)) for z in zooms(affine)]
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


_template_cache: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}


def template_grid(contrast: str, resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """The template of ``contrast`` on its ``resolution`` mm grid (cached per process)."""
    key = (contrast, float(resolution))
    if key not in _template_cache:
        tpl = load_template(contrast)
        _template_cache[key] = world_grid(np.asarray(tpl.dataobj), tpl.affine, resolution)
    return _template_cache[key]


# --------------------------------------------------------------------------------------------
# ANTs access


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
        LOGGER.warning(
            "ANTs already runs with %s thread(s) in this process (ITK reads the count once); "
            "threads=%s is ignored",
            _itk_threads,
            threads,
        )


def _ants_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**31 - 1:
        raise ValueError(f"seed must be in [0, 2**31 - 1), got {seed}")
    return seed + 1


def ants_affine(
    fixed: tuple[np.ndarray, np.ndarray],
    moving: tuple[np.ndarray, np.ndarray],
    *,
    stages: Sequence[tuple[str, Sequence[int], Sequence[int], Sequence[float]]],
    seed: int,
    threads: int | None,
) -> np.ndarray:
    """Run antsRegistration (linear stages after a centre-of-mass start); return the 4x4 RAS
    map from fixed world to moving world.

    ``fixed`` and ``moving`` are ``(data, affine)`` grids (see :func:`world_grid`). Each stage
    is ``(transform, shrink factors, iterations, smoothing sigmas in voxels)``; the metric is
    Mattes mutual information on a regular (seeded) sample of :data:`SAMPLING_RATE`. Raises
    :class:`LocalisationError` when ANTs fails or returns a degenerate transform.
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
                "--metric", f"MI[{f},{m},1,32,Regular,{SAMPLING_RATE}]",
                "--convergence", f"[{'x'.join(str(int(i)) for i in iterations)},1e-6,10]",
                "--shrink-factors", "x".join(str(int(s)) for s in shrink),
                "--smoothing-sigmas", "x".join(f"{s:g}" for s in smoothing) + "vox",
            ]  # fmt: skip
        code = lib.antsRegistration(args)
        fault_point("registration")
        files = sorted(glob.glob(prefix + "*GenericAffine.mat"))
        if code != 0 or len(files) != 1:
            raise LocalisationError(f"antsRegistration failed (exit code {code}, outputs {files})")
        result = _read_ants_affine(files[0])
    if not np.all(np.isfinite(result)) or abs(np.linalg.det(result[:3, :3])) < 1e-6:
        raise LocalisationError(f"registration returned a degenerate transform {result.tolist()}")
    return result


def register_template(
    ras_img: nib.spatialimages.SpatialImage,
    contrast: str,
    *,
    seed: int = 0,
    resolution: float = 2.0,
    threads: int | None = None,
    schedule: Schedule = FAST_SCHEDULE,
) -> np.ndarray:
    """Affine registration of the ``contrast`` template (moving) to a head image (fixed).

    ``schedule`` is :data:`FAST_SCHEDULE` (12/8/4 mm) or :data:`FINE_SCHEDULE` (8/4/2 mm).
    Returns the 4x4 map from template world mm to subject world mm (both RAS). Deterministic
    for a given ``seed`` when ANTs is single-threaded (the default; see module docstring).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    subject = world_grid(np.asarray(ras_img.dataobj), np.asarray(ras_img.affine), resolution)
    template = template_grid(contrast, resolution)
    subject_to_template = ants_affine(
        subject, template, stages=schedule.stages(resolution), seed=seed, threads=threads
    )
    return np.linalg.inv(subject_to_template)
