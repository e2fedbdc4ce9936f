"""Hardening of ``hsf-bids`` (issue 15): refused output folders, guards, crash files, exit codes.

Each test here reproduces a failure the issue found; they stop before any registration, so most run
the command in-process, and those about how the process ends run it in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hsf_bids.cli.run import main
from hsf_bids.outputs import lookup_table, lut_path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def run_process(*argv: str | Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``python -m hsf_bids`` in a child process: its exit status and standard error."""
    proc = subprocess.run(
        [sys.executable, "-m", "hsf_bids", *map(str, argv)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    return proc.returncode, proc.stderr


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hsf_bids-load-models"]


def _refuse_foreign(out: Path) -> str:
    out.mkdir(parents=True)
    (out / "dataset_description.json").write_text(
        json.dumps({"Name": "x", "BIDSVersion": "1.10.0", "GeneratedBy": [{"Name": "fmriprep"}]})
    )
    return f"{out / 'dataset_description.json'} describes derivatives of fmriprep, not hsf_bids"


def _refuse_other_ca_mode(out: Path) -> str:
    out.mkdir(parents=True)
    lookup_table("123").to_csv(lut_path(out), sep="\t", index=False)
    return f"{lut_path(out)} already describes other labels than ca_mode '1/2/3'"


REFUSALS = {"foreign_description": _refuse_foreign, "other_ca_mode": _refuse_other_ca_mode}
# The models are prefetched only with the Linear plugin (one process): --nprocs 1.
PARTICIPANT = (
    "participant",
    "--participant-label",
    "01",
    "--skip-bids-validation",
    "--nprocs",
    "1",
)


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refused_output_folder_exits_73_without_a_loading_thread(
    refusal, capsys, ds_mini, demo_hub, templateflow_home, tmp_path
):
    """Issue 15.1: the model-loading thread started before the shared files were written and was
    never joined when they were refused; the process then aborted (134) inside the engine."""
    out = tmp_path / "out"
    expected = REFUSALS[refusal](out)
    before = set(_loader_threads())
    code, err = run(
        capsys, ds_mini, out, *PARTICIPANT, "--hub", demo_hub, "--engine", "onnxruntime",
        "-w", tmp_path / "work",
    )  # fmt: skip
    assert code == 73
    assert expected in err
    assert [t for t in _loader_threads() if t not in before and t.is_alive()] == []
    assert not list(out.glob("sub-*"))


def test_a_run_in_the_caller_s_process_gives_its_environment_back(
    capsys, ds_mini, demo_hub, templateflow_home, tmp_path, monkeypatch
):
    """main() called in a process of its own (a notebook, a test) pointed $TMPDIR at the run's
    private folder and left it so; once that folder was gone, Chromium started later in the same
    process could not start."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    before = dict(os.environ)
    out = tmp_path / "out"
    REFUSALS["foreign_description"](out)  # a run that prepares its runtime, then stops early
    code, _ = run(capsys, ds_mini, out, *PARTICIPANT, "--hub", demo_hub, "-w", tmp_path / "work")
    assert code == 73
    assert dict(os.environ) == before
    assert not list(tmp_path.glob("hsf_bids-*"))  # the private folder went with the run


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refused_output_folder_process_ends_with_73(
    refusal, ds_mini, demo_hub, templateflow_home, tmp_path
):
    out = tmp_path / "out"
    expected = REFUSALS[refusal](out)
    code, err = run_process(
        ds_mini, out, *PARTICIPANT, "--hub", demo_hub, "--engine", "openvino",
        "-w", tmp_path / "work",
    )  # fmt: skip
    assert code == 73, err
    assert expected in err
    assert "terminate called" not in err and "Fatal Python error" not in err
    assert "Traceback" not in err


# --- links planted in the output folder (issue 15.7) ---------------------------------------


def _plant(out: Path, name: str, target: str | Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    link = out / name
    link.symlink_to(target)
    return link


def test_planted_bidsignore_link_is_refused_by_the_run(
    capsys, ds_mini, demo_hub, templateflow_home, tmp_path
):
    secret = tmp_path / "secret.txt"
    secret.write_text("another user's private notes\n")
    out = tmp_path / "out"
    link = _plant(out, ".bidsignore", secret)
    code, err = run(
        capsys, ds_mini, out, *PARTICIPANT, "--hub", demo_hub, "--engine", "onnxruntime",
        "-w", tmp_path / "work",
    )  # fmt: skip
    assert code == 73
    assert f"{link} is a symbolic link; hsf_bids never follows links in its output folder" in err
    assert link.is_symlink() and secret.read_text() == "another user's private notes\n"
    assert not list(out.glob("sub-*"))


@pytest.mark.parametrize(
    "name", [".bidsignore", "dataset_description.json", "desc-subfields_dseg.tsv"]
)
@pytest.mark.parametrize("target", ["secret", "/dev/zero", "dangling"])
def test_shared_files_never_read_through_a_link(tmp_path, name, target):
    from hsf_bids.outputs import (
        UnsafeOutputError,
        write_bidsignore,
        write_dataset_description,
        write_lut,
    )

    secret = tmp_path / "secret.txt"
    secret.write_text("private\n")
    out = tmp_path / "out"
    where = {"secret": secret, "/dev/zero": "/dev/zero", "dangling": tmp_path / "nothing"}
    link = _plant(out, name, where[target])
    writers = {
        ".bidsignore": lambda: write_bidsignore(out),
        "dataset_description.json": lambda: write_dataset_description(
            out, version="0", source_dataset=tmp_path, container={}
        ),
        "desc-subfields_dseg.tsv": lambda: write_lut(lut_path(out), "1/2/3"),
    }
    with pytest.raises(UnsafeOutputError, match="is a symbolic link") as info:
        writers[name]()
    assert info.value.exit_code == 73
    assert link.is_symlink() and secret.read_text() == "private\n"


def test_shared_file_that_is_not_a_regular_file(tmp_path):
    from hsf_bids.outputs import UnsafeOutputError, write_bidsignore

    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / ".bidsignore")  # opening it for reading would block without O_NONBLOCK
    with pytest.raises(UnsafeOutputError, match="is not a regular file"):
        write_bidsignore(out)
    (out / ".bidsignore").unlink()
    (out / ".bidsignore").write_bytes(b"x" * (2 << 20))
    with pytest.raises(UnsafeOutputError, match="larger than"):
        write_bidsignore(out)


# --- a model outside the HSF contract is refused before any registration (issue 15.9) -------


def _four_channel_model(source: Path, target: Path) -> Path:
    """``source`` with its output cut to 4 channels (and declared so)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(source)
    graph = model.graph
    output = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{output}_all" if o == output else o for o in node.output]
    for name, value in (("cut_starts", 0), ("cut_ends", 4), ("cut_axes", 1)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    graph.node.append(
        helper.make_node("Slice", [f"{output}_all", "cut_starts", "cut_ends", "cut_axes"], [output])
    )
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4
    onnx.checker.check_model(model)
    onnx.save(model, target)
    return target


def test_model_with_wrong_channels_refused_before_registration(
    capsys, ds_mini, demo_models, templateflow_home, tmp_path
):
    """It was found only after the registration, under about 160 lines of Nipype traceback."""
    from hsf_bids.hub import xxh3_64_file

    model = _four_channel_model(demo_models[0], tmp_path / "four.onnx")
    hub = tmp_path / "four.yaml"
    hub.write_text(
        f'ca_mode: "1/2/3"\nmodels:\n  four.onnx: {{url: four.onnx, xxh3_64: '
        f'"{xxh3_64_file(model)}"}}\nsegmentation: {{test_time_augmentation: false, '
        "test_time_num_aug: 0}\n"
    )
    work = tmp_path / "work"
    code, err = run(
        capsys, ds_mini, tmp_path / "out", *PARTICIPANT, "--hub", hub, "--engine", "onnxruntime",
        "-w", work,
    )  # fmt: skip
    assert code == 65
    assert (
        f"{model}: the model's output has shape ['batch', 4, 'x', 'y', 'z']; HSF models output "
        "[batch, 6, x, y, z]"
    ) in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert "Traceback" not in err
    assert not list(work.rglob("*localise*"))  # no node ran


def test_model_contract_read_from_the_file(demo_models, demo_hub, tmp_path):
    from hsf_bids.engines.contract import ModelContractError, check_model_contract

    for model in demo_models:
        check_model_contract(model)
    four = _four_channel_model(demo_models[0], tmp_path / "four.onnx")
    with pytest.raises(ModelContractError, match=r"has shape \['batch', 4") as info:
        check_model_contract(four)
    assert info.value.exit_code == 65
    with pytest.raises(ModelContractError, match="not an ONNX model"):
        check_model_contract(demo_hub)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(demo_models[0].read_bytes()[:100_000])
    with pytest.raises(ModelContractError, match="not an ONNX model"):
        check_model_contract(truncated)


# --- unexpected errors: one line, the traceback in a crash file ----------------------------

REPO = Path(__file__).resolve().parents[1]


def _crash_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("crash-*-hsf-bids.txt"))


def _broken_plugin(tmp_path: Path) -> Path:
    """A plugin file Nipype accepts by name but fails on when the run starts (not a node's
    failure, so no crash file of Nipype's)."""
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args: {n_procs: many}\n")
    return plugin


def test_unexpected_error_goes_to_the_subjects_crash_file(
    capsys, ds_mini, demo_hub, templateflow_home, tmp_path
):
    """An error the run did not expect: one line naming the crash file, the traceback in it,
    where the group level finds it; before, the run said "finished sub-01" and exited 0 (a
    plugin that failed to start) or printed a traceback."""
    from hsf_bids.logs import crash_reason

    out = tmp_path / "out"
    code, err = run(
        capsys, ds_mini, out, *PARTICIPANT, "--hub", demo_hub, "--engine", "onnxruntime",
        "-w", tmp_path / "work", "--use-plugin", _broken_plugin(tmp_path),
    )  # fmt: skip
    assert code == 1
    [crash] = _crash_files(out)
    assert crash.parent.parent == out / "sub-01" / "log"
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines == [
        "hsf-bids: error: unexpected error (TypeError: '<=' not supported between instances of "
        f"'str' and 'int'); the traceback is in {crash}"
    ]
    assert "Traceback" not in err and "finished" not in err
    assert "Traceback (most recent call last)" in crash.read_text()
    assert crash_reason(crash).startswith("TypeError: '<=' not supported")


def test_unexpected_io_error_without_a_subject_folder(
    capsys, ds_mini, demo_hub, templateflow_home, tmp_path
):
    """``sub-01/log`` is a file: the subject's log folder cannot take the crash file, the output
    folder's log does; an I/O error ends with 74."""
    out = tmp_path / "out"
    (out / "sub-01").mkdir(parents=True)
    (out / "sub-01" / "log").write_text("not a folder")
    code, err = run(
        capsys, ds_mini, out, *PARTICIPANT, "--hub", demo_hub, "--engine", "onnxruntime",
        "-w", tmp_path / "work",
    )  # fmt: skip
    assert code == 74
    [crash] = _crash_files(out)
    assert crash.parent.parent == out / "log"
    assert f"(NotADirectoryError: [Errno 20] Not a directory: '{out / 'sub-01' / 'log'}/" in err
    assert f"the traceback is in {crash}" in err and "Traceback" not in err


def test_unknown_plugin_is_a_usage_error(capsys, ds_mini, tmp_path):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: NoSuchPlugin\n")
    code, err = run(capsys, ds_mini, tmp_path / "out", "participant", "--use-plugin", plugin)
    assert code == 64
    assert f"the plugin file {plugin}: unknown Nipype plugin 'NoSuchPlugin'; choose one of" in err


# --- every documented exit code is produced ------------------------------------------------


def _documented_codes() -> set[int]:
    """The codes errors.py declares; the README must list the same."""
    import re

    from hsf_bids import errors

    declared = {getattr(errors, n) for n in errors.__all__ if n.startswith("EX_")}
    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("Exit codes (BIDS Apps execution spec):") :]
    paragraph = paragraph[: paragraph.index("\n\n")]
    listed = {int(n) for n in re.findall(r"(?:: |; )(\d+) ", paragraph)}
    assert listed == declared, f"README lists {sorted(listed)}, errors.py {sorted(declared)}"
    return declared


def _interrupt(ds_mini, demo_hub, tmp_path, signum: int = 2) -> tuple[int, str]:
    """Ctrl-C (or ``signum``: SIGTERM, a scheduler's time limit) once the models are planned and
    the workflow starts."""

    proc = subprocess.Popen(
        [sys.executable, "-m", "hsf_bids", str(ds_mini), str(tmp_path / "out"), *PARTICIPANT,
         "--hub", str(demo_hub), "--engine", "onnxruntime", "-w", str(tmp_path / "work")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    err = []
    for line in proc.stderr:
        err.append(line)
        if "inference:" in line:
            proc.send_signal(signum)
            break
    err.append(proc.stderr.read())
    return proc.wait(timeout=120), "".join(err)


def _scenario(code: int, capsys, ds_mini, demo_hub, tmp_path) -> tuple[int, str]:
    out, hub = tmp_path / "out", ("--hub", demo_hub)
    only = ("--participant-label", "01", "--skip-bids-validation")
    if code == 0:
        return run(capsys, ds_mini, out, "participant", "--list-participants")
    if code == 1:
        return run(
            capsys, ds_mini, out, *PARTICIPANT, *hub, "--engine", "onnxruntime",
            "--use-plugin", _broken_plugin(tmp_path), "-w", tmp_path / "work",
        )  # fmt: skip
    if code == 16:
        dataset = tmp_path / "bids"
        shutil.copytree(ds_mini, dataset)
        (dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz").rename(
            dataset / "sub-01" / "anat" / "sub-01_mprage.nii.gz"
        )
        return run(capsys, dataset, out, "participant", *hub, "--participant-label", "01")
    if code == 17:
        return run(capsys, ds_mini, out, "subject")
    if code == 18:
        return run(
            capsys, ds_mini, out, "participant", *hub, "--participant-label", "99", *only[2:]
        )
    if code == 64:
        return run(capsys, ds_mini, ds_mini, "participant")
    if code == 65:
        hub_file = tmp_path / "hub.yaml"
        hub_file.write_text("ca_mode: [unknown]\n")
        return run(capsys, ds_mini, out, "participant", "--hub", hub_file, *only)
    if code == 66:
        return run(capsys, tmp_path / "nothing", out, "participant")
    if code == 73:
        (tmp_path / "file").write_text("")
        return run(capsys, ds_mini, tmp_path / "file" / "out", "participant")
    if code == 74:
        (out / "sub-01").mkdir(parents=True)
        (out / "sub-01" / "log").write_text("")
        return run(
            capsys, ds_mini, out, *PARTICIPANT, *hub, "--engine", "onnxruntime",
            "-w", tmp_path / "work",
        )  # fmt: skip
    if code == 130:
        return _interrupt(ds_mini, demo_hub, tmp_path)
    if code == 143:
        return _interrupt(ds_mini, demo_hub, tmp_path, signum=15)
    raise AssertionError(f"no scenario produces exit code {code}")


@pytest.mark.parametrize("code", sorted(_documented_codes()))
def test_every_documented_exit_code_is_produced(
    code, capsys, ds_mini, demo_hub, templateflow_home, tmp_path
):
    got, err = _scenario(code, capsys, ds_mini, demo_hub, tmp_path)
    assert got == code, err[-3000:]
    assert "Traceback" not in err
    if code:
        assert len([line for line in err.splitlines() if "hsf-bids: error:" in line]) >= 1


def test_a_filter_pybids_refuses_is_a_usage_error(capsys, ds_mini, demo_hub, tmp_path):
    """pybids' ValueError for an unknown entity ended in a traceback."""
    filters = tmp_path / "filters.json"
    filters.write_text('{"t1w": {"nonsense_entity": "x"}}')
    code, err = run(
        capsys, ds_mini, tmp_path / "out", "participant", "--hub", demo_hub,
        "--skip-bids-validation", "--bids-filter-file", filters,
    )  # fmt: skip
    assert code == 64
    assert "the BIDS filters cannot be applied: 'nonsense_entity' is not a recognized entity" in err
    assert "Traceback" not in err and not _crash_files(tmp_path)
