"""The project's vocabulary, defined once: sides, the models' channels, the ``ca_mode``s and the
structures (labels) each produces, and the rule that holds both sides in one image.

Code, CLI, outputs, reports and group tables import these names from here; nothing else defines
them. Names users see:

- **side**: ``right`` or ``left`` (hemisphere);
- **structure**: a subfield or a merge of subfields, by its abbreviation (``DG``, ``CA1``, ``CA2``,
  ``CA3``, ``CA23``, ``CA``, ``SUB``, ``HC`` for the whole hippocampus), the same in file entities,
  tables and reports;
- **ca_mode**: which CA fields the models' channels are merged into before the vote: ``"1/2/3"``
  (none), ``"1/23"``, ``"123"``, ``""`` (the whole hippocampus);
- **contrast**: ``T1w`` or ``T2w`` (the BIDS suffix of a segmented image);
- **engine**/**device**/**precision**: what runs the models (``auto`` chooses among them);
- **fusion**: how predictions are combined, ``vote`` (HSF's) or ``mean``;
- **label**: a structure's value in a one-side segmentation (1, 2, ...); **index**: its value in
  the bilateral image (left = label, right = label + :data:`RIGHT_OFFSET`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CA_MODES",
    "CONTRASTS",
    "DEVICES",
    "ENGINES",
    "FUSIONS",
    "MODEL_CHANNELS",
    "N_MODEL_CLASSES",
    "PRECISIONS",
    "RIGHT_OFFSET",
    "SIDES",
    "SIDES_BY_INDEX",
    "WHOLE_HIPPOCAMPUS",
    "CaModeError",
    "Structure",
    "bilateral_index",
    "channel_groups",
    "check_ca_mode",
    "label_names",
    "side_of_index",
    "structures",
]

#: Both hemispheres, in the order they are localised and segmented. The augmentation seed of a
#: side is derived from its position here (:func:`hsf_bids.stages.side_seed`): reordering it
#: changes every result.
SIDES: tuple[str, str] = ("right", "left")

#: The order of the models' output channels (the HSF contract).
MODEL_CHANNELS: tuple[str, ...] = ("background", "DG", "CA1", "CA2", "CA3", "SUB")
N_MODEL_CLASSES = len(MODEL_CHANNELS)
_DG, _CA1, _CA2, _CA3, _SUB = 1, 2, 3, 4, 5

CA_MODES: tuple[str, ...] = ("1/2/3", "1/23", "123", "")
CONTRASTS: tuple[str, ...] = ("T1w", "T2w")
FUSIONS: tuple[str, ...] = ("vote", "mean")
ENGINES: tuple[str, ...] = ("onnxruntime", "openvino", "deepsparse")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")

#: Abbreviation of the whole hippocampus: the structure of ca_mode ``""`` and the sum row of the
#: volumes tables.
WHOLE_HIPPOCAMPUS = "HC"

#: Added to a label for the right side in bilateral images (left keeps the label).
RIGHT_OFFSET = 10


class CaModeError(ValueError):
    """A ``ca_mode`` that is not one of :data:`CA_MODES`."""


@dataclass(frozen=True)
class Structure:
    """One output structure of a ``ca_mode``.

    ``label`` is the single-side label in the fused segmentation, ``channels`` the model output
    channels whose probabilities are summed into it, ``abbreviation`` the short name used in tables
    and file entities (letters and digits only), ``name`` the full name without side.
    """

    label: int
    abbreviation: str
    name: str
    channels: tuple[int, ...]


_STRUCTURES: dict[str, tuple[Structure, ...]] = {
    "1/2/3": (
        Structure(1, "DG", "dentate gyrus", (_DG,)),
        Structure(2, "CA1", "CA1", (_CA1,)),
        Structure(3, "CA2", "CA2", (_CA2,)),
        Structure(4, "CA3", "CA3", (_CA3,)),
        Structure(5, "SUB", "subiculum", (_SUB,)),
    ),
    "1/23": (
        Structure(1, "DG", "dentate gyrus", (_DG,)),
        Structure(2, "CA1", "CA1", (_CA1,)),
        Structure(3, "CA23", "CA2 and CA3", (_CA2, _CA3)),
        Structure(4, "SUB", "subiculum", (_SUB,)),
    ),
    "123": (
        Structure(1, "DG", "dentate gyrus", (_DG,)),
        Structure(2, "CA", "CA1, CA2 and CA3", (_CA1, _CA2, _CA3)),
        Structure(3, "SUB", "subiculum", (_SUB,)),
    ),
    "": (Structure(1, WHOLE_HIPPOCAMPUS, "hippocampus", (_DG, _CA1, _CA2, _CA3, _SUB)),),
}


def check_ca_mode(ca_mode: object) -> str:
    """``ca_mode`` itself when it is one of :data:`CA_MODES`; else :class:`CaModeError`."""
    if not isinstance(ca_mode, str) or ca_mode not in _STRUCTURES:
        raise CaModeError(
            f"unknown ca_mode {ca_mode!r}: expected one of " + ", ".join(repr(m) for m in CA_MODES)
        )
    return ca_mode


def structures(ca_mode: str) -> list[Structure]:
    """The structures (without background) that ``ca_mode`` produces, in label order."""
    return list(_STRUCTURES[check_ca_mode(ca_mode)])


def channel_groups(ca_mode: str) -> tuple[tuple[int, ...], ...]:
    """For each label of ``ca_mode`` (background first), the model channels summed into it."""
    return ((0,), *(s.channels for s in structures(ca_mode)))


def label_names(ca_mode: str) -> tuple[str, ...]:
    """The name of each label value of ``ca_mode``: ``background``, then the abbreviations."""
    return ("background", *(s.abbreviation for s in structures(ca_mode)))


def _check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    return side


def bilateral_index(side: str, label: int | np.ndarray) -> int | np.ndarray:
    """Index of a single-side ``label`` in the bilateral image: left = label, right = label + 10.

    Background (0) stays 0 on both sides. ``label`` may be an int or an integer array (a one-side
    segmentation); the result has the same form.
    """
    _check_side(side)
    if isinstance(label, np.ndarray):
        if not np.issubdtype(label.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {label.dtype}")
        if side == "left":
            return label.copy()
        return np.where(label > 0, label + RIGHT_OFFSET, 0).astype(label.dtype, copy=False)
    label = int(label)
    if label < 0 or label >= RIGHT_OFFSET:
        raise ValueError(f"single-side label must be in [0, {RIGHT_OFFSET}), got {label}")
    if label == 0 or side == "left":
        return label
    return label + RIGHT_OFFSET


def side_of_index(index: int) -> tuple[str, int]:
    """Inverse of :func:`bilateral_index` for a non-background index: ``(side, label)``."""
    index = int(index)
    if 0 < index < RIGHT_OFFSET:
        return "left", index
    if RIGHT_OFFSET < index < 2 * RIGHT_OFFSET:
        return "right", index - RIGHT_OFFSET
    raise ValueError(f"{index} is not a bilateral subfield index")


#: The sides in the order of their indices in bilateral images (left, then right): the row order
#: of look-up and volumes tables.
SIDES_BY_INDEX: tuple[str, ...] = tuple(sorted(SIDES, key=lambda side: bilateral_index(side, 1)))
