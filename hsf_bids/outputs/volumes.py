"""Subfield volumes from a bilateral segmentation on the native grid, and the volumes table.

Volumes are voxel counts times the voxel volume of the grid the labels are on (no resampling), so
they are exact for the segmentation as written. The table has one row per side and structure of the
``ca_mode`` (zero-volume structures included) plus a whole-hippocampus row per side.

Ensemble spread: the ensemble records, for each of its predictions (model x input copy), how many
voxels each label has in that prediction alone (``CropSegmentation.prediction_counts``). Times the
voxel volume those are the structure's volume in each prediction; their standard deviation and 5th
and 95th percentiles (:func:`spread`) measure how much the ensemble disagrees with itself about the
volume. They are not a confidence interval for the true anatomy: models trained alike can agree
on the same error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from hsf_bids.outputs.derivatives import (
    Entities,
    GridError,
    sidecar_path,
    write_json,
    write_tsv,
)
from hsf_bids.vocabulary import (
    CA_MODES,
    RIGHT_OFFSET,
    SIDES_BY_INDEX,
    WHOLE_HIPPOCAMPUS,
    bilateral_index,
    structures,
)

__all__ = [
    "COLUMNS",
    "MIN_PLAUSIBLE_HC_MM3",
    "NONFINITE_INPUT",
    "QC_FLAGS",
    "SPREAD_COLUMNS",
    "TEMPLATE_BRAIN_MM3",
    "WHOLE_HIPPOCAMPUS",
    "LabelsError",
    "compute_volumes",
    "describe_qc_flags",
    "read_qc_flags",
    "estimate_icv_mm3",
    "model_volumes",
    "spread",
    "template_brain_volume_mm3",
    "voxel_volume_mm3",
    "volumes_sidecar",
    "write_volumes",
]

# Volume (mm3) of all labelled voxels of the CerebrA atlas on MNI152NLin2009cSym res-1 (1 mm
# isotropic): 1,169,666 voxels (template_brain_volume_mm3 recomputes it; a test checks it). CerebrA
# labels the brain (cerebrum, cerebellum, brainstem, ventricles), not the sulcal and extra-cerebral
# CSF, so this is a template *brain* volume, smaller than its intracranial volume. TemplateFlow's
# brain mask of this template would be closer to ICV but is not in the shipped TemplateFlow home.
TEMPLATE_BRAIN_MM3 = 1_169_666.0

# A whole hippocampus below this is a failed segmentation, not anatomy (adult hippocampi are about
# 2,500-4,500 mm3 a side, and below 2,000 only in severe atrophy). Reports and group flags use it.
MIN_PLAUSIBLE_HC_MM3 = 1000.0

COLUMNS: tuple[str, ...] = (
    "participant_id",
    "session_id",
    "acq",
    "ce",
    "rec",
    "run",
    "contrast",
    "source",
    "side",
    "structure",
    "label",
    "n_voxels",
    "volume_mm3",
    "volume_sd_mm3",
    "volume_p05_mm3",
    "volume_p95_mm3",
    "n_predictions",
    "mean_uncertainty",
    "icv_mm3",
    "localisation_ok",
    "qc_flags",
)

#: The columns :func:`spread` fills, in table order.
SPREAD_COLUMNS: tuple[str, ...] = ("volume_sd_mm3", "volume_p05_mm3", "volume_p95_mm3")
SPREAD_PERCENTILES = (5.0, 95.0)

# What the participant level found wrong with an image's results, for the ``qc_flags`` column
# ("; "-separated; n/a when none): a fixed vocabulary, so tables can be filtered.
NONFINITE_INPUT = "nonfinite_input"
QC_FLAGS: dict[str, str] = {
    NONFINITE_INPUT: "the input had NaN or infinite voxels, segmented as background (the "
    "sidecar's Provenance.QC.nonfinite_voxels says how many)",
    **{
        f"{side}_HC_{kind}": f"the {side} whole hippocampus {what}"
        for side in SIDES_BY_INDEX
        for kind, what in (
            ("empty", "has no voxel (nothing was segmented)"),
            ("small", f"is under {MIN_PLAUSIBLE_HC_MM3:g} mm^3 (implausibly small)"),
        )
    },
}

_R_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class LabelsError(ValueError):
    """A segmentation whose values are not the bilateral indices of the ``ca_mode``."""


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel (mm3) of a grid with this 4x4 voxel-to-world affine: ``|det|``."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape not in ((4, 4), (3, 3)):
        raise GridError(f"expected a 4x4 affine, got shape {affine.shape}")
    volume = abs(float(np.linalg.det(affine[:3, :3])))
    if not np.isfinite(volume) or volume == 0:
        raise GridError(f"affine has a singular or non-finite linear part:\n{affine}")
    return volume


def template_brain_volume_mm3(atlas: str | PathLike[str] | nib.Nifti1Image) -> float:
    """Volume (mm3) of all labelled (non-zero) voxels of an atlas image, e.g. CerebrA."""
    img = atlas if isinstance(atlas, nib.Nifti1Image) else nib.load(atlas)
    data = np.asanyarray(img.dataobj)
    return float(np.count_nonzero(data)) * voxel_volume_mm3(img.affine)


def estimate_icv_mm3(template_to_subject: np.ndarray) -> float:
    """eTIV-style head-size estimate: :data:`TEMPLATE_BRAIN_MM3` times ``|det(A)|``.

    ``A`` is the linear part of the affine mapping template physical coordinates to subject
    physical coordinates (a larger head gives ``|det| > 1``); a 4x4 or 3x3 matrix. The determinant
    is the same in LPS (ANTs) and RAS coordinates. Beware the direction: ANTs'
    ``registration(fixed=subject, moving=template)["fwdtransforms"]`` matrix maps subject points to
    template points, i.e. it is the inverse of ``A``.

    The result scales the template's *brain* volume (see :data:`TEMPLATE_BRAIN_MM3`), so it is
    proportional to, and smaller than, an intracranial volume; for normalising (ratios,
    covariates) the proportionality is what counts.
    """
    matrix = np.asarray(template_to_subject, dtype=float)
    if matrix.shape not in ((4, 4), (3, 3)) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"expected a finite 4x4 or 3x3 affine, got shape {matrix.shape}")
    det = abs(float(np.linalg.det(matrix[:3, :3])))
    if det == 0:
        raise ValueError("template-to-subject affine is singular")
    return TEMPLATE_BRAIN_MM3 * det


def spread(volumes: np.ndarray) -> dict[str, float | int | None]:
    """The spread of one structure's volumes over the ensemble's predictions.

    ``volumes``: the structure's volume (mm3) in each prediction. Returns the sample standard
    deviation (``ddof=1``), the 5th and 95th percentiles (linear interpolation between order
    statistics: numpy's default, R's ``quantile`` type 7) and their number. With fewer than two
    predictions there is no spread: the three statistics are None (``n/a``), not 0.
    """
    values = np.asarray(volumes, dtype=np.float64).ravel()
    out: dict[str, float | int | None] = dict.fromkeys(SPREAD_COLUMNS)
    out["n_predictions"] = int(values.size) if values.size else None
    if values.size >= 2:
        p05, p95 = np.percentile(values, SPREAD_PERCENTILES)
        out.update(volume_sd_mm3=float(np.std(values, ddof=1)), volume_p05_mm3=float(p05),
                   volume_p95_mm3=float(p95))  # fmt: skip
    return out


def _structure_volumes(
    counts: np.ndarray, ca_mode: str, voxel_volume: float
) -> dict[str, np.ndarray]:
    """Each structure's (and the whole hippocampus') volume in each prediction of ``counts``
    (``[..., labels]``, background first), flattened over the leading axes."""
    structs = structures(ca_mode)
    counts = np.asarray(counts)
    if counts.ndim < 1 or counts.shape[-1] != len(structs) + 1:
        raise ValueError(
            f"prediction counts of shape {counts.shape} do not have the {len(structs) + 1} labels "
            f"of ca_mode {ca_mode!r}"
        )
    flat = counts.reshape(-1, counts.shape[-1]).astype(np.float64) * voxel_volume
    out = {s.abbreviation: flat[:, s.label] for s in structs}
    if len(structs) > 1:
        out[WHOLE_HIPPOCAMPUS] = flat[:, 1:].sum(axis=1)
    return out


def model_volumes(
    counts: Mapping[str, np.ndarray],
    ca_mode: str,
    voxel_volume: float,
    models: Sequence[str],
) -> list[dict[str, object]]:
    """Each model's own volumes, for the segmentation's sidecar: per side and structure, the
    mean and standard deviation over that model's predictions (its input copies).

    ``counts``: side -> ``[inputs, copies, models, labels]`` (``prediction_counts``);
    ``models``: the models' names, in the ensemble's order.
    """
    entries = []
    for number, name in enumerate(models):
        means: dict[str, dict[str, float]] = {}
        sds: dict[str, dict[str, float | None]] = {}
        n = 0
        for side in SIDES_BY_INDEX:
            if side not in counts:
                continue
            side_counts = np.asarray(counts[side])
            if side_counts.ndim != 4 or side_counts.shape[2] != len(models):
                raise ValueError(
                    f"{side} prediction counts of shape {side_counts.shape} are not "
                    f"[inputs, copies, {len(models)} models, labels]"
                )
            volumes = _structure_volumes(side_counts[:, :, number], ca_mode, voxel_volume)
            n = next(iter(volumes.values())).size
            means[side] = {k: round(float(v.mean()), 4) for k, v in volumes.items()}
            sds[side] = {
                k: round(float(v.std(ddof=1)), 4) if v.size >= 2 else None
                for k, v in volumes.items()
            }
        entries.append({"File": name, "NumPredictions": n, "MeanVolume": means, "SDVolume": sds})
    return entries


def compute_volumes(
    labels: np.ndarray,
    uncertainty: np.ndarray,
    grid: np.ndarray | float,
    ca_mode: str,
    *,
    entities: Entities,
    contrast: str | None = None,
    icv_mm3: float | None = None,
    localisation_ok: bool | None = None,
    predictions: Mapping[str, np.ndarray] | None = None,
    nonfinite_voxels: int = 0,
) -> pd.DataFrame:
    """Volumes of every side and structure of ``ca_mode`` in a bilateral segmentation.

    ``labels``: integer array of bilateral indices (:func:`~hsf_bids.vocabulary.bilateral_index`)
    on the native grid; ``uncertainty``: the entropy map on the same grid; ``grid``: that grid's
    4x4 affine or its voxel volume in mm3; ``entities``: the source image's entities;
    ``contrast`` overrides ``entities.contrast`` (e.g. ``"T1w+T2w"`` for a fused run);
    ``icv_mm3``: :func:`estimate_icv_mm3` of the run, or None; ``localisation_ok``: the
    localisation QC verdict of the image, or None; ``predictions``: side -> the label counts of
    every prediction of the ensemble on that side (``[..., labels]``, background first; see
    ``CropSegmentation.prediction_counts``), on a grid of the same voxel volume, or None;
    ``nonfinite_voxels``: how many input voxels were NaN or infinite
    (:func:`hsf_bids.image.nonfinite_voxels`).

    ``qc_flags`` (the same on every row) names what is wrong with the image's results, from
    :data:`QC_FLAGS`: NaN input voxels, and each side's whole hippocampus empty or under
    :data:`MIN_PLAUSIBLE_HC_MM3`.

    Returns a DataFrame with :data:`COLUMNS`: per side one row per structure (zero-volume ones
    included) then a whole-hippocampus row (``structure`` ``HC``, ``label`` missing) unless the
    ``ca_mode`` is the whole hippocampus already. ``mean_uncertainty`` is the mean entropy inside
    the label (missing when the label is empty). The spread columns (:func:`spread`) come from
    ``predictions``; missing without them.
    """
    structs = structures(ca_mode)
    labels = np.asarray(labels)
    uncertainty = np.asarray(uncertainty)
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelsError(f"labels must be an integer array, got dtype {labels.dtype}")
    if uncertainty.shape != labels.shape:
        raise GridError(
            f"uncertainty {uncertainty.shape} and labels {labels.shape} are not on one grid"
        )
    voxel_volume = (
        float(grid) if np.ndim(grid) == 0 else voxel_volume_mm3(np.asarray(grid, dtype=float))
    )
    if not np.isfinite(voxel_volume) or voxel_volume <= 0:
        raise GridError(f"voxel volume must be positive, got {voxel_volume}")

    flat = labels.ravel()
    if flat.size and flat.min() < 0:
        raise LabelsError(f"labels contain negative values ({flat.min()})")
    counts = np.bincount(flat, minlength=2 * RIGHT_OFFSET)
    known = {0} | {bilateral_index(side, s.label) for side in SIDES_BY_INDEX for s in structs}
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - known)
    if unknown:
        raise LabelsError(
            f"labels {unknown} are not bilateral indices of ca_mode {ca_mode!r} "
            f"(expected {sorted(known)})"
        )
    inside = flat > 0
    if not np.all(np.isfinite(uncertainty.ravel()[inside])):
        raise ValueError("uncertainty is not finite inside the segmentation")
    sums = np.bincount(
        flat[inside], weights=uncertainty.ravel()[inside].astype(np.float64), minlength=counts.size
    )

    base = {
        "participant_id": f"sub-{entities.sub}",
        "session_id": f"ses-{entities.ses}" if entities.ses else None,
        "acq": entities.acq,
        "ce": entities.ce,
        "rec": entities.rec,
        "run": entities.run,
        "contrast": contrast or entities.contrast,
        "source": "_".join(
            [f"{k}-{v}" for k, v in entities.items()] + [entities.contrast or ""]
        ).rstrip("_"),
        "icv_mm3": icv_mm3,
        "localisation_ok": localisation_ok,
    }

    per_prediction = {
        side: _structure_volumes(counts, ca_mode, voxel_volume)
        for side, counts in (predictions or {}).items()
    }

    def row(side: str, structure: str, label: int | None, n: int, total: float) -> dict:
        volumes = per_prediction.get(side, {}).get(structure)
        return {
            **base,
            "side": side,
            "structure": structure,
            "label": label,
            "n_voxels": n,
            "volume_mm3": n * voxel_volume,
            **spread(volumes if volumes is not None else np.empty(0)),
            "mean_uncertainty": total / n if n else None,
        }

    rows = []
    flags = [NONFINITE_INPUT] if nonfinite_voxels else []
    for side in SIDES_BY_INDEX:
        indices = [bilateral_index(side, s.label) for s in structs]
        for s, index in zip(structs, indices, strict=True):
            rows.append(row(side, s.abbreviation, index, int(counts[index]), float(sums[index])))
        n = int(counts[indices].sum())
        if len(structs) > 1:
            rows.append(row(side, WHOLE_HIPPOCAMPUS, None, n, float(sums[indices].sum())))
        if n == 0:
            flags.append(f"{side}_HC_empty")
        elif n * voxel_volume < MIN_PLAUSIBLE_HC_MM3:
            flags.append(f"{side}_HC_small")

    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["qc_flags"] = "; ".join(flags) or None
    df["label"] = df["label"].astype("Int64")
    df["n_predictions"] = df["n_predictions"].astype("Int64")
    # Rounded far below any anatomical precision, so tables stay readable and diffs stable.
    rounding = [("volume_mm3", 4), *((c, 4) for c in SPREAD_COLUMNS), ("mean_uncertainty", 6),
                ("icv_mm3", 1)]  # fmt: skip
    for column, decimals in rounding:
        df[column] = df[column].astype(float).round(decimals)
    return df


def volumes_sidecar() -> dict[str, dict[str, object]]:
    """BIDS-style description of every column of :data:`COLUMNS` (``Description``, ``Units``)."""
    abbreviations = sorted(
        {s.abbreviation for mode in CA_MODES for s in structures(mode)} | {WHOLE_HIPPOCAMPUS}
    )
    return {
        "participant_id": {"Description": "Participant label, sub-<label>"},
        "session_id": {"Description": "Session label, ses-<label>; n/a without sessions"},
        "acq": {"Description": "acq entity of the source image; n/a when absent"},
        "ce": {"Description": "ce entity of the source image; n/a when absent"},
        "rec": {"Description": "rec entity of the source image; n/a when absent"},
        "run": {"Description": "run entity of the source image; n/a when absent"},
        "contrast": {"Description": "Contrast (BIDS suffix) of the segmented image, e.g. T1w"},
        "source": {"Description": "Source image name without extension"},
        "side": {
            "Description": "Hemisphere",
            "Levels": {"left": "left hippocampus", "right": "right hippocampus"},
        },
        "structure": {
            "Description": (
                "Structure abbreviation as in desc-subfields_dseg.tsv without the side prefix; "
                f"{WHOLE_HIPPOCAMPUS} is the whole hippocampus (all subfields of the side)"
            ),
            "Levels": {a: a for a in abbreviations},
        },
        "label": {
            "Description": (
                "Index of the structure in the bilateral segmentation (desc-subfields_dseg); "
                "n/a for the whole-hippocampus row"
            )
        },
        "n_voxels": {"Description": "Number of voxels with this label on the source image grid"},
        "volume_mm3": {
            "Description": "n_voxels times the voxel volume of the source image grid",
            "Units": "mm^3",
        },
        "volume_sd_mm3": {
            "Description": (
                "Ensemble spread of volume_mm3: the sample standard deviation (n - 1 "
                "denominator) of this structure's volume over the n_predictions individual "
                "predictions of the ensemble (every model on the original image and on each of "
                "its test-time augmented copies; each prediction mapped back onto the image's "
                "crop, merged to the ca_mode, and its argmax voxels counted times the voxel "
                "volume; HC: the sum of the side's structures). It measures how much the "
                "ensemble disagrees with itself, not how far volume_mm3 may be from the true "
                "anatomy: it is not a confidence interval (models trained alike can share an "
                "error, and it ignores scanner and protocol effects). n/a with a single "
                "prediction (one model, no test-time augmentation). Each model's own mean and "
                "standard deviation are in the image's desc-subfields_dseg.json "
                "(EnsembleVolumes)"
            ),
            "Units": "mm^3",
        },
        "volume_p05_mm3": {
            "Description": (
                "5th percentile of the structure's volume over the n_predictions predictions "
                "(as volume_sd_mm3; linear interpolation between order statistics, numpy's "
                "default and R's quantile type 7). volume_mm3 is the volume of the fused "
                "segmentation (the voxel-wise vote), not an average of the predictions' "
                "volumes, so it can fall outside volume_p05_mm3..volume_p95_mm3 (a thin "
                "structure the predictions place in different voxels loses voxels in the vote); "
                "the subject report says where. n/a with a single prediction"
            ),
            "Units": "mm^3",
        },
        "volume_p95_mm3": {
            "Description": "95th percentile of the structure's volume over the n_predictions "
            "predictions, as volume_p05_mm3; n/a with a single prediction",
            "Units": "mm^3",
        },
        "n_predictions": {
            "Description": (
                "Number of predictions fused for this side (input images x (1 + test-time "
                "augmented copies) x models); the spread columns come from these. n/a when the "
                "ensemble recorded none (outputs of an older version)"
            )
        },
        "mean_uncertainty": {
            "Description": (
                "Mean voxel-wise entropy of the mean predicted probabilities inside the label "
                "(0 = all predictions agree with certainty); n/a for an empty label"
            ),
            "Units": "nat",
        },
        "icv_mm3": {
            "Description": (
                "Head-size estimate for normalisation, eTIV style: the brain volume of the "
                "MNI152NLin2009cSym template (all CerebrA atlas labels, "
                f"{TEMPLATE_BRAIN_MM3:.0f} mm^3; this excludes sulcal and extra-cerebral CSF, so "
                "it is smaller than an intracranial volume) times the absolute determinant of "
                "the affine template-to-subject registration; n/a when not computed"
            ),
            "Units": "mm^3",
        },
        "localisation_ok": {
            "Description": (
                "Whether the localisation of the hippocampi passed its quality checks "
                "(template registration similarity, plausible scale, hippocampus inside the image "
                "and its box); False flags a segmentation to inspect before use"
            ),
            "Levels": {"True": "passed", "False": "doubtful"},
        },
        "qc_flags": {
            "Description": (
                "What the participant level found wrong with this image's results, "
                "'; '-separated (the same on every row of the image); n/a when nothing"
            ),
            "Levels": dict(QC_FLAGS),
        },
    }


def describe_qc_flags(flags: str | None, nonfinite_voxels: int | None = None) -> str:
    """The ``qc_flags`` of an image in words, e.g. ``"left hippocampus empty, 1200 NaN or
    infinite input voxels"``; "" when there are none. Unknown names are kept as they are."""
    words = []
    for flag in [f for f in (flags or "").split("; ") if f]:
        if flag == NONFINITE_INPUT:
            count = f"{nonfinite_voxels} " if nonfinite_voxels else ""
            words.append(f"{count}NaN or infinite input voxels treated as background")
        elif flag.endswith(("_HC_empty", "_HC_small")):
            side, _, kind = flag.split("_")
            what = "empty" if kind == "empty" else f"under {MIN_PLAUSIBLE_HC_MM3:g} mm3"
            words.append(f"{side} hippocampus {what}")
        else:
            words.append(flag)
    return ", ".join(words)


