"""Render the per-subject HTML report and the run's ``CITATION.md`` with jinja2.

``<output_dir>/sub-XX.html`` is self-contained: styles are inlined, figures are ``data:`` URIs,
and a Content-Security-Policy forbids any other load, so opening it never touches the network
(also on an air-gapped cluster) and the single file can be copied anywhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import nibabel as nib
import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from nibabel.orientations import apply_orientation

from hsf_bids import __version__
from hsf_bids.image import InvalidImageError, load_anat, ras_ornt, to_ras
from hsf_bids.localisation.qc import QcCheck
from hsf_bids.outputs.derivatives import write_text
from hsf_bids.reports.boilerplate import Methods, library_versions, methods
from hsf_bids.reports.collect import (
    Flag,
    ImageOutputs,
    OutputsError,
    SubjectOutputs,
    collect_subject,
    outside_range,
    read_lut,
)
from hsf_bids.reports.figures import (
    BOX_COLOURS,
    HEAT_STOPS,
    UNCERTAINTY_MAX,
    Figure,
    FigureError,
    head_figure,
    palette,
    side_figures,
    side_mask,
)
from hsf_bids.vocabulary import SIDES

__all__ = [
    "CITATION_NAME",
    "ReportError",
    "render_subject",
    "report_path",
    "write_citation",
    "write_reports",
    "write_subject_report",
]

CITATION_NAME = "CITATION.md"


class ReportError(RuntimeError):
    """A report that could not be written; the message names the subject and the reason."""


def report_path(output_dir: str | os.PathLike[str], subject: str) -> Path:
    """``<output_dir>/sub-<label>.html``."""
    return Path(output_dir) / f"sub-{subject.removeprefix('sub-')}.html"


def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("hsf_bids", "data/reports"),
        autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _css() -> str:
    return (resources.files("hsf_bids") / "data" / "reports" / "report.css").read_text("utf-8")


# --------------------------------------------------------------------------------------------
# Per-image content


@dataclass
class _QcRow:
    name: str
    value: str
    expected: str
    ok: bool | None  # None: informative only


@dataclass
class _ImageView:
    image: ImageOutputs
    figures: list[Figure] = field(default_factory=list)
    qc_rows: list[_QcRow] = field(default_factory=list)
    volume_rows: list[dict[str, str]] = field(default_factory=list)
    # (side, structure) whose vote volume is outside the ensemble's 5-95 % range
    outside_range: set[tuple[str, str]] = field(default_factory=set)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        levels = {f.level for f in self.image.flags}
        return "error" if "error" in levels else "warning" if "warning" in levels else "ok"


def _qc_rows(loc: Mapping[str, Any]) -> list[_QcRow]:
    """The localisation's checks as the sidecar recorded them (nothing is judged again), then
    the registration schedule that produced it."""
    rows = [
        _QcRow(check.title, check.shown, check.limit, check.passed)
        for check in (QcCheck.from_dict(c) for c in loc.get("checks") or [])
    ]
    retried = (loc.get("qc") or {}).get("retried")
    if isinstance(retried, int | float):
        rows.append(_QcRow("registration retried on the finer schedule",
                           "yes" if retried else "no", "", None))  # fmt: skip
    schedule = loc.get("schedule") or {}
    if schedule.get("levels_mm"):
        levels = "/".join(f"{level:g}" for level in schedule["levels_mm"])
        kept = f"{schedule.get('name', '?')} ({levels} mm levels)"
        rows.append(_QcRow("registration schedule kept", kept, "", None))
    return rows


def _ras(path: Path, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=dtype)
    return apply_orientation(data, ras_ornt(img.affine)), np.asarray(img.affine)


def _boxes(loc: Mapping[str, Any]) -> dict[str, tuple[list[int], list[int]]]:
    boxes = {}
    for side, box in (loc.get("boxes") or {}).items():
        try:
            boxes[side] = ([int(v) for v in box["start"]], [int(v) for v in box["stop"]])
        except (KeyError, TypeError, ValueError):
            continue
    return boxes


def _image_view(image: ImageOutputs, lut: Mapping[int, str]) -> _ImageView:
    started = time.perf_counter()
    view = _ImageView(image=image, qc_rows=_qc_rows(image.localisation))
    view.volume_rows = image.volumes
    view.outside_range = set(outside_range(image.volumes))
    source = image.source_paths[0]
    if source is None:
        return view
    try:
        ras, _ = to_ras(load_anat(source))
        anat = np.asarray(ras.dataobj, dtype=np.float32)
        labels, affine = _ras(image.dseg, np.int16)
        unc = _ras(image.uncertainty, np.float32)[0] if image.uncertainty else None
    except (InvalidImageError, OSError, ValueError) as exc:
        image.flags.append(Flag("warning", f"figures omitted: {exc}"))
        return view
    if labels.shape != anat.shape or not np.allclose(affine, nib.load(source).affine, atol=1e-4):
        image.flags.append(
            Flag("error", f"{image.dseg.name} is not on the grid of its input {source.name}")
        )
        return view
    zooms = tuple(float(z) for z in ras.header.get_zooms()[:3])
    boxes = _boxes(image.localisation)
    for side, (start, stop) in boxes.items():
        inside = np.zeros(labels.shape, dtype=bool)
        inside[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = True
        mask = side_mask(labels, side)
        outside = int(np.count_nonzero(mask & ~inside))
        if outside:
            image.flags.append(Flag(
                "error",
                f"{outside} of {int(mask.sum())} voxels of the {side} segmentation lie outside "
                f"the recorded {side} box: the segmentation and its sidecar disagree",
            ))  # fmt: skip
    pal = palette(lut)
    try:
        if boxes:
            view.figures.append(head_figure(anat, labels, zooms, boxes, pal))
        for side in SIDES:
            if side in boxes:
                view.figures += side_figures(anat, labels, unc, zooms, side, boxes[side], pal)
    except FigureError as exc:
        image.flags.append(Flag("warning", f"figures incomplete: {exc}"))
    view.seconds = time.perf_counter() - started
    return view


# --------------------------------------------------------------------------------------------
# Subject report


def _methods_for(images: Sequence[ImageOutputs], versions: Mapping[str, str]) -> Methods | None:
    if not images:
        return None
    contrasts = sorted({c for im in images for c in _contrasts(im)})
    multi = any(len(im.sources) > 1 for im in images)
    return methods(images[0].provenance, contrasts=contrasts, multispectral=multi,
                   versions=versions)  # fmt: skip


def _contrasts(image: ImageOutputs) -> list[str]:
    return [s.rsplit("_", 1)[-1].split(".", 1)[0] for s in image.sources]


def _status(outputs: SubjectOutputs, views: Sequence[_ImageView]) -> str:
    if outputs.crashes or outputs.missing or not views:
        return "failed"
    statuses = {v.status for v in views}
    return "error" if "error" in statuses else "warning" if "warning" in statuses else "ok"


def render_subject(outputs: SubjectOutputs) -> str:
    """The HTML text of one subject's report."""
    lut_table = read_lut(outputs.output_dir)
    lut = {int(i): str(c) for i, c in zip(lut_table["index"], lut_table["color"], strict=True)}
    views = [_image_view(image, lut) for image in outputs.images]
    versions = library_versions()
    sessions = []
    for session in outputs.sessions:
        sessions.append({
            "label": session,
            "views": [v for v in views if v.image.session == session],
            "table": outputs.volumes_tables.get(session),
        })  # fmt: skip
    recorded = {str((v.image.provenance.get("Software") or {}).get("Version")) for v in views}
    context = {
        "subject": outputs.subject,
        "status": _status(outputs, views),
        "sessions": sessions,
        "views": views,
        "outputs": outputs,
        "lut": lut_table.to_dict(orient="records"),
        "box_colours": BOX_COLOURS,
        "heat_gradient": ", ".join(HEAT_STOPS),
        "uncertainty_max": f"{UNCERTAINTY_MAX:.2f}",
        "methods": _methods_for([v.image for v in views], versions),
        "versions": {"hsf_bids": __version__, **versions},
        "version_mismatch": sorted(recorded - {__version__, "None"}),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "css": _css(),
        "rel": lambda p: os.path.relpath(p, outputs.output_dir),
    }
    return _environment().get_template("subject.html.j2").render(**context)


