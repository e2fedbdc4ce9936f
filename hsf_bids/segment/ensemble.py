"""Segment one crop with an ensemble of models and test-time augmentation (the HSF contract).

For every input crop (one contrast, or two for multispectral late fusion), the original and
``num_augmentations`` augmented copies are each augmented from the raw crop, z-scored, padded
to multiples of 8 and batched through **every** model network. Each prediction is un-padded,
merged to ``ca_mode`` and mapped back onto the crop grid, then joins one
:class:`~hsf_bids.segment.fuse.FusionAccumulator`.

Speed: an augmentation's coordinate maps and interpolation weights are built once and reused
for every model; the models' predictions for one copy are inverted with one sparse product.
``ca_mode`` merging is done before the inversion (both are linear, so the order does not change
the result and fewer channels are resampled). Every prediction is mapped back on its own whatever
the fusion (with ``fusion="mean"`` the models' sum could be inverted once, but each prediction's
own argmax on the crop grid is needed for its volumes).

Ensemble spread: the argmax of every prediction on the crop grid, taken for the vote anyway, is
also counted per label (``prediction_counts``), so each structure's volume in each prediction is
known without keeping any prediction: a few integers per prediction, one ``bincount`` each.

Determinism: all augmentations are drawn up front from the seed, in input order, before any
model runs, and predictions are added to the fusion in a fixed order (input, copy, model), so
labels and uncertainty are byte-identical for a given seed whatever the batch size (given an
engine whose output does not depend on the batch size, as the published models' per-instance
normalisation intends).

Timing: the result carries the wall time of each phase (``timings``: ``augment`` = drawing and
applying augmentations, z-scoring, padding; ``network`` = the networks' forward passes;
``invert`` = un-padding, ``ca_mode`` merging and inverting augmentations; ``fusion`` = the
accumulator), so the overhead around the network can be measured; timing reads a clock only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hsf_bids.engines.base import Network
from hsf_bids.vocabulary import FUSIONS, N_MODEL_CLASSES, label_names

from .augment import HSF_TTA, Augmentation, TTASettings, sample_augmentations
from .fuse import FusionAccumulator, UnknownFusionError, merge_ca, n_classes
from .preprocess import pad_to_multiple, unpad, zscore

__all__ = [
    "CropSegmentation",
    "EnsembleSettings",
    "InputCropError",
    "ModelOutputError",
    "segment_crop",
]


class InputCropError(ValueError):
    """The crops given to :func:`segment_crop` are unusable (shape, spacing, emptiness)."""


class ModelOutputError(RuntimeError):
    """A model network returned something that breaks the HSF output contract."""


@dataclass(frozen=True)
class EnsembleSettings:
    """How one crop is segmented by the ensemble (validated when built).

    ca_mode : ``"1/2/3"``, ``"1/23"``, ``"123"`` or ``""`` (see :mod:`hsf_bids.segment.fuse`).
    fusion : ``"vote"`` (HSF: plurality vote of every prediction's argmax, ties to the lower
        label) or ``"mean"`` (argmax of the mean probability).
    test_time_augmentation : add ``num_augmentations`` augmented copies per input to the
        original.
    num_augmentations : augmented copies per input (HSF: 20 for ``*_accurate`` presets).
    batch_size : copies per forward pass; does not change the result.
    augmentation : the augmentation ranges (HSF's by default).
    """

    ca_mode: str = "1/2/3"
    fusion: str = "vote"
    test_time_augmentation: bool = True
    num_augmentations: int = 20
    batch_size: int = 1
    augmentation: TTASettings = HSF_TTA

    def __post_init__(self) -> None:
        n_classes(self.ca_mode)  # raises UnknownCaModeError
        if self.fusion not in FUSIONS:
            raise UnknownFusionError(f"unknown fusion {self.fusion!r}; expected 'vote' or 'mean'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.test_time_augmentation and self.num_augmentations < 0:
            raise ValueError(f"num_augmentations must be >= 0, got {self.num_augmentations}")

    @property
    def copies(self) -> int:
        """Augmented copies per input actually drawn (0 without test-time augmentation)."""
        return self.num_augmentations if self.test_time_augmentation else 0


@dataclass(frozen=True)
class CropSegmentation:
    """The fused segmentation of one crop.

    Attributes
    ----------
    labels : uint8 ``[x, y, z]`` label map in the labels of ``ca_mode``.
    uncertainty : float32 ``[x, y, z]`` entropy of the mean probability (nats).
    n_predictions : number of predictions fused (inputs x copies x models).
    ca_mode, fusion : the settings used.
    label_names : name of each label value.
    prediction_counts : int64 ``[inputs, 1 + copies, models, C]``: voxels of each label in
        the argmax of each prediction (input crop, copy: 0 the original then the augmented
        ones, model in the order given), after mapping back and ``ca_mode`` merging; times the
        voxel volume, each structure's volume in each prediction.
    probabilities : float32 ``[C, x, y, z]`` mean probability, only when asked for.
    timings : wall seconds per phase (``augment``, ``network``, ``invert``, ``fusion``).
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    n_predictions: int
    ca_mode: str
    fusion: str
    label_names: tuple[str, ...]
    prediction_counts: np.ndarray
    probabilities: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _check_inputs(
    inputs: Sequence[tuple[np.ndarray, Sequence[float]]],
) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    if len(inputs) == 0:
        raise InputCropError("segment_crop needs at least one input crop")
    checked = []
    shape = None
    for number, item in enumerate(inputs):
        try:
            crop, spacing = item
        except (TypeError, ValueError):
            raise InputCropError(
                f"input {number} must be a (crop array, voxel spacing) pair"
            ) from None
        crop = np.asarray(crop)
        if crop.ndim != 3 or min(crop.shape) < 1:
            raise InputCropError(f"input {number}: crop must be 3-D, got shape {crop.shape}")
        if not np.issubdtype(crop.dtype, np.number) or np.iscomplexobj(crop):
            raise InputCropError(f"input {number}: crop must be real numbers, got {crop.dtype}")
        spacing3 = tuple(float(s) for s in np.ravel(spacing))
        if len(spacing3) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing3):
            raise InputCropError(
                f"input {number}: voxel spacing must be 3 positive numbers, got {spacing}"
            )
        if shape is None:
            shape = crop.shape
        elif crop.shape != shape:
            raise InputCropError(
                f"input {number}: crop shape {crop.shape} differs from input 0's {shape}; "
                "resample the second contrast onto the first one's grid before cropping"
            )
        checked.append((crop, spacing3))
    return checked


