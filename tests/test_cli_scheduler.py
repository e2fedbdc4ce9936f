"""``hsf-bids`` on a scheduler: resources from the SLURM task, and the participant list a job
array maps its task index to. (The scripts run on a real cluster in ``test_slurm.py``.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hsf_bids.cli.run import build_config, main, scheduler_cpus, scheduler_mem_gb, scheduler_scratch

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU",
                   "SLURM_TMPDIR")  # fmt: skip


@pytest.fixture
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process as outside any SLURM job (the tests may themselves run in one)."""
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_resources_follow_slurm() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "3", "SLURM_MEM_PER_NODE": "2048"}
    assert scheduler_cpus(env) == 3
    assert scheduler_mem_gb(env) == 2.0
    assert scheduler_mem_gb({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_PER_TASK": "2"}) == 2.0
    local = {**env, "TMPDIR": "/tmp/x", "SLURM_TMPDIR": "/local/7"}
    assert scheduler_scratch(local) == Path("/local/7")
    assert scheduler_scratch({**env, "TMPDIR": "/tmp/x"}) == Path("/tmp/x")
    # outside SLURM: the CPUs this process may run on, no memory limit, no scratch
    assert scheduler_cpus({}) == len(os.sched_getaffinity(0))
    assert scheduler_mem_gb({}) is None
    assert scheduler_scratch({"TMPDIR": "/tmp/x"}) is None


def test_defaults_in_a_slurm_task(no_slurm, ds_mini, tmp_path):
    no_slurm.setenv("SLURM_JOB_ID", "12")
    no_slurm.setenv("SLURM_CPUS_PER_TASK", "1")
    no_slurm.setenv("SLURM_MEM_PER_NODE", "3072")
    no_slurm.setenv("TMPDIR", str(tmp_path / "scratch"))
    config = build_config([str(ds_mini), str(tmp_path / "out"), "participant"])
    assert (config.nprocs, config.omp_nthreads, config.mem_gb) == (1, 1, 3.0)
    assert config.work_dir == tmp_path / "scratch" / "hsf_bids"
    assert config.plugin == "Linear"
    # options still win
    config = build_config([str(ds_mini), str(tmp_path / "out"), "participant", "--nprocs", "2",
                           "--mem-gb", "5", "-w", str(tmp_path / "w")])  # fmt: skip
    assert (config.nprocs, config.mem_gb, config.work_dir) == (2, 5.0, tmp_path / "w")


def test_defaults_outside_slurm(no_slurm, ds_mini, tmp_path):
    no_slurm.setenv("TMPDIR", str(tmp_path / "tmp"))
    config = build_config([str(ds_mini), str(tmp_path / "out"), "participant"])
    assert config.nprocs == len(os.sched_getaffinity(0))
    assert config.mem_gb is None
    assert config.work_dir == tmp_path / "work" / "hsf_bids"


def test_list_participants(capsys, ds_mini, tmp_path, demo_hub):
    args = [str(ds_mini), str(tmp_path / "out"), "participant", "--list-participants",
            "--hub", str(demo_hub)]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out == "01\n02\n03\n04\n"
    assert not (tmp_path / "out").exists()  # listing writes nothing
    # sub-02 has a T2w only
    assert main([*args, "--contrast", "T1w"]) == 0
    assert capsys.readouterr().out == "01\n03\n04\n"
    assert main([*args, "--participant-label", "04", "sub-02"]) == 0
    assert capsys.readouterr().out == "02\n04\n"


def test_list_participants_leaves_out_subjects_without_images(capsys, ds_mini, tmp_path, demo_hub):
    dataset = tmp_path / "bids"
    shutil.copytree(ds_mini, dataset)
    anat = dataset / "sub-05" / "anat"
    anat.mkdir(parents=True)
    shutil.copy(dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz", anat / "sub-05_FLAIR.nii.gz")
    code = main([str(dataset), str(tmp_path / "out"), "participant", "--list-participants",
                 "--hub", str(demo_hub)])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out == "01\n02\n03\n04\n"


def test_list_participants_unknown_label(capsys, ds_mini, tmp_path, demo_hub):
    code = main([str(ds_mini), str(tmp_path / "out"), "participant", "--list-participants",
                 "--participant-label", "09", "--hub", str(demo_hub)])  # fmt: skip
    assert code == 18  # as the participant run itself
    assert "participant label(s) not found" in capsys.readouterr().err
