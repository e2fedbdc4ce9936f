"""Every guard of ``hsf-bids``: the exact message and the BIDS Apps exit code.

These stop before any segmentation, so they run the command in-process.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hsf_bids.cli.run import main


@pytest.fixture
def dataset(ds_mini: Path, tmp_path: Path) -> Path:
    """A writable copy of ds-mini."""
    copy = tmp_path / "bids"
    shutil.copytree(ds_mini, copy)
    return copy


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_unknown_analysis_level(capsys, ds_mini, tmp_path):
    code, err = run(capsys, ds_mini, tmp_path / "out", "subject")
    assert code == 17
    assert "unknown analysis level 'subject': use 'participant' or 'group'" in err


def test_usage_error_exits_64(capsys, ds_mini, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([str(ds_mini), str(tmp_path / "out"), "participant", "--fusion", "median"])
    assert stop.value.code == 64
    assert "invalid choice: 'median'" in capsys.readouterr().err


def test_output_dir_is_bids_dir(capsys, dataset):
    code, err = run(capsys, dataset, dataset, "participant")
    assert code == 64
    assert (
        f"the output folder is the input BIDS folder {dataset}; choose another one "
        f"(suggestion: {dataset / 'derivatives' / 'hsf_bids'})"
    ) in err


def test_output_dir_inside_bids_dir(capsys, dataset):
    code, err = run(capsys, dataset, dataset / "sub-01" / "out", "participant")
    assert code == 64
    assert (
        f"the output folder {dataset / 'sub-01' / 'out'} is inside the input BIDS folder "
        f"{dataset}, where it would be read as input; use {dataset / 'derivatives' / 'hsf_bids'}"
        " or a folder outside the dataset"
    ) in err
    assert not (dataset / "sub-01" / "out").exists()


def test_work_dir_inside_bids_dir(capsys, dataset, tmp_path):
    code, err = run(capsys, dataset, tmp_path / "out", "participant", "-w", dataset / "work")
    assert code == 64
    assert (
        f"the work folder {dataset / 'work'} is inside the input BIDS folder {dataset}; "
        "choose a folder outside the dataset (-w/--work-dir)"
    ) in err


@pytest.mark.parametrize("inside", [".", "work", "sub-01/work"])
def test_work_dir_inside_output_dir(capsys, ds_mini, tmp_path, inside):
    """Issue 15.9: a work folder inside the output folder made the derivatives fail the
    validator."""
    out = tmp_path / "out"
    work = (out / inside).resolve()
    code, err = run(capsys, ds_mini, out, "participant", "-w", work)
    assert code == 64
    assert (
        f"the work folder {work} is inside the output folder {out}, whose derivatives would "
        "then fail the BIDS validator; choose a folder outside it (-w/--work-dir)"
    ) in err
    assert not out.exists()


def test_default_work_dir_of_an_output_in_the_datasets_derivatives(dataset):
    from hsf_bids.cli.run import build_config

    out = dataset / "derivatives" / "hsf_bids"
    config = build_config([str(dataset), str(out), "participant"])
    assert config.work_dir == dataset.parent / "work" / "hsf_bids"


def test_missing_bids_dir(capsys, tmp_path):
    code, err = run(capsys, tmp_path / "nothing", tmp_path / "out", "participant")
    assert code == 66
    assert f"the BIDS folder {tmp_path / 'nothing'} does not exist" in err


def test_not_a_bids_dataset(capsys, tmp_path):
    (tmp_path / "raw").mkdir()
    code, err = run(capsys, tmp_path / "raw", tmp_path / "out", "participant")
    assert code == 66
    assert f"{tmp_path / 'raw' / 'dataset_description.json'} is missing" in err


def test_output_dir_cannot_be_created(capsys, ds_mini, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = run(capsys, ds_mini, blocker / "out", "participant")
    assert code == 73
    assert f"cannot create the output folder {blocker / 'out'}" in err


def test_unknown_participant(capsys, ds_mini, tmp_path, demo_hub):
    code, err = run(
        capsys, ds_mini, tmp_path / "out", "participant", "--participant-label", "01", "sub-99",
        "--hub", demo_hub, "--skip-bids-validation",
    )  # fmt: skip
    assert code == 18
    assert f"participant label(s) not found in {ds_mini}: 99 (present: 01, 02, 03, 04)" in err


def test_unknown_session(capsys, ds_mini, tmp_path, demo_hub):
    code, err = run(
        capsys, ds_mini, tmp_path / "out", "participant", "--participant-label", "04",
        "--session-label", "03", "--hub", demo_hub, "--skip-bids-validation",
    )  # fmt: skip
    assert code == 18
    assert "session label(s) not found for the selected participants" in err
    assert "03 (present: 01, 02)" in err


def test_subject_without_anatomical_image(capsys, dataset, tmp_path, demo_hub):
    anat = dataset / "sub-05" / "anat"
    anat.mkdir(parents=True)
    shutil.copy(dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz", anat / "sub-05_FLAIR.nii.gz")
    (dataset / "participants.tsv").write_text(
        (dataset / "participants.tsv").read_text() + "sub-05\tcopy\n"
    )
    code, err = run(
        capsys, dataset, tmp_path / "out", "participant", "--participant-label", "05",
        "--hub", demo_hub,
    )  # fmt: skip
    assert code == 18
    assert f"nothing to segment: sub-05: no T1w or T2w image found in {dataset / 'sub-05'}" in err


def test_contrast_filter_selects_nothing(capsys, ds_mini, tmp_path, demo_hub):
    code, err = run(
        capsys, ds_mini, tmp_path / "out", "participant", "--participant-label", "02",
        "--contrast", "T1w", "--hub", demo_hub, "--skip-bids-validation",
    )  # fmt: skip
    assert code == 18
    assert f"sub-02: no T1w image found in {ds_mini / 'sub-02'}" in err


def test_bids_filter_file_errors(capsys, ds_mini, tmp_path):
    bad = tmp_path / "filter.json"
    bad.write_text("{not json")
    code, err = run(capsys, ds_mini, tmp_path / "out", "participant", "--bids-filter-file", bad)
    assert code == 64
    assert f"the BIDS filter file {bad} is not valid JSON" in err
    bad.write_text('{"bold": {"task": "rest"}}')
    code, err = run(capsys, ds_mini, tmp_path / "out", "participant", "--bids-filter-file", bad)
    assert code == 64
    assert f"the BIDS filter file {bad} has unknown queries ['bold']" in err


def test_invalid_bids_dataset(capsys, dataset, tmp_path, demo_hub):
    (dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz").rename(
        dataset / "sub-01" / "anat" / "sub-01_mprage.nii.gz"
    )
    code, err = run(capsys, dataset, tmp_path / "out", "participant", "--hub", demo_hub)
    assert code == 16
    assert f"the input dataset {dataset} is not valid BIDS" in err
    assert "sub-01_mprage.nii.gz" in err
    assert "--skip-bids-validation" in err


def _only(dataset: Path, subject: str) -> list[str]:
    return ["--participant-label", subject, "--skip-bids-validation"]


def test_truncated_nifti(capsys, dataset, tmp_path, demo_hub):
    path = dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, err = run(capsys, dataset, out, "participant", "--hub", demo_hub, *_only(dataset, "01"))
    assert code == 65
    assert f"{path}: the voxel data cannot be read" in err
    assert "sub-01_T1w is not segmented" in err
    assert not list(out.glob("sub-01/anat/*"))


def test_unreadable_nifti(capsys, dataset, tmp_path, demo_hub):
    path = dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    code, err = run(
        capsys, dataset, tmp_path / "out", "participant", "--hub", demo_hub, *_only(dataset, "01")
    )
    assert code == 65
    assert f"{path}: cannot be read as a NIfTI image" in err


def test_4d_image(capsys, dataset, tmp_path, demo_hub):
    path = dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine, img.header), path)
    code, err = run(
        capsys, dataset, tmp_path / "out", "participant", "--hub", demo_hub, *_only(dataset, "01")
    )
    assert code == 65
    assert (
        f"{path}: expected a 3D image (or 4D with one volume), got shape "
        f"({', '.join(str(s) for s in data.shape)}, 2)"
    ) in err


def test_offline_without_models(capsys, ds_mini, tmp_path):
    code, err = run(
        capsys, ds_mini, tmp_path / "out", "participant", "--preset", "single_fast",
        "--models-dir", tmp_path / "models", "--offline", *_only(ds_mini, "01"),
    )  # fmt: skip
    assert code == 66
    assert "arunet_single.onnx" in err
    assert "hsf-bids-models fetch --preset single_fast" in err


def test_preset_and_hub_are_exclusive(capsys, ds_mini, tmp_path, demo_hub):
    code, err = run(
        capsys, ds_mini, tmp_path / "out", "participant", "--preset", "single_fast",
        "--hub", demo_hub,
    )  # fmt: skip
    assert code == 64
    assert "--preset and --hub are exclusive" in err


def test_templates_missing_offline(capsys, ds_mini, tmp_path, demo_hub, monkeypatch):
    """An empty TemplateFlow home and no network: one clear error before any work."""
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    code, err = run(
        capsys, ds_mini, tmp_path / "out", "participant", "--hub", demo_hub, *_only(ds_mini, "01")
    )
    assert code == 66
    assert (
        f"{tmp_path / 'tf' / 'tpl-MNI152NLin2009cSym'}/tpl-MNI152NLin2009cSym_res-1_T1w.nii.gz: "
        "template file missing and TemplateFlow could not fetch it"
    ) in err
    assert "set TEMPLATEFLOW_HOME to a folder holding it" in err
    assert not (tmp_path / "out" / "sub-01" / "anat").exists()
