"""The HSF contract on one crop: z-score, padding, test-time augmentation and its inverse,
``ca_mode`` merging, vote/mean fusion, entropy, and the model ensemble.

Arrays in, arrays out: nothing here reads or writes files.
"""

from .augment import HSF_TTA, Augmentation, TTASettings, sample_augmentation, sample_augmentations
from .ensemble import (
    CropSegmentation,
    EnsembleSettings,
    InputCropError,
    ModelOutputError,
    segment_crop,
)
from .fuse import FusionAccumulator, UnknownFusionError, entropy, merge_ca, n_classes
from .preprocess import ConstantCropError, pad_to_multiple, unpad, zscore

__all__ = [
    "HSF_TTA",
    "Augmentation",
    "ConstantCropError",
    "CropSegmentation",
    "EnsembleSettings",
    "FusionAccumulator",
    "InputCropError",
    "ModelOutputError",
    "TTASettings",
    "UnknownFusionError",
    "entropy",
    "merge_ca",
    "n_classes",
    "pad_to_multiple",
    "sample_augmentation",
    "sample_augmentations",
    "segment_crop",
    "unpad",
    "zscore",
]
