"""Atomic file writes: a reader, or a run killed half-way, never sees half a file.

Every file the package writes for later reading (derivatives, reports, group tables, the run's
settings, downloaded and quantised models, the engine measurements' cache) goes through
:func:`atomic_file` or :func:`atomic_files`: the writer fills a hidden temporary file in the
destination folder, which is flushed to disk and then renamed over the destination
(``os.replace``, atomic within one file system). On any failure, or a kill, the destination keeps
its previous content (or stays absent) and the temporary file is removed; a hard kill can leave a
hidden ``.part-*`` file behind, never a partial file under the real name.

Temporary names are ``.part-<pid>-<random>-<name>``: hidden from pybids and the BIDS validator,
unique among parallel writers, and ending with the real name, so that libraries which choose a
format from the extension (``nib.save`` of ``.nii.gz``, OpenVINO's ``.xml`` + ``.bin``) write the
right one. Files get the mode ``open`` gives them (``0o666`` less the umask) unless ``mode`` says
otherwise.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

__all__ = ["TEMP_PREFIX", "atomic_file", "atomic_files"]

TEMP_PREFIX = ".part-"


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_files(
    *paths: str | PathLike[str], mode: int | None = None
) -> Iterator[tuple[Path, ...]]:
    """Yield one temporary path per destination in ``paths``; when the block ends without an
    exception, rename each over its destination, in the order given.

    The folders are created if needed. The temporary paths share one random part, so files a
    library writes side by side (``x.xml`` and ``x.bin``) land on the matching temporary names.
    The block must create every temporary file. ``mode`` (e.g. ``0o644``) is applied to each file
    before the rename. On failure the temporary files are removed and the exception propagates.
    """
    finals = [Path(p) for p in paths]
    token = f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
    temps = tuple(final.with_name(token + final.name) for final in finals)
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temps
        for tmp, final in zip(temps, finals, strict=True):
            _fsync(tmp)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, final)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path for ``path``; the block writes it, and on success it replaces
    ``path`` (see :func:`atomic_files`)::

        with atomic_file(out / "x.json") as tmp:
            tmp.write_text(text)
    """
    with atomic_files(path, mode=mode) as (tmp,):
        yield tmp
