"""The participant level end to end, on the real heads of ds-mini with the demo models.

Runs the installed command in subprocesses, as users do: a full run with the demo hub (test-time
augmentation on), four runs in parallel into one output folder, and a run killed mid-way then
resumed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import finish, hsf_bids

from hsf_bids.bids import validate_dataset
from hsf_bids.hub import xxh3_64_file

pytestmark = pytest.mark.slow

IMAGES = {
    "sub-01/anat/sub-01": ("sub-01/anat/sub-01_T1w.nii.gz", "T1w"),
    "sub-02/anat/sub-02": ("sub-02/anat/sub-02_T2w.nii.gz", "T2w"),
    "sub-03/anat/sub-03": ("sub-03/anat/sub-03_T1w.nii.gz", "T1w"),
    "sub-04/ses-01/anat/sub-04_ses-01": ("sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz", "T1w"),
    "sub-04/ses-02/anat/sub-04_ses-02": ("sub-04/ses-02/anat/sub-04_ses-02_T1w.nii.gz", "T1w"),
}


@pytest.fixture(scope="session")
def full_run(ds_mini, demo_hub, templateflow_home, tmp_path_factory):
    """``hsf-bids ds-mini out participant --hub demo.yaml``: every subject and session."""
    root = tmp_path_factory.mktemp("full")
    proc = hsf_bids(ds_mini, root / "out", "participant", "--hub", demo_hub, "-w", root / "work")
    log = finish(proc)
    return root / "out", proc.returncode, log


def test_full_run_segments_every_subject_and_session(full_run):
    out, code, log = full_run
    assert code == 0, log
    for prefix, (_, contrast) in IMAGES.items():
        assert (out / f"{prefix}_space-{contrast}_desc-subfields_dseg.nii.gz").is_file()
        assert (out / f"{prefix}_space-{contrast}_desc-subfields_uncertainty.nii.gz").is_file()
        assert (out / f"{prefix}_desc-subfields_volumes.tsv").is_file()
    assert "finished sub-01, sub-02, sub-03, sub-04" in log


def test_full_run_passes_the_bids_validator(full_run):
    out, code, log = full_run
    assert code == 0, log
    errors, warnings = validate_dataset(out)
    assert errors == [], errors
    print("validator warnings:", warnings)


def test_outputs_are_on_the_exact_grid_of_each_input(full_run, ds_mini):
    out, code, log = full_run
    assert code == 0, log
    lut = pd.read_csv(out / "desc-subfields_dseg.tsv", sep="\t")
    for prefix, (source, contrast) in IMAGES.items():
        src = nib.load(ds_mini / source)
        for kind in ("dseg", "uncertainty"):
            img = nib.load(out / f"{prefix}_space-{contrast}_desc-subfields_{kind}.nii.gz")
            assert img.shape == src.shape[:3]
            assert np.array_equal(img.affine, src.affine)
            for form in ("qform", "sform"):
                assert img.header[f"{form}_code"] == src.header[f"{form}_code"]
                assert np.allclose(getattr(img, f"get_{form}")(), getattr(src, f"get_{form}")())
        dseg = nib.load(out / f"{prefix}_space-{contrast}_desc-subfields_dseg.nii.gz")
        assert dseg.get_data_dtype() == np.uint8
        labels = np.unique(np.asarray(dseg.dataobj))
        assert set(labels.tolist()) <= {0, *lut["index"].tolist()}


def test_volumes_tables_equal_the_segmentations(full_run, ds_mini):
    out, code, log = full_run
    assert code == 0, log
    for prefix, (source, contrast) in IMAGES.items():
        table = pd.read_csv(out / f"{prefix}_desc-subfields_volumes.tsv", sep="\t")
        dseg = nib.load(out / f"{prefix}_space-{contrast}_desc-subfields_dseg.nii.gz")
        unc = nib.load(out / f"{prefix}_space-{contrast}_desc-subfields_uncertainty.nii.gz")
        labels = np.asarray(dseg.dataobj)
        entropy = np.asarray(unc.dataobj)
        voxel = abs(np.linalg.det(nib.load(ds_mini / source).affine[:3, :3]))
        for row in table.itertuples():
            if row.structure == "HC":
                inside = (labels > 0) & ((labels > 10) == (row.side == "right"))
            else:
                inside = labels == row.label
            assert row.n_voxels == inside.sum()
            assert row.volume_mm3 == pytest.approx(inside.sum() * voxel, abs=1e-4)  # 4 decimals
            if inside.any():
                assert row.mean_uncertainty == pytest.approx(entropy[inside].mean(), abs=1e-6)
        assert table["icv_mm3"].between(0.6e6, 2.0e6).all()
        text = pd.read_csv(
            out / f"{prefix}_desc-subfields_volumes.tsv", sep="\t", dtype=str, keep_default_na=False
        )
        assert text["label"].str.fullmatch(r"\d+|n/a").all()  # integers, as in the dseg
        assert set(table["side"]) == {"left", "right"}
        assert table["localisation_ok"].all()


def test_sidecars_and_dataset_description(full_run, demo_hub):
    out, code, log = full_run
    assert code == 0, log
    hub = yaml.safe_load(demo_hub.read_text())
    sidecar = json.loads(
        (out / "sub-03/anat/sub-03_space-T1w_desc-subfields_dseg.json").read_text()
    )
    assert sidecar["Sources"] == [
        "bids:raw:sub-03/anat/sub-03_T1w.nii.gz",
        "bids:raw:sub-03/anat/sub-03_T2w.nii.gz",
    ]
    assert sidecar["SpatialReference"] == "bids:raw:sub-03/anat/sub-03_T1w.nii.gz"
    prov = sidecar["Provenance"]
    assert {m["File"]: m["XXH3_64"] for m in prov["Models"]} == {
        name: entry["xxh3_64"] for name, entry in hub["models"].items()
    }
    for model in prov["Models"]:
        assert xxh3_64_file(demo_hub.parent / model["File"]) == model["XXH3_64"]
    assert prov["Seed"] == 42 and prov["Fusion"] == "vote" and prov["CaMode"] == "1/2/3"
    assert prov["TestTimeAugmentation"] is True and prov["NumAugmentations"] == 20
    assert prov["Engine"]["Name"] in ("onnxruntime", "openvino")
    assert set(prov["Localisation"]["boxes"]) == {"left", "right"}
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "hsf_bids"
    assert description["SourceDatasets"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def test_parallel_participant_runs_share_one_output(parallel_run):
    out, codes, logs = parallel_run
    assert codes == [0, 0, 0, 0], "\n".join(logs)
    json.loads((out / "dataset_description.json").read_text())
    assert pd.read_csv(out / "desc-subfields_dseg.tsv", sep="\t")["index"].is_unique
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob("*.part*"))
    errors, _ = validate_dataset(out)
    assert errors == [], errors


def test_sub04_sessions_agree_and_match_the_reference(parallel_run, shared_dir):
    """ses-02 is ses-01's head re-gridded (rotated, 1.2 mm, LPS): volumes must agree."""
    out, codes, logs = parallel_run
    assert codes[3] == 0, logs[3]
    tables = {}
    for ses in ("01", "02"):
        prefix = out / f"sub-04/ses-{ses}/anat/sub-04_ses-{ses}"
        dseg = np.asarray(nib.load(f"{prefix}_space-T1w_desc-subfields_dseg.nii.gz").dataobj)
        ref = nib.load(shared_dir / f"data/reference/sub-04_ses-{ses}_desc-cobralab_dseg.nii.gz")
        ref = np.rint(np.asarray(ref.dataobj)).astype(int)
        for side, ours, theirs in (("left", range(1, 6), range(7, 12)),
                                   ("right", range(11, 16), range(88, 93))):  # fmt: skip
            dice = _dice(np.isin(dseg, list(ours)), np.isin(ref, list(theirs)))
            print(f"sub-04 ses-{ses} {side} whole-hippocampus Dice vs reference: {dice:.3f}")
            assert dice > 0.5
        tables[ses] = pd.read_csv(f"{prefix}_desc-subfields_volumes.tsv", sep="\t").set_index(
            ["side", "structure"]
        )["volume_mm3"]
    both = pd.DataFrame({"ses-01": tables["01"], "ses-02": tables["02"]})
    both["difference_pct"] = 100 * (both["ses-02"] - both["ses-01"]) / both["ses-01"]
    print(both.round(1).to_string())
    present = both[both["ses-01"] > 0]
    assert (present["difference_pct"].abs() < 10).all()
    assert (both.loc[both["ses-01"] == 0, "ses-02"] == 0).all()


