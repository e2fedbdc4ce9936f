"""The localisation QC: measurements of a template-to-subject affine and the checks judged on them.

Measurements (:func:`measure_similarity`, :func:`measure_transform`) are numbers; :func:`judge`
turns them, once, into :class:`QcCheck` records (name, value, limit, passed, what it means) that
the sidecar stores (``Provenance.Localisation.checks``) and the reports and group tables read.
Nothing downstream applies these thresholds again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from hsf_bids.localisation.boxes import Box
from hsf_bids.localisation.registration import template_grid
from hsf_bids.templates import HIPPOCAMPUS_LABELS, load_atlas
from hsf_bids.vocabulary import SIDES

__all__ = [
    "DETERMINANT_RANGE",
    "MAX_SCALE_RATIO",
    "MIN_BRAIN_CORRELATION",
    "MIN_LOCAL_CORRELATION",
    "SCALE_RANGE",
    "QcCheck",
    "judge",
    "localisation_ok",
    "measure_similarity",
    "measure_transform",
]

# QC thresholds on Pearson's r between template and subject intensities. Measured on ds-mini:
# around each hippocampus 0.58-0.74 when registered, 0.27-0.56 after a 5 mm shift, <= 0.31
# after 10 mm; over the whole brain 0.29-0.51 registered, <= 0.16 after 10 mm (a weak signal).
MIN_BRAIN_CORRELATION = 0.15
MIN_LOCAL_CORRELATION = 0.35
# Plausible volume ratio subject/template (the 2009c template is a large adult head) and
# per-axis scale range of the template-to-subject affine.
DETERMINANT_RANGE = (0.35, 1.8)
SCALE_RANGE = (0.6, 1.35)
MAX_SCALE_RATIO = 1.4


@dataclass(frozen=True)
class QcCheck:
    """One localisation check, judged once.

    ``name`` is a stable identifier (``brain_correlation``, ``right_correlation``,
    ``determinant``, ...), ``title`` says what is measured, ``value`` is the measurement (a
    number, two numbers for a range, None when it could not be measured) and ``shown`` the same
    as people read it; ``limit`` is the rule it must meet, in words; ``meaning`` says what the
    outcome means for this image (for a failed check: why the localisation is not to be trusted).
    """

    name: str
    title: str
    value: float | tuple[float, ...] | None
    shown: str
    limit: str
    passed: bool
    meaning: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (a range as a list)."""
        values = asdict(self)
        if isinstance(self.value, tuple):
            values["value"] = list(self.value)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QcCheck:
        """The inverse of :meth:`to_dict`."""
        value = values.get("value")
        return cls(
            name=str(values["name"]),
            title=str(values.get("title", values["name"])),
            value=tuple(value) if isinstance(value, list) else value,
            shown=str(values.get("shown", "")),
            limit=str(values.get("limit", "")),
            passed=bool(values["passed"]),
            meaning=str(values.get("meaning", "")),
        )


def localisation_ok(checks: Sequence[QcCheck]) -> bool:
    """The one rule from checks to verdict: a localisation is trusted when every check passed."""
    return all(check.passed for check in checks)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# Measurements


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
        tpl, tpl_affine = template_grid("T1w", resolution)
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


def measure_similarity(
    data: np.ndarray,
    affine: np.ndarray,
    contrast: str,
    template_to_subject: np.ndarray,
    resolution: float,
) -> dict[str, float]:
    """Correlation between the registered template and the subject, over the template brain and
    over the brain within 16 mm of each hippocampus box (template points mapped into the
    subject)."""
    tpl, _ = template_grid(contrast, resolution)
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


def measure_transform(template_to_subject: np.ndarray) -> dict[str, float]:
    """Determinant and smallest/largest axis scale of the affine's linear part."""
    lin = template_to_subject[:3, :3]
    scales = np.linalg.svd(lin, compute_uv=False)
    return {
        "determinant": float(np.linalg.det(lin)),
        "scale_min": float(scales.min()),
        "scale_max": float(scales.max()),
    }


# --------------------------------------------------------------------------------------------
# Checks


def _correlation_check(
    name: str, where: str, r: float, limit: float, fail: str, ok: str
) -> QcCheck:
    passed = bool(np.isfinite(r) and r >= limit)
    return QcCheck(
        name=name,
        title=f"template-image correlation, {where}",
        value=_finite(r),
        shown=f"{r:.2f}",
        limit=f">= {limit}",
        passed=passed,
        meaning=(
            f"{ok} (correlation {r:.2f} >= {limit})"
            if passed
            else f"{fail} (correlation {r:.2f} < {limit})"
        ),
    )


