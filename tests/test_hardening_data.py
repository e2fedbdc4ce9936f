"""Issue 15, the data side: NaN voxels, implausibly small segmentations, a qform without voxel
size, and a group level that survives bad participant tables, failures and kills.

One participant run (module fixture, about 20 s) segments two heads made from ds-mini: one with
NaN voxels, one with 10 mm thick slices (its hippocampi come out under 1,000 mm3); the group
tests run on copies of its output.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import finish, hsf_bids

from hsf_bids.cli.run import main
from hsf_bids.image import InvalidImageError, load_anat

GROUP_FILES = (
    "group_volumes_long.tsv", "group_volumes_long.json", "group_volumes_wide.tsv",
    "group_volumes_wide.json", "group_failures.tsv", "group_failures.json", "group_report.html",
)  # fmt: skip
NAN_SLICES = 10  # top axial slices of sub-01 set to NaN


def _dataset(ds_mini: Path, root: Path) -> Path:
    """sub-01: ds-mini's sub-01 T1w (float) with NaN top slices; sub-02: sub-04 ses-01's 1 mm
    T1w keeping every 10th coronal slice (1 x 10 x 1 mm voxels)."""
    bids = root / "bids"
    bids.mkdir()
    shutil.copy(ds_mini / "dataset_description.json", bids)
    (bids / "participants.tsv").write_text("participant_id\tgroup\nsub-01\ta\nsub-02\tb\n")
    img = nib.load(ds_mini / "sub-01/anat/sub-01_T1w.nii.gz")
    data = np.asarray(img.dataobj).astype(np.float32)
    data[:, :, -NAN_SLICES:] = np.nan
    nan_img = nib.Nifti1Image(data, img.affine, img.header)
    nan_img.set_data_dtype(np.float32)
    (bids / "sub-01/anat").mkdir(parents=True)
    nib.save(nan_img, bids / "sub-01/anat/sub-01_T1w.nii.gz")
    img = nib.load(ds_mini / "sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz")
    affine = img.affine.copy()
    affine[:3, 1] *= 10
    thick = nib.Nifti1Image(np.asarray(img.dataobj)[:, ::10, :].copy(), affine)
    (bids / "sub-02/anat").mkdir(parents=True)
    nib.save(thick, bids / "sub-02/anat/sub-02_T1w.nii.gz")
    return bids


@pytest.fixture(scope="module")
def flagged_run(ds_mini, fast_hub, templateflow_home, tmp_path_factory):
    """The participant run of both heads: (bids, output, exit code, console)."""
    root = tmp_path_factory.mktemp("flagged")
    bids = _dataset(ds_mini, root)
    proc = hsf_bids(
        bids, root / "out", "participant", "--hub", fast_hub, "-w", root / "work",
        "--engine", "onnxruntime", "--nprocs", "1", "--skip-bids-validation",
    )  # fmt: skip
    log = finish(proc)
    return bids, root / "out", proc.returncode, log


def _volumes(out: Path, subject: str) -> pd.DataFrame:
    path = out / f"sub-{subject}/anat/sub-{subject}_desc-subfields_volumes.tsv"
    return pd.read_csv(path, sep="\t", keep_default_na=False)


@pytest.mark.slow
def test_nan_voxels_are_warned_flagged_and_reported(flagged_run):
    bids, out, code, log = flagged_run
    assert code == 0, log
    image = bids / "sub-01/anat/sub-01_T1w.nii.gz"
    count = 137 * 137 * NAN_SLICES
    assert (
        f"hsf-bids: warning: {image}: {count} voxel(s) are NaN or infinite: segmented as "
        "background, which can change the volumes; the results are flagged (qc_flags "
        "nonfinite_input)"
    ) in log
    table = _volumes(out, "01")
    assert set(table["qc_flags"]) == {"nonfinite_input"}
    assert table.columns[-1] == "qc_flags"
    dictionary = json.loads((out / "sub-01/anat/sub-01_desc-subfields_volumes.json").read_text())
    assert "nonfinite_input" in dictionary["qc_flags"]["Levels"]
    sidecar = json.loads(
        (out / "sub-01/anat/sub-01_space-T1w_desc-subfields_dseg.json").read_text()
    )
    assert sidecar["Provenance"]["QC"] == {
        "nonfinite_voxels": count,
        "qc_flags": ["nonfinite_input"],
    }
    assert (
        f"{count} voxels of the input were NaN or infinite and were segmented as background"
    ) in (out / "sub-01.html").read_text()
    assert f"sub-01_T1w flagged: {count} NaN or infinite input voxels treated as background" in log


@pytest.mark.slow
def test_implausibly_small_segmentation_is_warned_and_summarised(flagged_run):
    _, out, code, log = flagged_run
    assert code == 0, log  # flagged but completed: the outputs are written and say so
    table = _volumes(out, "02")
    hc = table[table["structure"] == "HC"].set_index("side")["volume_mm3"]
    assert (hc < 1000).all(), hc
    flags = table["qc_flags"].iloc[0]
    assert set(table["qc_flags"]) == {flags}
    assert set(flags.split("; ")) <= {"left_HC_small", "right_HC_small", "left_HC_empty",
                                      "right_HC_empty"}  # fmt: skip
    assert len(flags.split("; ")) == 2
    lines = log.splitlines()
    warning = next(line for line in lines if line.startswith("hsf-bids: warning: sub-02_T1w "))
    assert "left hippocampus" in warning and "right hippocampus" in warning
    assert warning.endswith("check it (sub-02.html)")
    summary = "hsf-bids: warning: 2 images flagged: sub-01_T1w, sub-02_T1w"
    assert summary in lines
    assert lines.index(summary) > lines.index(warning)
    assert "no left hippocampus was segmented" in (out / "sub-02.html").read_text() or (
        "the left hippocampus measures" in (out / "sub-02.html").read_text()
    )


def group(capsys, bids: Path, out: Path) -> tuple[int, str]:
    code = main([str(bids), str(out), "group"])
    return code, capsys.readouterr().err


@pytest.fixture
def output(flagged_run, tmp_path) -> tuple[Path, Path]:
    """A writable copy of the run's output, and its input dataset."""
    bids, out, code, log = flagged_run
    assert code == 0, log
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return bids, copy


