"""The reader API of the outputs: names found through outputs.derivatives, not globbed apart."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from hsf_bids.group.tables import failed_checks, read_volumes
from hsf_bids.outputs import read
from hsf_bids.outputs.derivatives import Entities, dseg_path, sidecar_path, volumes_path


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _outputs(root: Path) -> dict[str, Path]:
    """Two subjects, one with two sessions, written under the names derivatives gives."""
    made = {}
    for name in ("sub-01_T1w", "sub-02_ses-01_T1w", "sub-02_ses-02_T2w"):
        entities = Entities.from_filename(name)
        dseg = _touch(dseg_path(root, entities))
        checks = [{"name": "brain_correlation", "passed": True},
                  {"name": "sides", "passed": name != "sub-02_ses-02_T2w"}]  # fmt: skip
        sidecar = {"Provenance": {"Localisation": {"checks": checks}}}
        _touch(sidecar_path(dseg), json.dumps(sidecar))
        made[name] = dseg
        made[f"{name}_volumes"] = _touch(volumes_path(root, entities))
    _touch(root / "sub-03" / "log" / "x.txt")  # a subject folder without outputs
    return made


def test_reader_finds_every_output_by_subject_and_session(tmp_path: Path) -> None:
    made = _outputs(tmp_path)
    assert read.find_subjects(tmp_path) == ["01", "02", "03"]
    assert read.segmentations(tmp_path, "sub-02") == sorted(
        [made["sub-02_ses-01_T1w"], made["sub-02_ses-02_T2w"]]
    )
    assert read.segmentations(tmp_path, "03") == []
    assert read.uncertainty_of(made["sub-01_T1w"]).name == (
        "sub-01_space-T1w_desc-subfields_uncertainty.nii.gz"
    )
    assert len(read.dseg_sidecars(tmp_path)) == 3
    assert read.dseg_sidecars(tmp_path, ["01"]) == [sidecar_path(made["sub-01_T1w"])]
    assert len(read.volumes_tables(tmp_path)) == 3
    assert set(read.subject_volumes_tables(tmp_path, "02")) == {"01", "02"}
    assert read.subject_volumes_tables(tmp_path, "01") == {None: made["sub-01_T1w_volumes"]}
    assert read.has_volumes(tmp_path, "01") and not read.has_volumes(tmp_path, "03")
    assert read.source_name(made["sub-02_ses-01_T1w"]) == "sub-02_ses-01"
    assert read.sidecar_of_source(tmp_path, "sub-01_T1w") == sidecar_path(made["sub-01_T1w"])


def test_group_tables_read_the_failed_checks_from_the_sidecars(tmp_path: Path) -> None:
    _outputs(tmp_path)
    assert failed_checks(tmp_path, "sub-01_T1w") == ""
    assert failed_checks(tmp_path, "sub-02_ses-02_T2w") == "sides"
    assert failed_checks(tmp_path, "sub-09_T1w") is None  # no sidecar
    table = pd.DataFrame([{"participant_id": "sub-02", "session_id": "ses-02", "acq": "n/a",
                           "ce": "n/a", "rec": "n/a", "run": "n/a", "contrast": "T2w",
                           "source": "sub-02_ses-02_T2w", "side": "left", "structure": "HC",
                           "label": "n/a", "n_voxels": 2900, "volume_mm3": 2900.0,
                           "mean_uncertainty": 0.3, "icv_mm3": 1.2e6,
                           "localisation_ok": False}])  # fmt: skip
    path = volumes_path(tmp_path, Entities.from_filename("sub-02_ses-02_T2w"))
    table.to_csv(path, sep="\t", index=False)
    long = read_volumes([path], tmp_path).table
    assert long.loc[0, "localisation_failed"] == "sides"