def _results(work: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}


def test_killed_run_resumes_with_the_same_outputs(parallel_run, ds_mini, fast_hub, tmp_path):
    out, codes, logs = parallel_run
    assert codes[3] == 0, logs[3]
    args = (ds_mini, tmp_path / "out", "participant", "--participant-label", "04",
            "--session-label", "01", "--hub", fast_hub, "-w", tmp_path / "work",
            "--nprocs", "2", "--omp-nthreads", "1")  # fmt: skip
    # The MultiProc plugin here (parallel_run uses Linear), with the same one thread per model
    # as parallel_run: thread counts change float rounding, so they are kept.
    proc = hsf_bids(*args)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "work").rglob("result_segment_right.pklz")):
        assert proc.poll() is None, finish(proc)
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out/sub-04/ses-01/anat").exists() or not list(
        (tmp_path / "out/sub-04/ses-01/anat").glob("*_dseg.nii.gz")
    )

    resumed = hsf_bids(*args)
    log = finish(resumed)
    assert resumed.returncode == 0, log
    prefix = "sub-04/ses-01/anat/sub-04_ses-01"
    for name in ("space-T1w_desc-subfields_dseg.nii.gz",
                 "space-T1w_desc-subfields_uncertainty.nii.gz"):  # fmt: skip
        a = nib.load(tmp_path / "out" / f"{prefix}_{name}")
        b = nib.load(out / f"{prefix}_{name}")
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert (tmp_path / "out" / f"{prefix}_desc-subfields_volumes.tsv").read_text() == (
        out / f"{prefix}_desc-subfields_volumes.tsv"
    ).read_text()

    # A finished run again: every node comes from the cache.
    before = _results(tmp_path / "work")
    again = hsf_bids(*args)
    log = finish(again)
    assert again.returncode == 0, log
    assert _results(tmp_path / "work") == before