@pytest.mark.slow
def test_group_flags_the_nan_input(capsys, output):
    bids, out = output
    code, err = group(capsys, bids, out)
    assert code == 0, err
    wide = pd.read_csv(out / "group_volumes_wide.tsv", sep="\t").set_index("participant_id")
    assert "NaN or infinite input voxels" in wide.loc["sub-01", "flags"]
    assert "NaN" not in wide.loc["sub-02", "flags"]
    assert "implausibly small" in wide.loc["sub-02", "flags"]
    assert wide.loc["sub-01", "qc_flags"] == "nonfinite_input"
    long = pd.read_csv(out / "group_volumes_long.tsv", sep="\t")
    assert long.groupby("participant_id")["flag_input"].all().to_dict() == {
        "sub-01": True, "sub-02": False
    }  # fmt: skip
    dictionary = json.loads((out / "group_volumes_long.json").read_text())
    assert "flag_input" in dictionary and "qc_flags" in dictionary
    assert "NaN or infinite input voxels" in (out / "group_report.html").read_text()


def _tsv(out: Path, subject: str) -> Path:
    return out / f"sub-{subject}/anat/sub-{subject}_desc-subfields_volumes.tsv"


def _corrupt(kind: str, path: Path) -> str:
    """Spoil a participant table as a user or a broken disk might; returns the expected
    problem."""
    lines = path.read_text().splitlines()
    if kind == "binary":
        path.write_bytes(b"\x1f\x8b\x08\x00garbage\xff\xfe\n")
        return "cannot be read as a TSV table: 'utf-8' codec can't decode byte"
    if kind == "text_volume":
        cells = lines[3].split("\t")
        cells[lines[0].split("\t").index("volume_mm3")] = "12,5"
        path.write_text("\n".join([*lines[:3], "\t".join(cells), *lines[4:]]) + "\n")
        return "column volume_mm3: '12,5' on line 4 is not a number"
    if kind == "no_volume_column":
        header = lines[0].split("\t")
        at = header.index("volume_mm3")
        kept = ["\t".join(c for i, c in enumerate(line.split("\t")) if i != at) for line in lines]
        path.write_text("\n".join(kept) + "\n")
        return "missing column(s) volume_mm3"
    if kind == "ragged":
        path.write_text("\n".join([*lines[:4], lines[4] + "\textra", *lines[5:]]) + "\n")
        return "cannot be read as a TSV table: Error tokenizing data. C error: Expected"
    raise AssertionError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["binary", "text_volume", "no_volume_column", "ragged"])
