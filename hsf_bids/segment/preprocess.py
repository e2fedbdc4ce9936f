"""Intensity normalisation and padding of one crop, as the HSF models expect them.

The published models were trained on crops z-scored over every voxel (no mask) and zero-padded
to multiples of 8, the padding split ``ceil(t/2)`` before and ``floor(t/2)`` after on each
spatial axis (torchio's ``EnsureShapeMultiple``). These helpers reproduce that contract on plain
arrays; the spatial axes are always the last three, so a ``[C, x, y, z]`` or
``[B, C, x, y, z]`` array pads and un-pads like a bare ``[x, y, z]`` crop.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ConstantCropError", "Pads", "pad_to_multiple", "unpad", "zscore"]

#: ``((before, after), (before, after), (before, after))`` for the last three axes.
Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class ConstantCropError(ValueError):
    """The crop has no intensity variation, so it cannot be z-scored."""


def zscore(crop: np.ndarray) -> np.ndarray:
    """Z-score a crop over all of its voxels.

    Parameters
    ----------
    crop : array of any shape and real dtype (normally ``[x, y, z]``).

    Returns
    -------
    float32 array of the same shape: ``(crop - mean) / std`` with the unbiased (``ddof=1``)
    standard deviation, as torchio's ``ZNormalization`` used by HSF.

    Raises
    ------
    ConstantCropError
        If the crop is empty, has a single voxel, contains non-finite values or is constant.
    """
    values = np.asarray(crop)
    if values.size < 2:
        raise ConstantCropError(f"cannot z-score a crop of shape {values.shape}: too few voxels")
    # float64 statistics: int16 scans and large crops lose digits in a float32 running sum.
    values64 = values.astype(np.float64, copy=False)
    mean = values64.mean()
    std = values64.std(ddof=1)
    if not np.isfinite(mean) or not np.isfinite(std):
        raise ConstantCropError(
            f"cannot z-score a crop of shape {values.shape}: it contains NaN or infinite values"
        )
    if std == 0.0:
        raise ConstantCropError(
            f"cannot z-score a crop of shape {values.shape}: every voxel equals {mean:g} "
            "(is the box outside the head, or the image blank?)"
        )
    return ((values64 - mean) / std).astype(np.float32)


def _check_spatial(array: np.ndarray, what: str) -> None:
    if array.ndim < 3:
        raise ValueError(f"{what} needs at least 3 dimensions (x, y, z), got shape {array.shape}")


def pad_to_multiple(array: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, Pads]:
    """Zero-pad the last three axes up to the next multiple of ``multiple``.

    Parameters
    ----------
    array : array with at least three dimensions; the last three are x, y, z.
    multiple : the size every spatial axis must be a multiple of (8 for the HSF U-Nets).

    Returns
    -------
    padded : the zero-padded array (the input itself when nothing needs padding).
    pads : ``((before, after),) * 3`` for the last three axes, with ``t = (-n) % multiple``,
        ``before = ceil(t / 2)`` and ``after = floor(t / 2)``; pass it to :func:`unpad`.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple}")
    _check_spatial(array, "pad_to_multiple")
    pads_list = []
    for n in array.shape[-3:]:
        total = (-n) % multiple
        before = (total + 1) // 2
        pads_list.append((before, total - before))
    pads: Pads = (pads_list[0], pads_list[1], pads_list[2])
    if not any(b or a for b, a in pads):
        return array, pads
    width = [(0, 0)] * (array.ndim - 3) + list(pads)
    return np.pad(array, width, mode="constant", constant_values=0), pads


def unpad(array: np.ndarray, pads: Pads) -> np.ndarray:
    """Remove the padding added by :func:`pad_to_multiple` from the last three axes.

    Parameters
    ----------
    array : array with at least three dimensions, e.g. the model output ``[B, C, x, y, z]``.
    pads : the ``pads`` returned by :func:`pad_to_multiple` for the un-padded crop.

    Returns
    -------
    A view of ``array`` with the original spatial shape.
    """
    _check_spatial(array, "unpad")
    index: list[slice] = [slice(None)] * (array.ndim - 3)
    for n, (before, after) in zip(array.shape[-3:], pads, strict=True):
        if before < 0 or after < 0 or before + after > n:
            raise ValueError(f"pads {pads} do not fit an array of shape {array.shape}")
        index.append(slice(before, n - after))
    return array[tuple(index)]