def write_volumes(
    df: pd.DataFrame,
    path: str | PathLike[str],
    descriptions: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """Write a volumes table (TSV, ``n/a`` for missing) and its JSON sidecar; return the TSV path.

    Every column needs a description: those of :data:`COLUMNS` are known, others come from
    ``descriptions``. Column names must be valid R names (letters, digits, underscore, starting
    with a letter) so ``read.delim`` keeps them.
    """
    known = {**volumes_sidecar(), **(descriptions or {})}
    bad = [c for c in df.columns if not isinstance(c, str) or not _R_NAME.match(c)]
    if bad:
        raise ValueError(f"{path}: column names not valid in R: {bad}")
    undescribed = [c for c in df.columns if c not in known]
    if undescribed:
        raise ValueError(f"{path}: columns without a description: {undescribed}")
    path = Path(path)
    # Sidecar first: a table under its final name then always has its description.
    write_json({c: known[c] for c in df.columns}, sidecar_path(path))
    write_tsv(df, path)
    return path


def read_qc_flags(
    output_dir: str | PathLike[str], subjects: Sequence[str]
) -> dict[str, tuple[str, int | None]]:
    """The images of ``subjects`` whose volumes tables hold ``qc_flags``: source name ->
    (flags, NaN voxel count from the segmentation's sidecar, None when unknown). A table or
    sidecar that cannot be read is passed over (the reports and the group level say so)."""
    from hsf_bids.outputs.read import read_sidecar, sidecar_of_source, volumes_tables

    found: dict[str, tuple[str, int | None]] = {}
    for path in volumes_tables(output_dir, subjects):
        try:
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except (OSError, ValueError):
            continue
        if "qc_flags" not in table.columns or "source" not in table.columns:
            continue
        for source, flags in zip(table["source"], table["qc_flags"], strict=True):
            if flags in ("", "n/a") or source in found:
                continue
            try:
                qc = read_sidecar(sidecar_of_source(output_dir, source))["Provenance"]["QC"]
                count = int(qc["nonfinite_voxels"])
            except (OSError, ValueError, KeyError, TypeError):
                count = None
            found[source] = (flags, count)
    return found
