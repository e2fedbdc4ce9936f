"""int8 models and the agreement gate of ``engine auto`` (issue 14).

Real NNCF quantisation of the demo models, real OpenVINO and onnxruntime networks, the real
calibration set built from the shared TemplateFlow files. Timing is never asserted.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import finish, hsf_bids
from onnx import helper, numpy_helper

from hsf_bids.engines import EngineUnavailableError, cpu_supports_bf16, open_network
from hsf_bids.engines.agreement import GATE_DICE, Choice, measure_agreement
from hsf_bids.engines.plan import candidate_choices, measure_models, plan_models
from hsf_bids.hub import xxh3_64_file
from hsf_bids.quantize import find_int8, int8_paths, quantize_model

pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def calibration(templateflow_home):
    from hsf_bids.calibration import template_crops

    return template_crops()


@pytest.fixture(scope="module")
def quantized(demo_models, calibration, tmp_path_factory):
    """The first demo model and its int8 version, in a models folder of the test's own."""
    folder = tmp_path_factory.mktemp("models") / "hub-demo"
    model = demo_models[0]
    return model, folder, quantize_model(model, folder, xxh3_64_file(model))


def _bad_activations(source: Path, target: Path) -> Path:
    """The same function as ``source`` (to float rounding), but one channel of the input of its
    second convolution is 1000 times larger and that convolution's weights for it 1000 times
    smaller: one per-tensor activation range now has to cover both, so int8 crushes the other
    channels, as it does in a model whose activations have an outlier channel."""
    model = onnx.load(source)
    graph = model.graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    conv = convs[1]
    weights = {t.name: t for t in graph.initializer}
    weight = numpy_helper.to_array(weights[conv.input[1]]).copy()
    channels = weight.shape[1]
    scale = np.ones((1, channels, 1, 1, 1), dtype=np.float32)
    scale[0, 0] = 1000.0
    weight[:, 0] /= 1000.0
    weights[conv.input[1]].CopyFrom(numpy_helper.from_array(weight, conv.input[1]))
    graph.initializer.append(numpy_helper.from_array(scale, "outlier_scale"))
    mul = helper.make_node("Mul", [conv.input[0], "outlier_scale"], ["outlier_out"], "outlier")
    conv.input[0] = "outlier_out"
    graph.node.insert(list(graph.node).index(conv), mul)
    onnx.checker.check_model(model)
    onnx.save(model, target)
    return target


def test_int8_and_bf16_of_a_demo_model_pass_the_gate(quantized, calibration):
    """The gate's measurement on one demo model: fused labels (original + 2 augmentations per
    template crop, HSF's vote) of OpenVINO int8, bf16 and fp32 against onnxruntime fp32."""
    model, folder, int8 = quantized
    xxh = xxh3_64_file(model)
    choices = candidate_choices(model, xxh, folder, None)
    names = {c.name for c in choices}
    assert "openvino/int8/cpu" in names and "openvino/fp32/cpu" in names
    assert ("openvino/bf16/cpu" in names) == cpu_supports_bf16()
    (measurement,) = measure_models([model], [xxh], folder, threads=2)
    for name, agreement in measurement.agreements.items():
        assert agreement.passed, agreement.summary()
        assert agreement.min_dice >= GATE_DICE
        for contrast in ("T1w", "T2w"):
            per = agreement.dice[contrast]
            assert per["CA2"] is None  # the demo models never predict CA2
            assert all(per[s] >= GATE_DICE for s in ("DG", "CA1", "CA3", "SUB")), (name, per)
        assert agreement.n_predictions == 4 * 3  # 2 contrasts x 2 sides x (1 + 2 augmentations)
        assert agreement.cpu and agreement.engine_version
    int8_agreement = measurement.agreements["openvino/int8/cpu"]
    assert int8_agreement.run_file == int8.xml.name
    assert int8_agreement.run_file_xxh3_64 == int8.xxh3_64
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16 (AMX / AVX512-BF16): bf16 measured where it runs")


def test_quantising_twice_writes_the_same_files(quantized, tmp_path):
    model, _, first = quantized
    second = quantize_model(model, tmp_path, xxh3_64_file(model))
    assert second.xml.read_bytes() == first.xml.read_bytes()
    assert second.bin.read_bytes() == first.bin.read_bytes()
    assert second.record == first.record
    # The record: provenance of the file, checked on every use.
    assert first.record["source_xxh3_64"] == xxh3_64_file(model)
    assert first.record["settings"]["float_convolutions"] == "first and last"
    assert first.bin.stat().st_size < model.stat().st_size / 3  # int8 weights


