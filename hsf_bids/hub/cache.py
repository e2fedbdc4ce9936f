"""The models folder: where each preset's files live, their state, and making them present.

Layout: ``<models folder>/<preset.subfolder>/<model file name>`` (the subfolder is the model
version). Only the files a preset lists are ever used: the folder is never globbed, so a stray
``*.onnx`` cannot join the ensemble. Every use re-hashes the files (XXH3-64 reads about 10 GB/s,
so a 150 MB model costs a few tens of milliseconds).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import platformdirs

from hsf_bids.errors import EX_NOINPUT
from hsf_bids.hub.download import ChecksumError, ModelsError, download_file, file_digests
from hsf_bids.hub.presets import ModelFile, Preset

__all__ = [
    "MODELS_DIR_ENV",
    "FileState",
    "ModelStatus",
    "ModelsMissingError",
    "default_models_dir",
    "ensure_models",
    "fetch_command",
    "model_path",
    "resolve_models_dir",
    "verify_models",
]

MODELS_DIR_ENV = "HSF_BIDS_MODELS_DIR"


class ModelsMissingError(ModelsError):
    """Model files are missing (or corrupt) and may not be downloaded (offline, or local files).

    ``missing`` holds the offending :class:`ModelStatus` entries; ``command`` the fetch command.
    """

    exit_code = EX_NOINPUT

    def __init__(self, message: str, missing: tuple[ModelStatus, ...], command: str) -> None:
        super().__init__(message)
        self.missing = missing
        self.command = command


class FileState(str, Enum):
    """State of one model file: verified, present with a wrong checksum, or absent."""

    VERIFIED = "verified"
    CORRUPT = "corrupt"
    MISSING = "missing"


@dataclass(frozen=True)
class ModelStatus:
    """One model file of a preset, where it is (or would be) and its state after hashing.

    ``got`` is the XXH3-64 found (None when missing), ``got_sha256`` the SHA-256 found when the
    model has one.
    """

    model: ModelFile
    path: Path
    state: FileState
    got: str | None = None
    got_sha256: str | None = None

    @property
    def mismatch(self) -> tuple[str, str, str]:
        """``(kind, expected, got)`` of the first checksum that does not match (CORRUPT only)."""
        if self.got != self.model.xxh3_64:
            return "xxh3_64", self.model.xxh3_64, self.got or ""
        return "sha256", self.model.sha256 or "", self.got_sha256 or ""


def default_models_dir() -> Path:
    """The per-user cache folder for models: ``<user cache dir>/hsf_bids/models``."""
    return Path(platformdirs.user_cache_dir("hsf_bids")) / "models"


def resolve_models_dir(models_dir: Path | str | None = None) -> Path:
    """The models folder: ``models_dir`` > ``$HSF_BIDS_MODELS_DIR`` > the per-user cache folder."""
    if models_dir is not None and str(models_dir) != "":
        return Path(models_dir).expanduser().absolute()
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return default_models_dir()


def model_path(preset: Preset, model: ModelFile, models_dir: Path) -> Path:
    """Where ``model`` is read from: its local file for hub files, else the models folder."""
    if model.local_path is not None:
        return model.local_path
    return Path(models_dir) / preset.subfolder / model.name


def _status(preset: Preset, model: ModelFile, models_dir: Path) -> ModelStatus:
    path = model_path(preset, model, models_dir)
    try:
        got, got_sha256 = file_digests(path, sha256=model.sha256 is not None)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ModelStatus(model, path, FileState.MISSING)
    verified = got == model.xxh3_64 and got_sha256 == model.sha256
    state = FileState.VERIFIED if verified else FileState.CORRUPT
    return ModelStatus(model, path, state, got, got_sha256)


def verify_models(preset: Preset, models_dir: Path | str) -> list[ModelStatus]:
    """Re-hash every file of ``preset`` (in preset order) and report its state; no download."""
    return [_status(preset, model, Path(models_dir)) for model in preset.models]


def fetch_command(preset: Preset, models_dir: Path | str) -> str:
    """The shell command that downloads this preset's files into ``models_dir``."""
    choice = (
        f"--preset {shlex.quote(preset.name)}"
        if preset.builtin
        else f"--hub {shlex.quote(str(preset.source))}"
    )
    return f"hsf-bids-models fetch {choice} --models-dir {shlex.quote(str(models_dir))}"


def _describe(status: ModelStatus) -> str:
    if status.state is FileState.MISSING:
        what = f"missing: no file at {status.path}"
    else:
        kind, expected, got = status.mismatch
        what = (
            f"present at {status.path} but corrupt: its {kind} is {got}, expected {expected} "
            "(a damaged or different file; fetching replaces it)"
        )
    return f"  {status.model.name}: {what}\n    from {status.model.url}"


def ensure_models(
    preset: Preset,
    models_dir: Path | str,
    offline: bool = False,
    *,
    progress: bool | None = None,
    download: Callable[..., Path] = download_file,
    **download_options: Any,
) -> list[Path]:
    """Make every file of ``preset`` present and verified; return their paths in preset order.

    Cached files are re-hashed; a mismatching one counts as missing and is downloaded again
    (unless ``offline``). With everything cached and verified no socket is opened. Raises
    :class:`ModelsMissingError` (offline, naming each file, its URL and the fetch command, or a
    hub's local file that is absent), :class:`ChecksumError` (a hub's local file or a download
    with the wrong checksum), ``DownloadError`` or ``OSError`` (network, disk).
    ``download_options`` go to :func:`~hsf_bids.hub.download.download_file` (retries, timeouts).
    """
    models_dir = Path(models_dir)
    statuses = verify_models(preset, models_dir)
    local_bad = [
        s for s in statuses if s.model.local_path is not None and s.state is not FileState.VERIFIED
    ]
    for status in local_bad:
        if status.state is FileState.CORRUPT:
            kind, expected, got = status.mismatch
            raise ChecksumError(
                f"hub file {preset.source}: model {status.model.name} at {status.path} has "
                f"{kind} {got}, expected {expected}",
                status.path,
                expected,
                got,
            )
    if local_bad:
        raise ModelsMissingError(
            f"hub file {preset.source} names model files that do not exist:\n"
            + "\n".join(_describe(s) for s in local_bad),
            tuple(local_bad),
            "",
        )

    todo = [s for s in statuses if s.state is not FileState.VERIFIED]
    if todo and offline:
        command = fetch_command(preset, models_dir)
        missing = sum(s.state is FileState.MISSING for s in todo)
        found = [f"{missing} missing"] if missing else []
        if len(todo) > missing:
            found.append(f"{len(todo) - missing} present but corrupt (checksum mismatch)")
        raise ModelsMissingError(
            f"{len(todo)} model file(s) of {'preset' if preset.builtin else 'hub file'} "
            f"{preset.name if preset.builtin else preset.source} cannot be used from the models "
            f"folder {models_dir / preset.subfolder} ({' and '.join(found)}) and downloads are "
            "off (offline):\n"
            + "\n".join(_describe(s) for s in todo)
            + f"\nFetch them on a machine with internet access with:\n  {command}",
            tuple(todo),
            command,
        )
    for status in todo:
        download(
            status.model.url,
            status.path,
            status.model.xxh3_64,
            size=status.model.size,
            sha256=status.model.sha256,
            allow_http=preset.allow_http,
            progress=progress,
            **download_options,
        )
    return [s.path for s in statuses]
