"""Atomic file writes: a reader, or a run killed half-way, never sees half a file.

Every file the package writes for later reading (derivatives, reports, group tables, the run's
settings, downloaded and quantised models, the engine measurements' cache) goes through
:func:`atomic_file` or :func:`atomic_files`: the writer fills a hidden temporary file in the
destination folder, which is flushed to disk and then renamed over the destination
(``os.replace``, atomic within one file system). On any failure the destination keeps its
previous content (or stays absent) and the temporary file is removed. A hard kill (``kill -9``,
the out-of-memory killer, a node failure) leaves the temporary file behind, never a partial file
under the real name; the next write into that folder, by any run on the same machine, removes it.

Temporary names are ``.part-<host>.<pid>-<random>-<name>``: hidden from pybids and the BIDS
validator, unique among parallel writers, and ending with the real name, so that libraries which
choose a format from the extension (``nib.save`` of ``.nii.gz``, OpenVINO's ``.xml`` + ``.bin``)
write the right one. Files get the mode ``open`` gives them (``0o666`` less the umask) unless
``mode`` says otherwise.

Telling an abandoned temporary file from one being written: the writer holds an exclusive
``flock`` on it until the rename, and the kernel drops the lock when the process ends, however it
ends. A lock, unlike a pid, holds across pid namespaces (containers), pid reuse and forked
workers. Only files named with this machine's host name are ever removed: where a shared file
system keeps locks local to each client (NFS ``local_lock``, Lustre ``localflock``), another
machine's writer cannot be seen, so its files are left alone. Where locks are not supported at
all, nothing is removed.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

from hsf_bids.faults import fault_point

__all__ = [
    "TEMP_PREFIX",
    "atomic_file",
    "atomic_files",
    "holds_lock",
    "host_tag",
    "lock_if_abandoned",
    "owner_tag",
    "remove_abandoned",
]

TEMP_PREFIX = ".part-"
_ABANDONED = re.compile(r"\.part-(?P<host>[A-Za-z0-9_]+)\.\d+-")
# Folders already cleared by this process (keyed by pid: a forked worker clears them again).
_cleared: set[tuple[int, Path]] = set()


def owner_tag() -> str:
    """``<host>.<pid>`` of this process, as temporary names carry it (host: the short host name
    with anything but letters, digits and ``_`` replaced, so the tag parses back)."""
    host = socket.gethostname().split(".")[0] or "localhost"
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', host)[:40]}.{os.getpid()}"


def host_tag() -> str:
    """The host part of :func:`owner_tag`: whose temporary files this machine may remove."""
    return owner_tag().rsplit(".", 1)[0]


def holds_lock(path: Path) -> int:
    """Create ``path`` (which must not exist) and hold an exclusive lock on it; returns the
    descriptor, to be closed once the file is renamed or removed. On a file system without
    locks the file is created unlocked."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # no locks here: nobody can take it for abandoned either
    return fd


def lock_if_abandoned(path: Path) -> int | None:
    """A descriptor holding the lock of ``path`` when its writer is gone (the caller removes the
    file, then closes it); None when it is in use, not ours to open, or locks do not work."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: its writer is alive; anything else: cannot tell
        os.close(fd)
        return None
    return fd


def remove_abandoned(folder: Path) -> list[Path]:
    """Remove the temporary files of dead writers of this machine from ``folder``; returns them.

    Called before the first write into a folder in each process, so a rerun clears what a killed
    run left where it writes again.
    """
    key = (os.getpid(), folder)
    if key in _cleared:
        return []
    _cleared.add(key)
    host, removed = host_tag(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _ABANDONED.match(entry.name)
        if not match or match["host"] != host or not entry.is_file(follow_symlinks=False):
            continue
        fd = lock_if_abandoned(Path(entry.path))
        if fd is None:
            continue
        try:
            # Still the file we locked (not one a new writer made under a reused name)?
            if os.path.samestat(os.fstat(fd), os.lstat(entry.path)):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass  # removed meanwhile, or not ours to remove: it stays, as before
        finally:
            os.close(fd)
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_files(
    *paths: str | PathLike[str], mode: int | None = None
) -> Iterator[tuple[Path, ...]]:
    """Yield one temporary path per destination in ``paths``; when the block ends without an
    exception, rename each over its destination, in the order given.

    The folders are created if needed, and abandoned temporary files in them removed
    (:func:`remove_abandoned`). The temporary files exist, empty, when the block starts; the block
    writes them by name (truncating, not replacing them). The temporary paths share one random
    part, so files a library writes side by side (``x.xml`` and ``x.bin``) land on the matching
    temporary names. ``mode`` (e.g. ``0o644``) is applied to each file before the rename. On
    failure the temporary files are removed and the exception propagates.
    """
    finals = [Path(p) for p in paths]
    token = f"{TEMP_PREFIX}{owner_tag()}-{secrets.token_hex(4)}-"
    temps = tuple(final.with_name(token + final.name) for final in finals)
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(final.parent)
    locks: list[int] = []
    try:
        for tmp in temps:
            locks.append(holds_lock(tmp))
        for final in finals:
            fault_point(f"write:{final.name}")
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
    finally:
        for fd in locks:
            os.close(fd)


@contextmanager
def atomic_file(path: str | PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path for ``path``; the block writes it, and on success it replaces
    ``path`` (see :func:`atomic_files`)::

        with atomic_file(out / "x.json") as tmp:
            tmp.write_text(text)
    """
    with atomic_files(path, mode=mode) as (tmp,):
        yield tmp
