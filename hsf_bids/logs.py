"""The per-subject log folders a participant run leaves: ``<output>/sub-XX/log/<run-id>/``.

Run ids start with a UTC time stamp (:func:`hsf_bids.config.new_run_id`), so the last in name order
is the latest run; its ``crash-*.txt`` files (Nipype's text crash files) say why a subject failed.
"""

from __future__ import annotations

from pathlib import Path


def latest_run_dir(subject_dir: Path) -> Path | None:
    """The newest ``log/<run-id>`` folder of a subject's output folder, or None."""
    runs = sorted(p for p in (subject_dir / "log").glob("*") if p.is_dir())
    return runs[-1] if runs else None


def crash_files(run_dir: Path) -> list[Path]:
    """The text crash files of one run of one subject."""
    return sorted(run_dir.glob("crash-*.txt"))


def crash_reason(crashfile: Path) -> str:
    """The exception line that ends a Nipype text crash file (what the user needs first)."""
    lines = [line.strip() for line in crashfile.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "unknown error"