def judge(
    qc: Mapping[str, float], boxes: Mapping[str, Box], name: str
) -> tuple[list[QcCheck], list[str]]:
    """The checks of one localisation, and its warnings.

    ``qc`` holds the measurements (:func:`measure_transform`, :func:`measure_similarity`),
    ``boxes`` the box of each side, ``name`` the image's name for the messages. Returns the
    checks in a fixed order (head size, scaling, brain correlation, then per side its local
    correlation and field of view, then the left/right order) and the warnings (a hippocampus
    partly outside the image, a box clamped by the image edge).
    """
    checks: list[QcCheck] = []
    notes: list[str] = []
    det = qc["determinant"]
    lo, hi = DETERMINANT_RANGE
    if det <= 0:
        meaning = f"the template-to-subject affine mirrors the head (determinant {det:.3f})"
    elif not lo <= det <= hi:
        meaning = (
            f"implausible head size: template-to-subject volume ratio {det:.2f} outside "
            f"{list(DETERMINANT_RANGE)}"
        )
    else:
        meaning = f"plausible head size: template-to-subject volume ratio {det:.2f}"
    checks.append(QcCheck(
        "determinant", "head size / template (affine determinant)", float(det), f"{det:.2f}",
        f"{lo} to {hi}", bool(lo <= det <= hi), meaning,
    ))  # fmt: skip
    smin, smax = qc["scale_min"], qc["scale_max"]
    lo, hi = SCALE_RANGE
    bad = smin < lo or smax > hi or smax / max(smin, 1e-9) > MAX_SCALE_RATIO
    checks.append(QcCheck(
        "scaling", "template scaling per axis", (float(smin), float(smax)),
        f"{smin:.2f} to {smax:.2f}", f"{lo} to {hi}, ratio <= {MAX_SCALE_RATIO}", not bad,
        (f"implausible scaling of the template: axis scales {smin:.2f} to {smax:.2f} "
         f"(expected within {list(SCALE_RANGE)}, ratio <= {MAX_SCALE_RATIO})") if bad
        else f"plausible scaling of the template: axis scales {smin:.2f} to {smax:.2f}",
    ))  # fmt: skip
    checks.append(_correlation_check(
        "brain_correlation", "brain", qc["brain_correlation"], MIN_BRAIN_CORRELATION,
        "template and image disagree over the brain", "template and image agree over the brain",
    ))  # fmt: skip
    for side, box in boxes.items():
        checks.append(_correlation_check(
            f"{side}_correlation", f"{side} hippocampus", qc[f"{side}_correlation"],
            MIN_LOCAL_CORRELATION, f"{side} hippocampus: template and image disagree around it",
            f"{side} hippocampus: template and image agree around it",
        ))  # fmt: skip
        # The checks go to the image's own sidecar: they do not name the file (its path differs
        # between a container and the host); the notes, also printed, do.
        if box.label_voxels_outside:
            missing = (
                f"{box.fraction_outside:.1%} of the warped template hippocampus "
                f"({box.label_voxels_outside} of {box.label_voxels} voxels) is missing"
            )
            meaning = f"{side} hippocampus partly outside the field of view: {missing}"
            notes.append(
                f"{side} hippocampus partly outside the field of view of {name}: {missing}"
            )
        else:
            meaning = f"{side} hippocampus inside the field of view"
            if any(box.clipped_voxels):
                notes.append(
                    f"{side} box clamped by the image edge of {name}: margin voxels lost per "
                    f"axis {list(box.clipped_voxels)} (the hippocampus itself is inside)"
                )
        checks.append(QcCheck(
            f"{side}_field_of_view", f"{side} hippocampus outside the field of view",
            float(box.fraction_outside), f"{box.fraction_outside:.1%}", "0 %",
            not box.label_voxels_outside, meaning,
        ))  # fmt: skip
    if "right" in boxes and "left" in boxes:
        # In RAS+ the right hippocampus has the larger x; the opposite means a left-right swap.
        cr = np.mean([boxes["right"].label_start[0], boxes["right"].label_stop[0]])
        cl = np.mean([boxes["left"].label_start[0], boxes["left"].label_stop[0]])
        gap = float(cr - cl)
        checks.append(QcCheck(
            "sides", "right hippocampus right of the left one (centre x distance, voxels)", gap,
            f"{gap:.1f}", "> 0", gap > 0,
            "the right hippocampus was found right of the left one" if gap > 0
            else "the right hippocampus was found left of the left one",
        ))  # fmt: skip
    return checks, notes
