"""Channel merging (``ca_mode``) and the fusion of many predictions into one label map.

The HSF models output six softmax channels: ``0 background, 1 DG, 2 CA1, 3 CA2, 4 CA3, 5 SUB``.
``ca_mode`` sums some of them *before* any argmax or vote. Fusion keeps, per voxel, the vote
count of each class (of every prediction's argmax) and the running sum of probabilities, so its
memory does not depend on how many predictions join (HSF held all of them at once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hsf_bids.vocabulary import FUSIONS, N_MODEL_CLASSES, channel_groups

__all__ = [
    "ENTROPY_EPS",
    "FusionAccumulator",
    "UnknownFusionError",
    "entropy",
    "merge_ca",
    "n_classes",
]

#: Added inside the logarithm of the entropy, as in HSF.
ENTROPY_EPS = 1e-5


class UnknownFusionError(ValueError):
    """A fusion method that is not ``"vote"`` or ``"mean"``."""


def _check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise UnknownFusionError(f"unknown fusion {fusion!r}; expected 'vote' or 'mean'")


def n_classes(ca_mode: str) -> int:
    """Number of output labels (background included) for ``ca_mode``."""
    return len(channel_groups(ca_mode))


def merge_ca(probs: np.ndarray, ca_mode: str) -> np.ndarray:
    """Sum the model's probability channels into the labels of ``ca_mode``.

    Parameters
    ----------
    probs : ``[6, x, y, z]`` (channel axis 0) or ``[B, 6, x, y, z]`` (channel axis 1)
        probabilities as the HSF models output them.
    ca_mode : ``"1/2/3"`` (identity), ``"1/23"``, ``"123"`` or ``""``.

    Returns
    -------
    Array of the same layout with :func:`n_classes` channels, the dtype of ``probs``. For
    ``"1/2/3"`` the input itself is returned (no copy).
    """
    groups = channel_groups(ca_mode)
    if probs.ndim == 4:
        axis = 0
    elif probs.ndim == 5:
        axis = 1
    else:
        raise ValueError(
            f"merge_ca expects [C, x, y, z] or [B, C, x, y, z] probabilities, got shape "
            f"{probs.shape}"
        )
    if probs.shape[axis] != N_MODEL_CLASSES:
        raise ValueError(
            f"merge_ca expects {N_MODEL_CLASSES} model channels, got {probs.shape[axis]} "
            f"(shape {probs.shape})"
        )
    if len(groups) == N_MODEL_CLASSES:
        return probs
    out_shape = list(probs.shape)
    out_shape[axis] = len(groups)
    out = np.empty(out_shape, dtype=probs.dtype)
    for label, group in enumerate(groups):
        dst = out[label] if axis == 0 else out[:, label]
        src = probs[group[0]] if axis == 0 else probs[:, group[0]]
        np.copyto(dst, src)
        for channel in group[1:]:
            dst += probs[channel] if axis == 0 else probs[:, channel]
    return out


def entropy(mean_probs: np.ndarray) -> np.ndarray:
    """Voxel-wise entropy ``H = -sum_c p_c ln(p_c + 1e-5)``, clipped at 0, as float32.

    Parameters
    ----------
    mean_probs : ``[C, x, y, z]`` mean probabilities (channel axis 0).
    """
    p = np.asarray(mean_probs, dtype=np.float64)
    h = -np.sum(p * np.log(p + ENTROPY_EPS), axis=0)
    # ln(p + eps) > ln(p) makes H slightly negative where one class has p close to 1.
    return np.maximum(h, 0.0).astype(np.float32)


class FusionAccumulator:
    """Running vote counts and probability sum over any number of predictions.

    Memory is fixed at construction: ``n_classes`` uint16 vote counts and ``n_classes``
    float64 sums per voxel, whatever the number of predictions added.

    Parameters
    ----------
    shape : spatial shape ``(x, y, z)`` of every prediction.
    n_classes : number of channels of every prediction (after ``ca_mode`` merging).
    votes : keep vote counts. Without them only ``fusion="mean"`` is available, and
        :meth:`add_sum` may be used to add pre-summed predictions.
    """

    def __init__(self, shape: Sequence[int], n_classes: int, *, votes: bool = True) -> None:
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"FusionAccumulator needs a 3-D spatial shape, got {shape}")
        if n_classes < 2:
            raise ValueError(f"FusionAccumulator needs at least 2 classes, got {n_classes}")
        self.n_classes = int(n_classes)
        self._n_voxels = int(np.prod(self.shape))
        self._sum = np.zeros((self.n_classes, self._n_voxels), dtype=np.float64)
        self._votes = np.zeros((self.n_classes, self._n_voxels), dtype=np.uint16) if votes else None
        self._voxel_index = np.arange(self._n_voxels) if votes else None
        self.count = 0

    @property
    def tracks_votes(self) -> bool:
        """Whether vote counts are kept (``fusion="vote"`` possible)."""
        return self._votes is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator's arrays (constant over its life)."""
        extra = 0 if self._votes is None else self._votes.nbytes + self._voxel_index.nbytes
        return self._sum.nbytes + extra

    def _flat(self, probs: np.ndarray) -> np.ndarray:
        expected = (self.n_classes, *self.shape)
        if probs.shape != expected:
            raise ValueError(f"prediction of shape {probs.shape} does not match {expected}")
        return probs.reshape(self.n_classes, self._n_voxels)

    def add(self, probs: np.ndarray) -> np.ndarray:
        """Add one prediction ``[n_classes, x, y, z]``: one vote for its argmax, and its
        probabilities to the sum.

        Returns the prediction's own segmentation size: voxels per class of its argmax (ties
        to the lower class, as the vote), int64 ``[n_classes]``. The argmax is needed for the
        vote anyway, so the ensemble's per-prediction volumes cost one ``bincount``.
        """
        flat = self._flat(probs)
        winners = np.argmax(flat, axis=0)
        if self._votes is not None:
            if self.count >= np.iinfo(np.uint16).max:
                raise OverflowError("more than 65535 predictions overflow the uint16 vote counts")
            self._votes[winners, self._voxel_index] += 1
        self._sum += flat
        self.count += 1
        return np.bincount(winners, minlength=self.n_classes).astype(np.int64, copy=False)

    def add_sum(self, probs_sum: np.ndarray, n: int) -> None:
        """Add the sum of ``n`` predictions at once (only without vote counts: the argmax of
        each member is unknown)."""
        if self._votes is not None:
            raise RuntimeError("add_sum would leave the vote counts incomplete; use add()")
        if n < 1:
            raise ValueError(f"add_sum needs n >= 1, got {n}")
        self._sum += self._flat(probs_sum)
        self.count += int(n)

    def mean_probabilities(self) -> np.ndarray:
        """Mean probability ``[n_classes, x, y, z]`` (float32) over every prediction added."""
        if self.count == 0:
            raise RuntimeError("no prediction was added to the fusion accumulator")
        return (self._sum / self.count).astype(np.float32).reshape(self.n_classes, *self.shape)

    def vote_counts(self) -> np.ndarray:
        """Votes per class ``[n_classes, x, y, z]`` (uint16)."""
        if self._votes is None:
            raise RuntimeError("this accumulator keeps no vote counts (votes=False)")
        return self._votes.reshape(self.n_classes, *self.shape).copy()

    def result(self, fusion: str = "vote") -> tuple[np.ndarray, np.ndarray]:
        """Fuse the predictions.

        Parameters
        ----------
        fusion : ``"vote"``: plurality vote of the per-prediction argmax, ties to the lower
            label (HSF); ``"mean"``: argmax of the mean probability.

        Returns
        -------
        labels : uint8 ``[x, y, z]``.
        uncertainty : float32 ``[x, y, z]``, entropy of the mean probability (see
            :func:`entropy`), whatever the fusion.
        """
        _check_fusion(fusion)
        if self.count == 0:
            raise RuntimeError("no prediction was added to the fusion accumulator")
        if fusion == "vote":
            if self._votes is None:
                raise RuntimeError("fusion='vote' needs an accumulator built with votes=True")
            # np.argmax returns the first maximum: ties go to the lower label, as in HSF.
            labels = np.argmax(self._votes, axis=0)
        else:
            labels = np.argmax(self._sum, axis=0)
        mean = self.mean_probabilities()
        return (
            labels.astype(np.uint8).reshape(self.shape),
            entropy(mean),
        )
