"""Run-time environment for read-only installs and containers.

Several libraries the app loads write into ``$HOME`` on their own and some phone home: matplotlib
(font cache and config, ``~/.config/matplotlib``), the Deno runtime of the BIDS validator
(``~/.cache/deno``), ONNX Runtime (a telemetry device id in ``~/.cache/Microsoft`` and a session
file in the temporary folder) and OpenVINO's conversion tools (a telemetry client id in
``~/intel``, sent over the network). In a read-only image (``docker run --read-only``) those writes
fail with warnings; on Apptainer, where ``$HOME`` is the user's own, they land in the user's home.

:func:`prepare_runtime` is called once at start-up, before those libraries are imported. It turns
the telemetry off and points each library cache, and ``$TMPDIR`` itself, at a private folder of
this process inside the temporary folder (removed at exit), so a run writes only to its output,
work and temporary folders, and every temporary file of the run and of the processes it starts
(registrations, the validator, the engines' session files) lies in that one folder.
Variables the user has already set are left alone (a ``$TMPDIR`` the user set is the temporary
folder the private folder is made in).

A run killed before its exit handlers ran (``kill -9``, the out-of-memory killer) leaves its
private folder behind; the next run on the same machine removes it. Each private folder,
``hsf_bids-<host>.<pid>-<random>``, holds a ``.lock`` file its process keeps locked (``flock``)
until it ends, however it ends; a folder whose lock can be taken belongs to a dead process (see
:mod:`hsf_bids.atomic`, which tells abandoned temporary files apart the same way).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from hsf_bids.atomic import holds_lock, host_tag, lock_if_abandoned, owner_tag
from hsf_bids.errors import EX_CANTCREAT, HsfBidsError

__all__ = [
    "CACHE_VARIABLES",
    "QUIET_VARIABLES",
    "RuntimeEnvironmentError",
    "RuntimeEnvironment",
    "prepare_runtime",
    "remove_abandoned_folders",
    "end_runtime",
    "remove_private_folder",
]

# Library caches that default to $HOME: environment variable -> subfolder of the private folder.
CACHE_VARIABLES: dict[str, str] = {
    "MPLCONFIGDIR": "matplotlib",
    "DENO_DIR": "deno",
}
# Telemetry and update checks: all of them would need the network, some also write to $HOME.
QUIET_VARIABLES: dict[str, str] = {
    "ORT_DISABLE_TELEMETRY": "1",
    "NIPYPE_NO_ET": "1",
    "DENO_NO_UPDATE_CHECK": "1",
}
PREFIX = "hsf_bids-"


class RuntimeEnvironmentError(HsfBidsError, RuntimeError):
    """Neither the temporary folder nor the work folder can hold this run's temporary files."""

    exit_code = EX_CANTCREAT


@dataclass(frozen=True)
class RuntimeEnvironment:
    """What :func:`prepare_runtime` did.

    ``scratch`` is the private folder of this process (removed at exit when ``cleanup``);
    ``set_variables`` the environment variables it set, with their values (``TMPDIR`` is
    ``<scratch>/tmp``), and ``replaced`` their values before (``None``: unset); ``temp_dir`` the
    temporary folder the private folder is in (the work folder's ``tmp`` when the default is not
    writable).
    """

    scratch: Path
    temp_dir: Path
    set_variables: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, str | None] = field(default_factory=dict)


LOCK_NAME = ".lock"
# This process's private folders, with the descriptor that holds each one's lock.
_private: dict[Path, int] = {}


def _make_scratch(base: str) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{owner_tag()}-", dir=base)).resolve()
    _private[scratch] = holds_lock(scratch / LOCK_NAME)
    return scratch


def remove_private_folder() -> None:
    """Remove this process's private folders (at exit, or when the run is stopped)."""
    for scratch, fd in list(_private.items()):
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(fd)
        del _private[scratch]


