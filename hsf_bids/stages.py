"""The stages of one segmentation, as plain functions over files.

Each stage reads its inputs from files, calls the pure computation (``image``, ``localisation``,
``segment``, ``outputs``) and writes its results into ``out_dir``, returning their paths. The
Nipype interfaces are thin wrappers over these, so the stages can be run and tested without Nipype.

Data path of one image (``in_file``; a second contrast joins through :func:`coregister`):
``localise`` -> ``segment_side`` (right, left) -> ``paste_back`` -> ``write_derivatives`` ->
``write_volumes_table`` (per subject and session).

Timing: each stage writes ``timing.json`` (:data:`TIMING_JSON`, see :class:`StageTimer`) next
to its outputs in ``out_dir`` (the Nipype node's folder in the work folder, never the
derivatives) and logs it at DEBUG on ``hsf_bids.timing``; ``benchmarks/participant.py`` reads
them back. Timing reads a clock only and never changes a result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from hsf_bids.engines.base import Network
from hsf_bids.faults import fault_point
from hsf_bids.image import from_ras, load_anat, nonfinite_voxels, to_ras
from hsf_bids.localisation import Box, crop, locate
from hsf_bids.outputs.derivatives import write_json
from hsf_bids.settings import SegmentationSettings
from hsf_bids.timing import StageTimer
from hsf_bids.vocabulary import SIDES

LOCALISATION_JSON = "localisation.json"
# One side's per-prediction label counts (segment_side -> write_derivatives).
PREDICTIONS_JSON = "predictions.json"


def read_localisation(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A localisation written by :func:`localise` (boxes as :class:`Box`)."""
    data = json.loads(Path(path).read_text())
    data["boxes"] = {side: Box.from_dict(box) for side, box in data["boxes"].items()}
    return data


def _ras_image(in_file: str | os.PathLike[str]) -> tuple[nib.Nifti1Image, np.ndarray]:
    return to_ras(load_anat(in_file))


def localise(
    in_file: str | os.PathLike[str],
    contrast: str,
    out_dir: str | os.PathLike[str],
    settings: SegmentationSettings,
) -> Path:
    """Register the template to ``in_file`` and find both boxes; writes ``localisation.json``.

    ``contrast`` picks the template; ``settings`` gives the seed and the box margin
    (:meth:`~hsf_bids.settings.SegmentationSettings.box_margin`). The JSON holds the boxes
    (RAS+ voxels of the input), the template-to-subject affine, the QC values and checks,
    ``localisation_ok``, warnings and the registration schedule kept.
    """
    timer = StageTimer("localise")
    with timer.step("read"):
        ras, _ = _ras_image(in_file)
    with timer.step("register"):  # registration, boxes and QC
        margin = settings.box_margin(np.linalg.norm(ras.affine[:3, :3], axis=0))
        loc = locate(ras, contrast, margin=margin, seed=settings.seed)
    record = {"source": str(in_file), **loc.to_dict()}
    with timer.step("write"):
        path = write_json(record, Path(out_dir) / LOCALISATION_JSON)
    timer.write(out_dir)
    return path


def coregister(
    in_file: str | os.PathLike[str],
    reference_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: SegmentationSettings,
) -> Path:
    """Register a second contrast to the reference image (seeded by ``settings.seed``) and
    resample it onto the reference's RAS+ grid (linear); writes ``coregistered.nii.gz`` and the
    transform as JSON."""
    from hsf_bids.segment.coregister import register_to, resample_to

    timer = StageTimer("coregister")
    with timer.step("read"):
        moving, _ = _ras_image(in_file)
        fixed, _ = _ras_image(reference_file)
    with timer.step("register"):
        moving_to_fixed = register_to(moving, fixed, seed=settings.seed)
    out = Path(out_dir)
    with timer.step("write"):  # resampling included
        write_json(
            {"source": str(in_file), "reference": str(reference_file),
             "moving_to_fixed": moving_to_fixed.tolist()},
            out / "coregistration.json",
        )  # fmt: skip
        path = out / "coregistered.nii.gz"
        nib.save(resample_to(moving, fixed, moving_to_fixed), path)
    timer.write(out)
    return path


def side_seed(seed: int, side: str) -> np.random.Generator:
    """Independent, reproducible augmentation streams for the two sides of one run."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SIDES.index(side)]))


def load_networks(settings: SegmentationSettings) -> list[Network]:
    """The process's loaded network of each model of ``settings`` (loaded once per process,
    :func:`hsf_bids.engines.load_network`), run as the model's ``engine/precision/device``."""
    from hsf_bids.engines import load_network

    networks = []
    for model in settings.models:
        engine, precision, device = model.choice.split("/")
        networks.append(
            load_network(
                model.path, engine=engine, precision=precision, device=device,
                threads=settings.threads,
            )
        )  # fmt: skip
    return networks


