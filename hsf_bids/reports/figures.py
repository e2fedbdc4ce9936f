"""QC figures of one segmented image, as indexed PNGs, from arrays in RAS+ voxel order.

Inputs are the head image, the bilateral segmentation and the uncertainty map, all on the same
RAS+ grid (voxel sizes ``zooms`` in mm), and the boxes of the localisation (RAS+ voxel ranges).
Nothing is recomputed: the figures only draw what the participant level wrote.

Display conventions: slices are resampled to square pixels in mm (linear for intensities, nearest
for labels), shown with superior (coronal, sagittal) or anterior (axial) at the top, and the
subject's left on the viewer's left (neurological convention); sagittal views have anterior on
the right. One fixed 256-colour palette serves every figure (see :func:`palette`), so each figure
is an 8-bit palette PNG: small, exact colours, no imaging library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hsf_bids.reports.png import data_uri, encode_indexed_png, png_size
from hsf_bids.vocabulary import RIGHT_OFFSET

__all__ = [
    "BOX_COLOURS",
    "HEAT_STOPS",
    "UNCERTAINTY_MAX",
    "Figure",
    "FigureError",
    "Palette",
    "coronal_slices",
    "head_figure",
    "hex_to_rgb",
    "mosaic",
    "palette",
    "side_figures",
    "side_mask",
]

# Palette layout: a grey ramp for anatomy, a heat ramp for uncertainty, fixed marks, then the
# look-up table's colours.
_GREY = 160
_HEAT0, _HEAT = 160, 64
_WHITE, _GAP, _BOX0, _LABEL0 = 224, 225, 226, 228
_MAX_LABELS = 256 - _LABEL0

BOX_COLOURS: dict[str, str] = {"right": "#ff3df5", "left": "#00e5ff"}
# Uncertainty colour scale (nats): the entropy of a uniform guess over the model's 6 classes.
UNCERTAINTY_MAX = math.log(6.0)
# Below this entropy a voxel is shown as anatomy: confident background stays readable.
_UNCERTAINTY_SHOWN = 0.05
# A perceptually ordered dark-to-bright ramp (inferno-like), also used for the HTML colour bar.
HEAT_STOPS: tuple[str, ...] = ("#1b0c41", "#6a176e", "#bb3754", "#f0701e", "#f5c73a", "#fcffa4")

_CROP_PX_PER_MM = 4.0
_CROP_MAX_TILE_PX = 240
_HEAD_MAX_PX = 240
_MAX_CORONAL = 12
_GAP_PX = 3


class FigureError(ValueError):
    """Arrays that cannot be drawn together (different grids, a box outside the image)."""


@dataclass(frozen=True)
class Figure:
    """One PNG figure with the words that go around it in the report."""

    key: str
    title: str
    caption: str
    png: bytes

    @property
    def width(self) -> int:
        return png_size(self.png)[0]

    @property
    def height(self) -> int:
        return png_size(self.png)[1]

    @property
    def uri(self) -> str:
        """The PNG as a ``data:`` URI, for an ``<img src>`` that reads nothing when opened."""
        return data_uri(self.png)


@dataclass(frozen=True)
class Palette:
    """The 256 RGB colours of every figure and the palette index of each bilateral label."""

    colours: np.ndarray  # (256, 3) uint8
    label_codes: np.ndarray  # (256,) uint8: label value -> palette index (0 for unknown labels)


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    """``"#e69f00"`` -> ``(230, 159, 0)``."""
    text = colour.strip().lstrip("#")
    if len(text) != 6:
        raise FigureError(f"not a #rrggbb colour: {colour!r}")
    try:
        return tuple(int(text[i : i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        raise FigureError(f"not a #rrggbb colour: {colour!r}") from None


def _ramp(stops: Sequence[str], n: int) -> np.ndarray:
    anchors = np.array([hex_to_rgb(s) for s in stops], dtype=float)
    x = np.linspace(0, len(stops) - 1, n)
    return np.stack([np.interp(x, np.arange(len(stops)), anchors[:, c]) for c in range(3)], 1)


def palette(lut: Mapping[int, str]) -> Palette:
    """The figure palette for a look-up table ``{bilateral index: "#rrggbb"}``."""
    if len(lut) > _MAX_LABELS:
        raise FigureError(f"at most {_MAX_LABELS} labels can be drawn, got {len(lut)}")
    colours = np.zeros((256, 3), dtype=float)
    colours[:_GREY] = np.linspace(0, 255, _GREY)[:, None]
    colours[_HEAT0 : _HEAT0 + _HEAT] = _ramp(HEAT_STOPS, _HEAT)
    colours[_WHITE] = 255
    colours[_GAP] = (17, 17, 17)
    colours[_BOX0] = hex_to_rgb(BOX_COLOURS["right"])
    colours[_BOX0 + 1] = hex_to_rgb(BOX_COLOURS["left"])
    codes = np.zeros(256, dtype=np.uint8)
    for i, (index, colour) in enumerate(sorted(lut.items())):
        if not 0 < int(index) < 256:
            raise FigureError(f"label index {index} outside 1..255")
        colours[_LABEL0 + i] = hex_to_rgb(colour)
        codes[int(index)] = _LABEL0 + i
    return Palette(np.round(colours).astype(np.uint8), codes)


# --------------------------------------------------------------------------------------------
# Slices


def _display_mm(zooms: Sequence[float], axis: int) -> tuple[float, float]:
    """Physical (row, column) pixel size of a slice along ``axis`` once displayed."""
    x, y, z = (float(v) for v in zooms)
    return {0: (z, y), 1: (z, x), 2: (y, x)}[axis]


def _slice(volume: np.ndarray, axis: int, index: int, region: Sequence[slice]) -> np.ndarray:
    """A 2D slice, limited to ``region`` along the other axes, in display order.

    Every view puts the slice's last remaining axis (superior, or anterior for axial) at the top.
    """
    sel = list(region)
    sel[axis] = int(index)
    return np.asarray(volume[tuple(sel)]).T[::-1]


def _resample(
    image: np.ndarray, mm: tuple[float, float], px_per_mm: float, order: int
) -> np.ndarray:
    factors = (mm[0] * px_per_mm, mm[1] * px_per_mm)
    if np.allclose(factors, 1.0):
        return image.copy()
    # grid_mode treats voxels as areas, so labels (order 0) and intensities (order 1) line up.
    return ndimage.zoom(image, factors, order=order, mode="nearest", grid_mode=True)


def _window(data: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """Robust intensity range over the non-zero voxels (all voxels when every one is zero)."""
    values = data[data != 0] if np.any(data) else data.ravel()
    lo, hi = np.percentile(values, [low, high]) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _grey(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    scaled = (image.astype(np.float32) - lo) / (hi - lo)
    return np.clip(np.round(scaled * (_GREY - 1)), 0, _GREY - 1).astype(np.uint8)


def _edges(labels: np.ndarray, pad: str = "edge") -> np.ndarray:
    """Labelled pixels with a 4-neighbour of another value: a one-pixel contour inside each
    region, so neighbouring subfields each keep their own colour. ``pad="constant"`` also
    outlines regions along the image border."""
    padded = np.pad(labels, 1, mode=pad)
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return (labels != 0) & differs


def _outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    edge = _edges(mask.astype(np.uint8), pad="constant")
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1) & mask
    return edge


# --------------------------------------------------------------------------------------------
# Composition


def mosaic(tiles: Sequence[np.ndarray], columns: int, gap: int = _GAP_PX) -> np.ndarray:
    """Tiles (2D palette-index arrays, any sizes) in rows of ``columns``, separated by ``gap``
    pixels of the background colour; each tile is centred in its cell."""
    if not tiles:
        raise FigureError("no tiles to arrange")
    columns = max(1, min(columns, len(tiles)))
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    out = np.full(
        (rows * cell_h + (rows - 1) * gap, columns * cell_w + (columns - 1) * gap),
        _GAP,
        dtype=np.uint8,
    )
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        top = r * (cell_h + gap) + (cell_h - tile.shape[0]) // 2
        left = c * (cell_w + gap) + (cell_w - tile.shape[1]) // 2
        out[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    return out


def side_mask(labels: np.ndarray, side: str) -> np.ndarray:
    """Voxels of ``side``'s structures in a bilateral segmentation (left < 10 < right)."""
    if side == "left":
        return (labels > 0) & (labels < RIGHT_OFFSET)
    if side == "right":
        return labels > RIGHT_OFFSET
    raise FigureError(f"side must be 'left' or 'right', not {side!r}")