def _resolve_rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _run_network(network: Network, batch: np.ndarray) -> np.ndarray:
    probs = np.asarray(network.run(batch))
    expected = (batch.shape[0], N_MODEL_CLASSES, *batch.shape[2:])
    if probs.shape != expected:
        path = getattr(network, "path", "<unknown model>")
        raise ModelOutputError(
            f"model {path} returned shape {probs.shape} for input {batch.shape}; the HSF "
            f"contract expects {expected} (6 softmax channels)"
        )
    return probs


def segment_crop(
    inputs: Sequence[tuple[np.ndarray, Sequence[float]]],
    networks: Sequence[Network],
    settings: EnsembleSettings = EnsembleSettings(),  # noqa: B008 - frozen, never mutated
    *,
    seed: int | np.random.Generator = 0,
    return_probabilities: bool = False,
) -> CropSegmentation:
    """Segment one crop (one side) with every network, with or without test-time augmentation.

    Parameters
    ----------
    inputs : ``[(crop, spacing), ...]``: each crop a 3-D array in RAS voxel order at native
        resolution, ``spacing`` its voxel size in mm. One item for one contrast; two for
        multispectral late fusion (e.g. a T2w resampled onto the T1w grid and cropped with the
        same box): every crop must have the same shape, and all predictions join one vote.
    networks : loaded models (:class:`hsf_bids.engines.base.Network`), each returning
        ``[b, 6, x, y, z]`` softmax probabilities.
    settings : ``ca_mode``, fusion, test-time augmentation and batch size
        (:class:`EnsembleSettings`; HSF's by default).
    seed : an int seed or a :class:`numpy.random.Generator` for the augmentations.
    return_probabilities : also return the mean probability map.

    Returns
    -------
    CropSegmentation
    """
    checked = _check_inputs(inputs)
    if len(networks) == 0:
        raise ValueError("segment_crop needs at least one model network")
    ca_mode, fusion, batch_size = settings.ca_mode, settings.fusion, settings.batch_size
    n_labels = n_classes(ca_mode)
    n_aug = settings.copies

    # Draw every augmentation before running anything: the draws then depend on the seed, the
    # inputs' shapes and spacings only, not on the batch size or the number of models.
    timings = dict.fromkeys(("augment", "network", "invert", "fusion"), 0.0)
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[phase] += now - clock
        clock = now

    rng = _resolve_rng(seed)
    # (input, copy, augmentation); copy 0 is the original.
    jobs: list[tuple[int, int, Augmentation | None]] = []
    for index, (crop, spacing) in enumerate(checked):
        jobs.append((index, 0, None))
        augs = []
        if n_aug:
            augs = sample_augmentations(rng, n_aug, crop.shape, spacing, settings.augmentation)
        jobs.extend((index, copy, aug) for copy, aug in enumerate(augs, start=1))

    shape = checked[0][0].shape
    lap("augment")
    accumulator = FusionAccumulator(shape, n_labels, votes=fusion == "vote")
    counts = np.zeros((len(checked), 1 + n_aug, len(networks), n_labels), dtype=np.int64)
    lap("fusion")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = []
        for index, _, aug in chunk:
            crop = checked[index][0]
            image = crop if aug is None else aug.apply(crop)
            try:
                normalised = zscore(image)
            except ValueError as error:
                raise InputCropError(f"input {index}: {error}") from None
            images.append(normalised)
        batch, pads = pad_to_multiple(np.stack(images)[:, None])
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        lap("augment")
        # [models, batch, C, x, y, z], merged to ca_mode on the padded grid's crop region.
        predictions = []
        for s in networks:
            probs = _run_network(s, batch)
            lap("network")
            predictions.append(merge_ca(unpad(probs, pads), ca_mode))
            lap("invert")
        for position, (index, copy, aug) in enumerate(chunk):
            members = np.stack([p[position] for p in predictions])
            if aug is not None:
                members = aug.invert(members)
            lap("invert")
            for model, member in enumerate(members):
                counts[index, copy, model] = accumulator.add(member)
            lap("fusion")

    labels, uncertainty = accumulator.result(fusion)
    probabilities = accumulator.mean_probabilities() if return_probabilities else None
    lap("fusion")
    return CropSegmentation(
        labels=labels,
        uncertainty=uncertainty,
        n_predictions=accumulator.count,
        ca_mode=ca_mode,
        fusion=fusion,
        label_names=label_names(ca_mode),
        prediction_counts=counts,
        probabilities=probabilities,
        timings=timings,
    )