def write_subject_report(
    output_dir: str | os.PathLike[str],
    subject: str,
    *,
    bids_dir: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    expected: Sequence[str] | None = None,
) -> Path:
    """Write ``<output_dir>/sub-<subject>.html`` from the subject's outputs; returns its path.

    See :func:`hsf_bids.reports.collect.collect_subject` for ``bids_dir``, ``run_id`` and
    ``expected``. Raises :class:`ReportError` naming the subject when its outputs cannot be read.
    """
    try:
        outputs = collect_subject(
            output_dir, subject, bids_dir=bids_dir, run_id=run_id,
            expected=list(expected) if expected else None,
        )  # fmt: skip
        html = render_subject(outputs)
    except (OutputsError, jinja2.TemplateError) as exc:
        # A template error means a sidecar lacks what the report shows (e.g. written by another
        # version): that subject has no report, the run goes on.
        raise ReportError(f"sub-{subject.removeprefix('sub-')}: no report: {exc}") from exc
    return write_text(html, report_path(output_dir, subject))


def write_citation(
    output_dir: str | os.PathLike[str], provenance: Mapping[str, Any], **kwargs: Any
) -> Path:
    """Write the methods paragraph and references as ``<output_dir>/CITATION.md``.

    ``provenance`` is a sidecar's ``Provenance`` block; ``kwargs`` go to
    :func:`hsf_bids.reports.boilerplate.methods`.
    """
    text = (
        _environment()
        .get_template("citation.md.j2")
        .render(methods=methods(provenance, **kwargs), version=__version__)
    )
    return write_text(text, Path(output_dir) / CITATION_NAME)


def write_reports(
    output_dir: str | os.PathLike[str],
    subjects: Iterable[str],
    *,
    bids_dir: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    expected: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Write the report of every subject, and ``CITATION.md`` from the first segmented image.

    ``expected`` maps a subject label to its selected source names. Returns the written reports
    and the errors (subject -> message) of those that could not be written; one subject's
    failure does not stop the others.
    """
    written: dict[str, Path] = {}
    errors: dict[str, str] = {}
    images: list[ImageOutputs] = []
    for subject in subjects:
        label = subject.removeprefix("sub-")
        try:
            written[label] = write_subject_report(
                output_dir, label, bids_dir=bids_dir, run_id=run_id,
                expected=(expected or {}).get(label),
            )  # fmt: skip
            images += collect_subject(output_dir, label, bids_dir=bids_dir).images
        except (ReportError, OutputsError) as exc:
            errors[label] = str(exc)
    if images:
        write_citation(
            output_dir, images[0].provenance,
            contrasts=sorted({c for image in images for c in _contrasts(image)}),
            multispectral=any(len(image.sources) > 1 for image in images),
        )  # fmt: skip
    return written, errors