def _spread(lo: int, hi: int, count: int) -> list[int]:
    """At most ``count`` evenly spaced integers from ``lo`` to ``hi`` (inclusive)."""
    if hi < lo:
        return []
    return sorted({int(round(v)) for v in np.linspace(lo, hi, min(count, hi - lo + 1))})


def coronal_slices(
    labels: np.ndarray, side: str, start: Sequence[int], stop: Sequence[int], count: int
) -> list[int]:
    """Coronal (axis 1) slice indices along one hippocampus: evenly over the slices where the
    segmentation of ``side`` has voxels inside the box, else over the whole box."""
    region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    present = np.flatnonzero(side_mask(labels[region], side).any(axis=(0, 2)))
    if present.size:
        return [int(start[1]) + i for i in _spread(int(present[0]), int(present[-1]), count)]
    return _spread(int(start[1]), int(stop[1]) - 1, count)


def _check_grid(anat: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray | None) -> None:
    if labels.shape != anat.shape or (uncertainty is not None and uncertainty.shape != anat.shape):
        raise FigureError(
            f"the segmentation {labels.shape} and the image {anat.shape} are not on one grid"
        )


@dataclass(frozen=True)
class _View:
    """What one tile shows: a slice along ``axis`` at ``index`` inside ``region``."""

    axis: int
    index: int
    region: tuple[slice, slice, slice]