def test_a_bad_participant_table_is_named_and_the_rest_processed(capsys, output, kind):
    bids, out = output
    bad = _tsv(out, "02")
    problem = _corrupt(kind, bad)
    code, err = group(capsys, bids, out)
    assert code == 65, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith(f"hsf-bids: error: {bad}: {problem}"), line
    assert line.endswith("left out of the group tables (see group_failures.tsv)")
    failures = pd.read_csv(out / "group_failures.tsv", sep="\t")
    row = failures.set_index("status").loc["invalid"]
    assert row["participant_id"] == "sub-02"
    assert row["reason"].startswith(f"sub-02/anat/sub-02_desc-subfields_volumes.tsv: {problem}")
    wide = pd.read_csv(out / "group_volumes_wide.tsv", sep="\t")
    assert list(wide["participant_id"]) == ["sub-01"]
    assert (
        "sub-02/anat/sub-02_desc-subfields_volumes.tsv" in (out / "group_report.html").read_text()
    )


@pytest.mark.slow
def test_a_malformed_participants_table_is_a_warning(capsys, output, tmp_path):
    bids, out = output
    copy = tmp_path / "bids"
    shutil.copytree(bids, copy)
    (copy / "participants.tsv").write_bytes(b"participant_id\tgroup\nsub-01\ta\tb\n\xff\n")
    code, err = group(capsys, copy, out)
    assert code == 0, err
    assert "Traceback" not in err
    assert f"hsf-bids: warning: {copy / 'participants.tsv'}: cannot be read (" in err
    assert "group" not in pd.read_csv(out / "group_volumes_wide.tsv", sep="\t").columns
    (copy / "participants.tsv").write_text("participant_id\tgroup\nsub-01\ta\nsub-01\tb\n")
    code, err = group(capsys, copy, out)
    assert code == 0, err
    assert "participants.tsv: a participant_id is there twice; its columns are not joined" in err
    assert len(pd.read_csv(out / "group_volumes_wide.tsv", sep="\t")) == 2  # no row doubled


def _staging(out: Path) -> list[Path]:
    return sorted(out.glob(".group-staging-*"))


@pytest.mark.slow
def test_group_outputs_are_replaced_together_or_withdrawn(capsys, output):
    bids, out = output
    code, err = group(capsys, bids, out)
    assert code == 0, err
    assert all((out / name).is_file() for name in GROUP_FILES)
    # Every table bad: the failures say which; no table of the previous run stays as if current.
    _corrupt("binary", _tsv(out, "01"))
    _corrupt("ragged", _tsv(out, "02"))
    code, err = group(capsys, bids, out)
    assert code == 65, err
    assert "none of the 2 participant volumes table(s) can be used" in err
    assert sorted(p.name for p in out.glob("group_*")) == [
        "group_failures.json", "group_failures.tsv"
    ]  # fmt: skip
    failures = pd.read_csv(out / "group_failures.tsv", sep="\t")
    assert list(failures["status"]) == ["invalid", "invalid"]
    assert _staging(out) == []


