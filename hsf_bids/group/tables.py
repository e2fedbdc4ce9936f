"""Group tables from what the participant level wrote (nothing is recomputed from images).

* :func:`read_volumes` gathers every ``*_desc-subfields_volumes.tsv`` into one long table, with
  the names of the localisation checks each image failed (from its sidecar);
* :func:`add_flags` adds the quality flags a statistician filters on;
* :func:`wide_table` makes one row per image with one column per side and structure;
* :func:`subject_status` lists each subject's latest participant run (ok, failed with the reason
  from its crash file, or missing);
* :func:`join_phenotypes` joins ``participants.tsv`` and ``sessions.tsv`` columns.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from hsf_bids.errors import EX_DATAERR, EX_NOINPUT, HsfBidsError
from hsf_bids.logs import crash_files, crash_reason, latest_run_dir
from hsf_bids.outputs.read import has_volumes, read_sidecar, sidecar_of_source, volumes_tables
from hsf_bids.outputs.volumes import MIN_PLAUSIBLE_HC_MM3, NONFINITE_INPUT, SPREAD_COLUMNS
from hsf_bids.vocabulary import SIDES, WHOLE_HIPPOCAMPUS

LOGGER = logging.getLogger(__name__)

# Iglewicz and Hoaglin's rule: |modified z| > 3.5 marks an outlier; below 5 values the median
# absolute deviation says too little to flag anyone.
ROBUST_Z_LIMIT = 3.5
MIN_GROUP_SIZE = 5
MAD_TO_SIGMA = 0.6745

# Identify one segmented image (one row of the wide table).
IMAGE_KEYS = ("participant_id", "session_id", "acq", "ce", "rec", "run", "contrast", "source")
_TEXT_COLUMNS = (*IMAGE_KEYS, "side", "structure")
STATUS_COLUMNS = ["participant_id", "status", "run_id", "reason", "crash_file"]
FLAG_COLUMNS = (
    "flag_localisation", "flag_uncertainty", "flag_volume", "flag_asymmetry", "flag_input",
    "flag_spread",
)  # fmt: skip
# The wide table's suffix for each spread column of the long one (left_HC_sd_mm3, ...).
WIDE_SPREAD = {"volume_sd_mm3": "sd", "volume_p05_mm3": "p05", "volume_p95_mm3": "p95"}


class GroupInputError(HsfBidsError, ValueError):
    """The output folder holds nothing the group level can use."""

    exit_code = EX_NOINPUT


class VolumesTableError(HsfBidsError, ValueError):
    """A participant volumes table that cannot be used; the message names it."""

    exit_code = EX_DATAERR


def volumes_files(output_dir: Path, participants: Sequence[str] = ()) -> list[Path]:
    """Every participant volumes table under ``output_dir`` (optionally of some subjects)."""
    return volumes_tables(output_dir, participants)


def failed_checks(output_dir: Path, source: str) -> str | None:
    """The names of the localisation checks the image ``source`` failed, ``"; "``-separated
    (empty when all passed), as its sidecar recorded them; None when the sidecar or its checks
    cannot be read."""
    try:
        sidecar = read_sidecar(sidecar_of_source(output_dir, source))
        checks = sidecar["Provenance"]["Localisation"]["checks"]
        return "; ".join(str(c["name"]) for c in checks if not c["passed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class InvalidTable(NamedTuple):
    """A participant volumes table the group level cannot use: its path (relative to the output
    folder), its subject, and what is wrong."""

    path: str
    participant_id: str
    problem: str


class VolumesRead(NamedTuple):
    """The usable participant tables as one long table (None when none is usable), and the
    others."""

    table: pd.DataFrame | None
    invalid: list[InvalidTable]


# What the group level needs of a participant table (a table of an older version may lack the
# columns added since, e.g. qc_flags).
REQUIRED_COLUMNS = (*_TEXT_COLUMNS, "label", "n_voxels", "volume_mm3", "mean_uncertainty",
                    "icv_mm3", "localisation_ok")  # fmt: skip
_NUMBERS = ("label", "n_voxels", "volume_mm3", "mean_uncertainty", "icv_mm3")
# Numbers that tables of older versions lack (the ensemble spread).
_OPTIONAL_NUMBERS = (*SPREAD_COLUMNS, "n_predictions")


def _numbers(frame: pd.DataFrame) -> list[str]:
    return [*_NUMBERS, *(c for c in _OPTIONAL_NUMBERS if c in frame.columns)]


_NOT_MISSING = ("source", "side", "structure", "n_voxels", "volume_mm3")
_BOOLEANS = {"True": True, "False": False, "true": True, "false": False}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_table(frame: pd.DataFrame, subject: str) -> str | None:
    """What makes a participant table unusable (None when nothing does); row numbers are the
    file's line numbers."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    if frame.empty:
        return "no rows"
    line = frame.index + 2  # after the header, numbered from 1

    def where(bad: pd.Series) -> str:
        lines = line[bad.to_numpy()].tolist()
        more = f" and {len(lines) - 3} more" if len(lines) > 3 else ""
        return f"line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:3]))}{more}"

    for column in _NOT_MISSING:
        empty = frame[column].isna()
        if empty.any():
            return f"column {column}: no value on {where(empty)}"
    for column in _numbers(frame):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            first = frame.loc[bad, column].iloc[0]
            return f"column {column}: {str(first)[:40]!r} on {where(bad)} is not a number"
        bad = ~np.isfinite(values.fillna(0)) | (values < 0)
        if bad.any():
            return f"column {column}: a negative or infinite value on {where(bad)}"
    bad = ~frame["side"].isin(SIDES)
    if bad.any():
        return f"column side: {str(frame.loc[bad, 'side'].iloc[0])[:40]!r} on {where(bad)}" \
            f" is not one of {', '.join(SIDES)}"  # fmt: skip
    bad = frame["participant_id"] != subject
    if bad.any():
        return f"participant_id {str(frame.loc[bad, 'participant_id'].iloc[0])[:40]!r} on " \
            f"{where(bad)} in a table of {subject}"  # fmt: skip
    ok = frame["localisation_ok"].astype("string")
    bad = ok.notna() & ~ok.isin(list(_BOOLEANS))
    if bad.any():
        return f"column localisation_ok: {str(ok[bad].iloc[0])[:40]!r} on {where(bad)} is not" \
            " True or False"  # fmt: skip
    repeated = frame.duplicated(["source", "side", "structure"], keep="first")
    if repeated.any():
        return f"the same image, side and structure again on {where(repeated)}"
    return None


