"""Hardening of ``hsf-bids`` (issue 15): refused output folders, guards, crash files, exit codes.

Each test here reproduces a failure the issue found; they stop before any registration, so most run
the command in-process, and those about how the process ends run it in a subprocess.
"""

from __future__ import annotations

import json
import os
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
