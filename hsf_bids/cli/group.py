"""The group level: statistics-ready tables and a group report from the participant outputs."""

from __future__ import annotations

import logging

import pandas as pd

from hsf_bids import errors as ex
from hsf_bids.config import RunConfig
from hsf_bids.group.report import render_group_report
from hsf_bids.group.tables import (
    IMAGE_KEYS,
    GroupInputError,
    add_flags,
    join_phenotypes,
    read_volumes,
    subject_status,
    volumes_files,
    wide_table,
)
from hsf_bids.outputs.derivatives import write_bidsignore, write_json, write_text, write_tsv
from hsf_bids.outputs.volumes import volumes_sidecar

LONG_TSV = "group_volumes_long.tsv"
WIDE_TSV = "group_volumes_wide.tsv"
FAILURES_TSV = "group_failures.tsv"
REPORT_HTML = "group_report.html"

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


def run_group(config: RunConfig) -> int:
    """Write the group tables and report; returns the BIDS Apps exit code."""
    out = config.output_dir
    try:
        long = read_volumes(volumes_files(out, config.participant_labels), out)
    except GroupInputError as exc:
        LOGGER.error("%s", exc)
        return ex.exit_code(exc)
    long = add_flags(long)
    wide = wide_table(long)
    status = subject_status(out, config.bids_dir, config.participant_labels)

    known = {**volumes_sidecar(), **_FLAG_DESCRIPTIONS}
    long_out, long_extra = join_phenotypes(long, config.bids_dir, IMAGE_KEYS)
    wide_out, wide_extra = join_phenotypes(wide, config.bids_dir, IMAGE_KEYS)
    long_dictionary = {c: {**known, **long_extra}[c] for c in long_out.columns}
    wide_dictionary = {**_wide_dictionary(wide, known), **wide_extra}
    failures = status[status["status"] != "ok"]
    failures_dictionary = {
        "participant_id": known["participant_id"],
        "status": {
            "Description": "Outcome of the subject's latest participant run",
            "Levels": {"failed": "a step crashed (see reason)", "missing": "no output yet"},
        },
        "run_id": {"Description": "The latest run's log folder under sub-<label>/log/"},
        "reason": {"Description": "The error that ended the run (last line of its crash file)"},
        "crash_file": {"Description": "The crash file, relative to the output folder"},
    }
    for name, table, dictionary in (
        (LONG_TSV, long_out, long_dictionary),
        (WIDE_TSV, wide_out, wide_dictionary),
        (FAILURES_TSV, failures, failures_dictionary),
    ):
        write_json(dictionary, out / name.replace(".tsv", ".json"))
        write_tsv(table, out / name)
    write_text(render_group_report(long, wide, status, out), out / REPORT_HTML)
    write_bidsignore(out)

    n_flagged = int((wide["n_flags"] > 0).sum())
    LOGGER.info(
        "group tables of %d image(s) in %s and %s; %d flagged; report %s",
        len(wide),
        out / WIDE_TSV,
        out / LONG_TSV,
        n_flagged,
        out / REPORT_HTML,
    )
    for row in failures.itertuples():
        LOGGER.warning("%s %s: %s", row.participant_id, row.status, row.reason)
    return ex.EX_OK