def _tile(
    view: _View,
    anat: np.ndarray,
    labels: np.ndarray,
    zooms: Sequence[float],
    px_per_mm: float,
    window: tuple[float, float],
    pal: Palette,
    *,
    style: str,
    uncertainty: np.ndarray | None = None,
    boxes: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
) -> np.ndarray:
    mm = _display_mm(zooms, view.axis)
    background = _resample(_slice(anat, view.axis, view.index, view.region), mm, px_per_mm, 1)
    tile = _grey(background, window)
    lab = _resample(_slice(labels, view.axis, view.index, view.region), mm, px_per_mm, 0)
    lab = lab.astype(np.int64)
    codes = pal.label_codes[np.clip(lab, 0, 255)]
    if style == "contours":
        edge = _edges(lab)
        tile[edge] = codes[edge]
    elif style == "filled":
        filled = lab > 0
        tile[filled] = codes[filled]
    elif style == "uncertainty":
        if uncertainty is None:
            raise FigureError("an uncertainty tile needs the uncertainty map")
        unc = _resample(_slice(uncertainty, view.axis, view.index, view.region), mm, px_per_mm, 1)
        shown = unc >= _UNCERTAINTY_SHOWN
        level = np.clip(unc / UNCERTAINTY_MAX, 0, 1) * (_HEAT - 1)
        tile[shown] = (_HEAT0 + np.round(level[shown])).astype(np.uint8)
        edge = _edges((lab > 0).astype(np.uint8))
        tile[edge] = _WHITE
    else:
        raise FigureError(f"unknown tile style {style!r}")
    other = [a for a in range(3) if a != view.axis]
    for side, (start, stop) in (boxes or {}).items():
        # The box's projection on the view: drawn whether or not this slice crosses it.
        rect = np.zeros([anat.shape[a] for a in other], dtype=np.uint8)
        rect[start[other[0]] : stop[other[0]], start[other[1]] : stop[other[1]]] = 1
        rect = rect[view.region[other[0]], view.region[other[1]]].T[::-1]
        rect = _resample(rect, mm, px_per_mm, 0).astype(bool)
        tile[_outline(rect, width=2)] = _BOX0 + (0 if side == "right" else 1)
    return tile


def _encode(indices: np.ndarray, pal: Palette) -> bytes:
    return encode_indexed_png(indices, pal.colours)


