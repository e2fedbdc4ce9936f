"""tools/compare_outputs.py: the check that a change of code left the derivatives as they were."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, compare_outputs_tool

SCRIPT = REPO / "tools" / "compare_outputs.py"


def _outputs(root: Path, run: str, when: str) -> Path:
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[1:3, 2, 3] = 2
    nib.save(nib.Nifti1Image(labels, np.eye(4)), anat / "sub-01_desc-subfields_dseg.nii.gz")
    sidecar = {"Provenance": {"RunId": run, "Started": when, "Localisation": {"ok": True}}}
    (anat / "sub-01_desc-subfields_dseg.json").write_text(json.dumps(sidecar))
    (anat / "sub-01_desc-subfields_volumes.tsv").write_text("structure\tvolume_mm3\nDG\t12.5\n")
    log = root / "sub-01" / "log" / run
    log.mkdir(parents=True)
    (log / "config.json").write_text(json.dumps({"run": run}))
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "when": when}))
    return root


RUN_A = "20261129-202403_1db1364e-3697-4913-a113-b12a5c6088d3"
RUN_B = "20261130-090000_00000000-1111-2222-3333-444444444444"


def test_two_runs_that_differ_only_in_run_id_and_time_agree(tmp_path):
    module = compare_outputs_tool()
    a = _outputs(tmp_path / "a", RUN_A, "2026-11-29T20:24:03+00:00")
    b = _outputs(tmp_path / "b", RUN_B, "2026-11-30 09:00:00 UTC")
    assert module.compare(a, b) == []
    done = subprocess.run([sys.executable, SCRIPT, a, b], capture_output=True, text=True)
    assert done.returncode == 0 and "4 files compared: the same" in done.stdout


def test_every_kind_of_difference_is_named(tmp_path):
    module = compare_outputs_tool()
    a = _outputs(tmp_path / "a", RUN_A, "2026-11-29T20:24:03+00:00")
    b = _outputs(tmp_path / "b", RUN_A, "2026-11-29T20:24:03+00:00")
    anat = b / "sub-01" / "anat"
    image = nib.load(anat / "sub-01_desc-subfields_dseg.nii.gz")
    labels = np.asarray(image.dataobj).copy()
    labels[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(labels, image.affine, image.header), image.get_filename())
    sidecar = anat / "sub-01_desc-subfields_dseg.json"
    sidecar.write_text(sidecar.read_text().replace('"ok"', '"localisation_ok"'))
    (anat / "sub-01_desc-subfields_volumes.tsv").write_text("structure\tvolume_mm3\nDG\t12.6\n")
    (b / "extra.txt").write_text("new")
    problems = module.compare(a, b)
    assert "extra.txt: only in " + str(b) in problems
    assert "sub-01/anat/sub-01_desc-subfields_dseg.nii.gz: voxels or header differ" in problems
    assert any(".Provenance.Localisation.ok: only in the first" in p for p in problems)
    assert any(".Localisation.localisation_ok: only in the second" in p for p in problems)
    assert any("volumes.tsv: line 2: 'DG\\t12.5' != 'DG\\t12.6'" in p for p in problems)
    done = subprocess.run([sys.executable, SCRIPT, a, b], capture_output=True, text=True)
    assert done.returncode == 1 and "5 differences" in done.stdout


def test_participant_label_compares_one_subject_of_a_larger_run(tmp_path):
    module = compare_outputs_tool()
    a = _outputs(tmp_path / "a", RUN_A, "2026-11-29T20:24:03+00:00")
    b = _outputs(tmp_path / "b", RUN_A, "2026-11-29T20:24:03+00:00")
    shutil.copytree(b / "sub-01", b / "sub-02")
    (b / "dataset_description.json").write_text("{}")
    assert module.compare(a, b) != []
    assert module.compare(a, b, ["sub-01"]) == []
    assert module.compare(a, b, ["01"]) == []


@pytest.mark.parametrize("missing", ["first", "second"])
def test_a_missing_folder_is_a_usage_error(tmp_path, missing):
    first, second = (tmp_path / "nope", tmp_path)[:: 1 if missing == "first" else -1]
    done = subprocess.run([sys.executable, SCRIPT, first, second], capture_output=True, text=True)
    assert done.returncode == 2 and "not a folder" in done.stderr
