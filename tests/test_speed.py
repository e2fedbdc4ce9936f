"""Speed work (issue 8): the agreement gate of ``--engine auto`` and the timing records.

Real sessions of the demo models on a real ds-mini crop; no timing is asserted (the machine is
shared), only that the records exist and add up.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hsf_bids import engines, stages, timing
from hsf_bids.engines import (
    AGREEMENT,
    MIN_AGREEMENT_DICE,
    agrees_with_reference,
    available_engines,
    get_session,
    resolve_engine,
)
from hsf_bids.image import load_anat, to_ras
from hsf_bids.segment import segment_crop

# Boxes the localisation (seed 42) finds in sub-04 ses-01 (Colin27, 1 mm, RAS): RAS+ voxels.
BOXES = {"right": ((95, 76, 34), (135, 129, 87)), "left": ((46, 76, 35), (86, 129, 88))}
HEAD = "sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz"


@pytest.fixture(scope="module")
def head_crops(ds_mini: Path) -> dict[str, tuple[np.ndarray, tuple[float, ...]]]:
    ras, _ = to_ras(load_anat(ds_mini / HEAD))
    spacing = tuple(float(z) for z in ras.header.get_zooms()[:3])
    data = np.asarray(ras.dataobj)
    return {side: (data[_slices(box)].copy(), spacing) for side, box in BOXES.items()}


def _slices(box: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in zip(*box, strict=True))


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


def test_auto_never_picks_a_combination_without_recorded_agreement(monkeypatch):
    every = [
        ("onnxruntime", "fp32", "cuda"),
        ("openvino", "bf16", "cpu"),
        ("openvino", "fp32", "cpu"),
        ("onnxruntime", "fp32", "cpu"),
    ]
    # As on a machine with CUDA and a bf16 CPU, where both would come first.
    monkeypatch.setattr(engines, "available_engines", lambda: list(every))
    choice = resolve_engine("auto", "cpu")
    assert agrees_with_reference(choice)
    assert choice == ("openvino", "fp32", "cpu")  # not bf16: its agreement is not recorded
    # --device cuda is the user's choice of device: fp32 on the GPU, not a silent CPU run.
    assert resolve_engine("auto", "cuda") == ("onnxruntime", "fp32", "cuda")
    # Marked as disagreeing: auto moves on to the next agreeing one.
    monkeypatch.setitem(AGREEMENT, ("openvino", "fp32", "cpu"), 0.9)
    assert resolve_engine("auto", "cpu") == ("onnxruntime", "fp32", "cpu")
    # Explicit requests still run what was asked for.
    assert resolve_engine("openvino", "cpu", "bf16") == ("openvino", "bf16", "cpu")
    assert resolve_engine("onnxruntime", "cuda") == ("onnxruntime", "fp32", "cuda")


def test_auto_keeps_within_the_memory_budget(demo_models, caplog):
    """With --mem-gb, auto passes over OpenVINO when its estimate for the ensemble is over the
    budget, and takes the smallest engine (with a warning) when nothing fits."""
    assert resolve_engine("auto", "cpu") == ("openvino", "fp32", "cpu")
    ov = engines.estimated_memory_gb("openvino", demo_models)
    ort = engines.estimated_memory_gb("onnxruntime", demo_models)
    assert engines.RUN_BASE_GB < ort < ov
    roomy = resolve_engine("auto", "cpu", models=demo_models, mem_gb=ov + 0.01)
    assert roomy == ("openvino", "fp32", "cpu")
    with caplog.at_level("INFO", logger="hsf_bids.engines"):
        tight = resolve_engine("auto", "cpu", models=demo_models, mem_gb=(ov + ort) / 2)
    assert tight == ("onnxruntime", "fp32", "cpu")
    assert "more than --mem-gb" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hsf_bids.engines"):
        hopeless = resolve_engine("auto", "cpu", models=demo_models, mem_gb=0.1)
    assert hopeless == ("onnxruntime", "fp32", "cpu")
    assert "no engine fits --mem-gb 0.1" in caplog.text
    # An explicit engine is the user's choice, whatever the budget.
    assert resolve_engine("openvino", "cpu", models=demo_models, mem_gb=0.1)[0] == "openvino"


def test_every_auto_choice_here_is_recorded_as_agreeing():
    for precision in (None, "fp32"):
        assert agrees_with_reference(resolve_engine("auto", "cpu", precision))
    for choice, dice in AGREEMENT.items():
        assert agrees_with_reference(choice) == (dice is not None and dice >= MIN_AGREEMENT_DICE)
    assert not agrees_with_reference(("deepsparse", "int8", "cpu"))  # never measured
    assert ("onnxruntime", "fp32", "cpu") in available_engines()


@pytest.mark.parametrize("tta", [False, True], ids=["no_tta", "tta"])
def test_openvino_fp32_agrees_with_onnxruntime_fp32_on_a_real_crop(demo_models, head_crops, tta):
    """The measurement behind AGREEMENT's OpenVINO fp32 entry, on both sides of sub-04."""
    if ("openvino", "fp32", "cpu") not in available_engines():
        pytest.skip("OpenVINO is not installed")
    assert agrees_with_reference(("openvino", "fp32", "cpu"))
    for side, item in head_crops.items():
        labels = {}
        for engine in ("onnxruntime", "openvino"):
            sessions = [get_session(m, engine=engine, precision="fp32", threads=2)
                        for m in demo_models]  # fmt: skip
            labels[engine] = segment_crop(
                [item], sessions, test_time_augmentation=tta, num_augmentations=2, seed=3
            ).labels
        ref = labels["onnxruntime"]
        assert {1, 2, 4, 5} <= set(np.unique(ref).tolist()), side  # a real segmentation
        for label in range(1, 6):
            dice = _dice(ref, labels["openvino"], label)
            assert dice >= MIN_AGREEMENT_DICE, (side, label, dice)