def read_volumes_table(path: Path, output_dir: Path) -> pd.DataFrame:
    """One participant volumes table, checked (entity columns as text, ``n/a`` missing).

    Raises :class:`VolumesTableError` saying what is wrong (the message names the file)."""
    name = path.relative_to(output_dir).as_posix()
    subject = name.split("/", 1)[0]
    try:
        frame = pd.read_csv(
            path, sep="\t", keep_default_na=False, na_values=["n/a", ""], encoding="utf-8",
            dtype={c: "string" for c in _TEXT_COLUMNS},
        )  # fmt: skip
    except (OSError, ValueError) as exc:  # ParserError, EmptyDataError, UnicodeDecodeError
        message = f"{name}: cannot be read as a TSV table: {_first_line(exc)}"
        raise VolumesTableError(message) from exc
    problem = _check_table(frame, subject)
    if problem:
        raise VolumesTableError(f"{name}: {problem}")
    for column in _numbers(frame):
        frame[column] = pd.to_numeric(frame[column])
    frame["label"] = frame["label"].astype("Int64")
    frame["n_voxels"] = frame["n_voxels"].astype("int64")
    ok = frame["localisation_ok"].astype("string")
    frame["localisation_ok"] = ok.map(_BOOLEANS, na_action="ignore").astype("boolean")
    # Tables of versions before the column: no flags recorded.
    frame["qc_flags"] = frame.get("qc_flags", pd.Series(pd.NA, index=frame.index)).astype("string")
    return frame


def read_volumes(files: Sequence[Path], output_dir: Path) -> VolumesRead:
    """One long table of the rows of every usable volumes table, plus ``volumes_file`` (relative
    path) and ``localisation_failed``; a table that cannot be used is left out and listed with
    what is wrong, so that one bad table does not stop the group.

    Entity columns stay text (``run-01`` keeps its zero); ``n/a`` is missing.
    """
    if not files:
        raise GroupInputError(
            f"no participant results in {output_dir}: no *_desc-subfields_volumes.tsv found; "
            "run the participant level first"
        )
    frames, invalid = [], []
    for path in files:
        try:
            frame = read_volumes_table(path, output_dir)
        except VolumesTableError as exc:
            name = path.relative_to(output_dir).as_posix()
            problem = str(exc).removeprefix(f"{name}: ")
            invalid.append(InvalidTable(name, name.split("/", 1)[0], problem))
            continue
        frame["volumes_file"] = path.relative_to(output_dir).as_posix()
        failed = {s: failed_checks(output_dir, s) for s in frame["source"].dropna().unique()}
        frame["localisation_failed"] = frame["source"].map(failed).astype("string")
        frames.append(frame)
    if not frames:
        return VolumesRead(None, invalid)
    return VolumesRead(pd.concat(frames, ignore_index=True), invalid)


