"""Locate the hippocampi in a head image: register the template, warp its hippocampi, make the
boxes, judge the result, and retry on a finer schedule when it looks poor.

Contract steps 1-3. In: a head image in RAS+ voxel order (see :func:`hsf_bids.image.to_ras`) and
its contrast; out: a :class:`Localisation` (boxes, template-to-subject affine, QC checks, the
registration schedule that produced it).

The MNI152NLin2009cSym template of the matching contrast (moving) is registered affinely to the
subject (fixed) with ANTs (:mod:`hsf_bids.localisation.registration`) on the
:data:`~hsf_bids.localisation.registration.FAST_SCHEDULE` (12, 8 and 4 mm levels, after a
centre-of-mass initialisation, Mattes mutual information on a regular seeded sample). The
CerebrA hippocampus labels (48 right, 99 left) are then warped to the subject grid with nearest
neighbour, exactly as ``ants.apply_transforms(..., interpolator="nearestNeighbor")`` would, but
only inside a region around each label, so images of any size cost the same
(:mod:`hsf_bids.localisation.boxes`). The result is judged once
(:func:`hsf_bids.localisation.qc.judge`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from hsf_bids.image import image_name
from hsf_bids.localisation.boxes import Box, auto_margin, check_margin, make_box, warp_label
from hsf_bids.localisation.qc import (
    QcCheck,
    judge,
    localisation_ok,
    measure_similarity,
    measure_transform,
)
from hsf_bids.localisation.registration import (
    FAST_SCHEDULE,
    FINE_SCHEDULE,
    LocalisationError,
    Schedule,
    register_template,
    zooms,
)
from hsf_bids.templates import HIPPOCAMPUS_LABELS, load_atlas
from hsf_bids.vocabulary import SIDES

__all__ = ["RETRY_CORRELATION", "Localisation", "assess", "locate"]

LOGGER = logging.getLogger(__name__)

# Below this local correlation (either side) locate() registers again on the finer schedule and
# keeps the better of the two (by the lower of the two local correlations).
RETRY_CORRELATION = 0.5


@dataclass
class Localisation:
    """Where the hippocampi are in one RAS+ head image, and how much to trust it.

    ``template_to_subject`` maps template world mm (RAS) to subject world mm (RAS); its linear
    part's determinant is the subject/template volume ratio (an eTIV-style scale). ``masks``
    holds, per side, ``(start, mask)``: the warped hippocampus label as a boolean array whose
    voxel ``(0, 0, 0)`` sits at index ``start`` of the subject grid (it may extend past the
    image). ``qc`` holds the numeric measurements, ``checks`` the QC checks judged on them,
    ``warnings`` human-readable notes, ``schedule`` the registration schedule that produced
    ``template_to_subject`` (None when the affine was given, see :func:`assess`).
    """

    contrast: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    template_to_subject: np.ndarray
    boxes: dict[str, Box]
    masks: dict[str, tuple[tuple[int, int, int], np.ndarray]]
    qc: dict[str, float]
    checks: list[QcCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seed: int = 0
    resolution: float = 2.0
    schedule: Schedule | None = None

    @property
    def localisation_ok(self) -> bool:
        """True when every QC check passed."""
        return localisation_ok(self.checks)

    @property
    def failed_checks(self) -> list[QcCheck]:
        """The checks that did not pass (empty when :attr:`localisation_ok`)."""
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (no masks), for JSON reports and provenance."""
        return {
            "contrast": self.contrast,
            "shape": list(self.shape),
            "affine": np.asarray(self.affine).tolist(),
            "template_to_subject": np.asarray(self.template_to_subject).tolist(),
            "boxes": {side: box.to_dict() for side, box in self.boxes.items()},
            "qc": dict(self.qc),
            "checks": [check.to_dict() for check in self.checks],
            "localisation_ok": self.localisation_ok,
            "warnings": list(self.warnings),
            "seed": self.seed,
            "resolution": self.resolution,
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
        }


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
    along the RAS+ axes, default :func:`~hsf_bids.localisation.boxes.auto_margin` of the voxel
    sizes. ``seed`` seeds ANTs' sampling, ``resolution`` is the registration grid in mm,
    ``threads`` ANTs' thread count (default 1, for reproducibility). Returns a
    :class:`Localisation` (see :func:`assess`).

    When either local correlation is below ``RETRY_CORRELATION`` the registration is run again
    on the finer schedule and the better result kept (``qc["retried"]`` is then 1, and
    ``schedule`` names the one kept). The kept result's notes (``warnings``) are logged as
    warnings of this module's logger.
    """
    _check_ras(ras_img)
    loc = _register_and_assess(
        ras_img, contrast, FAST_SCHEDULE, margin=margin, seed=seed, resolution=resolution,
        threads=threads,
    )  # fmt: skip
    loc.qc["retried"] = 0.0
    if _local_correlation(loc) < RETRY_CORRELATION:
        # The fast route can stop in a poor optimum on thin slabs: try the finer schedule.
        fine = _register_and_assess(
            ras_img, contrast, FINE_SCHEDULE, margin=margin, seed=seed, resolution=resolution,
            threads=threads,
        )  # fmt: skip
        if _local_correlation(fine) > _local_correlation(loc):
            loc = fine
        loc.qc["retried"] = 1.0
    # Only the kept attempt speaks: the notes of a discarded one describe a result not used.
    for note in loc.warnings:
        LOGGER.warning(note)
    loc.seed = seed
    return loc


def _register_and_assess(
    ras_img: nib.spatialimages.SpatialImage,
    contrast: str,
    schedule: Schedule,
    *,
    margin: Sequence[int] | None,
    seed: int,
    resolution: float,
    threads: int | None,
) -> Localisation:
    """One registration and its assessment; its notes (``warnings``) are returned, not logged."""
    template_to_subject = register_template(
        ras_img, contrast, seed=seed, resolution=resolution, threads=threads, schedule=schedule
    )
    loc = assess(ras_img, contrast, template_to_subject, margin=margin, resolution=resolution)
    loc.schedule = schedule
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
    world mm), makes one :class:`~hsf_bids.localisation.boxes.Box` per side (``"right"`` then
    ``"left"``), measures the QC values and judges the checks. A hippocampus partly outside the
    image produces a note (in ``warnings``; returned, not logged: :func:`locate` logs the notes
    of the result it keeps) naming how much is missing, and fails a check, as do an implausible
    affine or a poor template/image correlation.
    """
    _check_ras(ras_img)
    name = image_name(ras_img)
    affine = np.asarray(ras_img.affine, dtype=float)
    template_to_subject = np.asarray(template_to_subject, dtype=float)
    if template_to_subject.shape != (4, 4) or not np.all(np.isfinite(template_to_subject)):
        raise ValueError(f"template_to_subject must be a finite 4x4 matrix: {template_to_subject}")
    shape = tuple(int(s) for s in ras_img.shape)
    margin = auto_margin(zooms(affine)) if margin is None else check_margin(margin)
    qc = measure_transform(template_to_subject)
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
    qc.update(measure_similarity(data, affine, contrast, template_to_subject, resolution))
    for side, box in boxes.items():
        qc[f"{side}_fraction_outside"] = box.fraction_outside
    checks, notes = judge(qc, boxes, name)
    return Localisation(
        contrast=contrast,
        shape=shape,
        affine=affine,
        template_to_subject=template_to_subject,
        boxes=boxes,
        masks=masks,
        qc=qc,
        checks=checks,
        warnings=notes,
        resolution=resolution,
    )
