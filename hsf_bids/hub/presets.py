"""Presets and hub files: HSF's preset YAML, read and validated into frozen objects.

A **preset** is a named model set shipped as package data in ``hsf_bids/data/presets/``; a **hub
file** is a user's YAML in the same format (``--hub FILE``). Both become a :class:`Preset`.

Format (HSF's, extended)::

    name: bagging_accurate          # presets: required; hub files: optional (default: file stem)
    version: "4.0.0"                # presets: required; hub files: optional
    description: ...                # optional for hub files
    contrasts: [T1w, T2w]           # optional for hub files (default: T1w, T2w); see below
    ca_mode: "1/2/3"                # "1/2/3", "1/23", "123" or ""
    engine: null                    # optional engine hint, e.g. deepsparse
    labels: {0: {name: background, abbreviation: BG}, ...}      # optional for hub files
    margins: {isotropic: [8, 8, 8], anisotropic: [16, 4, 16]}   # optional for hub files; see below
    models_path: ...                # HSF's key, accepted and ignored (see the models folder)
    allow_http: false               # optional: accept plain http:// URLs to other hosts
    models:
      <local file name>.onnx: {url: ..., xxh3_64: <16 lowercase hex>, size: <bytes or null>,
                               sha256: <64 lowercase hex, optional>}
    segmentation: {test_time_augmentation: true, test_time_num_aug: 20}

What the pipeline does with them (none is ignored): ``contrasts`` are the contrasts the models
accept (T1w and/or T2w; an image of another contrast is skipped with a warning, see
:func:`hsf_bids.settings.select_jobs`); ``margins`` set the box margin unless ``--margin`` is
given (``anisotropic`` is ``[thin, thick, thin]`` as for HSF's coronal slices and is applied
along whichever axis has the thick slices); ``labels`` must be HSF's six channels (the label
table and volumes are fixed), so a different one is refused; ``engine`` is a hint shown by
``hsf-bids-models``. Downloads are held to the file's word (:mod:`hsf_bids.hub.download`):
``size`` is a hard limit, ``sha256`` is verified as well as ``xxh3_64`` (XXH3-64 detects
accidents, SHA-256 tampering), and a remote URL must be https unless ``allow_http`` is true
(plain http to this machine's loopback is always accepted).

Naming scheme of the shipped presets: the current models (4.0.0) have HSF's bare names
(``bagging_accurate``, ``bagging_fast``, ``single_accurate``, ``single_fast``); presets of an
older model version carry it as a suffix (``bagging_accurate_3.0.0``, ...), and the 85 %-sparse
int8 models for DeepSparse are ``bagging_sparse_3.0.0`` and ``single_sparse_3.0.0``.

Model files live in ``<models folder>/<subfolder>/<file name>``, where the subfolder is the model
version (or ``hub-<stem>-<hash>`` for a hub file without a version). Local file names are therefore
unique per version: presets never overwrite each other's files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlsplit

from hsf_bids.errors import EX_DATAERR, EX_NOINPUT, EX_USAGE, HsfBidsError, brief
from hsf_bids.hub.download import is_loopback
from hsf_bids.hub.yamlfile import YamlFileError, read_yaml
from hsf_bids.vocabulary import CA_MODES, CONTRASTS

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_MARGINS",
    "DEFAULT_PRESET",
    "HubError",
    "HubNotFoundError",
    "Label",
    "Margins",
    "ModelFile",
    "Preset",
    "UnknownPresetError",
    "hub_subfolder",
    "list_presets",
    "load_hub",
    "load_preset",
    "resolve_preset",
]

DEFAULT_PRESET = "bagging_accurate"

_CHECKSUM = re.compile(r"[0-9a-f]{16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A version or stem becomes a folder name: keep it to characters that are safe everywhere.
_SAFE_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_URL_SCHEMES = ("http", "https", "file")
# Lengths beyond any real value; they also keep every message quoting one short.
_MAX_NAME = 100
_MAX_FILE_NAME = 255
_MAX_URL = 2048

_TOP_KEYS = {
    "name",
    "version",
    "description",
    "contrasts",
    "ca_mode",
    "engine",
    "labels",
    "margins",
    "models_path",
    "models",
    "segmentation",
    "allow_http",
}
_PRESET_REQUIRED = ("name", "version", "description", "contrasts", "labels", "margins")
_MODEL_KEYS = {"url", "xxh3_64", "size", "sha256"}
_SEGMENTATION_KEYS = {"test_time_augmentation", "test_time_num_aug"}


class HubError(HsfBidsError, ValueError):
    """A preset or hub file is invalid; the message names the file and what is wrong."""

    exit_code = EX_DATAERR


class HubNotFoundError(HubError):
    """The hub file given does not exist."""

    exit_code = EX_NOINPUT


class UnknownPresetError(HubError):
    """No shipped preset has the requested name."""

    exit_code = EX_USAGE


@dataclass(frozen=True)
class ModelFile:
    """One model file of a preset.

    ``name`` is the local file name (no folders), ``url`` the address as written in the YAML,
    ``xxh3_64`` its 16-hex-digit checksum, ``size`` its size in bytes when known, ``sha256`` its
    SHA-256 when the hub file gives one. ``local_path`` is set when the URL is a local file
    (relative path or ``file://``, hub files only): that file is used in place, never copied into
    the models folder.
    """

    name: str
    url: str
    xxh3_64: str
    size: int | None = None
    local_path: Path | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Label:
    """One output channel of the models: index, full name, abbreviation (e.g. 2, CA1)."""

    index: int
    name: str
    abbreviation: str


@dataclass(frozen=True)
class Margins:
    """Box margins in voxels (L-R, P-A, I-S) for isotropic and thick-slice anisotropic images.

    ``anisotropic`` is written for coronal slices, as in HSF: ``[thin, thick, thin]``. The
    pipeline applies it along whichever axis has the thick slices (:attr:`thick_slice`).
    """

    isotropic: tuple[int, int, int] = (8, 8, 8)
    anisotropic: tuple[int, int, int] = (16, 4, 16)

    @property
    def thick_slice(self) -> tuple[int, int]:
        """``(thin, thick)``: the margin along thin and along thick axes."""
        return self.anisotropic[0], self.anisotropic[1]


DEFAULT_LABELS = (
    Label(0, "background", "BG"),
    Label(1, "dentate gyrus", "DG"),
    Label(2, "cornu ammonis 1", "CA1"),
    Label(3, "cornu ammonis 2", "CA2"),
    Label(4, "cornu ammonis 3", "CA3"),
    Label(5, "subiculum", "SUB"),
)
DEFAULT_MARGINS = Margins()


@dataclass(frozen=True)
class Preset:
    """A validated model set.

    ``models`` lists exactly the files that take part in the ensemble, in YAML order.
    ``subfolder`` is the folder under the models folder holding its downloaded files.
    ``source`` is the YAML it was read from; ``builtin`` tells a shipped preset from a hub file.
    ``allow_http``: the file accepts plain http URLs to hosts other than the loopback.
    """

    name: str
    version: str | None
    description: str
    ca_mode: str
    models: tuple[ModelFile, ...]
    test_time_augmentation: bool
    test_time_num_aug: int
    contrasts: tuple[str, ...]
    labels: tuple[Label, ...]
    margins: Margins
    engine: str | None
    source: Path
    subfolder: str
    builtin: bool = field(default=True)
    allow_http: bool = False

    @property
    def n_inputs_per_model(self) -> int:
        """Forward passes per model and crop: the original plus the augmented copies."""
        return 1 + (self.test_time_num_aug if self.test_time_augmentation else 0)


def _presets_dir() -> Path:
    return Path(str(resources.files("hsf_bids") / "data" / "presets"))


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_dir().glob("*.yaml"))


def load_preset(name: str) -> Preset:
    """Read and validate the shipped preset ``name``; :class:`UnknownPresetError` if none."""
    names = list_presets()
    if name not in names:
        raise UnknownPresetError(
            f"unknown preset {brief(name)}; choose one of: {', '.join(names)} (or give --hub FILE)"
        )
    path = _presets_dir() / f"{name}.yaml"
    preset = _parse(_read_yaml(path), path, builtin=True)
    if preset.name != name:
        raise HubError(
            f"{path}: 'name' is {brief(preset.name)} but the file is named {brief(name)}"
        )
    return preset


def load_hub(path: Path | str) -> Preset:
    """Read and validate a user's hub file.

    Relative paths and ``file://`` URLs resolve next to the YAML. Without ``version`` the files go
    to a models subfolder ``hub-<stem>-<8 hex of the absolute path>``. Raises
    :class:`HubNotFoundError` when the file does not exist, :class:`HubError` when it is invalid.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise HubNotFoundError(f"hub file {path} does not exist or is not a file")
    preset = _parse(_read_yaml(path), path, builtin=False)
    _check_no_clash_with_builtin(preset)
    return preset


def resolve_preset(preset: str | None = None, hub: Path | str | None = None) -> Preset:
    """The model set of a run: the hub file if given, else the preset (default bagging_accurate)."""
    if preset is not None and hub is not None:
        raise HubError("give either a preset or a hub file, not both")
    if hub is not None:
        return load_hub(hub)
    return load_preset(preset or DEFAULT_PRESET)


def hub_subfolder(path: Path) -> str:
    """Models subfolder of a hub file without a version: ``hub-<stem>-<8 hex of its path>``.

    The path hash (of the resolved path: one folder per file, however it is named) keeps two hub
    files with the same name from sharing (and fighting over) a folder.
    """
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip(".") or "hub"
    return f"hub-{stem}-{digest}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = read_yaml(path)
    except OSError as exc:
        raise HubNotFoundError(f"cannot read hub file {path}: {exc.strerror or exc}") from exc
    except YamlFileError as exc:
        raise HubError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise HubError(f"{path}: expected a YAML mapping with 'ca_mode', 'models', 'segmentation'")
    return data


def _names(keys: Any) -> str:
    """Keys of a mapping as a message lists them: each cut short, at most ten."""
    keys = sorted(brief(k, quote=False) for k in keys)
    return ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


def _parse(data: dict[str, Any], path: Path, *, builtin: bool) -> Preset:
    def fail(msg: str) -> HubError:
        return HubError(f"{'preset' if builtin else 'hub file'} {path}: {msg}")

    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise fail(f"unknown key(s) {_names(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    required = ("ca_mode", "models", "segmentation") + (_PRESET_REQUIRED if builtin else ())
    missing = [k for k in required if k not in data]
    if missing:
        raise fail(f"missing key(s) {', '.join(missing)}")

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
        raise fail(f"'name' must be a non-empty string of at most {_MAX_NAME} characters")

    version = data.get("version")
    if version is not None:
        version = str(version) if isinstance(version, (int, float)) else version
        if (
            not isinstance(version, str)
            or len(version) > _MAX_NAME
            or not _SAFE_FOLDER.fullmatch(version)
        ):
            raise fail(
                f"'version' {brief(data.get('version'))} must be a plain folder name such as "
                "\"4.0.0\" (letters, digits, '.', '_', '+', '-')"
            )

    description = data.get("description") or ""
    if not isinstance(description, str):
        raise fail("'description' must be a string")

    ca_mode = data["ca_mode"]
    if isinstance(ca_mode, int) and not isinstance(ca_mode, bool):
        ca_mode = str(ca_mode)  # YAML reads an unquoted 123 as a number
    if ca_mode not in CA_MODES:
        raise fail(
            f"unknown ca_mode {brief(data['ca_mode'])}; valid: "
            + ", ".join(repr(m) for m in CA_MODES)
            + ' (quote it in YAML: ca_mode: "1/2/3")'
        )

    engine = data.get("engine")
    if engine is not None and (not isinstance(engine, str) or not engine):
        raise fail("'engine' must be an engine name such as deepsparse, or null")

    contrasts = data.get("contrasts", list(CONTRASTS))
    if (
        not isinstance(contrasts, list)
        or not contrasts
        or not all(isinstance(c, str) and c for c in contrasts)
    ):
        raise fail("'contrasts' must be a non-empty list of BIDS suffixes such as [T1w, T2w]")
    unsupported = [c for c in contrasts if c not in CONTRASTS]
    if unsupported:
        raise fail(
            f"contrasts: hsf_bids segments {' and '.join(CONTRASTS)} images only, not "
            f"{_names(unsupported)}"
        )

    allow_http = data.get("allow_http", False)
    if not isinstance(allow_http, bool):
        raise fail(f"'allow_http' must be true or false, not {brief(allow_http)}")
    models = _parse_models(data["models"], path, fail, builtin=builtin, allow_http=allow_http)
    tta, n_aug = _parse_segmentation(data["segmentation"], fail)
    labels = _parse_labels(data["labels"], fail) if "labels" in data else DEFAULT_LABELS
    margins = _parse_margins(data["margins"], fail) if "margins" in data else DEFAULT_MARGINS

    if version is not None:
        subfolder = version
    elif builtin:
        raise fail("missing key 'version'")
    else:
        subfolder = hub_subfolder(path)

    return Preset(
        name=name,
        version=version,
        description=description.strip(),
        ca_mode=ca_mode,
        models=models,
        test_time_augmentation=tta,
        test_time_num_aug=n_aug,
        contrasts=tuple(contrasts),
        labels=labels,
        margins=margins,
        engine=engine,
        source=path,
        subfolder=subfolder,
        builtin=builtin,
        allow_http=allow_http,
    )


def _check_file_name(name: Any, fail: Callable[[str], HubError]) -> str:
    if not isinstance(name, str) or not name or len(name) > _MAX_FILE_NAME:
        raise fail(
            f"model file name {brief(name)} must be a non-empty string of at most "
            f"{_MAX_FILE_NAME} characters"
        )
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or name.startswith(".")
        or "\x00" in name
    ):
        raise fail(
            f"model file name {brief(name)} must be a bare file name (no folder, no '..', not "
            "absolute, not hidden); it names the file inside the models folder"
        )
    if not name.endswith(".onnx") or name == ".onnx":
        raise fail(f"model file name {brief(name)} must end with '.onnx'")
    return name


def _resolve_url(
    url: str, path: Path, fail: Callable[[str], HubError], *, allow_http: bool = False
) -> Path | None:
    """Local path of a hub URL, or None for http(s). Refuses other schemes, and plain http to a
    host other than the loopback unless ``allow_http``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # A one-letter "scheme" is a Windows drive (C:\...), i.e. an absolute path.
    if scheme and len(scheme) > 1:
        if scheme not in _URL_SCHEMES:
            raise fail(
                f"URL {brief(url)}: scheme {brief(scheme)} is not supported; use http, https, "
                "file or a path relative to the hub file"
            )
        if scheme != "file":
            if not parts.netloc:
                raise fail(f"URL {brief(url)} has no host")
            if scheme == "http" and not allow_http and not is_loopback(parts.hostname):
                raise fail(
                    f"URL {brief(url)} uses plain http, which anyone on the network path can "
                    "alter; use https, or set 'allow_http: true' in the hub file"
                )
            return None
        # file:///abs/x.onnx is absolute; file:x.onnx and file://x.onnx are relative to the YAML.
        if parts.netloc in ("", "localhost"):
            local = unquote(parts.path)
        else:
            local = unquote(parts.netloc + parts.path)
        if not local:
            raise fail(f"URL {brief(url)} names no file")
        local_path = Path(local)
    else:
        local_path = Path(url)
        if local_path.is_absolute() or PureWindowsPath(url).is_absolute() or len(scheme) == 1:
            raise fail(
                f"URL {brief(url)} is an absolute path; write it as file://... or as a path "
                "relative to the hub file"
            )
    return local_path if local_path.is_absolute() else path.parent / local_path


def _parse_models(
    raw: Any, path: Path, fail: Callable[[str], HubError], *, builtin: bool, allow_http: bool
) -> tuple[ModelFile, ...]:
    if not isinstance(raw, dict) or not raw:
        raise fail("'models' must be a non-empty mapping of file name -> {url, xxh3_64}")
    models = []
    for name, entry in raw.items():
        name = _check_file_name(name, fail)
        if not isinstance(entry, dict):
            raise fail(f"model {name}: expected a mapping with 'url' and 'xxh3_64'")
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise fail(f"model {name}: unknown key(s) {_names(unknown)}")
        missing = [k for k in ("url", "xxh3_64") if k not in entry]
        if missing:
            raise fail(f"model {name}: missing key(s) {', '.join(missing)}")
        url, checksum, size = entry["url"], entry["xxh3_64"], entry.get("size")
        if not isinstance(url, str) or not url.strip() or len(url) > _MAX_URL:
            raise fail(
                f"model {name}: 'url' must be a non-empty string of at most {_MAX_URL} characters"
            )
        url = url.strip()
        if not isinstance(checksum, str) or not _CHECKSUM.fullmatch(checksum):
            raise fail(
                f"model {name}: xxh3_64 {brief(checksum)} is not 16 lowercase hexadecimal "
                "characters"
            )
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise fail(f"model {name}: 'size' must be a number of bytes or null, not {brief(size)}")
        sha256 = entry.get("sha256")
        if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.fullmatch(sha256)):
            raise fail(
                f"model {name}: sha256 {brief(sha256)} is not 64 lowercase hexadecimal characters"
            )
        local = _resolve_url(url, path, fail, allow_http=allow_http)
        if builtin and local is not None:
            raise fail(f"model {name}: shipped presets must use http(s) URLs, not {brief(url)}")
        models.append(
            ModelFile(
                name=name, url=url, xxh3_64=checksum, size=size, local_path=local, sha256=sha256
            )
        )
    return tuple(models)


def _parse_segmentation(raw: Any, fail: Callable[[str], HubError]) -> tuple[bool, int]:
    if not isinstance(raw, dict):
        raise fail(
            "'segmentation' must be a mapping with test_time_augmentation and test_time_num_aug"
        )
    unknown = set(raw) - _SEGMENTATION_KEYS
    if unknown:
        raise fail(f"segmentation: unknown key(s) {_names(unknown)}")
    missing = [k for k in sorted(_SEGMENTATION_KEYS) if k not in raw]
    if missing:
        raise fail(f"segmentation: missing key(s) {', '.join(missing)}")
    tta, n_aug = raw["test_time_augmentation"], raw["test_time_num_aug"]
    if not isinstance(tta, bool):
        raise fail(f"segmentation: test_time_augmentation must be true or false, not {brief(tta)}")
    if not isinstance(n_aug, int) or isinstance(n_aug, bool) or n_aug < 0:
        raise fail(f"segmentation: test_time_num_aug must be an integer >= 0, not {brief(n_aug)}")
    if tta and n_aug == 0:
        raise fail("segmentation: test_time_augmentation is true but test_time_num_aug is 0")
    return tta, n_aug


def _parse_labels(raw: Any, fail: Callable[[str], HubError]) -> tuple[Label, ...]:
    if not isinstance(raw, dict) or not raw:
        raise fail("'labels' must map channel index -> {name, abbreviation}")
    labels = []
    for index, entry in raw.items():
        if (
            not isinstance(index, int)
            or not isinstance(entry, dict)
            or set(entry) != {"name", "abbreviation"}
            or not all(isinstance(v, str) and v for v in entry.values())
        ):
            raise fail(
                f"labels: entry {brief(index)} must be <index>: {{name: ..., abbreviation: ...}}"
            )
        labels.append(Label(index, entry["name"], entry["abbreviation"]))
    labels.sort(key=lambda lab: lab.index)
    if [lab.index for lab in labels] != list(range(len(labels))):
        raise fail("labels: channel indices must be 0, 1, 2, ... without gaps")
    if tuple(labels) != DEFAULT_LABELS:
        # The label table, the ca_mode merging and the volumes are HSF's six channels.
        expected = ", ".join(
            f"{lab.index}: {{name: {lab.name}, abbreviation: {lab.abbreviation}}}"
            for lab in DEFAULT_LABELS
        )
        raise fail(
            "labels: hsf_bids supports HSF's six output channels only; leave 'labels' out or "
            f"give exactly {{{expected}}}"
        )
    return tuple(labels)


def _parse_margins(raw: Any, fail: Callable[[str], HubError]) -> Margins:
    if not isinstance(raw, dict) or set(raw) != {"isotropic", "anisotropic"}:
        raise fail("'margins' must have exactly 'isotropic' and 'anisotropic'")
    values = {}
    for key, value in raw.items():
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            raise fail(f"margins: {key} must be three voxel counts >= 0 (L-R, P-A, I-S)")
        values[key] = tuple(value)
    thin, thick, other = values["anisotropic"]
    if other != thin:
        raise fail(
            f"margins: anisotropic {list(values['anisotropic'])} must be [thin, thick, thin] "
            "(written for coronal slices, as in HSF): hsf_bids applies the thick value along "
            f"whichever axis has thick slices, e.g. [{thin}, {thick}, {thin}]"
        )
    return Margins(**values)


def _check_no_clash_with_builtin(hub: Preset) -> None:
    """Refuse a versioned hub file whose file names would overwrite a shipped preset's files."""
    if hub.version is None:
        return
    shipped: dict[str, str] = {}
    for name in list_presets():
        preset = load_preset(name)
        if preset.subfolder == hub.subfolder:
            shipped.update({m.name: m.xxh3_64 for m in preset.models})
    for model in hub.models:
        if model.local_path is None and shipped.get(model.name, model.xxh3_64) != model.xxh3_64:
            raise HubError(
                f"hub file {hub.source}: model {model.name} with version {brief(hub.version)} "
                f"would overwrite the shipped model of that name (xxh3_64 {shipped[model.name]}); "
                "rename the file or change or drop 'version'"
            )