def robust_z(values: pd.Series) -> pd.Series:
    """Modified z-scores ``0.6745 (x - median) / MAD``; missing when the group is too small or
    has no spread."""
    x = values.astype(float)
    if x.notna().sum() < MIN_GROUP_SIZE:
        return pd.Series(np.nan, index=values.index)
    median = x.median()
    mad = (x - median).abs().median()
    if not mad > 0:
        return pd.Series(np.nan, index=values.index)
    return MAD_TO_SIGMA * (x - median) / mad


def _filled(table: pd.DataFrame) -> pd.DataFrame:
    """Missing entity values as "" so that pivots and merges keep those rows (pandas drops
    missing keys)."""
    return table.assign(**{k: table[k].astype("string").fillna("") for k in IMAGE_KEYS})


def _unfilled(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(**{k: table[k].replace("", pd.NA) for k in IMAGE_KEYS})


def add_flags(long: pd.DataFrame) -> pd.DataFrame:
    """Quality flags per row (True = look before use), computed within each contrast, side and
    structure (T2w volumes differ systematically from T1w ones):

    ``flag_localisation``: the image's ``localisation_ok`` is false; ``flag_uncertainty``: mean
    uncertainty far above the group (robust z > 3.5); ``flag_volume``: volume far from the group
    (|robust z| > 3.5), or a whole hippocampus under :data:`MIN_PLAUSIBLE_HC_MM3` (checked
    whatever the group size); ``flag_asymmetry``: left/right asymmetry index far from the group;
    ``flag_input``: the input image had NaN or infinite voxels (its ``qc_flags``);
    ``flag_spread``: a whole hippocampus whose relative ensemble spread (``volume_sd_mm3 /
    volume_mm3``) is far above the group's (robust z > 3.5): the models disagree on this image.
    Tables without the spread columns (older outputs) get no spread flag.
    """
    out = _filled(long)
    for column in (*SPREAD_COLUMNS, "n_predictions"):
        if column not in out.columns:
            out[column] = np.nan
    by = ["contrast", "side", "structure"]
    out["volume_z"] = out.groupby(by, dropna=False)["volume_mm3"].transform(robust_z)
    out["uncertainty_z"] = out.groupby(by, dropna=False)["mean_uncertainty"].transform(robust_z)
    sides = out.pivot_table(index=[*IMAGE_KEYS, "structure"], columns="side", values="volume_mm3")
    mean = (sides["left"] + sides["right"]) / 2
    index = ((sides["left"] - sides["right"]) / mean.where(mean > 0)).rename("asymmetry_index")
    out = out.merge(index.reset_index(), on=[*IMAGE_KEYS, "structure"], how="left")
    out["asymmetry_z"] = out.groupby(by, dropna=False)["asymmetry_index"].transform(robust_z)
    volume = out["volume_mm3"].astype(float)
    out["relative_spread"] = out["volume_sd_mm3"].astype(float) / volume.where(volume > 0)
    out["spread_z"] = out.groupby(by, dropna=False)["relative_spread"].transform(robust_z)
    out["flag_localisation"] = ~out["localisation_ok"].fillna(False).astype(bool)
    out["flag_uncertainty"] = out["uncertainty_z"] > ROBUST_Z_LIMIT
    implausible = (out["structure"] == "HC") & (out["volume_mm3"] < MIN_PLAUSIBLE_HC_MM3)
    out["flag_volume"] = (out["volume_z"].abs() > ROBUST_Z_LIMIT) | implausible
    out["flag_asymmetry"] = out["asymmetry_z"].abs() > ROBUST_Z_LIMIT
    qc_flags = out.get("qc_flags", pd.Series(pd.NA, index=out.index)).astype("string")
    out["flag_input"] = qc_flags.str.contains(NONFINITE_INPUT, regex=False).fillna(False)
    whole = out["structure"] == WHOLE_HIPPOCAMPUS
    out["flag_spread"] = whole & (out["spread_z"] > ROBUST_Z_LIMIT)
    for column in ("volume_z", "uncertainty_z", "asymmetry_index", "asymmetry_z",
                   "relative_spread", "spread_z"):  # fmt: skip
        out[column] = out[column].astype(float).round(4)
    return _unfilled(out)


def wide_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per image: ``<side>_<structure>_mm3`` for every side and structure (whole
    hippocampus ``HC`` included), each followed by its ensemble spread
    (``<side>_<structure>_sd_mm3``, ``_p05_mm3``, ``_p95_mm3``) when the long table has it,
    ``n_predictions``, ``icv_mm3``, ``localisation_ok``, ``qc_flags`` and the row's flags."""
    keys = list(IMAGE_KEYS)
    long = _filled(long)
    stats = {"volume_mm3": ""} | {c: f"_{s}" for c, s in WIDE_SPREAD.items() if c in long}
    # groupby-unstack, not pivot_table: a spread column that is n/a everywhere (one prediction)
    # stays; a repeated row is averaged, as pivot_table did.
    cells = long.astype({c: float for c in stats}).groupby([*keys, "side", "structure"], sort=False)
    volumes = cells[list(stats)].mean().unstack(["side", "structure"])
    pairs = list(dict.fromkeys(zip(long["side"], long["structure"], strict=True)))
    pairs.sort(key=lambda c: (c[0] != "left", c[1] == WHOLE_HIPPOCAMPUS))
    volumes = volumes[[(stat, side, structure) for side, structure in pairs for stat in stats]]
    volumes.columns = [
        f"{side}_{r_name(structure)}{stats[stat]}_mm3" for stat, side, structure in volumes.columns
    ]
    if "qc_flags" not in long.columns:
        long = long.assign(qc_flags=pd.Series(pd.NA, index=long.index, dtype="string"))
    aggregates = {
        "icv_mm3": ("icv_mm3", "first"), "localisation_ok": ("localisation_ok", "first"),
        "qc_flags": ("qc_flags", "first"),
    }  # fmt: skip
    if "n_predictions" in long:
        aggregates = {"n_predictions": ("n_predictions", "max"), **aggregates}
    per_image = long.groupby(keys, dropna=False, sort=False).agg(**aggregates)
    flagged = long[list(FLAG_COLUMNS)].any(axis=1)
    reasons = (
        long[flagged]
        .assign(flags=lambda d: d.apply(_row_flags, axis=1))
        .groupby(keys, dropna=False, sort=False)["flags"]
        .agg(lambda items: "; ".join(dict.fromkeys(i for item in items for i in item)))
    )
    wide = _unfilled(volumes.join(per_image).join(reasons).reset_index())
    wide["flags"] = wide["flags"].astype(object).fillna("")
    wide["n_flags"] = wide["flags"].map(lambda f: len(f.split("; ")) if f else 0)
    return wide.sort_values(keys, na_position="first", ignore_index=True)


def _row_flags(row: pd.Series) -> list[str]:
    where = f"{row['side']} {row['structure']}"
    found = []
    if row["flag_localisation"]:
        failed = row.get("localisation_failed")
        # The column is "; "-separated like the flags: within one flag, commas.
        named = f" ({failed.replace('; ', ', ')})" if isinstance(failed, str) and failed else ""
        found.append(f"localisation doubtful{named}")
    if row["flag_uncertainty"]:
        found.append(f"{where} high uncertainty")
    if row["flag_volume"]:
        small = row["structure"] == "HC" and row["volume_mm3"] < MIN_PLAUSIBLE_HC_MM3
        found.append(f"{where} volume {'implausibly small' if small else 'outlier'}")
    if row["flag_asymmetry"]:
        found.append(f"{row['structure']} asymmetry outlier")
    if row.get("flag_input", False):
        found.append("NaN or infinite input voxels")
    if row["flag_spread"]:
        found.append(f"{where} ensemble spread high")
    return found


def subject_status(
    output_dir: Path, bids_dir: Path, participants: Sequence[str] = ()
) -> pd.DataFrame:
    """Each subject of the input dataset (or of ``participants``): ``ok``, ``failed`` (its latest
    participant run left crash files; ``reason`` is the error) or ``missing`` (no output)."""
    wanted = [f"sub-{p.removeprefix('sub-')}" for p in participants] or sorted(
        p.name for p in bids_dir.glob("sub-*") if p.is_dir()
    )
    rows = []
    for subject in wanted:
        folder = output_dir / subject
        run = latest_run_dir(folder)
        crashes = crash_files(run) if run else []
        if crashes:
            status, reason = "failed", crash_reason(crashes[0])
        elif has_volumes(output_dir, subject):
            status, reason = "ok", None
        else:
            status, reason = "missing", "no participant output (not run, or still running)"
        rows.append({
            "participant_id": subject,
            "status": status,
            "run_id": run.name if run else None,
            "reason": reason,
            "crash_file": crashes[0].relative_to(output_dir).as_posix() if crashes else None,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


_R_INVALID = re.compile(r"[^A-Za-z0-9_.]")


def r_name(name: str) -> str:
    """A column name R's ``read.delim`` keeps as is (``make.names`` leaves it unchanged)."""
    clean = _R_INVALID.sub("_", str(name))
    if not clean or not (clean[0].isalpha() or (clean[0] == "." and not clean[1:2].isdigit())):
        clean = f"X{clean}"
    return clean


Phenotypes = list[tuple[str, pd.DataFrame, list[str], dict]]


def _read_phenotype(path: Path, on: list[str]) -> pd.DataFrame | None:
    """A participants or sessions table; None, with a warning naming it, when it cannot be read
    or has a key twice (its columns are then not joined: the volumes do not depend on them)."""
    try:
        frame = pd.read_csv(path, sep="\t", dtype="string", keep_default_na=False,
                            na_values=["n/a"], encoding="utf-8")  # fmt: skip
    except (OSError, ValueError) as exc:
        LOGGER.warning(
            "%s: cannot be read (%s); its columns are not joined", path, _first_line(exc)
        )
        return None
    keys = [c for c in on if c in frame.columns]
    if keys and frame.duplicated(keys).any():
        LOGGER.warning("%s: a %s is there twice; its columns are not joined", path, keys[-1])
        return None
    return frame


def read_phenotypes(bids_dir: Path) -> Phenotypes:
    """``participants.tsv`` (with the descriptions of ``participants.json``) and every
    ``sessions.tsv`` of the input, for :func:`join_phenotypes`; a file that cannot be read is
    left out with a warning."""
    sources: Phenotypes = []
    participants = bids_dir / "participants.tsv"
    frame = _read_phenotype(participants, ["participant_id"]) if participants.is_file() else None
    if frame is not None:
        sidecar = bids_dir / "participants.json"
        meta: object = {}
        if sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                LOGGER.warning("%s: cannot be read (%s); columns are described without it",
                               sidecar, _first_line(exc))  # fmt: skip
        sources.append(("participants", frame, ["participant_id"],
                        meta if isinstance(meta, dict) else {}))  # fmt: skip
    frames = []
    for path in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv")):
        frame = _read_phenotype(path, ["session_id"])
        if frame is not None:
            frame.insert(0, "participant_id", path.parent.name)
            frames.append(frame)
    if frames:
        sources.append(("sessions", pd.concat(frames, ignore_index=True),
                        ["participant_id", "session_id"], {}))  # fmt: skip
    return sources


def join_phenotypes(
    table: pd.DataFrame, bids_dir: Path, taken: Sequence[str], sources: Phenotypes | None = None
) -> tuple[pd.DataFrame, dict[str, dict[str, object]]]:
    """Join ``participants.tsv`` (on ``participant_id``) and each subject's ``sessions.tsv`` (on
    ``participant_id`` and ``session_id``). Their columns get R-valid names; one that collides with
    a column of ours is prefixed ``participants_``/``sessions_``. Returns the table and the joined
    columns' descriptions (from ``participants.json`` where it describes them). ``sources``: what
    :func:`read_phenotypes` read (read here when None)."""
    described: dict[str, dict[str, object]] = {}
    if sources is None:
        sources = read_phenotypes(bids_dir)
    out = table
    used = set(taken) | set(table.columns)
    for prefix, frame, on, meta in sources:
        if not set(on) <= set(frame.columns):
            continue
        renames = {}
        for column in frame.columns:
            if column in on:
                continue
            name = r_name(column)
            if name in used:
                name = f"{prefix}_{name}"
            renames[column] = name
            used.add(name)
            entry = dict(meta.get(column, {})) if isinstance(meta.get(column), dict) else {}
            entry.setdefault("Description", f"column {column!r} of the input's {prefix}.tsv")
            described[name] = entry
        out = out.merge(frame.rename(columns=renames), on=on, how="left")
    return out, described
