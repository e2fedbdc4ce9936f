"""The group level: statistics-ready tables and a group report from the participant outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from hsf_bids import errors as ex
from hsf_bids.config import RunConfig
from hsf_bids.group.publish import replaced_together
from hsf_bids.group.report import render_group_report
from hsf_bids.group.tables import (
    IMAGE_KEYS,
    STATUS_COLUMNS,
    GroupInputError,
    InvalidTable,
    VolumesRead,
    add_flags,
    join_phenotypes,
    read_phenotypes,
    read_volumes,
    subject_status,
    volumes_files,
    wide_table,
)
from hsf_bids.outputs.derivatives import (
    DerivativesError,
    write_bidsignore,
    write_json,
    write_text,
    write_tsv,
)
from hsf_bids.outputs.volumes import volumes_sidecar

LONG_TSV = "group_volumes_long.tsv"
WIDE_TSV = "group_volumes_wide.tsv"
FAILURES_TSV = "group_failures.tsv"
REPORT_HTML = "group_report.html"
# Replaced together (group/publish.py): a set from one run, never a mix.
GROUP_OUTPUTS = tuple(
    name
    for table in (LONG_TSV, WIDE_TSV, FAILURES_TSV)
    for name in (table, table.replace(".tsv", ".json"))
) + (REPORT_HTML,)

_FLAG_DESCRIPTIONS = {
    "volumes_file": {"Description": "The participant volumes table this row comes from"},
    "volume_z": {
        "Description": "Robust z-score (0.6745 (x - median) / MAD) of volume_mm3 within the "
        "group's images of the same contrast, side and structure; n/a under 5 images or no spread"
    },
    "uncertainty_z": {"Description": "Robust z-score of mean_uncertainty, as volume_z"},
    "asymmetry_index": {
        "Description": "(left - right) / mean(left, right) volume of this structure in this image"
    },
    "asymmetry_z": {"Description": "Robust z-score of asymmetry_index, as volume_z"},
    "localisation_failed": {
        "Description": "Names of the localisation QC checks the image failed ('; '-separated, "
        "empty if none), from its segmentation's sidecar (Provenance.Localisation.checks)"
    },
    "flag_localisation": {"Description": "True when localisation_ok is false"},
    "flag_uncertainty": {"Description": "True when uncertainty_z > 3.5"},
    "flag_volume": {
        "Description": "True when |volume_z| > 3.5, or a whole hippocampus (HC) is under "
        "1000 mm^3 (a failed segmentation)"
    },
    "flag_asymmetry": {"Description": "True when |asymmetry_z| > 3.5"},
    "flag_input": {
        "Description": "True when the input image had NaN or infinite voxels, segmented as "
        "background (qc_flags holds nonfinite_input)"
    },
    "relative_spread": {
        "Description": "volume_sd_mm3 / volume_mm3: the ensemble's disagreement on this "
        "structure's volume relative to its size; n/a with a single prediction or no volume"
    },
    "spread_z": {"Description": "Robust z-score of relative_spread, as volume_z"},
    "flag_spread": {
        "Description": "True for a whole hippocampus (HC) whose spread_z > 3.5: the ensemble's "
        "models and augmented copies disagree on this image far more than on the group's "
        "(an unusual or degraded image); weigh it down or exclude it"
    },
}

# Wide spread column suffix -> (what it is, its column in the participant table).
_WIDE_SPREAD_WORDS = {
    "sd": ("Ensemble standard deviation of the volume", "volume_sd_mm3"),
    "p05": ("Ensemble 5th percentile of the volume", "volume_p05_mm3"),
    "p95": ("Ensemble 95th percentile of the volume", "volume_p95_mm3"),
}

LOGGER = logging.getLogger(__name__)


def _wide_dictionary(wide: pd.DataFrame, known: dict) -> dict[str, dict[str, object]]:
    described = {}
    for column in wide.columns:
        if column in known:
            described[column] = known[column]
        elif column.endswith("_mm3"):
            side, structure, *stat = column.removesuffix("_mm3").split("_")
            what = "whole hippocampus" if structure == "HC" else structure
            quantity, source = _WIDE_SPREAD_WORDS[stat[0]] if stat else ("Volume", "volume_mm3")
            described[column] = {
                "Description": f"{quantity} of the {side} {what} ({source} of the participant "
                "table)",
                "Units": "mm^3",
            }
    described["flags"] = {"Description": "The image's quality flags, '; '-separated; empty if none"}
    described["n_flags"] = {"Description": "Number of quality flags of the image"}
    return described


def _failures_dictionary(known: dict) -> dict[str, dict[str, object]]:
    return {
        "participant_id": known["participant_id"],
        "status": {
            "Description": "Outcome of the subject's latest participant run, or of reading one "
            "of its volumes tables",
            "Levels": {
                "failed": "a step crashed (see reason)",
                "missing": "no output yet",
                "invalid": "a volumes table that cannot be used, left out of the group tables "
                "(reason: the file and what is wrong)",
            },
        },
        "run_id": {"Description": "The latest run's log folder under sub-<label>/log/"},
        "reason": {"Description": "The error that ended the run (last line of its crash file)"},
        "crash_file": {"Description": "The crash file, relative to the output folder"},
    }


def _failures(status: pd.DataFrame, invalid: list[InvalidTable]) -> pd.DataFrame:
    """The failed and missing subjects, then every volumes table that cannot be used."""
    rows = [
        {
            "participant_id": t.participant_id,
            "status": "invalid",
            "reason": f"{t.path}: {t.problem}",
        }
        for t in invalid
    ]
    failed = status[status["status"] != "ok"]
    if not rows:
        return failed
    return pd.concat([failed, pd.DataFrame(rows, columns=STATUS_COLUMNS)], ignore_index=True)


def _write_group(config: RunConfig, read: VolumesRead, folder: Path) -> pd.DataFrame | None:
    """Write every group output into ``folder``; returns the wide table (None when no
    participant table could be used: then only the failures are written)."""
    out = config.output_dir
    status = subject_status(out, config.bids_dir, config.participant_labels)
    failures = _failures(status, read.invalid)
    known = {**volumes_sidecar(), **_FLAG_DESCRIPTIONS}
    outputs = [(FAILURES_TSV, failures, _failures_dictionary(known))]
    wide = None
    if read.table is not None:
        long = add_flags(read.table)
        wide = wide_table(long)
        phenotypes = read_phenotypes(config.bids_dir)
        long_out, long_extra = join_phenotypes(long, config.bids_dir, IMAGE_KEYS, phenotypes)
        wide_out, wide_extra = join_phenotypes(wide, config.bids_dir, IMAGE_KEYS, phenotypes)
        long_dictionary = {c: {**known, **long_extra}[c] for c in long_out.columns}
        wide_dictionary = {**_wide_dictionary(wide, known), **wide_extra}
        outputs += [(LONG_TSV, long_out, long_dictionary), (WIDE_TSV, wide_out, wide_dictionary)]
        write_text(render_group_report(long, wide, failures, out), folder / REPORT_HTML)
    for name, table, dictionary in outputs:
        write_json(dictionary, folder / name.replace(".tsv", ".json"))
        write_tsv(table, folder / name)
    return wide


def run_group(config: RunConfig) -> int:
    """Write the group tables and report, replacing the previous ones together; returns the
    BIDS Apps exit code: 0, or 65 when a participant volumes table could not be used (it is
    named in group_failures.tsv, the others are in the tables), 66 without participant results,
    73 when the outputs cannot be written (the previous ones are then gone too)."""
    out = config.output_dir
    files = volumes_files(out, config.participant_labels)
    if not files:
        exc = GroupInputError(
            f"no participant results in {out}: no *_desc-subfields_volumes.tsv found; "
            "run the participant level first"
        )
        LOGGER.error("%s", exc)
        return ex.exit_code(exc)
    try:
        with replaced_together(out, GROUP_OUTPUTS) as folder:
            read = read_volumes(files, out)
            wide = _write_group(config, read, folder)
        write_bidsignore(out)
    except (OSError, DerivativesError) as exc:
        # The reason only: the file that failed was in the staging folder, now removed.
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        LOGGER.error(
            "cannot write the group outputs in %s: %s; no group output is left there (the "
            "previous ones were removed, as they would no longer be current)",
            out, getattr(cause, "strerror", None) or cause,
        )  # fmt: skip
        return ex.EX_CANTCREAT

    for table in read.invalid:
        LOGGER.error(
            "%s: %s; left out of the group tables (see %s)", out / table.path, table.problem,
            FAILURES_TSV,
        )  # fmt: skip
    failures = pd.read_csv(out / FAILURES_TSV, sep="\t", keep_default_na=False, dtype=str)
    for row in failures[failures["status"] != "invalid"].itertuples():
        LOGGER.warning("%s %s: %s", row.participant_id, row.status, row.reason)
    if wide is None:
        LOGGER.error(
            "none of the %d participant volumes table(s) can be used: no group table written; "
            "see %s", len(files), out / FAILURES_TSV,
        )  # fmt: skip
        return ex.EX_DATAERR
    n_flagged = int((wide["n_flags"] > 0).sum())
    LOGGER.info(
        "group tables of %d image(s) in %s and %s; %d flagged; report %s",
        len(wide),
        out / WIDE_TSV,
        out / LONG_TSV,
        n_flagged,
        out / REPORT_HTML,
    )
    return ex.EX_DATAERR if read.invalid else ex.EX_OK
