"""BIDS Derivatives: names, atomic writers, sidecars, ``dataset_description.json``, ``.bidsignore``.

Layout of one participant's outputs (BIDS 1.10, ``bids-validator`` 3 passes with 0 errors)::

    <output_dir>/dataset_description.json               shared, see write_dataset_description
    <output_dir>/desc-subfields_dseg.tsv                shared look-up table (lut.write_lut)
    <output_dir>/.bidsignore                            shared, see write_bidsignore
    <output_dir>/sub-01/[ses-01/]anat/
        sub-01[_ses-01][_acq-..]..._space-T1w_desc-subfields_dseg.nii.gz (+ .json)
        sub-01[_ses-01][_acq-..]..._space-T1w_desc-subfields_uncertainty.nii.gz (+ .json)
        sub-01[_ses-01]_desc-subfields_volumes.tsv (+ .json)

Outputs stay on the source image's grid, so ``space-`` names the source contrast (``T1w``/``T2w``)
and the sidecar's ``SpatialReference`` points at the source image. The uncertainty map (entropy)
has no BIDS suffix: it is not a probability, so ``probseg`` would mislead readers of the dataset; it
gets its own ``_uncertainty`` suffix and a ``.bidsignore`` entry, like the volumes tables.

Every writer here writes a hidden temporary file in the destination folder and renames it over the
final name, so a final name never holds a partial file, and parallel participant runs writing the
same shared file with identical content leave it valid.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from os import PathLike
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from hsf_bids.atomic import atomic_file
from hsf_bids.errors import EX_CANTCREAT, HsfBidsError

__all__ = [
    "BIDSIGNORE_PATTERNS",
    "BIDS_VERSION",
    "CODE_URL",
    "DESC",
    "LUT_NAME",
    "PIPELINE_NAME",
    "UNCERTAINTY_SUFFIX",
    "DerivativesError",
    "EntitiesError",
    "Entities",
    "ForeignDerivativesError",
    "GridError",
    "OutputWriteError",
    "UnsafeOutputError",
    "bids_uri",
    "dataset_description",
    "derivative_name",
    "derivative_path",
    "detect_container",
    "dseg_path",
    "dseg_sidecar",
    "image_on_grid",
    "lut_path",
    "read_output_text",
    "sidecar_path",
    "uncertainty_path",
    "uncertainty_sidecar",
    "volumes_path",
    "write_bidsignore",
    "write_dataset_description",
    "write_json",
    "write_nifti",
    "write_segmentation",
    "write_text",
    "write_tsv",
]

PIPELINE_NAME = "hsf_bids"
# TODO(maintainer): set to the public repository once it exists.
CODE_URL = "https://github.com/hsf-bids/hsf_bids"
BIDS_VERSION = "1.10.0"
DESC = "subfields"
UNCERTAINTY_SUFFIX = "uncertainty"
LUT_NAME = f"desc-{DESC}_dseg.tsv"
DATATYPE = "anat"

# What the BIDS schema has no rule for (gitignore syntax; directories without a trailing slash).
BIDSIGNORE_PATTERNS: tuple[str, ...] = (
    "*.html",
    "figures",
    "log",
    "CITATION.md",
    "*_volumes.tsv",
    "*_volumes.json",
    f"*_{UNCERTAINTY_SUFFIX}.nii.gz",
    f"*_{UNCERTAINTY_SUFFIX}.json",
    "group_*",
)


class DerivativesError(HsfBidsError, RuntimeError):
    """The output folder cannot take these derivatives."""

    exit_code = EX_CANTCREAT


class ForeignDerivativesError(DerivativesError):
    """The output folder holds another pipeline's derivatives."""


