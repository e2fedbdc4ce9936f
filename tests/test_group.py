"""The group level: tables equal the participant tables, load in pandas and R, flags, report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hsf_bids.bids import validate_dataset
from hsf_bids.cli.run import main
from hsf_bids.group.tables import add_flags, robust_z, wide_table

SUBJECT_FILES = ("sub-01", "sub-02", "sub-03", "sub-04")


def group(capsys, bids: Path, out: Path) -> tuple[int, str]:
    code = main([str(bids), str(out), "group"])
    return code, capsys.readouterr().err


@pytest.fixture
def participant_output(parallel_run, tmp_path) -> Path:
    """A writable copy of the participant output of ds-mini (4 subjects, 5 images)."""
    out, codes, logs = parallel_run
    assert codes == [0, 0, 0, 0], "\n".join(logs)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy


@pytest.mark.slow
def test_group_tables_equal_the_participant_tables(capsys, ds_mini, participant_output):
    code, err = group(capsys, ds_mini, participant_output)
    assert code == 0, err
    wide = pd.read_csv(participant_output / "group_volumes_wide.tsv", sep="\t")
    long = pd.read_csv(participant_output / "group_volumes_long.tsv", sep="\t")
    assert len(wide) == 5
    assert sorted(zip(wide["participant_id"], wide["session_id"].fillna(""), strict=True)) == [
        ("sub-01", ""), ("sub-02", ""), ("sub-03", ""), ("sub-04", "ses-01"), ("sub-04", "ses-02")
    ]  # fmt: skip
    tables = sorted(participant_output.glob("sub-*/**/*_desc-subfields_volumes.tsv"))
    assert len(tables) == 5
    n_rows = 0
    for path in tables:
        subject = pd.read_csv(path, sep="\t")
        n_rows += len(subject)
        for row in subject.itertuples():
            same_image = (long["source"] == row.source) & (long["side"] == row.side)
            match = long[same_image & (long["structure"] == row.structure)]
            assert len(match) == 1
            assert match["volume_mm3"].item() == row.volume_mm3
            assert match["n_voxels"].item() == row.n_voxels
            wide_row = wide[wide["source"] == row.source]
            assert wide_row[f"{row.side}_{row.structure}_mm3"].item() == row.volume_mm3
            assert wide_row["icv_mm3"].item() == row.icv_mm3
    assert len(long) == n_rows
    # participants.tsv joined in; its 'source' column collides with ours and is prefixed
    assert wide.set_index("source").loc["sub-04_ses-01_T1w", "participants_source"] == "colin27"
    errors, _ = validate_dataset(participant_output)
    assert errors == [], errors
    report = (participant_output / "group_report.html").read_text()
    for subject in SUBJECT_FILES:
        assert f'href="{subject}.html"' in report
    # Self-contained: no script, no stylesheet or image to fetch, nothing off the machine.
    assert "<script" not in report and "<link" not in report and "<img" not in report
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", report)
    assert "default-src 'none'" in report
    assert report.count("<svg") == 6  # DG, CA1, CA2, CA3, SUB, HC
    assert report.count("<circle") == 6 * 2 * 5  # structures x sides x images


def _r_names(path: Path) -> list[str]:
    script = f'x <- read.delim("{path}"); cat(names(x), sep="\\n"); cat(nrow(x), "\\n")'
    proc = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=True)
    *names, rows = proc.stdout.split()
    return [*names, int(rows)]


@pytest.mark.slow
def test_tables_load_in_pandas_and_r(capsys, ds_mini, participant_output):
    code, err = group(capsys, ds_mini, participant_output)
    assert code == 0, err
    if shutil.which("Rscript") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Rscript is not installed (.ci/run installs r-base-core)")
        pytest.skip("Rscript is not installed")
    for name in ("group_volumes_wide.tsv", "group_volumes_long.tsv", "group_failures.tsv"):
        path = participant_output / name
        table = pd.read_csv(path, sep="\t")
        header = path.read_text().splitlines()[0].split("\t")
        assert list(table.columns) == header
        assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", c) for c in header)
        if name == "group_failures.tsv":
            continue  # empty here: R reads a header-only table with 0 rows too
        assert _r_names(path) == [*header, len(table)]


@pytest.mark.slow
def test_group_is_rerun_after_more_subjects(capsys, ds_mini, participant_output, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for item in participant_output.iterdir():
        if item.name not in ("sub-03", "sub-04"):
            (shutil.copytree if item.is_dir() else shutil.copy)(item, partial / item.name)
    code, err = group(capsys, ds_mini, partial)
    assert code == 0, err
    assert len(pd.read_csv(partial / "group_volumes_wide.tsv", sep="\t")) == 2
    missing = pd.read_csv(partial / "group_failures.tsv", sep="\t")
    assert missing.set_index("participant_id")["status"].to_dict() == {
        "sub-03": "missing", "sub-04": "missing"
    }  # fmt: skip
    for subject in ("sub-03", "sub-04"):
        shutil.copytree(participant_output / subject, partial / subject)
    code, err = group(capsys, ds_mini, partial)
    assert code == 0, err
    assert len(pd.read_csv(partial / "group_volumes_wide.tsv", sep="\t")) == 5
    assert len(pd.read_csv(partial / "group_failures.tsv", sep="\t")) == 0


def test_group_without_participant_results(capsys, ds_mini, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = group(capsys, ds_mini, tmp_path / "empty")
    assert code == 66
    assert (
        f"no participant results in {tmp_path / 'empty'}: no *_desc-subfields_volumes.tsv found;"
        " run the participant level first"
    ) in err
    code, err = group(capsys, ds_mini, tmp_path / "nothing")
    assert code == 66
    assert f"no participant results in {tmp_path / 'nothing'}: the folder does not exist" in err
    assert not (tmp_path / "nothing").exists()


def _long(volumes: dict[str, tuple[float, float]], ok: dict[str, bool] | None = None):
    """A long table of whole-hippocampus rows: image -> (left, right) volumes."""
    rows = []
    for image, (left, right) in volumes.items():
        for side, volume in (("left", left), ("right", right)):
            rows.append({
                "participant_id": image, "session_id": pd.NA, "acq": pd.NA, "ce": pd.NA,
                "rec": pd.NA, "run": pd.NA, "contrast": "T1w", "source": f"{image}_T1w",
                "side": side, "structure": "HC", "label": pd.NA, "n_voxels": int(volume),
                "volume_mm3": volume, "mean_uncertainty": 0.2, "icv_mm3": 1.4e6,
                "localisation_ok": (ok or {}).get(image, True), "volumes_file": "x",
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_flags_volume_asymmetry_localisation_and_failed_segmentations():
    volumes = {f"sub-{i:02d}": (3000.0 + 40 * i, 3050.0 + 35 * i) for i in range(1, 9)}
    volumes["sub-20"] = (6500.0, 6400.0)  # far larger than the group
    volumes["sub-21"] = (3300.0, 2900.0)  # usual sizes, unusual asymmetry
    volumes["sub-22"] = (300.0, 3100.0)  # left hippocampus missed
    long = add_flags(_long(volumes, ok={"sub-05": False}))
    flagged = {
        column: sorted(set(long.loc[long[column], "participant_id"]))
        for column in ("flag_volume", "flag_asymmetry", "flag_localisation")
    }
    assert flagged["flag_volume"] == ["sub-20", "sub-22"]
    assert "sub-21" in flagged["flag_asymmetry"] and "sub-01" not in flagged["flag_asymmetry"]
    assert flagged["flag_localisation"] == ["sub-05"]
    wide = wide_table(long).set_index("participant_id")
    assert wide.loc["sub-22", "flags"].startswith("left HC volume implausibly small")
    assert wide.loc["sub-01", "n_flags"] == 0
    assert wide.loc["sub-05", "flags"] == "localisation doubtful"


def test_robust_z_needs_five_values_and_spread():
    assert robust_z(pd.Series([1.0, 2.0, 3.0, 4.0])).isna().all()
    assert robust_z(pd.Series([5.0] * 6)).isna().all()
    z = robust_z(pd.Series([1.0, 2.0, 3.0, 4.0, 5.0, 100.0]))
    assert z.iloc[-1] > 3.5 and np.abs(z.iloc[:-1]).max() < 3.5


def test_the_localisation_flag_names_the_failed_checks():
    volumes = {f"sub-{i:02d}": (3000.0 + 40 * i, 3050.0 + 35 * i) for i in range(1, 7)}
    long = _long(volumes, ok={"sub-03": False})
    long["localisation_failed"] = long["participant_id"].map(
        lambda p: "right_correlation; sides" if p == "sub-03" else ""
    )
    wide = wide_table(add_flags(long)).set_index("participant_id")
    assert wide.loc["sub-03", "flags"] == "localisation doubtful (right_correlation, sides)"
    assert wide.loc["sub-03", "n_flags"] == 1
    assert wide.loc["sub-01", "flags"] == ""
