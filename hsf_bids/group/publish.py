"""Replace the group outputs together, or not at all, even when a run is killed.

The group level writes several files at the output root (tables, data dictionaries, report,
failures) that only mean something together. Each is written whole by :mod:`hsf_bids.atomic`,
but a run that fails or is killed between two of them would leave a mix of new and previous
files, or the previous set looking current after a failure. :func:`replaced_together` prevents
both:

1. one group run at a time per output folder (an exclusive ``flock`` on the folder, released by
   the kernel when the process dies); under it, a staging folder left by a killed run is removed;
2. the previous outputs are withdrawn first (moved into a new hidden staging folder), so a run
   that fails or is killed from then on leaves no group output rather than stale ones;
3. the new files are written into that staging folder; only when every one is written are they
   moved to their final names (a rename each, within one file system), and the folder removed.

A kill during the renames of step 2 or 3 (a few system calls) can leave part of a set in place;
the next group run removes it first. Staging folders are hidden (``.group-staging-*``), so
pybids and the BIDS validator skip them.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STAGING_PREFIX", "replaced_together"]

STAGING_PREFIX = ".group-staging-"
_PREVIOUS = "previous"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (waits for another group run to finish)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: runs are then not serialised
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replaced_together(output_dir: Path, names: Sequence[str]) -> Iterator[Path]:
    """Yield a hidden staging folder in ``output_dir`` in which to write the outputs ``names``
    (file names at the output root) under their final names.

    On entry the previous outputs of ``names`` are withdrawn; when the block ends without an
    exception the files written are moved into ``output_dir`` (a name not written stays absent);
    on an exception, or a kill, none is (see the module's description).
    """
    output_dir = Path(output_dir)
    with _folder_lock(output_dir):
        for leftover in output_dir.glob(f"{STAGING_PREFIX}*"):
            _remove(leftover)
        staging = output_dir / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        previous = staging / _PREVIOUS
        previous.mkdir(parents=True)
        try:
            for name in names:
                old = output_dir / name
                if old.exists() or old.is_symlink():
                    os.replace(old, previous / name)
            _fsync_dir(output_dir)
            yield staging
            shutil.rmtree(previous)
            for name in names:
                new = staging / name
                if new.exists():
                    os.replace(new, output_dir / name)
            _fsync_dir(output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
