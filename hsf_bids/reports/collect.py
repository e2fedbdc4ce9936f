"""Read what the participant level wrote for one subject: segmentations, sidecars, volumes
tables, the look-up table, crash files; find the input images the outputs were made from.

Nothing is recomputed; QC flags come from the sidecars' ``Provenance.Localisation`` (its
``checks``, ``localisation_ok`` and ``warnings``) and ``Provenance.QC`` (NaN input voxels),
plus two consistency checks on the written
files (each side's segmentation inside its recorded box, a non-empty hippocampus on each side).
"""

from __future__ import annotations

import errno
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd

from hsf_bids.localisation.qc import QcCheck
from hsf_bids.logs import crash_files, crash_reason, latest_run_dir
from hsf_bids.outputs.derivatives import (
    Entities,
    UnsafeOutputError,
    lut_path,
    read_output_text,
    sidecar_path,
)
from hsf_bids.outputs.read import segmentations, subject_volumes_tables, uncertainty_of
from hsf_bids.outputs.volumes import MIN_PLAUSIBLE_HC_MM3

__all__ = [
    "CrashReport",
    "Flag",
    "ImageOutputs",
    "OutputsError",
    "SubjectOutputs",
    "collect_subject",
    "outside_range",
    "read_crash",
    "read_lut",
    "resolve_source",
]

# A whole hippocampus (all subfields of one side) smaller than this is worth a look: adult ones
# measure a few thousand mm3.
# Largest crash text kept in a report (the end of a traceback is what matters).
_CRASH_CHARS = 20_000


class OutputsError(ValueError):
    """An output file of the participant level that cannot be read; the message names it."""


@dataclass(frozen=True)
class Flag:
    """One QC finding: ``level`` is ``"error"`` (do not trust without a look), ``"warning"``
    or ``"info"``; ``text`` says what and where."""

    level: str
    text: str


@dataclass
class ImageOutputs:
    """The outputs of one segmented image (its dseg, uncertainty map, sidecar and volume rows)."""

    name: str  # source image name without extension, e.g. sub-04_ses-01_T1w
    entities: Entities
    dseg: Path
    uncertainty: Path | None
    sidecar: dict[str, Any]
    sources: list[str]
    source_paths: list[Path | None]
    volumes: list[dict[str, str]] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.sidecar.get("Provenance") or {})

    @property
    def localisation(self) -> dict[str, Any]:
        return dict(self.provenance.get("Localisation") or {})

    @property
    def localisation_ok(self) -> bool:
        return bool(self.localisation.get("localisation_ok", False))

    @property
    def checks(self) -> list[QcCheck]:
        """The localisation's QC checks, as judged when the image was localised."""
        return [QcCheck.from_dict(c) for c in self.localisation.get("checks") or []]

    @property
    def session(self) -> str | None:
        return self.entities.ses

    @property
    def contrast(self) -> str:
        return self.entities.contrast or "?"


@dataclass(frozen=True)
class CrashReport:
    """A Nipype crash file: the failed node, the final error line and the (truncated) text."""

    path: Path
    node: str
    reason: str
    text: str


@dataclass
class SubjectOutputs:
    """Everything the report of one subject shows."""

    subject: str  # label without sub-
    output_dir: Path
    images: list[ImageOutputs]
    volumes_tables: dict[str | None, Path]  # session (None without sessions) -> TSV
    crashes: list[CrashReport]
    run_id: str | None
    missing: list[str] = field(default_factory=list)  # selected images without outputs

    @property
    def sessions(self) -> list[str | None]:
        found = {im.session for im in self.images} | set(self.volumes_tables)
        return sorted(found, key=lambda s: (s is not None, s or ""))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = read_output_text(path)
        if text is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
        data = json.loads(text)
    except (OSError, ValueError, UnsafeOutputError) as exc:
        raise OutputsError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise OutputsError(f"{path}: expected a JSON object")
    return data


