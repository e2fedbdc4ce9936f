"""Hippocampal subfield labels: the structures of a ``ca_mode``, bilateral indices, colours.

The models output channels ``0 background, 1 DG, 2 CA1, 3 CA2, 4 CA3, 5 SUB``; ``ca_mode``
merges CA channels before the vote. Outputs hold both sides in one image: left keeps the model
label, right adds :data:`RIGHT_OFFSET` (:func:`bilateral_index` is the only place of that rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from hsf_bids.errors import EX_CANTCREAT, HsfBidsError
from hsf_bids.outputs.derivatives import write_tsv

__all__ = [
    "CA_MODES",
    "RIGHT_OFFSET",
    "SIDES",
    "CaModeError",
    "LutConflictError",
    "Structure",
    "bilateral_index",
    "lookup_table",
    "side_of_index",
    "structures",
    "write_lut",
]

SIDES: tuple[str, str] = ("left", "right")
RIGHT_OFFSET = 10
CA_MODES: tuple[str, ...] = ("1/2/3", "1/23", "123", "")

# Model output channels (the HSF contract), used by ca_mode merges.
_DG, _CA1, _CA2, _CA3, _SUB = 1, 2, 3, 4, 5


class CaModeError(ValueError):
    """A ``ca_mode`` that is not one of :data:`CA_MODES`."""


class LutConflictError(HsfBidsError, RuntimeError):
    """An existing look-up table describes other labels than the one being written."""

    exit_code = EX_CANTCREAT


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
    "": (Structure(1, "HC", "hippocampus", (_DG, _CA1, _CA2, _CA3, _SUB)),),
}

# Okabe & Ito's colour-blind-safe palette; neighbouring subfields get far-apart hues. Merged
# structures keep the colour of their largest member so figures stay comparable across ca_modes.
_LEFT_COLOURS: dict[str, str] = {
    "DG": "#0072b2",  # blue
    "CA1": "#e69f00",  # orange
    "CA2": "#009e73",  # bluish green
    "CA3": "#cc79a7",  # reddish purple
    "CA23": "#cc79a7",
    "CA": "#e69f00",
    "SUB": "#f0e442",  # yellow
    "HC": "#d55e00",  # vermillion
}
# The right side is the same hue, darker, so sides differ without looking like other structures.
_RIGHT_SHADE = 0.72


def _check_ca_mode(ca_mode: str) -> str:
    if not isinstance(ca_mode, str) or ca_mode not in _STRUCTURES:
        raise CaModeError(
            f"unknown ca_mode {ca_mode!r}: expected one of " + ", ".join(repr(m) for m in CA_MODES)
        )
    return ca_mode


def structures(ca_mode: str) -> list[Structure]:
    """The structures (without background) that ``ca_mode`` produces, in label order."""
    return list(_STRUCTURES[_check_ca_mode(ca_mode)])


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


def _colour(abbreviation: str, side: str) -> str:
    base = _LEFT_COLOURS[abbreviation]
    if side == "left":
        return base
    rgb = [int(base[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c * _RIGHT_SHADE):02x}" for c in rgb)


def lookup_table(ca_mode: str) -> pd.DataFrame:
    """The bilateral ``dseg.tsv`` look-up table of ``ca_mode``.

    Columns ``index`` (int), ``name`` (e.g. ``left dentate gyrus``), ``abbreviation`` (``L-DG``),
    ``color`` (``#rrggbb``); one row per side and structure, left rows first, background omitted
    (0 is background by BIDS convention).
    """
    rows = []
    for side in SIDES:
        for s in structures(ca_mode):
            rows.append(
                {
                    "index": bilateral_index(side, s.label),
                    "name": f"{side} {s.name}",
                    "abbreviation": f"{side[0].upper()}-{s.abbreviation}",
                    "color": _colour(s.abbreviation, side),
                }
            )
    return pd.DataFrame(rows, columns=["index", "name", "abbreviation", "color"])


def write_lut(path: str | PathLike[str], ca_mode: str, *, overwrite: bool = False) -> Path:
    """Write :func:`lookup_table` of ``ca_mode`` to ``path`` (atomically) and return the path.

    Concurrent writers of the same ``ca_mode`` write identical bytes, so the shared top-level table
    stays valid. An existing table with other content (another ``ca_mode``) would silently relabel
    earlier outputs, so it raises :class:`LutConflictError` unless ``overwrite`` is true.
    """
    path = Path(path)
    table = lookup_table(ca_mode)
    if not overwrite and path.exists():
        try:
            existing = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise LutConflictError(
                f"{path}: cannot read the existing look-up table ({exc})"
            ) from exc
        same = list(existing.columns) == list(table.columns) and (
            existing.values.tolist() == table.astype(str).values.tolist()
        )
        if not same:
            raise LutConflictError(
                f"{path} already describes other labels than ca_mode {ca_mode!r}; use another "
                "output folder (outputs of different ca_modes cannot share one look-up table)"
            )
    write_tsv(table, path)
    return path