def test_segment_crop_times_its_phases(demo_models, head_crops):
    sessions = [get_session(m, engine="onnxruntime", threads=2) for m in demo_models]
    result = segment_crop([head_crops["left"]], sessions, num_augmentations=2, seed=1)
    assert set(result.timings) == {"augment", "network", "invert", "fusion"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["network"] > 0 and result.timings["invert"] > 0


def test_stages_write_timing_records(ds_mini, demo_models, head_crops, templateflow_home, tmp_path):
    """Each stage leaves a timing record next to its outputs, in its own folder."""
    folders = {name: tmp_path / name for name in ("loc", "right", "left", "paste", "deriv")}
    for folder in folders.values():
        folder.mkdir()
    head = ds_mini / HEAD
    loc = stages.localise(head, "T1w", folders["loc"], seed=42)
    outputs = {}
    for side in ("right", "left"):
        outputs[side] = stages.segment_side(
            [head], loc, side, folders[side], models=[str(m) for m in demo_models],
            engine=["onnxruntime", "fp32", "cpu"], threads=2, ca_mode="1/2/3", fusion="vote",
            seed=42, test_time_augmentation=False, num_augmentations=0, batch_size=1,
        )  # fmt: skip
    dseg, unc = stages.paste_back_sides(
        head, loc, {s: o[0] for s, o in outputs.items()}, {s: o[1] for s, o in outputs.items()},
        folders["paste"],
    )  # fmt: skip
    stages.write_derivatives(
        dseg, unc, loc, source_file=head, sources=["bids:raw:" + HEAD],
        output_dir=tmp_path / "out", ca_mode="1/2/3", contrast="T1w",
        provenance={"Engine": {"Name": "onnxruntime"}}, out_dir=folders["deriv"],
    )  # fmt: skip
    records = {name: timing.read_timing(folder / timing.TIMING_JSON)
               for name, folder in folders.items()}  # fmt: skip
    assert records["loc"]["stage"] == "localise"
    assert set(records["loc"]["seconds"]) == {"read", "register", "write"}
    for side in ("right", "left"):
        record = records[side]
        assert record["stage"] == f"segment_{side}"
        assert {"crop", "load_models", "network", "augment", "invert", "fusion", "write"} <= set(
            record["seconds"]
        )
        assert sum(record["seconds"].values()) <= record["total"] + 1e-3
    assert records["paste"]["stage"] == "paste_back" and records["paste"]["total"] > 0
    assert records["deriv"]["stage"] == "derivatives"
    # One process: the memory high-water mark never goes down from stage to stage.
    marks = [records[name]["peak_rss_mib"] for name in ("loc", "right", "left", "paste", "deriv")]
    assert marks[0] > 50 and marks == sorted(marks), marks
    # Never among the derivatives.
    assert not list((tmp_path / "out").rglob(timing.TIMING_JSON))
    # The stage's outputs are what segment_crop gives on the same crop (boxes as recorded).
    box = stages.read_localisation(loc)["boxes"]["left"]
    assert (box.start, box.stop) == BOXES["left"]
    sessions = [get_session(m, engine="onnxruntime", threads=2) for m in demo_models]
    expected = segment_crop([head_crops["left"]], sessions, test_time_augmentation=False).labels
    assert np.array_equal(np.asarray(nib.load(outputs["left"][0]).dataobj), expected)
    assert json.loads((tmp_path / "loc" / timing.TIMING_JSON).read_text())["total"] > 0