def read_lut(output_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The top-level look-up table (``index``, ``name``, ``abbreviation``, ``color``)."""
    path = lut_path(output_dir)
    try:
        text = read_output_text(path)
        if text is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
        lut = pd.read_csv(io.StringIO(text), sep="\t", dtype={"index": int}, keep_default_na=False)
    except (OSError, ValueError, UnsafeOutputError) as exc:
        raise OutputsError(f"{path}: cannot read the look-up table ({exc})") from exc
    missing = {"index", "name", "abbreviation", "color"} - set(lut.columns)
    if missing:
        raise OutputsError(f"{path}: look-up table without column(s) {sorted(missing)}")
    return lut


def _raw_root(output_dir: Path, bids_dir: Path | None) -> Path | None:
    if bids_dir is not None:
        return Path(bids_dir)
    description = output_dir / "dataset_description.json"
    if not description.is_file():
        return None
    link = (_read_json(description).get("DatasetLinks") or {}).get("raw")
    if not isinstance(link, str):
        return None
    parsed = urlparse(link)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(link) if not parsed.scheme else None


def resolve_source(uri: str, output_dir: Path, bids_dir: Path | None = None) -> Path | None:
    """The file behind a ``bids:raw:`` URI of a sidecar's ``Sources``, if it exists.

    The raw dataset is ``bids_dir`` when given, else the ``DatasetLinks.raw`` of the output's
    ``dataset_description.json``.
    """
    prefix = "bids:raw:"
    if not uri.startswith(prefix):
        return None
    root = _raw_root(output_dir, bids_dir)
    if root is None:
        return None
    path = root / uri[len(prefix) :]
    return path if path.is_file() else None


def read_crash(path: Path) -> CrashReport:
    """Parse a Nipype text crash file (node name, last line of the traceback)."""
    text = path.read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    node = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Node:")), "")
    reason = crash_reason(path)
    if len(text) > _CRASH_CHARS:
        text = "[... start of the file cut ...]\n" + text[-_CRASH_CHARS:]
    return CrashReport(path=path, node=node or path.stem, reason=reason, text=text)


def _log_run(subject_dir: Path, run_id: str | None) -> Path | None:
    if run_id is not None:
        return subject_dir / "log" / run_id
    return latest_run_dir(subject_dir)


def _volume_rows(path: Path) -> list[dict[str, str]]:
    try:
        # As text: the page shows exactly what the table holds.
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise OutputsError(f"{path}: cannot read the volumes table ({exc})") from exc
    if "source" not in table.columns:
        raise OutputsError(f"{path}: volumes table without a 'source' column")
    return table.to_dict(orient="records")


def _localisation_flags(image: ImageOutputs) -> list[Flag]:
    loc = image.localisation
    if not loc:
        return [Flag("error", f"{image.dseg.name}: the sidecar records no localisation")]
    failed = [check.meaning for check in image.checks if not check.passed]
    flags = [Flag("error", f"doubtful localisation: {meaning}") for meaning in failed]
    if not image.localisation_ok and not flags:
        flags.append(Flag("error", "doubtful localisation (localisation_ok is false)"))
    flags += [Flag("warning", w) for w in loc.get("warnings", []) if w not in failed]
    return flags


def _volume_flags(rows: list[dict[str, str]]) -> list[Flag]:
    flags = []
    for row in rows:
        if row.get("structure") != "HC":
            continue
        try:
            volume = float(row.get("volume_mm3", "nan"))
        except ValueError:
            continue
        if volume == 0:
            flags.append(Flag("error", f"no {row.get('side')} hippocampus was segmented"))
        elif volume < MIN_PLAUSIBLE_HC_MM3:
            flags.append(Flag(
                "warning",
                f"the {row.get('side')} hippocampus measures {volume:g} mm3, below "
                f"{MIN_PLAUSIBLE_HC_MM3:g} mm3: check the segmentation",
            ))  # fmt: skip
    return flags


def _number(row: dict[str, str], column: str) -> float | None:
    try:
        value = float(row.get(column, "n/a"))
    except ValueError:
        return None
    return value if value == value else None


def outside_range(rows: list[dict[str, str]]) -> dict[tuple[str, str], Flag]:
    """The rows whose volume (the vote's) lies outside the 5-95 % range of the ensemble's
    predictions, by ``(side, structure)``, each with a note that says why that can happen."""
    found = {}
    for row in rows:
        volume, low, high = (_number(row, c) for c in ("volume_mm3", "volume_p05_mm3",
                                                        "volume_p95_mm3"))  # fmt: skip
        if volume is None or low is None or high is None or low <= volume <= high:
            continue
        side, structure = row.get("side", "?"), row.get("structure", "?")
        where = (
            f"{side} {structure}: the vote's volume ({volume:g} mm3) is "
            f"{'below' if volume < low else 'above'} the ensemble's 5-95 % range "
            f"({low:g}-{high:g} mm3 over {row.get('n_predictions', '?')} predictions)"
        )
        if volume < low:
            why = (
                "the vote is taken voxel by voxel, not over volumes: where the predictions "
                "place this structure in different voxels, each such voxel goes to the label "
                "most of them give it, so the structure keeps only the voxels most predictions "
                "agree on and ends up smaller than most single predictions"
            )
        else:
            why = (
                "the vote is taken voxel by voxel, not over volumes: where the predictions "
                "split a voxel among several labels, this structure can win it without a "
                "majority (ties go to the lower label), gaining voxels that most single "
                "predictions give to other labels"
            )
        found[(side, structure)] = Flag("info", f"{where}; {why}.")
    return found


def collect_subject(
    output_dir: str | os.PathLike[str],
    subject: str,
    *,
    bids_dir: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    expected: list[str] | None = None,
) -> SubjectOutputs:
    """Gather the outputs of ``subject`` (label with or without ``sub-``) in ``output_dir``.

    ``bids_dir`` locates the input images (default: the raw dataset linked from the output's
    ``dataset_description.json``); ``run_id`` picks the log folder whose crash files are shown
    (default: the latest); ``expected`` names the source images (``sub-01_T1w``) that were
    selected, so those without outputs are listed as missing. Raises :class:`OutputsError` when
    an output file cannot be read, and when the subject has neither outputs nor crash files.
    """
    output_dir = Path(output_dir)
    subject = subject.removeprefix("sub-")
    subject_dir = output_dir / f"sub-{subject}"
    bids = Path(bids_dir) if bids_dir is not None else None

    images: list[ImageOutputs] = []
    for dseg in segmentations(output_dir, subject):
        sidecar = _read_json(sidecar_path(dseg))
        sources = [str(s) for s in sidecar.get("Sources") or []]
        if not sources:
            raise OutputsError(f"{sidecar_path(dseg)}: no Sources")
        name = sources[0].rsplit("/", 1)[-1].split(".", 1)[0]
        try:
            entities = Entities.from_filename(name)
        except ValueError as exc:
            raise OutputsError(f"{sidecar_path(dseg)}: {exc}") from exc
        unc = uncertainty_of(dseg)
        images.append(
            ImageOutputs(
                name=name, entities=entities, dseg=dseg,
                uncertainty=unc if unc.is_file() else None, sidecar=sidecar, sources=sources,
                source_paths=[resolve_source(s, output_dir, bids) for s in sources],
            )
        )  # fmt: skip

    tables = subject_volumes_tables(output_dir, subject)
    rows_by_source: dict[str, list[dict[str, str]]] = {}
    for path in tables.values():
        for row in _volume_rows(path):
            rows_by_source.setdefault(row["source"], []).append(row)
    for image in images:
        image.volumes = rows_by_source.get(image.name, [])
        image.flags = _localisation_flags(image) + _volume_flags(image.volumes)
        nonfinite = (image.provenance.get("QC") or {}).get("nonfinite_voxels")
        if nonfinite:
            image.flags.append(Flag(
                "warning",
                f"{nonfinite} voxels of the input were NaN or infinite and were segmented as "
                "background: the volumes may be wrong",
            ))  # fmt: skip
        image.flags += list(outside_range(image.volumes).values())
        if image.uncertainty is None:
            image.flags.append(Flag("warning", "no uncertainty map next to the segmentation"))
        if image.source_paths[0] is None:
            image.flags.append(
                Flag("warning", f"input image {image.sources[0]} not found: figures omitted")
            )

    run = _log_run(subject_dir, run_id)
    crashes = [read_crash(p) for p in crash_files(run)] if run else []
    if not images and not crashes and not tables:
        raise OutputsError(f"no outputs of sub-{subject} in {output_dir}")
    found = {image.name for image in images}
    missing = [name for name in (expected or []) if name not in found]
    return SubjectOutputs(
        subject=subject, output_dir=output_dir, images=images, volumes_tables=tables,
        crashes=crashes, run_id=run.name if run else None, missing=missing,
    )  # fmt: skip
