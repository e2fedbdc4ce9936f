"""DeepSparse, the legacy optional engine, run for real: its optimised runtime (static shapes per
crop, one engine per shape), agreement with onnxruntime fp32 on a participant run.

DeepSparse 1.8 installs only on CPython 3.8-3.11 with numpy < 2 (``pip install '.[deepsparse]'``),
so these tests run in a virtual environment of their own: ``.ci/run`` builds it and runs
``pytest -m deepsparse`` there with ``HSF_BIDS_TEST_DEEPSPARSE=1``, which makes a missing
DeepSparse a failure under ``CI=true``. Elsewhere (the main environment) a test that needs
DeepSparse is skipped, saying why.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import finish, hsf_bids, require

from hsf_bids.engines import ModelLoadError, open_network
from hsf_bids.engines.agreement import GATE_DICE, dice_per_structure
from hsf_bids.engines.deepsparse import deepsparse_available, write_static_copy
from hsf_bids.hub import xxh3_64_file
from hsf_bids.vocabulary import RIGHT_OFFSET

pytestmark = pytest.mark.deepsparse

THREADS = 2
FALLBACK_WARNING = "Optimized runtime disabled"


def require_deepsparse() -> None:
    """Skip unless DeepSparse imports; in its own CI environment (``HSF_BIDS_TEST_DEEPSPARSE=1``)
    a missing DeepSparse is a failure under CI=true."""
    if deepsparse_available():
        return
    reason = (
        f"deepsparse is not installed in this environment (Python {sys.version.split()[0]}); "
        "it needs CPython <= 3.11 with numpy < 2: pip install '.[deepsparse]' in a venv of its "
        "own (.ci/run does, and runs pytest -m deepsparse there)"
    )
    if os.environ.get("HSF_BIDS_TEST_DEEPSPARSE") == "1":
        require(False, reason)
    pytest.skip(reason)


@pytest.fixture
def crops() -> dict[tuple[int, ...], np.ndarray]:
    """Seeded random batches of three shapes (two crop sizes, two batch sizes)."""
    rng = np.random.default_rng(0)
    shapes = [(1, 1, 48, 64, 48), (1, 1, 40, 56, 56), (2, 1, 40, 56, 56)]
    return {s: rng.standard_normal(s, dtype=np.float32) for s in shapes}


def test_static_copy_fixes_the_input_shape_and_leaves_the_model_alone(demo_models, tmp_path):
    import onnx

    model = demo_models[0]
    before = xxh3_64_file(model)
    copy = write_static_copy(model, (2, 1, 40, 56, 48), tmp_path / "static.onnx")
    dims = onnx.load(str(copy)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 1, 40, 56, 48]
    assert not any(d.dim_param for d in dims)
    assert xxh3_64_file(model) == before
    with pytest.raises(ModelLoadError, match=r"dimension 1 is fixed at 1, the batch has 2"):
        write_static_copy(model, (1, 2, 40, 56, 48), tmp_path / "bad.onnx")
    with pytest.raises(ModelLoadError, match=r"has 5 dimensions, the batch \[1, 40, 56, 48\]"):
        write_static_copy(model, (1, 40, 56, 48), tmp_path / "bad.onnx")


def test_deepsparse_runs_its_optimised_runtime_one_engine_per_shape(
    demo_models, crops, tmp_path, caplog, capfd
):
    require_deepsparse()
    import deepsparse

    # The models folder may be read-only and its files are checked by checksum: DeepSparse's
    # own input_shapes argument would rewrite the file in place, the network must not.
    model = tmp_path / demo_models[0].name
    shutil.copyfile(demo_models[0], model)
    model.chmod(0o444)
    before = xxh3_64_file(model)

    caplog.set_level(logging.INFO, logger="hsf_bids.engines.deepsparse")
    network = open_network(model, engine="deepsparse", threads=THREADS)
    reference = open_network(model, engine="onnxruntime", threads=THREADS)
    assert (network.engine, network.precision, network.device) == ("deepsparse", "fp32", "cpu")
    for shape, batch in crops.items():
        probs = network.run(batch)
        expected = reference.run(batch)
        assert probs.shape == (shape[0], 6, *shape[2:]) and probs.dtype == np.float32
        assert float(np.abs(probs - expected).max()) < 1e-3
        assert float((probs.argmax(1) == expected.argmax(1)).mean()) > 0.999
    first = network.engine_for((1, 1, 48, 64, 48))
    network.run(crops[(1, 1, 48, 64, 48)])
    assert network.engine_for((1, 1, 48, 64, 48)) is first  # compiled once, then reused
    assert sorted(network._engines) == sorted(crops)
    assert all(e.fraction_of_supported_ops == 1.0 for e in network._engines.values())
    assert all(e.num_cores == THREADS for e in network._engines.values())
    compiled = [r.getMessage() for r in caplog.records if "optimised runtime compiled" in r.message]
    assert len(compiled) == len(crops), caplog.text
    assert xxh3_64_file(model) == before
    assert FALLBACK_WARNING not in capfd.readouterr().err

    # The control: the same model with its dynamic input shape falls back, and says so.
    deepsparse.Engine(str(model), batch_size=1, num_cores=THREADS)
    assert FALLBACK_WARNING in capfd.readouterr().err
    network.close()


def test_deepsparse_refuses_a_model_outside_the_contract(tmp_path):
    require_deepsparse()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError, match="corrupt.onnx"):
        open_network(corrupt, engine="deepsparse")


def test_an_explicit_deepsparse_plan_names_the_precision_that_runs(demo_models, tmp_path):
    """DeepSparse runs the graph as stored: the plan (hence the provenance) says so, and a
    different --precision is refused instead of recorded."""
    require_deepsparse()
    from hsf_bids.engines import EngineUnavailableError
    from hsf_bids.engines.plan import plan_models

    checksums = [xxh3_64_file(p) for p in demo_models]
    plan = plan_models(demo_models, checksums, tmp_path, engine="deepsparse")
    assert [r.choice for r in plan.runs] == ["deepsparse/fp32/cpu"] * len(demo_models)
    assert all(r.agreement is None for r in plan.runs)  # asked for, so not gated
    with pytest.raises(EngineUnavailableError, match=r"as stored, in fp32, not int8"):
        plan_models(demo_models, checksums, tmp_path, engine="deepsparse", precision="int8")


@pytest.fixture(scope="module")
def sub04_runs(ds_mini, fast_hub, templateflow_home, tmp_path_factory):
    """sub-04 ses-01 segmented with --engine deepsparse and with onnxruntime (fast demo hub), the
    two runs side by side (one process each)."""
    require_deepsparse()
    root = tmp_path_factory.mktemp("deepsparse_runs")
    procs = {
        engine: hsf_bids(
            ds_mini, root / engine, "participant", "--participant-label", "04",
            "--session-label", "01", "--hub", fast_hub, "--engine", engine,
            "--precision", "fp32", "--nprocs", "1", "--seed", "7", "-w", root / f"work_{engine}",
            "--skip-bids-validation",
        )
        for engine in ("deepsparse", "onnxruntime")
    }  # fmt: skip
    runs = {engine: (root / engine, finish(proc)) for engine, proc in procs.items()}
    for engine, proc in procs.items():
        assert proc.returncode == 0, runs[engine][1]
    return runs


def _sides(dseg: Path) -> list[np.ndarray]:
    """Left and right single-side label maps of a bilateral label image."""
    data = np.asarray(nib.load(dseg).dataobj).astype(np.int16)
    right = np.where(data > RIGHT_OFFSET, data - RIGHT_OFFSET, 0)
    return [np.where(data < RIGHT_OFFSET, data, 0), right]


def test_participant_run_with_deepsparse_agrees_with_onnxruntime(sub04_runs):
    from hsf_bids.outputs.read import read_sidecar, segmentations

    (out, log), (reference_out, _) = sub04_runs["deepsparse"], sub04_runs["onnxruntime"]
    assert "DeepSparse optimised runtime compiled" in log, log
    assert FALLBACK_WARNING not in log and "onnxruntime fallback" not in log, log
    (dseg,) = segmentations(out, "sub-04")
    (reference,) = segmentations(reference_out, "sub-04")
    assert dseg.name == reference.name
    provenance = read_sidecar(dseg.with_name(dseg.name.replace(".nii.gz", ".json")))["Provenance"]
    assert provenance["Engine"]["Name"] == "deepsparse", provenance["Engine"]
    for side, ours, theirs in zip(("left", "right"), _sides(dseg), _sides(reference), strict=True):
        dice = dice_per_structure([theirs], [ours])
        print(f"sub-04 ses-01 {side}: Dice deepsparse vs onnxruntime fp32 {dice}")
        present = {k: v for k, v in dice.items() if v is not None}
        assert len(present) >= 4, dice
        assert all(v >= GATE_DICE for v in present.values()), dice