def test_a_failing_subject_leaves_a_crash_file_and_the_others_finish(
    ds_mini, fast_hub, templateflow_home, tmp_path
):
    """sub-01's image is readable but holds no head (a 12 mm cube of noise far from the
    origin): its localisation fails inside the workflow, sub-02 is still segmented."""
    import shutil

    bids = tmp_path / "bids"
    shutil.copytree(ds_mini, bids)
    cube = np.random.default_rng(0).uniform(0, 100, (12, 12, 12)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = 400.0
    nib.save(nib.Nifti1Image(cube, affine), bids / "sub-01/anat/sub-01_T1w.nii.gz")
    out = tmp_path / "out"
    proc = hsf_bids(bids, out, "participant", "--participant-label", "01", "02", "--hub",
                    fast_hub, "--skip-bids-validation", "-w", tmp_path / "work")  # fmt: skip
    log = finish(proc)
    assert proc.returncode == 1, log
    crashes = list((out / "sub-01" / "log").glob("*/crash-*.txt"))
    assert crashes, log
    assert "localise" in crashes[0].name
    assert "sub-01_T1w.nii.gz" in crashes[0].read_text()
    assert (
        "sub-01 failed: hsf_bids.localisation.LocalisationError: "
        f"{bids / 'sub-01/anat/sub-01_T1w.nii.gz'}: the warped right hippocampus lies entirely "
        "outside the image"
    ) in log
    assert f"details in {crashes[0]}" in log
    assert not list(out.glob("sub-01/anat/*"))
    assert (out / "sub-02/anat/sub-02_space-T2w_desc-subfields_dseg.nii.gz").is_file()
    assert not list((out / "sub-02" / "log").glob("*/crash-*.txt"))
    assert "finished sub-02" in log
    # The group level still runs, and lists the failure with its reason.
    grouped = hsf_bids(bids, out, "group")
    log = finish(grouped)
    assert grouped.returncode == 0, log
    failures = pd.read_csv(out / "group_failures.tsv", sep="\t").set_index("participant_id")
    # sub-03 and sub-04 were not run at all: missing, not failed
    assert failures["status"].to_dict() == {"sub-01": "failed", "sub-03": "missing",
                                            "sub-04": "missing"}  # fmt: skip
    assert "LocalisationError" in failures.loc["sub-01", "reason"]
    report = (out / "group_report.html").read_text()
    assert "sub-01" in report and "the warped right hippocampus lies entirely outside" in report
    assert len(pd.read_csv(out / "group_volumes_wide.tsv", sep="\t")) == 1
    # ... and the failed subject's own report shows what went wrong.
    subject_report = (out / "sub-01.html").read_text()
    assert "LocalisationError" in subject_report
    assert "the warped right hippocampus lies entirely outside" in subject_report