class OutputWriteError(DerivativesError):
    """Writing an output file failed; nothing was left under its final name."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"could not write {path}: {reason}")
        self.path = path


class UnsafeOutputError(DerivativesError):
    """A file the package reads back from its output folder is a symbolic link, not a regular
    file, or far larger than anything the package writes there."""


class EntitiesError(ValueError):
    """A source file name or entity set that cannot name a derivative."""


class GridError(ValueError):
    """An array that does not fit the grid of the image it should be written on."""


# ---------------------------------------------------------------------------------------------
# Entities and names

# Raw entities an anatomical image may carry, in BIDS order; ``chunk`` comes after ``space``.
_BEFORE_SPACE = ("sub", "ses", "task", "acq", "ce", "rec", "run", "echo", "part")
_AFTER_SPACE = ("chunk",)
_LONG_NAMES = {
    "subject": "sub",
    "session": "ses",
    "task": "task",
    "acquisition": "acq",
    "ceagent": "ce",
    "reconstruction": "rec",
    "run": "run",
    "echo": "echo",
    "part": "part",
    "chunk": "chunk",
}
# Entities that distinguish images but that derivative names here do not carry: refusing them avoids
# two sources silently writing to one derivative name.
_UNSUPPORTED = {
    "sample": "sample", "tracksys": "tracksys", "nucleus": "nuc", "nuc": "nuc", "volume": "voi",
    "voi": "voi", "tracer": "trc", "trc": "trc", "stain": "stain", "staining": "stain",
    "direction": "dir", "dir": "dir", "modality": "mod", "mod": "mod", "flip": "flip",
    "inv": "inv", "mt": "mt", "proc": "proc", "hemi": "hemi", "space": "space", "split": "split",
    "recording": "recording", "seg": "seg", "res": "res", "den": "den", "label": "label",
    "desc": "desc",
}  # fmt: skip
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_INDEX_ENTITIES = ("run", "echo", "chunk")


@dataclass(frozen=True)
class Entities:
    """The BIDS entities of a source image that its derivatives keep, and its contrast.

    Values are labels without the key (``sub="01"``); ``contrast`` is the source suffix (``T1w``,
    ``T2w``) and becomes the derivatives' ``space-``. Index entities (``run``, ``echo``, ``chunk``)
    stay strings so zero padding survives.
    """

    sub: str
    ses: str | None = None
    task: str | None = None
    acq: str | None = None
    ce: str | None = None
    rec: str | None = None
    run: str | None = None
    echo: str | None = None
    part: str | None = None
    chunk: str | None = None
    contrast: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                if f.name == "sub":
                    raise EntitiesError("the subject label (sub) is required")
                continue
            if not isinstance(value, str):
                # pybids gives runs as (padded) ints; their str() keeps the padding.
                value = str(value)
                object.__setattr__(self, f.name, value)
            if not _LABEL.match(value):
                raise EntitiesError(
                    f"{f.name}={value!r} is not a BIDS label (letters and digits only)"
                )
            if f.name in _INDEX_ENTITIES and not value.isdigit():
                raise EntitiesError(f"{f.name}={value!r} is not a BIDS index (digits only)")

    @classmethod
    def from_filename(cls, path: str | PathLike[str]) -> Entities:
        """Parse a BIDS file name such as ``sub-01_ses-2_acq-hr_run-01_T2w.nii.gz``.

        Raises :class:`EntitiesError` naming the file for a malformed name, a label with other
        characters than letters and digits, or an entity that derivative names cannot carry.
        """
        name = Path(path).name
        parts = name.split("_")
        suffix = parts[-1].split(".", 1)[0]
        values: dict[str, str] = {}
        for part in parts[:-1]:
            key, sep, value = part.partition("-")
            if not sep or not key or not value:
                raise EntitiesError(f"{name}: {part!r} is not a key-label pair")
            if key in values:
                raise EntitiesError(f"{name}: entity {key!r} appears twice")
            if key not in _BEFORE_SPACE + _AFTER_SPACE:
                raise EntitiesError(f"{name}: entity {key!r} is not supported in derivative names")
            values[key] = value
        if not suffix:
            raise EntitiesError(f"{name}: no suffix (such as T1w) before the extension")
        try:
            return cls(**values, contrast=suffix)
        except EntitiesError as exc:
            raise EntitiesError(f"{name}: {exc}") from None
        except TypeError:
            raise EntitiesError(f"{name}: no subject entity (sub-<label>)") from None

    @classmethod
    def from_pybids(cls, entities: Mapping[str, Any]) -> Entities:
        """Build from a pybids entity mapping (``subject``, ``session``, ... and ``suffix``).

        Short keys (``sub``, ``ses``) are accepted too; ``datatype``, ``extension`` and unknown
        metadata keys are ignored; BIDS entities that derivative names cannot carry raise
        :class:`EntitiesError`.
        """
        values: dict[str, Any] = {}
        for key, value in entities.items():
            if value is None:
                continue
            if key in _UNSUPPORTED:
                raise EntitiesError(
                    f"entity {_UNSUPPORTED[key]!r} ({value}) is not supported in derivative names"
                )
            short = _LONG_NAMES.get(key, key if key in _LONG_NAMES.values() else None)
            if short is not None:
                values[short] = value
        if "sub" not in values:
            raise EntitiesError(f"no subject in entities {dict(entities)!r}")
        return cls(**values, contrast=entities.get("suffix"))

    def session_only(self) -> Entities:
        """Only subject and session: the key of per-session outputs such as the volumes table."""
        return Entities(sub=self.sub, ses=self.ses)

    def items(self) -> list[tuple[str, str]]:
        """The set entities (without contrast) in BIDS order, ``chunk`` last."""
        return [(k, v) for k in _BEFORE_SPACE + _AFTER_SPACE if (v := getattr(self, k))]

    def with_contrast(self, contrast: str) -> Entities:
        """The same entities for another contrast (the second image of a multispectral run)."""
        return replace(self, contrast=contrast)


def derivative_name(
    entities: Entities,
    suffix: str,
    extension: str,
    *,
    space: str | None = None,
    label: str | None = None,
    desc: str | None = DESC,
) -> str:
    """A BIDS derivative file name: source entities, ``space-``, ``label-``, ``desc-``, suffix.

    ``sub-01_ses-01_acq-hr_run-1_space-T1w_desc-subfields_dseg.nii.gz`` for ``entities`` of
    ``sub-01_ses-01_acq-hr_run-1_T1w.nii.gz``, ``space="T1w"``, ``suffix="dseg"``,
    ``extension=".nii.gz"``.
    """
    for key, value in (("suffix", suffix), ("space", space), ("label", label), ("desc", desc)):
        if value is not None and not _LABEL.match(value):
            raise EntitiesError(f"{key}={value!r} is not a BIDS label (letters and digits only)")
    if not extension.startswith("."):
        raise EntitiesError(f"extension {extension!r} must start with a dot")
    parts = [f"{k}-{v}" for k, v in entities.items() if k in _BEFORE_SPACE]
    if space is not None:
        parts.append(f"space-{space}")
    parts += [f"{k}-{v}" for k, v in entities.items() if k in _AFTER_SPACE]
    if label is not None:
        parts.append(f"label-{label}")
    if desc is not None:
        parts.append(f"desc-{desc}")
    return "_".join([*parts, suffix]) + extension


def derivative_path(output_dir: str | PathLike[str], entities: Entities, name: str) -> Path:
    """``<output_dir>/sub-<sub>/[ses-<ses>/]anat/<name>``."""
    path = Path(output_dir) / f"sub-{entities.sub}"
    if entities.ses is not None:
        path /= f"ses-{entities.ses}"
    return path / DATATYPE / name


def _space(entities: Entities) -> str:
    if entities.contrast is None:
        raise EntitiesError(f"sub-{entities.sub}: the source contrast (T1w, T2w) is not known")
    return entities.contrast


def dseg_path(output_dir: str | PathLike[str], entities: Entities) -> Path:
    """Where the bilateral subfield segmentation of the image ``entities`` goes."""
    name = derivative_name(entities, "dseg", ".nii.gz", space=_space(entities))
    return derivative_path(output_dir, entities, name)


def uncertainty_path(output_dir: str | PathLike[str], entities: Entities) -> Path:
    """Where the uncertainty (entropy) map of the image ``entities`` goes."""
    name = derivative_name(entities, UNCERTAINTY_SUFFIX, ".nii.gz", space=_space(entities))
    return derivative_path(output_dir, entities, name)


def volumes_path(output_dir: str | PathLike[str], entities: Entities) -> Path:
    """Where the volumes table of the subject and session of ``entities`` goes (one per session)."""
    session = entities.session_only()
    return derivative_path(output_dir, session, derivative_name(session, "volumes", ".tsv"))


def lut_path(output_dir: str | PathLike[str]) -> Path:
    """The shared top-level look-up table that every ``desc-subfields_dseg`` inherits."""
    return Path(output_dir) / LUT_NAME


def sidecar_path(path: str | PathLike[str]) -> Path:
    """The JSON sidecar of a data file (``x_dseg.nii.gz`` -> ``x_dseg.json``)."""
    path = Path(path)
    return path.with_name(path.name.split(".", 1)[0] + ".json")


def bids_uri(path: str | PathLike[str], bids_dir: str | PathLike[str], dataset: str = "raw") -> str:
    """The BIDS URI of ``path`` inside the dataset at ``bids_dir``: ``bids:raw:sub-01/anat/...``."""
    path, root = Path(path).absolute(), Path(bids_dir).absolute()
    try:
        relative = path.relative_to(root)
    except ValueError:
        # Symlinked datasets (DataLad) give paths that only match once resolved.
        try:
            relative = path.resolve().relative_to(root.resolve())
        except ValueError:
            raise EntitiesError(f"{path} is not inside the BIDS dataset {root}") from None
    return f"bids:{dataset}:{relative.as_posix()}"


# ---------------------------------------------------------------------------------------------
# Images on the source grid


def image_on_grid(
    data: np.ndarray, reference: nib.Nifti1Image, dtype: type | np.dtype, *, intent: str = "none"
) -> nib.Nifti1Image:
    """``data`` as a NIfTI image on the exact grid of ``reference`` (same shape, qform and sform).

    The reference header is copied so both affines and their codes survive (some sources carry
    only one); ``data`` must already be in the reference's voxel order. Spatial units default to
    mm when the source leaves them unset. ``intent`` is a NIfTI intent name (``"label"`` for
    segmentations).
    """
    shape = tuple(reference.shape[:3])
    if reference.ndim > 3 and int(np.prod(reference.shape[3:])) != 1:
        raise GridError(f"reference image {reference.get_filename()} is not 3D: {reference.shape}")
    if data.shape != shape:
        raise GridError(
            f"array of shape {data.shape} is not on the grid of {reference.get_filename()} {shape}"
        )
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    # The reference affine equals the header's best affine, so nibabel keeps both forms as they are.
    img = nib.Nifti1Image(np.asarray(data).astype(dtype, copy=False), reference.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_intent(intent)
    spatial_unit, time_unit = img.header.get_xyzt_units()
    if spatial_unit == "unknown":
        img.header.set_xyzt_units("mm", time_unit)
    img.header["descrip"] = f"{PIPELINE_NAME} {DESC}".encode()
    if data.size:
        img.header["cal_min"], img.header["cal_max"] = float(data.min()), float(data.max())
    return img


# ---------------------------------------------------------------------------------------------
# Atomic writers


@contextmanager
def _atomic(path: str | PathLike[str]) -> Iterator[Path]:
    """:func:`hsf_bids.atomic.atomic_file`, with its failures as :class:`OutputWriteError`
    (which names the output file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(path, f"cannot create folder {path.parent} ({exc})") from exc
    try:
        with atomic_file(path) as tmp:
            yield tmp
    except OutputWriteError:
        raise
    except Exception as exc:
        raise OutputWriteError(path, f"{type(exc).__name__}: {exc}") from exc


def write_nifti(img: nib.Nifti1Image, path: str | PathLike[str]) -> Path:
    """Save ``img`` to ``path`` (``.nii`` or ``.nii.gz``) atomically; return the path."""
    with _atomic(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def _json_default(obj: Any) -> Any:
    # Provenance blocks often carry numpy scalars/arrays and paths; JSON has no type for them.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"


def write_json(obj: Any, path: str | PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy values and paths converted, NaN refused)."""
    with _atomic(path) as tmp:
        text = _json_text(obj)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return Path(path)


def write_tsv(df: pd.DataFrame, path: str | PathLike[str]) -> Path:
    """Write ``df`` as a BIDS TSV atomically: tab separated, no index, missing values as ``n/a``."""
    with _atomic(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            df.to_csv(fh, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return Path(path)


def write_text(text: str, path: str | PathLike[str]) -> Path:
    """Write ``text`` atomically."""
    with _atomic(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Reading back


# The files read back (shared top-level files, sidecars) are a few kilobytes.
MAX_READ_BACK_BYTES = 1 << 20


def read_output_text(
    path: str | PathLike[str], *, max_bytes: int = MAX_READ_BACK_BYTES
) -> str | None:
    """The text of a file of the output folder that the package reads back, or None if absent.

    Anyone who can write to the output folder could plant a symbolic link where the package reads
    (a link to another user's file would be copied into the outputs, one to ``/dev/zero`` would
    exhaust the memory), so the file is opened without following a link in its last component
    and must be a regular UTF-8 file of at most ``max_bytes``; otherwise
    :class:`UnsafeOutputError` (73) says what to remove. Writes need no such care: they replace
    a link itself, never its target (:mod:`hsf_bids.atomic`).
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeOutputError(
                f"{path} is a symbolic link; hsf_bids never follows links in its output folder "
                "(it would read or replace the link's target): remove the link and run again"
            ) from None
        raise UnsafeOutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeOutputError(
                f"{path} is not a regular file; remove it and run again (hsf_bids writes a "
                "regular file there)"
            )
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeOutputError(
            f"{path} is larger than {max_bytes} bytes, far more than hsf_bids writes there; "
            "remove it and run again"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeOutputError(f"{path} is not UTF-8 text ({exc.reason}); remove it") from exc


# ---------------------------------------------------------------------------------------------
# Shared top-level files


def detect_container(
    environ: Mapping[str, str] | None = None, root: str | PathLike[str] = "/"
) -> dict[str, str] | None:
    """The container this process runs in, as a BIDS ``GeneratedBy.Container`` object, or None.

    ``$HSF_BIDS_CONTAINER`` (``"docker:repo/image:tag"``, set by the image) wins; then Apptainer or
    Singularity (``$APPTAINER_NAME``/``$SINGULARITY_NAME``), then Docker's ``/.dockerenv`` (no tag
    known). ``environ`` and ``root`` default to this process's environment and ``/``.
    """
    env = os.environ if environ is None else environ
    spec = env.get("HSF_BIDS_CONTAINER", "").strip()
    if spec:
        kind, _, tag = spec.partition(":")
        return {"Type": kind, "Tag": tag} if tag else {"Type": kind}
    for var, kind in (("APPTAINER_NAME", "apptainer"), ("SINGULARITY_NAME", "singularity")):
        if env.get(var):
            return {"Type": kind, "Tag": env[var]}
    if (Path(root) / ".dockerenv").exists():
        return {"Type": "docker"}
    return None


def _dataset_link(source_dataset: str | PathLike[str]) -> str:
    text = os.fspath(source_dataset)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text) and not re.match(r"^[A-Za-z]:[\\/]", text):
        return text  # already a URI (https:, doi:, file:)
    return Path(text).absolute().as_uri()


def dataset_description(
    *,
    version: str,
    source_dataset: str | PathLike[str],
    container: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The derivatives' ``dataset_description.json`` content.

    ``source_dataset`` is the input BIDS folder (recorded as a ``file:`` URI) or a URI of it;
    sidecars refer to its files as ``bids:raw:...``. ``container`` is a ``{"Type", "Tag"}``
    mapping or None.
    """
    generated_by: dict[str, Any] = {"Name": PIPELINE_NAME, "Version": version, "CodeURL": CODE_URL}
    if container:
        generated_by["Container"] = dict(container)
    return {
        "Name": "Hippocampal subfield segmentations (hsf_bids)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": "bids:raw:"}],
        "DatasetLinks": {"raw": _dataset_link(source_dataset)},
    }


def write_dataset_description(
    output_dir: str | PathLike[str],
    *,
    version: str,
    source_dataset: str | PathLike[str],
    container: Mapping[str, str] | None = None,
) -> str | None:
    """Write ``<output_dir>/dataset_description.json``; return a warning message or None.

    ``container`` None means detect it (:func:`detect_container`); an empty mapping records none.
    Parallel runs of one version write identical bytes, so an atomic replace needs no lock. An
    existing description from another hsf_bids version is replaced and reported in the returned
    message (outputs of two versions now share the folder); one from another pipeline raises
    :class:`ForeignDerivativesError` rather than being overwritten.
    """
    path = Path(output_dir) / "dataset_description.json"
    if container is None:
        container = detect_container()
    content = dataset_description(
        version=version, source_dataset=source_dataset, container=container
    )
    message = None
    text = read_output_text(path)
    if text is not None:
        try:
            existing = json.loads(text)
            generators = existing.get("GeneratedBy") or [{}]
            name, old_version = generators[0].get("Name"), generators[0].get("Version")
            old_link = (existing.get("DatasetLinks") or {}).get("raw")
        except (OSError, ValueError, AttributeError, IndexError, TypeError) as exc:
            message = f"{path} was unreadable ({exc}); rewritten"
        else:
            if name != PIPELINE_NAME:
                raise ForeignDerivativesError(
                    f"{path} describes derivatives of {name or 'an unknown pipeline'!s}, not "
                    f"{PIPELINE_NAME}; choose another output folder "
                    f"(for example <bids_dir>/derivatives/{PIPELINE_NAME})"
                )
            if old_version != version:
                message = (
                    f"{path.parent} holds outputs of {PIPELINE_NAME} {old_version}; this is "
                    f"{version}: outputs of both versions now share the folder"
                )
            new_link = content["DatasetLinks"]["raw"]
            if old_link != new_link:
                message = (message + "; " if message else "") + (
                    f"{path.parent} held outputs derived from {old_link}; these are derived "
                    f"from {new_link}"
                )
        if message is None and text == _json_text(content):
            return None
    write_json(content, path)
    return message


def write_bidsignore(output_dir: str | PathLike[str], extra: Sequence[str] = ()) -> Path:
    """Write ``<output_dir>/.bidsignore`` listing :data:`BIDSIGNORE_PATTERNS` and ``extra``.

    Lines already there (a user's) are kept, ours appended after them. Without a lock this is still
    safe for parallel runs: every writer writes existing-lines-plus-ours, which is the same text
    whichever writer went first, so no writer can drop another's lines.
    """
    path = Path(output_dir) / ".bidsignore"
    ours = [*BIDSIGNORE_PATTERNS, *extra]
    text = read_output_text(path)
    existing = text.splitlines() if text is not None else []
    lines = existing + [p for p in ours if p not in existing]
    if lines != existing or text is None:
        write_text("\n".join(lines) + "\n", path)
    return path


# ---------------------------------------------------------------------------------------------
# Sidecars


def dseg_sidecar(
    *,
    sources: Sequence[str],
    provenance: Mapping[str, Any],
    spatial_reference: str | None = None,
    model_volumes: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """JSON sidecar of a bilateral ``desc-subfields_dseg``.

    ``sources`` are BIDS URIs of the input images (``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``),
    the first being the image whose grid the segmentation is on; ``spatial_reference`` defaults to
    it. ``provenance`` is a plain mapping (preset name and version, ca_mode, model files with
    their XXH3-64, engine, precision, device, seed, fusion, test-time augmentation, margins and
    boxes) stored as is under ``"Provenance"``. ``model_volumes``: each model's own volumes
    (:func:`hsf_bids.outputs.volumes.model_volumes`), stored under ``"EnsembleVolumes"``.
    """
    if not sources:
        raise ValueError("a derivative needs at least one source")
    sidecar = {
        "Description": (
            "Bilateral hippocampal subfield segmentation (Hippocampal Segmentation Factory models) "
            "on the grid of the source image. Left structures keep the model label, right ones "
            f"add 10; names and colours in {LUT_NAME}."
        ),
        "Sources": list(sources),
        "SpatialReference": spatial_reference or sources[0],
        "Provenance": dict(provenance),
    }
    if model_volumes is not None:
        sidecar["EnsembleVolumes"] = {
            "Description": (
                "Each model's own volumes (mm^3) per side and structure (HC: whole hippocampus): "
                "MeanVolume and SDVolume (n - 1 denominator; null for one prediction) over that "
                "model's NumPredictions predictions per side (the original image and its "
                "test-time augmented copies), each prediction's argmax voxels counted after "
                "mapping back and ca_mode merging. A model far from the others disagrees with "
                "the ensemble; the volumes table's spread columns pool every model."
            ),
            "Units": "mm^3",
            "Models": [dict(m) for m in model_volumes],
        }
    return sidecar


def uncertainty_sidecar(
    *,
    sources: Sequence[str],
    provenance: Mapping[str, Any] | None = None,
    spatial_reference: str | None = None,
) -> dict[str, Any]:
    """JSON sidecar of the uncertainty map (see :func:`dseg_sidecar` for the arguments)."""
    if not sources:
        raise ValueError("a derivative needs at least one source")
    sidecar: dict[str, Any] = {
        "Description": (
            "Voxel-wise entropy -sum_c p_c ln(p_c + 1e-5), clipped at 0, of the mean class "
            "probability over all predictions (models and augmentations); 0 outside the boxes."
        ),
        "Units": "nat",
        "Sources": list(sources),
        "SpatialReference": spatial_reference or sources[0],
    }
    if provenance is not None:
        sidecar["Provenance"] = dict(provenance)
    return sidecar


def write_segmentation(
    output_dir: str | PathLike[str],
    entities: Entities,
    labels: np.ndarray,
    uncertainty: np.ndarray,
    reference: nib.Nifti1Image,
    *,
    sources: Sequence[str],
    provenance: Mapping[str, Any],
    model_volumes: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the bilateral dseg and the uncertainty map of one image, with their sidecars.

    ``labels`` (bilateral indices, integers) and ``uncertainty`` are arrays on the grid of
    ``reference`` (the source image, in its own voxel order); ``model_volumes`` goes into the
    dseg sidecar (see :func:`dseg_sidecar`). Returns the written paths under
    the keys ``dseg``, ``dseg_json``, ``uncertainty``, ``uncertainty_json``.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise GridError(f"labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint8).max):
        raise GridError(f"labels outside [0, 255]: {labels.min()}..{labels.max()}")
    dseg = dseg_path(output_dir, entities)
    unc = uncertainty_path(output_dir, entities)
    # Sidecars first: an image under its final name then always has its sidecar.
    written = {
        "dseg_json": write_json(
            dseg_sidecar(sources=sources, provenance=provenance, model_volumes=model_volumes),
            sidecar_path(dseg),
        ),
        "uncertainty_json": write_json(
            uncertainty_sidecar(sources=sources, provenance=provenance), sidecar_path(unc)
        ),
    }
    written["dseg"] = write_nifti(image_on_grid(labels, reference, np.uint8, intent="label"), dseg)
    written["uncertainty"] = write_nifti(image_on_grid(uncertainty, reference, np.float32), unc)
    return written
