"""Find what the participant level wrote: the one reader of the names :mod:`.derivatives` gives.

Readers (the subject reports, the group tables and report) ask here instead of globbing file
names of their own. In: an output folder and, optionally, subject labels or BIDS entities; out:
paths (nothing is parsed here except a sidecar's JSON in :func:`read_sidecar`).
Layout: ``sub-<label>/[ses-<label>/]anat/<name>`` (:func:`.derivatives.derivative_path`).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from hsf_bids.outputs.derivatives import (
    DATATYPE,
    DESC,
    UNCERTAINTY_SUFFIX,
    Entities,
    dseg_path,
    read_output_text,
    sidecar_path,
)

__all__ = [
    "dseg_sidecars",
    "find_subjects",
    "has_volumes",
    "read_sidecar",
    "segmentations",
    "session_of",
    "sidecar_of_source",
    "source_name",
    "subject_volumes_tables",
    "uncertainty_of",
    "volumes_tables",
]

_DSEG = f"*_desc-{DESC}_dseg.nii.gz"
_DSEG_JSON = f"*_desc-{DESC}_dseg.json"
_VOLUMES = f"*_desc-{DESC}_volumes.tsv"
# A subject's data folders: without sessions, then one per session.
_FOLDERS = (DATATYPE, f"ses-*/{DATATYPE}")


def _subject_label(subject: str) -> str:
    return f"sub-{subject.removeprefix('sub-')}"


def _subject_dirs(output_dir: str | PathLike[str], subjects: Sequence[str] = ()) -> list[Path]:
    root = Path(output_dir)
    if subjects:
        return [root / _subject_label(s) for s in subjects]
    return sorted(p for p in root.glob("sub-*") if p.is_dir())


def _find(subject_dir: Path, pattern: str) -> list[Path]:
    return sorted(p for folder in _FOLDERS for p in subject_dir.glob(f"{folder}/{pattern}"))


def find_subjects(output_dir: str | PathLike[str]) -> list[str]:
    """Labels (without ``sub-``) of the subject folders of an output folder."""
    return [p.name[4:] for p in _subject_dirs(output_dir)]


def segmentations(output_dir: str | PathLike[str], subject: str) -> list[Path]:
    """The bilateral ``desc-subfields_dseg`` images of one subject (every session), sorted."""
    return _find(Path(output_dir) / _subject_label(subject), _DSEG)


def uncertainty_of(dseg: str | PathLike[str]) -> Path:
    """Where the uncertainty map of a ``dseg`` image is (whether or not it exists)."""
    dseg = Path(dseg)
    return dseg.with_name(dseg.name.replace("_dseg.nii.gz", f"_{UNCERTAINTY_SUFFIX}.nii.gz"))


def dseg_sidecars(output_dir: str | PathLike[str], subjects: Sequence[str] = ()) -> list[Path]:
    """The JSON sidecars of every subject's (or of ``subjects``') segmentations, sorted."""
    return sorted(p for d in _subject_dirs(output_dir, subjects) for p in _find(d, _DSEG_JSON))


def sidecar_of_source(output_dir: str | PathLike[str], source: str) -> Path:
    """The dseg sidecar of the image named ``source`` (``sub-01_ses-01_T1w``, with or without
    extension), found through its BIDS entities (whether or not it exists)."""
    return sidecar_path(dseg_path(output_dir, Entities.from_filename(source)))


def source_name(path: str | PathLike[str]) -> str:
    """The name of the image a derivative was made from, as far as the name says: the entities
    before ``space-`` (``sub-01_ses-01``); see a sidecar's ``Sources`` for the full name."""
    return Path(path).name.split("_space-")[0]


def volumes_tables(output_dir: str | PathLike[str], participants: Sequence[str] = ()) -> list[Path]:
    """Every subject's (or ``participants``') ``desc-subfields_volumes.tsv``, sorted."""
    dirs = _subject_dirs(output_dir, participants)
    return sorted(p for d in dirs for p in _find(d, _VOLUMES))


def session_of(path: str | PathLike[str]) -> str | None:
    """The ``ses-`` label in an output file's name (None without sessions)."""
    return next((p[4:] for p in Path(path).name.split("_") if p.startswith("ses-")), None)


def subject_volumes_tables(output_dir: str | PathLike[str], subject: str) -> dict[str | None, Path]:
    """One subject's volumes tables by session label (None without sessions)."""
    return {session_of(p): p for p in volumes_tables(output_dir, [subject])}


def has_volumes(output_dir: str | PathLike[str], subject: str) -> bool:
    """Whether the subject has at least one volumes table (its participant run finished)."""
    return bool(volumes_tables(output_dir, [subject]))


def read_sidecar(path: str | PathLike[str]) -> dict[str, Any]:
    """A JSON sidecar as a dict (OSError or ValueError when it cannot be read;
    :class:`~hsf_bids.outputs.UnsafeOutputError` for a link or an oversized file)."""
    text = read_output_text(path)
    if text is None:
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