def _group_process(bids: Path, out: Path, fsize: int | None = None) -> subprocess.Popen:
    def limit() -> None:  # in the child: a full disk after fsize bytes per file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen(
        [sys.executable, "-m", "hsf_bids", str(bids), str(out), "group"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=limit if fsize else None,
    )  # fmt: skip


@pytest.mark.slow
def test_group_on_a_full_disk_leaves_no_stale_outputs(capsys, output):
    bids, out = output
    code, err = group(capsys, bids, out)
    assert code == 0, err
    proc = _group_process(bids, out, fsize=4096)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 73, log
    assert "Traceback" not in log
    (line,) = [line for line in log.splitlines() if "error:" in line]
    assert line.startswith(f"hsf-bids: error: cannot write the group outputs in {out}: File too")
    assert not any((out / name).exists() for name in GROUP_FILES)
    assert _staging(out) == [] and not list(out.rglob(".part-*"))
    code, err = group(capsys, bids, out)
    assert code == 0, err
    assert all((out / name).is_file() for name in GROUP_FILES)


def _withdrawn(out: Path) -> bool:
    """Whether a group run has moved the previous outputs into its staging folder (all of them:
    the few renames themselves are not what this test aims at)."""
    try:
        return any(
            len(list((folder / "previous").iterdir())) == len(GROUP_FILES)
            for folder in _staging(out)
        )
    except OSError:  # the run finished and removed its folder meanwhile
        return False


@pytest.mark.slow
def test_a_killed_group_run_leaves_no_stale_outputs(capsys, output):
    bids, out = output
    code, err = group(capsys, bids, out)
    assert code == 0, err
    before = {name: (out / name).read_bytes() for name in GROUP_FILES if "report" not in name}
    for _ in range(3):  # a busy machine can let a run finish between look and kill
        proc = _group_process(bids, out)
        deadline = time.monotonic() + 60
        while not _withdrawn(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGSTOP)
        caught = _withdrawn(out)  # still computing or writing the new set
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        if caught:
            break
    assert caught and proc.returncode == -signal.SIGKILL
    assert not any((out / name).exists() for name in GROUP_FILES)
    assert len(_staging(out)) == 1  # what the kill left; the next run removes it
    code, err = group(capsys, bids, out)
    assert code == 0, err
    assert _staging(out) == []
    after = {name: (out / name).read_bytes() for name in before}
    assert after == before


def _zero_pixdim(source: Path, target: Path) -> None:
    """``source`` with pixdim[2] set to 0 in the stored header (nibabel's writer would fix it)."""
    raw = bytearray(gzip.decompress(source.read_bytes()))
    raw[84:88] = struct.pack("<f", 0.0)  # pixdim[2]: byte 76 + 2 * 4
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(gzip.compress(bytes(raw)))


def test_qform_with_zero_voxel_size_is_refused(capsys, ds_mini, tmp_path):
    source = ds_mini / "sub-01/anat/sub-01_T1w.nii.gz"  # qform only (sform_code 0), 1.75 mm
    assert int(nib.load(source).header["sform_code"]) == 0
    bids = tmp_path / "bids"
    bids.mkdir()
    shutil.copy(ds_mini / "dataset_description.json", bids)
    image = bids / "sub-01/anat/sub-01_T1w.nii.gz"
    _zero_pixdim(source, image)
    message = (
        f"{image}: the qform (in use: sform_code is 0) has voxel size [1.75, 0.0, 1.75] "
        "(pixdim[1:4]): a zero or non-finite voxel size is unknown, not 1 mm"
    )
    with pytest.raises(InvalidImageError) as info:
        load_anat(image)
    assert str(info.value) == message
    code = main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation"])
    err = capsys.readouterr().err
    assert code == 65
    assert f"hsf-bids: error: {message}; sub-01_T1w is not segmented" in err.splitlines()
    assert "Traceback" not in err