def read_predictions(path: str | os.PathLike[str]) -> np.ndarray:
    """The per-prediction label counts written by :func:`segment_side`: int64
    ``[inputs, 1 + copies, models, labels]`` (see ``CropSegmentation.prediction_counts``)."""
    return np.asarray(json.loads(Path(path).read_text())["counts"], dtype=np.int64)


def segment_side(
    in_files: Sequence[str | os.PathLike[str]],
    localisation_file: str | os.PathLike[str],
    side: str,
    out_dir: str | os.PathLike[str],
    settings: SegmentationSettings,
) -> tuple[Path, Path, Path]:
    """Segment one side's crop with every model; writes the crop's labels and uncertainty,
    and each prediction's label counts (:data:`PREDICTIONS_JSON`, :func:`read_predictions`).

    ``in_files``: the image whose grid the outputs share, then optionally a second contrast
    already on that image's RAS+ grid (:func:`coregister`). ``settings`` gives the models, how
    each runs, and the ensemble's settings; the side's augmentations are seeded by
    :func:`side_seed`. Outputs are NIfTI crops (``labels.nii.gz`` uint8 in ``ca_mode`` labels,
    ``uncertainty.nii.gz`` float32) placed in the world where the crop lies.
    """
    from hsf_bids.segment import segment_crop

    timer = StageTimer(f"segment_{side}")
    with timer.step("crop"):  # reading the images and cropping
        box = read_localisation(localisation_file)["boxes"][side]
        primary, _ = _ras_image(in_files[0])
        spacing = tuple(float(z) for z in primary.header.get_zooms()[:3])
        crops = [(crop(np.asarray(primary.dataobj), box), spacing)]
        for extra in in_files[1:]:
            crops.append((crop(np.asarray(nib.load(extra).dataobj), box), spacing))
    # Waits here when the participant run is already loading them (_prefetch_networks).
    with timer.step("load_models"):
        networks = load_networks(settings)
    result = segment_crop(crops, networks, settings.ensemble, seed=side_seed(settings.seed, side))
    for phase, seconds in result.timings.items():
        timer.add(phase, seconds)
    fault_point(f"segment:{side}")
    crop_affine = primary.affine.copy()
    crop_affine[:3, 3] = primary.affine[:3, :3] @ np.asarray(box.start) + primary.affine[:3, 3]
    out = Path(out_dir)
    labels_path, uncertainty_path = out / "labels.nii.gz", out / "uncertainty.nii.gz"
    predictions_path = out / PREDICTIONS_JSON
    with timer.step("write"):
        nib.save(nib.Nifti1Image(result.labels.astype(np.uint8), crop_affine), labels_path)
        nib.save(
            nib.Nifti1Image(result.uncertainty.astype(np.float32), crop_affine), uncertainty_path
        )
        counts = {
            "axes": ["input", "copy", "model", "label"],
            "labels": list(result.label_names),
            "counts": result.prediction_counts.tolist(),
        }
        write_json(counts, predictions_path)
    timer.write(out)
    return labels_path, uncertainty_path, predictions_path