def remove_abandoned_folders(base: str | os.PathLike[str]) -> list[Path]:
    """Remove the private folders in ``base`` of this machine's runs that have ended (killed
    before they could remove them); returns them. A folder without a lock file (a process
    killed in the instant between making it and locking it) is left alone."""
    host = host_tag()
    removed = []
    for folder in Path(base).glob(f"{PREFIX}{host}.*-*"):
        if folder in _private or folder.is_symlink() or not folder.is_dir():
            continue
        fd = lock_if_abandoned(folder / LOCK_NAME)
        if fd is None:
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    return removed


def _temp_base(env: MutableMapping[str, str]) -> str:
    """The temporary folder the user chose (``$TMPDIR``, ``$TEMP``, ``$TMP``), else ``/tmp``.

    Not :func:`tempfile.gettempdir`: when ``/tmp`` is read-only it falls back to the current
    folder, which is nobody's temporary folder.
    """
    for variable in ("TMPDIR", "TEMP", "TMP"):
        if env.get(variable):
            return env[variable]
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


def prepare_runtime(
    work_dir: Path | str,
    environ: MutableMapping[str, str] | None = None,
    *,
    cleanup: bool = True,
) -> RuntimeEnvironment:
    """Make this process write only to its work and temporary folders; returns what was set.

    ``work_dir`` is the run's (existing, writable) work folder: when no temporary folder is
    writable (``docker run --read-only`` without ``--tmpfs /tmp``) the private folder is made in
    ``<work_dir>/tmp``. ``$TMPDIR`` becomes ``<private folder>/tmp``; abandoned private folders
    of earlier runs are removed first (:func:`remove_abandoned_folders`). ``environ`` defaults
    to ``os.environ`` (child processes inherit it); when it is ``os.environ`` Python's
    :mod:`tempfile` is re-pointed as well. With ``cleanup`` the
    private folder is removed when the process exits. Raises :class:`RuntimeEnvironmentError`
    naming both folders when neither can be written.
    """
    env = os.environ if environ is None else environ
    changed: dict[str, str] = {}
    base = _temp_base(env)
    remove_abandoned_folders(base)
    try:
        scratch = _make_scratch(base)
    except OSError as first:
        fallback = Path(work_dir).expanduser().absolute() / "tmp"
        try:
            fallback.mkdir(parents=True, exist_ok=True)
            remove_abandoned_folders(fallback)
            scratch = _make_scratch(str(fallback))
        except OSError as exc:
            raise RuntimeEnvironmentError(
                f"no writable temporary folder: {base} ({first.strerror or first}) and "
                f"{fallback} ({exc.strerror or exc}); mount one at /tmp (docker run --tmpfs "
                "/tmp) or give a writable work folder (-w)"
            ) from exc
    temp_dir = scratch.parent
    (scratch / "tmp").mkdir()
    changed["TMPDIR"] = str(scratch / "tmp")

    for variable, subfolder in CACHE_VARIABLES.items():
        if not env.get(variable):
            path = scratch / subfolder
            path.mkdir()
            changed[variable] = str(path)
    for variable, value in QUIET_VARIABLES.items():
        if variable not in env:
            changed[variable] = value
    replaced = {variable: env.get(variable) for variable in changed}
    env.update(changed)

    if env is os.environ:
        tempfile.tempdir = None  # tempfile caches its choice; make it read $TMPDIR again
        # OpenVINO imports its model-conversion tools, which send telemetry and write a client
        # id to ~/intel when the optional openvino_telemetry module imports; when it cannot,
        # OpenVINO falls back to its built-in no-op stub. Forked workers inherit this.
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    if cleanup:
        atexit.register(remove_private_folder)
    return RuntimeEnvironment(
        scratch=scratch, temp_dir=temp_dir, set_variables=changed, replaced=replaced
    )


def end_runtime(runtime: RuntimeEnvironment) -> None:
    """Undo :func:`prepare_runtime` in this process (``os.environ``): the variables it set get
    their previous values back and the private folder is removed.

    A command line run ends with its process; a caller of :func:`hsf_bids.cli.run.main` in its
    own process (a notebook, a test) would otherwise keep ``$TMPDIR`` pointing at a folder that
    is removed when it exits, or earlier.
    """
    for variable, value in runtime.replaced.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value
    tempfile.tempdir = None
    remove_private_folder()
