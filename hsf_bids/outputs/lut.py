"""The look-up table (``dseg.tsv``) of the bilateral label images: the names and colours of the
structures of a ``ca_mode`` on each side (:mod:`hsf_bids.vocabulary` defines structures, sides
and indices).
"""

from __future__ import annotations

import io
from os import PathLike
from pathlib import Path

import pandas as pd

from hsf_bids.errors import EX_CANTCREAT, HsfBidsError
from hsf_bids.outputs.derivatives import read_output_text, write_tsv
from hsf_bids.vocabulary import SIDES_BY_INDEX, WHOLE_HIPPOCAMPUS, bilateral_index, structures

__all__ = ["LutConflictError", "lookup_table", "write_lut"]


class LutConflictError(HsfBidsError, RuntimeError):
    """An existing look-up table describes other labels than the one being written."""

    exit_code = EX_CANTCREAT


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
    WHOLE_HIPPOCAMPUS: "#d55e00",  # vermillion
}
# The right side is the same hue, darker, so sides differ without looking like other structures.
_RIGHT_SHADE = 0.72


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
    for side in SIDES_BY_INDEX:
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
    text = None if overwrite else read_output_text(path)
    if text is not None:
        try:
            existing = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False)
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
