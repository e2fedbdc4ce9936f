"""An unexpected error at the top of a command: its traceback goes to a crash file, the console
gets one line naming it.

The crash file is a text file named ``crash-<time>-<pid>-<prog>.txt``, like Nipype's crash
files, in the log folder of the subject when a participant run is about one
(``<output>/sub-XX/log/<run-id>/``, where the group level's failures table and the subject's
report look), else in the output folder's ``log/<run-id>/`` (hidden from the BIDS validator by
``.bidsignore``), else in the work folder's, else in the system's temporary folder. Its last line
is the exception, which :func:`hsf_bids.logs.crash_reason` reads.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hsf_bids.atomic import atomic_file
from hsf_bids.config import RunConfig
from hsf_bids.errors import brief

__all__ = ["crash_folders", "report_crash", "write_crash_file"]


def crash_folders(config: RunConfig | None) -> list[Path]:
    """Where a crash file may go, best first."""
    folders = []
    if config is not None:
        # Only a participant run's crash is the subject's failure (the group level lists it).
        if config.analysis_level == "participant" and len(config.participant_labels) == 1:
            label = config.participant_labels[0].removeprefix("sub-")
            folders.append(config.subject_log_dir(label))
        folders += [
            config.output_dir / "log" / config.run_id,
            config.work_dir / "log" / config.run_id,
        ]
    folders.append(Path(tempfile.gettempdir()))
    return folders


def write_crash_file(exc: BaseException, config: RunConfig | None, prog: str) -> Path | None:
    """Write ``exc``'s traceback (and the command line) to a crash file; its path, or None when
    no folder could take it."""
    text = f"{prog} {' '.join(sys.argv[1:])}\n\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)
    )
    name = f"crash-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{prog}.txt"
    for folder in crash_folders(config):
        path = folder / name
        try:
            with atomic_file(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
        except OSError:
            continue
        return path
    return None


def report_crash(exc: BaseException, config: RunConfig | None, prog: str) -> str:
    """The one line the console gets for an unexpected ``exc`` (its crash file written)."""
    path = write_crash_file(exc, config, prog)
    where = f"the traceback is in {path}" if path else "no crash file could be written"
    what = brief(f"{type(exc).__name__}: {exc}".replace("\n", " "), limit=300, quote=False)
    return f"unexpected error ({what}); {where}"