def _centre(start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    return (np.asarray(start, dtype=float) + np.asarray(stop, dtype=float) - 1) / 2


def head_figure(
    anat: np.ndarray,
    labels: np.ndarray,
    zooms: Sequence[float],
    boxes: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    pal: Palette,
    *,
    window: tuple[float, float] | None = None,
) -> Figure:
    """The whole head with both boxes: axial and coronal through the boxes' mean centre, and a
    sagittal view through each box. Boxes are drawn as their projection on each view (right
    magenta, left cyan); the segmentation is filled with the look-up table's colours."""
    _check_grid(anat, labels, None)
    if not boxes:
        raise FigureError("no boxes to draw")
    extent_mm = np.asarray(anat.shape[:3]) * np.asarray(zooms, dtype=float)
    px_per_mm = _HEAD_MAX_PX / float(extent_mm.max())
    window = window or _window(anat[::2, ::2, ::2])
    centres = {side: _centre(*box) for side, box in boxes.items()}
    mean = np.mean(list(centres.values()), axis=0)
    whole = (slice(None),) * 3
    views = [
        (_View(2, int(round(mean[2])), whole), boxes),
        (_View(1, int(round(mean[1])), whole), boxes),
    ]
    for side in ("right", "left"):
        if side in boxes:
            views.append((_View(0, int(round(centres[side][0])), whole), {side: boxes[side]}))
    tiles = [
        _tile(v, anat, labels, zooms, px_per_mm, window, pal, style="filled", boxes=b)
        for v, b in views
    ]
    names = ["axial", "coronal"] + [f"sagittal through the {s} box" for s in boxes]
    caption = (
        "Localisation: the two boxes (right magenta, left cyan) that the hippocampi were cropped "
        "to, projected on " + ", ".join(names) + ". Each box should enclose its "
        "hippocampus (filled with the subfield colours) with a margin; a box elsewhere means a "
        "failed localisation."
    )
    return Figure("head", "Localisation boxes", caption, _encode(mosaic(tiles, len(tiles)), pal))


def side_figures(
    anat: np.ndarray,
    labels: np.ndarray,
    uncertainty: np.ndarray | None,
    zooms: Sequence[float],
    side: str,
    box: tuple[Sequence[int], Sequence[int]],
    pal: Palette,
    *,
    n_coronal: int = _MAX_CORONAL,
) -> list[Figure]:
    """The hippocampus of one side inside its box: a coronal mosaic of contours along it,
    sagittal and axial views through it, and the uncertainty map on the coronal slices."""
    _check_grid(anat, labels, uncertainty)
    start, stop = (tuple(int(v) for v in b) for b in box)
    if any(a < 0 or b > n or a >= b for a, b, n in zip(start, stop, anat.shape, strict=True)):
        raise FigureError(f"{side} box {list(start)}..{list(stop)} is outside {anat.shape}")
    region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    box_mm = (np.asarray(stop) - np.asarray(start)) * np.asarray(zooms, dtype=float)
    px_per_mm = min(_CROP_PX_PER_MM, _CROP_MAX_TILE_PX / float(box_mm.max()))
    window = _window(anat[region], 0.5, 99.9)
    ys = coronal_slices(labels, side, start, stop, n_coronal)
    mask = side_mask(labels[region], side)
    # Through the bulk of the segmentation (quartiles of its voxels), else the box centre.
    xs, zs = (
        sorted({a + int(round(q)) for q in np.percentile(np.nonzero(mask)[axis], (25, 50, 75))})
        if mask.any() else [int(round((a + b - 1) / 2))]
        for axis, a, b in ((0, start[0], stop[0]), (2, start[2], stop[2]))
    )  # fmt: skip
    common = dict(zooms=zooms, px_per_mm=px_per_mm, window=window, pal=pal)
    coronal = [_tile(_View(1, y, region), anat, labels, style="contours", **common) for y in ys]
    columns = 6
    figures = [
        Figure(
            f"coronal-{side}",
            f"{side.capitalize()} hippocampus, coronal",
            f"Coronal slices (posterior to anterior, voxel y = {ys[0]}..{ys[-1]}, "
            f"{len(ys)} slices) across the {side} hippocampus, subfield contours over the image, "
            "left of the subject on the left of each slice.",
            _encode(mosaic(coronal, columns), pal),
        )
    ]
    other = [_tile(_View(0, x, region), anat, labels, style="contours", **common) for x in xs]
    other += [_tile(_View(2, z, region), anat, labels, style="contours", **common) for z in zs]
    figures.append(
        Figure(
            f"sagittal-axial-{side}",
            f"{side.capitalize()} hippocampus, sagittal and axial",
            f"Sagittal (voxel x = {', '.join(map(str, xs))}; anterior on the right) and axial "
            f"(voxel z = {', '.join(map(str, zs))}; anterior at the top) slices through the "
            f"{side} hippocampus.",
            _encode(mosaic(other, len(other)), pal),
        )
    )
    if uncertainty is not None:
        tiles = [
            _tile(_View(1, y, region), anat, labels, style="uncertainty",
                  uncertainty=uncertainty, **common)
            for y in ys[::2]
        ]  # fmt: skip
        figures.append(
            Figure(
                f"uncertainty-{side}",
                f"{side.capitalize()} hippocampus, uncertainty",
                "Voxel-wise entropy of the mean class probability on every other coronal slice "
                "above "
                f"(0 to ln 6 = {UNCERTAINTY_MAX:.2f} nats; below {_UNCERTAINTY_SHOWN} the "
                "image shows through); white: outline of the segmentation. Bright bands along "
                "subfield borders are expected; bright areas inside a subfield are not.",
                _encode(mosaic(tiles, columns), pal),
            )
        )
    return figures
