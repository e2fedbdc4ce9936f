"""The calibration set: fixed hippocampus crops every installation can build.

Two jobs share it: NNCF's post-training quantisation (:mod:`hsf_bids.quantize`) reads activation
ranges from it, and the agreement gate (:mod:`hsf_bids.engines.agreement`) compares a faster
engine or precision with onnxruntime fp32 on it. It is built from the files the app needs anyway:
the MNI152NLin2009cSym T1w and T2w templates and the CerebrA hippocampus labels (TemplateFlow),
cropped as the app crops a subject (the label's bounding box grown by :data:`DEFAULT_MARGIN`
voxels; the template is in RAS+ order at 1 mm, so it needs no registration). A user's own images
can join or replace it (:func:`image_crops`: localised with the app's registration).

Everything is seeded: the same seed gives the same crops, augmentations and network inputs, so
quantising twice writes the same file and an agreement measured twice gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsf_bids.segment.augment import HSF_TTA, Augmentation, sample_augmentations
from hsf_bids.segment.preprocess import pad_to_multiple, zscore

__all__ = [
    "CALIBRATION_SEED",
    "CalibrationCrop",
    "augmentations",
    "calibration_batches",
    "image_crops",
    "template_crops",
]

CALIBRATION_SEED = 20241
# Gamma factors applied (after min-max scaling) to some quantisation inputs, so the activation
# ranges NNCF records cover contrasts a little unlike the template's (scanners, sequences).
_GAMMAS = (0.7, 1.4)


@dataclass(frozen=True)
class CalibrationCrop:
    """One side's crop of one image: raw intensities in RAS+ order, voxel size in mm."""

    contrast: str
    side: str
    crop: np.ndarray
    spacing: tuple[float, float, float]
    source: str

    @property
    def name(self) -> str:
        return f"{self.source} {self.contrast} {self.side}"


def template_crops(contrasts: Sequence[str] = ("T1w", "T2w")) -> list[CalibrationCrop]:
    """Both sides' hippocampus crops of the MNI152NLin2009cSym template of each contrast."""
    from hsf_bids.image import to_ras
    from hsf_bids.localisation import DEFAULT_MARGIN, crop, make_box
    from hsf_bids.templates import HIPPOCAMPUS_LABELS, load_atlas, load_template
    from hsf_bids.vocabulary import SIDES

    atlas, _ = to_ras(load_atlas())
    labels = np.asarray(atlas.dataobj)
    crops = []
    for contrast in contrasts:
        template, _ = to_ras(load_template(contrast))
        data = np.asarray(template.dataobj, dtype=np.float32)
        spacing = tuple(float(z) for z in template.header.get_zooms()[:3])
        for side in SIDES:
            mask = labels == HIPPOCAMPUS_LABELS[side]
            box = make_box(side, (0, 0, 0), mask, data.shape, DEFAULT_MARGIN)
            crops.append(
                CalibrationCrop(contrast, side, crop(data, box), spacing, "MNI152NLin2009cSym")
            )
    return crops


def image_crops(
    paths: Sequence[str | Path], contrasts: Sequence[str], *, seed: int = 0
) -> list[CalibrationCrop]:
    """Both sides' crops of each image, localised as the participant level does."""
    from hsf_bids.image import load_anat, to_ras
    from hsf_bids.localisation import crop, locate
    from hsf_bids.vocabulary import SIDES

    crops = []
    for path, contrast in zip(paths, contrasts, strict=True):
        ras, _ = to_ras(load_anat(path))
        loc = locate(ras, contrast, seed=seed)
        data = np.asarray(ras.dataobj, dtype=np.float32)
        spacing = tuple(float(z) for z in ras.header.get_zooms()[:3])
        for side in SIDES:
            box_crop = crop(data, loc.boxes[side])
            crops.append(CalibrationCrop(contrast, side, box_crop, spacing, Path(path).name))
    return crops


def augmentations(
    crops: Sequence[CalibrationCrop], n_augmentations: int, seed: int = CALIBRATION_SEED
) -> list[list[Augmentation]]:
    """HSF's test-time augmentations for each crop, drawn from one seeded stream in crop order."""
    rng = np.random.default_rng(seed)
    return [
        sample_augmentations(rng, n_augmentations, c.crop.shape, c.spacing, HSF_TTA)
        if n_augmentations
        else []
        for c in crops
    ]


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.power(scaled, gamma, dtype=np.float32)


def calibration_batches(
    crops: Sequence[CalibrationCrop] | None = None,
    *,
    n_augmentations: int = 4,
    seed: int = CALIBRATION_SEED,
) -> list[np.ndarray]:
    """Network inputs ``[1, 1, x, y, z]`` (z-scored, padded to multiples of 8) for quantisation.

    Per crop: the original, ``n_augmentations`` HSF augmentations (flip, affine or elastic), and
    the original under each gamma of :data:`_GAMMAS`. Default crops: :func:`template_crops`.
    """
    crops = template_crops() if crops is None else list(crops)
    batches = []
    for item, augs in zip(crops, augmentations(crops, n_augmentations, seed), strict=True):
        images = [item.crop, *(aug.apply(item.crop) for aug in augs)]
        images += [_gamma(item.crop, g) for g in _GAMMAS]
        for image in images:
            batch, _ = pad_to_multiple(zscore(image)[None, None])
            batches.append(np.ascontiguousarray(batch, dtype=np.float32))
    return batches