def paste_back_sides(
    in_file: str | os.PathLike[str],
    localisation_file: str | os.PathLike[str],
    side_labels: Mapping[str, str | os.PathLike[str]],
    side_uncertainty: Mapping[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
) -> tuple[Path, Path]:
    """Assemble both sides into one bilateral label image and one uncertainty map on the exact
    grid (shape, voxel order, header) of ``in_file``.

    Side labels become bilateral indices (:func:`hsf_bids.vocabulary.bilateral_index`). Where
    two boxes overlap, a labelled voxel wins over background, and between two labels the less
    uncertain one wins.
    """
    from hsf_bids.outputs.derivatives import image_on_grid
    from hsf_bids.vocabulary import bilateral_index

    timer = StageTimer("paste_back")
    source = nib.load(in_file)
    ras, ornt = _ras_image(in_file)
    boxes = read_localisation(localisation_file)["boxes"]
    labels = np.zeros(ras.shape, dtype=np.uint8)
    uncertainty = np.zeros(ras.shape, dtype=np.float32)
    for side in SIDES:
        box = boxes[side]
        side_lab = np.asarray(nib.load(side_labels[side]).dataobj).astype(np.uint8)
        side_unc = np.asarray(nib.load(side_uncertainty[side]).dataobj).astype(np.float32)
        region_lab, region_unc = labels[box.slices], uncertainty[box.slices]  # views
        wins = (side_lab > 0) & ((region_lab == 0) | (side_unc < region_unc))
        region_lab[wins] = bilateral_index(side, side_lab[wins])
        region_unc[wins] = side_unc[wins]
        background = region_lab == 0
        region_unc[background] = np.maximum(region_unc[background], side_unc[background])
    fault_point("paste_back")
    out = Path(out_dir)
    dseg = out / "dseg.nii.gz"
    unc = out / "uncertainty.nii.gz"
    nib.save(image_on_grid(from_ras(labels, ornt), source, np.uint8, intent="label"), dseg)
    nib.save(image_on_grid(from_ras(uncertainty, ornt), source, np.float32), unc)
    timer.write(out)
    return dseg, unc


def write_derivatives(
    dseg_file: str | os.PathLike[str],
    uncertainty_file: str | os.PathLike[str],
    localisation_file: str | os.PathLike[str],
    *,
    source_file: str | os.PathLike[str],
    sources: Sequence[str],
    output_dir: str | os.PathLike[str],
    contrast: str,
    settings: SegmentationSettings,
    out_dir: str | os.PathLike[str],
    predictions: Mapping[str, str | os.PathLike[str]] | None = None,
    secondary_file: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Path], Path]:
    """Write the image's derivatives (atomically) and its rows of the volumes table.

    ``contrast`` is what the volumes table calls the input (``T1w``, ``T2w`` or ``T1w+T2w``);
    ``settings`` gives the ``ca_mode`` and the provenance block of the sidecars;
    ``predictions``: side -> the :data:`PREDICTIONS_JSON` of :func:`segment_side`, for the
    volumes' ensemble spread (without them the spread columns are ``n/a``);
    ``secondary_file`` is the second contrast fused in, if any. The sidecars' ``Provenance.QC``
    and the table's ``qc_flags`` say what is wrong with the results (NaN input voxels, an empty
    or implausibly small hippocampus).

    Returns the written derivative paths and a TSV of this image's volume rows in ``out_dir``
    (the session's table is assembled by :func:`write_volumes_table`).
    """
    from hsf_bids.outputs import Entities, compute_volumes, estimate_icv_mm3, write_segmentation
    from hsf_bids.outputs.volumes import model_volumes, voxel_volume_mm3

    timer = StageTimer("derivatives")
    entities = Entities.from_filename(source_file)
    loc = json.loads(Path(localisation_file).read_text())
    source = nib.load(source_file)
    labels = np.asarray(nib.load(dseg_file).dataobj)
    uncertainty = np.asarray(nib.load(uncertainty_file).dataobj, dtype=np.float32)
    record = {
        **settings.provenance,
        "Localisation": {
            key: loc[key]
            for key in ("boxes", "qc", "checks", "localisation_ok", "warnings",
                        "template_to_subject", "seed", "resolution", "schedule")
        },
    }  # fmt: skip
    counts = {side: read_predictions(path) for side, path in (predictions or {}).items()}
    per_model = None
    if counts:
        named = [m.get("File") for m in settings.provenance.get("Models") or []]
        if len(named) != len(settings.models) or not all(named):
            named = [Path(m.path).name for m in settings.models]
        per_model = model_volumes(counts, settings.ca_mode, voxel_volume_mm3(source.affine), named)
    # NaN voxels were segmented as background (load_anat): counted again here, from every
    # input, so that the tables and the sidecar flag the image.
    nonfinite = sum(
        nonfinite_voxels(load_anat(f)) for f in (source_file, secondary_file) if f is not None
    )
    icv = estimate_icv_mm3(np.asarray(loc["template_to_subject"]))
    table = compute_volumes(
        labels, uncertainty, source.affine, settings.ca_mode, entities=entities,
        contrast=contrast, icv_mm3=icv, localisation_ok=bool(loc["localisation_ok"]),
        predictions=counts or None,
        nonfinite_voxels=nonfinite,
    )  # fmt: skip
    flags = table["qc_flags"].iloc[0]
    record["QC"] = {
        "nonfinite_voxels": nonfinite,
        "qc_flags": flags.split("; ") if isinstance(flags, str) else [],
    }
    written = write_segmentation(
        output_dir, entities, labels, uncertainty, source, sources=sources, provenance=record,
        model_volumes=per_model,
    )  # fmt: skip
    part = Path(out_dir) / "volumes_part.tsv"
    table.to_csv(part, sep="\t", index=False, na_rep="n/a")
    timer.write(out_dir)
    return written, part


def write_volumes_table(
    parts: Sequence[str | os.PathLike[str]],
    source_file: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
) -> Path:
    """Concatenate the volume rows of every image of one subject and session into its
    ``_desc-subfields_volumes.tsv`` (with its JSON data dictionary)."""
    from hsf_bids.outputs import Entities, volumes_path, write_volumes

    # As text: every value is carried over exactly as the image's stage wrote it.
    frames = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in parts]
    table = pd.concat(frames, ignore_index=True)
    path = volumes_path(output_dir, Entities.from_filename(source_file))
    write_volumes(table, path)
    return path
