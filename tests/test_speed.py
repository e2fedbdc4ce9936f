"""Speed work (issue 8): engine choice, the memory budget of ``--engine auto`` and the timing
records (the agreement gate itself: test_gate.py).

Real networks of the demo models on a real ds-mini crop; no timing is asserted (the machine is
shared), only that the records exist and add up.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hsf_bids import engines, stages, timing
from hsf_bids.engines import available_engines, load_network, resolve_engine
from hsf_bids.engines.agreement import GATE_DICE
from hsf_bids.engines.plan import plan_models
from hsf_bids.hub import xxh3_64_file
from hsf_bids.image import load_anat, to_ras
from hsf_bids.segment import EnsembleSettings, segment_crop
from hsf_bids.settings import ModelSpec, SegmentationSettings

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


def test_auto_on_a_gpu_and_explicit_requests_run_what_was_asked(monkeypatch):
    every = [
        ("onnxruntime", "fp32", "cuda"),
        ("openvino", "bf16", "cpu"),
        ("openvino", "fp32", "cpu"),
        ("onnxruntime", "fp32", "cpu"),
    ]
    # As on a machine with CUDA and a bf16 CPU.
    monkeypatch.setattr(engines, "available_engines", lambda: list(every))
    # --device cuda is the user's choice of device: fp32 on the GPU, not a silent CPU run.
    assert resolve_engine("auto", "cuda") == ("onnxruntime", "fp32", "cuda")
    # auto without models to measure takes no shortcut: the reference.
    assert resolve_engine("auto", "cpu") == ("onnxruntime", "fp32", "cpu")
    # Explicit requests run what was asked for.
    assert resolve_engine("openvino", "cpu", "bf16") == ("openvino", "bf16", "cpu")
    assert resolve_engine("onnxruntime", "cuda") == ("onnxruntime", "fp32", "cuda")


def test_auto_keeps_within_the_memory_budget(demo_models, templateflow_home, tmp_path, caplog):
    """With --mem-gb, auto runs in onnxruntime fp32 the models whose faster choice would take
    the estimate over the budget; an explicit engine is the user's choice, whatever the budget."""
    checksums = [xxh3_64_file(m) for m in demo_models]
    free = plan_models(demo_models, checksums, tmp_path, threads=2)
    assert all(r.engine == "openvino" for r in free.runs), free.describe()
    ov = engines.estimated_memory_gb([(r.engine, r.precision, r.path) for r in free.runs])
    ort = engines.estimated_memory_gb([("onnxruntime", "fp32", m) for m in demo_models])
    assert engines.RUN_BASE_GB < ort < ov
    roomy = plan_models(demo_models, checksums, tmp_path, threads=2, mem_gb=ov + 0.01)
    assert [r.choice for r in roomy.runs] == [r.choice for r in free.runs]
    with caplog.at_level("INFO", logger="hsf_bids.engines"):
        tight = plan_models(demo_models, checksums, tmp_path, threads=2, mem_gb=(ov + ort) / 2)
    assert any(r.choice == "onnxruntime/fp32/cpu" for r in tight.runs)
    assert "more than --mem-gb" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hsf_bids.engines"):
        hopeless = plan_models(demo_models, checksums, tmp_path, threads=2, mem_gb=0.1)
    assert all(r.choice == "onnxruntime/fp32/cpu" for r in hopeless.runs)
    assert "even in onnxruntime fp32" in caplog.text
    explicit = plan_models(demo_models, checksums, tmp_path, engine="openvino", mem_gb=0.1)
    assert all(r.engine == "openvino" for r in explicit.runs)


@pytest.mark.parametrize("tta", [False, True], ids=["no_tta", "tta"])
def test_openvino_fp32_agrees_with_onnxruntime_fp32_on_a_real_crop(demo_models, head_crops, tta):
    """OpenVINO fp32 against onnxruntime fp32 on a subject's crops (both sides of sub-04), as
    the gate measures it on the template's."""
    if ("openvino", "fp32", "cpu") not in available_engines():
        pytest.skip("OpenVINO is not installed")
    for side, item in head_crops.items():
        labels = {}
        for engine in ("onnxruntime", "openvino"):
            networks = [load_network(m, engine=engine, precision="fp32", threads=2)
                        for m in demo_models]  # fmt: skip
            labels[engine] = segment_crop(
                [item],
                networks,
                EnsembleSettings(test_time_augmentation=tta, num_augmentations=2),
                seed=3,
            ).labels
        ref = labels["onnxruntime"]
        assert {1, 2, 4, 5} <= set(np.unique(ref).tolist()), side  # a real segmentation
        for label in range(1, 6):
            dice = _dice(ref, labels["openvino"], label)
            assert dice >= GATE_DICE, (side, label, dice)


def test_segment_crop_times_its_phases(demo_models, head_crops):
    networks = [load_network(m, engine="onnxruntime", threads=2) for m in demo_models]
    result = segment_crop(
        [head_crops["left"]], networks, EnsembleSettings(num_augmentations=2), seed=1
    )
    assert set(result.timings) == {"augment", "network", "invert", "fusion"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["network"] > 0 and result.timings["invert"] > 0


def test_stages_write_timing_records(ds_mini, demo_models, head_crops, templateflow_home, tmp_path):
    """Each stage leaves a timing record next to its outputs, in its own folder."""
    folders = {name: tmp_path / name for name in ("loc", "right", "left", "paste", "deriv")}
    for folder in folders.values():
        folder.mkdir()
    head = ds_mini / HEAD
    settings = SegmentationSettings(
        models=tuple(ModelSpec(str(m), xxh3_64_file(m), "onnxruntime/fp32/cpu")
                     for m in demo_models),
        ensemble=EnsembleSettings(test_time_augmentation=False, num_augmentations=0),
        seed=42, threads=2, provenance={"Engine": {"Name": "onnxruntime"}},
    )  # fmt: skip
    loc = stages.localise(head, "T1w", folders["loc"], settings)
    outputs = {}
    for side in ("right", "left"):
        outputs[side] = stages.segment_side([head], loc, side, folders[side], settings)
    dseg, unc = stages.paste_back_sides(
        head, loc, {s: o[0] for s, o in outputs.items()}, {s: o[1] for s, o in outputs.items()},
        folders["paste"],
    )  # fmt: skip
    stages.write_derivatives(
        dseg, unc, loc, source_file=head, sources=["bids:raw:" + HEAD],
        output_dir=tmp_path / "out", contrast="T1w", settings=settings,
        out_dir=folders["deriv"],
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
    networks = [load_network(m, engine="onnxruntime", threads=2) for m in demo_models]
    expected = segment_crop(
        [head_crops["left"]], networks, EnsembleSettings(test_time_augmentation=False)
    ).labels
    assert np.array_equal(np.asarray(nib.load(outputs["left"][0]).dataobj), expected)
    assert json.loads((tmp_path / "loc" / timing.TIMING_JSON).read_text())["total"] > 0