def test_an_int8_file_that_does_not_match_its_record_is_never_used(quantized, tmp_path):
    model, folder, _ = quantized
    copy = tmp_path / "copy"
    shutil.copytree(folder / "int8", copy / "int8")
    xxh = xxh3_64_file(model)
    assert find_int8(copy, model.name, xxh) is not None
    assert find_int8(copy, model.name, "0" * 16) is None  # made from another model version
    xml, bin_, _ = int8_paths(copy, model.name)
    data = bytearray(bin_.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bin_.write_bytes(bytes(data))
    assert find_int8(copy, model.name, xxh) is None


def test_auto_runs_in_fp32_a_model_whose_int8_version_fails_the_gate(
    demo_models, calibration, tmp_path, caplog
):
    """Two models: the demo model, and one whose activations quantise badly. ``auto`` runs the
    first in int8 and the second, whose int8 version fails the gate, in a float precision."""
    folder = tmp_path / "hub"
    good = demo_models[0]
    bad = _bad_activations(good, tmp_path / "outlier.onnx")
    crop = np.ascontiguousarray(_input(calibration[0]))
    reference = open_network(good, engine="onnxruntime", threads=2).run(crop)
    same = open_network(bad, engine="onnxruntime", threads=2).run(crop)
    np.testing.assert_allclose(same, reference, atol=1e-4)  # the same network in fp32
    paths, checksums = [good, bad], [xxh3_64_file(good), xxh3_64_file(bad)]
    for path, xxh in zip(paths, checksums, strict=True):
        quantize_model(path, folder, xxh)
    with caplog.at_level(logging.INFO, logger="hsf_bids.engines"):
        plan = plan_models(paths, checksums, folder, engine="auto", threads=2)
    good_run, bad_run = plan.runs
    assert good_run.choice == "openvino/int8/cpu"
    assert good_run.agreement is not None and good_run.agreement.passed
    assert bad_run.precision != "int8" and bad_run.path == bad
    cached = {
        p.name: json.loads(p.read_text()) for p in (folder / "agreement").glob("outlier.*int8*")
    }
    (record,) = cached.values()
    assert not record["passed"] and record["min_dice"] < GATE_DICE
    assert "outlier.onnx openvino/int8/cpu" in caplog.text and "fails the gate" in caplog.text
    # The measurement is cached: the same plan again measures nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hsf_bids.engines"):
        again = plan_models(paths, checksums, folder, engine="auto", threads=2)
    assert [r.choice for r in again.runs] == [r.choice for r in plan.runs]
    assert "measured" not in caplog.text
    # Provenance of a model's choice: its measurement and the gate.
    entry = good_run.provenance()
    assert entry["Precision"] == "int8" and entry["RunFile"].endswith(".xml")
    assert entry["Agreement"]["Gate"] == GATE_DICE and entry["Agreement"]["MinDice"] >= GATE_DICE
    assert plan.summary()["Precision"].startswith("int8 (1 model)")


def test_the_cache_is_keyed_by_the_cpu(quantized, monkeypatch, caplog):
    """Another CPU (or engine version) is measured again; the first measurement stays."""
    from hsf_bids.engines import cpu

    model, folder, _ = quantized
    xxh = xxh3_64_file(model)
    plan_models([model], [xxh], folder, engine="auto", precision="int8", threads=2)
    before = set((folder / "agreement").glob("*int8*"))
    monkeypatch.setattr(cpu, "cpu_signature", lambda: "x86_64 another-cpu")
    with caplog.at_level(logging.INFO, logger="hsf_bids.engines"):
        plan_models([model], [xxh], folder, engine="auto", precision="int8", threads=2)
    assert "measured demo_unet_b0.onnx" in caplog.text
    after = set((folder / "agreement").glob("*int8*"))
    assert before < after


def test_explicit_int8_needs_the_int8_versions(demo_models, tmp_path):
    xxh = xxh3_64_file(demo_models[0])
    for engine in ("openvino", "auto"):
        with pytest.raises(EngineUnavailableError, match="no int8 version.*hsf-bids-models"):
            plan_models([demo_models[0]], [xxh], tmp_path, engine=engine, precision="int8")
    with pytest.raises(EngineUnavailableError, match="int8 runs with engine openvino"):
        plan_models([demo_models[0]], [xxh], tmp_path, engine="onnxruntime", precision="int8")
    with pytest.raises(EngineUnavailableError, match="int8 runs with engine openvino on the CPU"):
        plan_models([demo_models[0]], [xxh], tmp_path, engine="auto", device="cuda",
                    precision="int8")  # fmt: skip


def test_int8_explicit_plan_and_network(quantized, calibration):
    model, folder, int8 = quantized
    plan = plan_models([model], [xxh3_64_file(model)], folder, engine="openvino",
                       precision="int8", threads=2)  # fmt: skip
    (run,) = plan.runs
    assert (run.engine, run.precision, run.path) == ("openvino", "int8", int8.xml)
    network = open_network(run.path, engine="openvino", precision="int8", threads=2)
    assert network.precision == "int8"
    probs = network.run(_input(calibration[0]))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    with pytest.raises(EngineUnavailableError, match="quantised model"):
        open_network(model, engine="openvino", precision="int8")


def test_int8_segmentations_are_byte_identical_for_a_seed(quantized, calibration):
    from hsf_bids.segment import EnsembleSettings, segment_crop

    _, _, int8 = quantized
    item = calibration[2]
    runs = []
    for _ in range(2):
        network = open_network(int8.xml, engine="openvino", precision="int8", threads=2)
        result = segment_crop(
            [(item.crop, item.spacing)], [network], EnsembleSettings(num_augmentations=3), seed=7
        )
        runs.append(result)
    assert runs[0].labels.tobytes() == runs[1].labels.tobytes()
    assert runs[0].uncertainty.tobytes() == runs[1].uncertainty.tobytes()


def test_measuring_again_reuses_the_reference(quantized, calibration):
    """The lazy path of the plan: a second choice measured later is compared with the same
    reference votes, without running onnxruntime again."""
    model, _, int8 = quantized
    xxh = xxh3_64_file(model)
    crops = calibration[:2]
    reference = open_network(model, engine="onnxruntime", threads=2)
    fp32 = Choice("openvino", "fp32", "cpu", model)
    first = measure_agreement(
        model, xxh, reference, {fp32: (open_network(model, engine="openvino", threads=2), xxh)},
        crops,
    )  # fmt: skip
    int8_choice = Choice("openvino", "int8", "cpu", int8.xml)
    network = open_network(int8.xml, engine="openvino", precision="int8", threads=2)
    second = measure_agreement(
        model, xxh, None, {int8_choice: (network, int8.xxh3_64)}, crops, previous=first
    )
    assert second.votes["reference"] is first.votes["reference"]
    assert second.agreements[int8_choice.name].reference_seconds_per_pass == pytest.approx(
        first.reference_seconds_per_pass, abs=1e-4
    )


def _input(item) -> np.ndarray:
    from hsf_bids.segment.preprocess import pad_to_multiple, zscore

    batch, _ = pad_to_multiple(zscore(item.crop)[None, None])
    return np.ascontiguousarray(batch, dtype=np.float32)


@pytest.mark.slow
def test_participant_auto_runs_int8_and_same_seed_gives_the_same_bytes(
    ds_mini, fast_hub, templateflow_home, tmp_path
):
    """End to end: the int8 versions made by ``hsf-bids-models quantize``; ``auto`` runs them
    (through the gate), says so in the sidecars and the report; two runs with one seed write
    byte-identical images and equal sidecars."""
    models = tmp_path / "models"
    made = subprocess.run(
        [sys.executable, "-m", "hsf_bids.hub.cli", "quantize", "--hub", str(fast_hub),
         "--models-dir", str(models), "--threads", "2"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert made.stdout.count("passes (gate 0.98)") == 3, made.stdout
    outputs = []
    for number in (1, 2):
        out = tmp_path / f"out{number}"
        proc = hsf_bids(ds_mini, out, "participant", "--participant-label", "04",
                        "--session-label", "01", "--hub", fast_hub, "--models-dir", models,
                        "-w", tmp_path / f"work{number}", "--seed", "5")  # fmt: skip
        log = finish(proc)
        assert proc.returncode == 0, log
        outputs.append(out)
    anat = Path("sub-04/ses-01/anat")
    sidecar = json.loads(
        (outputs[0] / anat / "sub-04_ses-01_space-T1w_desc-subfields_dseg.json").read_text()
    )
    provenance = sidecar["Provenance"]
    assert provenance["Engine"] == {"Name": "openvino", "Precision": "int8", "Device": "cpu"}
    for model in provenance["Models"]:
        assert model["RunFile"].endswith(".xml")
        assert model["Agreement"]["MinDice"] >= GATE_DICE
    report = (outputs[0] / "sub-04.html").read_text()
    assert "openvino int8" in report and "lowest Dice" in report
    citation = (outputs[0] / "CITATION.md").read_text()
    assert "NNCF post-training quantisation" in citation
    for path in sorted((outputs[0] / anat).iterdir()):
        other = outputs[1] / anat / path.name
        if path.suffix == ".json":
            assert json.loads(path.read_text()) == json.loads(other.read_text()), path.name
        elif path.name.endswith(".nii.gz"):
            assert path.read_bytes() == other.read_bytes(), path.name


def test_check_command_measures_on_the_user_s_images(
    demo_hub, ds_mini, templateflow_home, tmp_path
):
    """``hsf-bids-models check --images``: both hippocampi of a real head, every model, one line
    per model and choice with its lowest Dice and verdict; printed, not cached."""
    models_dir = tmp_path / "models"
    head = ds_mini / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    made = subprocess.run(
        [sys.executable, "-m", "hsf_bids.hub.cli", "quantize", "--hub", str(demo_hub),
         "--models-dir", str(models_dir), "--no-check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    done = subprocess.run(
        [sys.executable, "-m", "hsf_bids.hub.cli", "check", "--hub", str(demo_hub),
         "--models-dir", str(models_dir), "--images", str(head), "--precision", "int8",
         "--threads", "2"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "openvino/int8/cpu  " in line]
    assert len(lines) == 3, done.stdout
    assert all("lowest Dice 0.9" in line and "(gate 0.98)" in line for line in lines)
    assert "T2w: DG 0.9" in done.stdout and "ensemble (fused labels), T2w" in done.stdout
    assert not list(models_dir.rglob("agreement/*.json"))  # the user's crops are not cached
    bad = subprocess.run(
        [sys.executable, "-m", "hsf_bids.hub.cli", "check", "--hub", str(demo_hub),
         "--models-dir", str(models_dir), "--images", str(tmp_path / "head.nii.gz")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 64
    assert "must end with _T1w or _T2w" in bad.stderr and "Traceback" not in bad.stderr


def test_auto_takes_the_first_passing_choice_in_the_cpus_order_whatever_the_timings(quantized):
    """The choice never follows timings (two runs with separate caches would then write different
    labels when two choices run at nearly the same speed): int8 first, bf16 only where this CPU's
    bf16 outruns its fp32, OpenVINO fp32, else the reference."""
    from dataclasses import replace

    from hsf_bids.engines.cpu import bf16_beats_fp32
    from hsf_bids.engines.plan import auto_choice, auto_order

    model, folder, _ = quantized
    (measurement,) = measure_models([model], [xxh3_64_file(model)], folder, threads=2)
    template = next(iter(measurement.agreements.values()))

    def made(choice: str, seconds: float, passed: bool = True):
        return replace(template, choice=choice, seconds_per_pass=seconds, passed=passed,
                       reference_seconds_per_pass=2.0)  # fmt: skip

    assert auto_order()[0] == "openvino/int8/cpu" and auto_order()[-1] == "openvino/fp32/cpu"
    assert ("openvino/bf16/cpu" in auto_order()) == bf16_beats_fp32()
    assert "openvino/bf16/cpu" in auto_order("bf16")
    known = {"openvino/fp32/cpu": made("openvino/fp32/cpu", 1.0),
             "openvino/bf16/cpu": made("openvino/bf16/cpu", 0.3)}  # fmt: skip
    want = "openvino/bf16/cpu" if bf16_beats_fp32() else "openvino/fp32/cpu"
    assert auto_choice(known) == want
    known["openvino/int8/cpu"] = made("openvino/int8/cpu", 5.0)  # timed slower: still first
    assert auto_choice(known) == "openvino/int8/cpu"
    known["openvino/int8/cpu"] = made("openvino/int8/cpu", 0.1, passed=False)
    assert auto_choice(known) == want
    assert auto_choice({"openvino/fp32/cpu": made("openvino/fp32/cpu", 3.0)}) == "openvino/fp32/cpu"
    failing = {"openvino/fp32/cpu": made("openvino/fp32/cpu", 0.1, passed=False)}
    assert auto_choice(failing) is None
