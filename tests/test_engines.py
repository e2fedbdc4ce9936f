"""Inference engines on the real demo models: agreement, probabilities, batching, shapes, errors."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hsf_bids.engines import (
    EngineUnavailableError,
    InputShapeError,
    ModelLoadError,
    Network,
    UnknownEngineError,
    available_engines,
    clear_network_cache,
    cpu_supports_bf16,
    load_network,
    open_network,
    resolve_engine,
)
from hsf_bids.engines.deepsparse import deepsparse_available
from hsf_bids.engines.onnxruntime import cuda_available

THREADS = 2
ENGINES = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def mni_crops(templateflow_home: Path) -> np.ndarray:
    """Both hippocampus crops of the MNI 2009c sym T1w, z-scored and padded to 40x56x56.

    Boxes from the demo models' REPORT.md (left [52:92, 82:135, 39:94], right [100:140, ...]).
    """
    image = templateflow_home / "tpl-MNI152NLin2009cSym" / "tpl-MNI152NLin2009cSym_res-1_T1w.nii.gz"
    data = np.asarray(nib.load(image).dataobj, dtype=np.float64)
    crops = []
    for x0 in (52, 100):
        crop = data[x0 : x0 + 40, 82:135, 39:94]
        crop = (crop - crop.mean()) / crop.std(ddof=1)
        crops.append(np.pad(crop, [(0, 0), (2, 1), (1, 0)]).astype(np.float32))
    return np.stack(crops)[:, None]  # [2, 1, 40, 56, 56]


@pytest.fixture(scope="module")
def networks(demo_models: list[Path]) -> dict[str, Network]:
    """One network per engine on the first demo model."""
    return {e: open_network(demo_models[0], engine=e, threads=THREADS) for e in ENGINES}


def test_onnxruntime_and_openvino_fp32_agree_on_every_demo_model(demo_models, mni_crops):
    for model in demo_models:
        ort_probs = open_network(model, engine="onnxruntime", threads=THREADS).run(mni_crops)
        ov = open_network(model, engine="openvino", precision="fp32", threads=THREADS)
        assert ov.precision == "fp32"
        ov_probs = ov.run(mni_crops)
        assert ov_probs.shape == ort_probs.shape == (2, 6, 40, 56, 56)
        assert np.abs(ov_probs - ort_probs).max() < 1e-3, model.name
        agreement = (ov_probs.argmax(1) == ort_probs.argmax(1)).mean()
        assert agreement > 0.999, f"{model.name}: argmax agreement {agreement:.5f}"
        # The model really segments the MNI crop: some hippocampus in each side's crop.
        assert ((ort_probs.argmax(1) > 0).sum(axis=(1, 2, 3)) > 500).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_outputs_are_float32_probabilities(networks, mni_crops, engine):
    probs = networks[engine].run(mni_crops[:1])
    assert probs.dtype == np.float32
    assert probs.shape == (1, 6, 40, 56, 56)
    assert probs.min() >= 0.0 and probs.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_of_two_equals_two_batches_of_one(networks, mni_crops, engine):
    network = networks[engine]
    together = network.run(mni_crops)
    apart = np.concatenate([network.run(mni_crops[:1]), network.run(mni_crops[1:])])
    # onnxruntime is batch-invariant to float rounding; OpenVINO's CPU kernels block a batch of
    # two differently from a batch of one (measured up to 8e-5).
    np.testing.assert_allclose(together, apart, atol=1e-5 if engine == "onnxruntime" else 5e-4)
    assert (together.argmax(1) == apart.argmax(1)).mean() > 0.9999


@pytest.mark.parametrize("engine", ENGINES)
def test_different_crop_shapes_in_one_network(networks, mni_crops, engine):
    network = networks[engine]
    first = network.run(mni_crops[:1])
    rng = np.random.default_rng(7)
    for shape in [(48, 64, 48), (56, 48, 64), (40, 56, 56), (32, 40, 48)]:
        batch = rng.standard_normal((1, 1, *shape), dtype=np.float32)
        probs = network.run(batch)
        assert probs.shape == (1, 6, *shape)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # No state carried over from other shapes.
    np.testing.assert_allclose(network.run(mni_crops[:1]), first, atol=1e-6)


def test_float64_and_noncontiguous_input_are_accepted(networks, mni_crops):
    network = networks["onnxruntime"]
    expected = network.run(mni_crops[:1])
    as_f64 = np.asfortranarray(mni_crops[:1].astype(np.float64))
    np.testing.assert_allclose(network.run(as_f64), expected, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((40, 56, 56), "shape"),  # no batch and channel axes
        ((1, 2, 40, 56, 56), "shape"),  # two channels
        ((1, 1, 40, 53, 56), "multiples of 8"),  # not padded
    ],
)
def test_bad_batch_is_rejected_naming_the_model(networks, engine, shape, message):
    with pytest.raises(InputShapeError, match=message) as info:
        networks[engine].run(np.zeros(shape, dtype=np.float32))
    assert "demo_unet_b0.onnx" in str(info.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_missing_and_corrupt_model_files_raise_model_load_error(tmp_path, engine):
    missing = tmp_path / "absent.onnx"
    with pytest.raises(ModelLoadError, match="absent.onnx"):
        open_network(missing, engine=engine)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelLoadError, match="corrupt.onnx"):
        open_network(corrupt, engine=engine)


def test_load_network_loads_a_model_once_per_process(demo_models):
    clear_network_cache()
    try:
        first = load_network(demo_models[0], engine="onnxruntime", threads=THREADS)
        assert load_network(demo_models[0], engine="onnxruntime", threads=THREADS) is first
        # Same file through another spelling of its path: still one network.
        relative = demo_models[0].parent / ".." / demo_models[0].parent.name / demo_models[0].name
        assert load_network(relative, engine="onnxruntime", threads=THREADS) is first
        # Other settings or another model: other networks.
        other_engine = load_network(demo_models[0], engine="openvino", threads=THREADS)
        assert other_engine is not first and other_engine.engine == "openvino"
        assert load_network(demo_models[0], engine="onnxruntime", threads=1) is not first
        assert load_network(demo_models[1], engine="onnxruntime", threads=THREADS) is not first
    finally:
        clear_network_cache()
    assert load_network(demo_models[0], engine="onnxruntime", threads=THREADS) is not first
    clear_network_cache()


def test_load_network_is_thread_safe(demo_models):
    clear_network_cache()
    barrier = threading.Barrier(4)

    def load(_):
        barrier.wait()
        return load_network(demo_models[2], engine="onnxruntime", threads=1)

    try:
        with ThreadPoolExecutor(4) as pool:
            loaded = list(pool.map(load, range(4)))
        assert all(s is loaded[0] for s in loaded)
    finally:
        clear_network_cache()


@pytest.mark.skipif(cuda_available(), reason="CUDA is available: no fallback to test")
def test_cuda_request_falls_back_to_cpu_and_says_so(demo_models, mni_crops, caplog):
    with caplog.at_level(logging.WARNING, logger="hsf_bids.engines"):
        network = open_network(demo_models[0], engine="onnxruntime", device="cuda", threads=1)
    assert network.device == "cpu"
    assert "CUDA requested" in caplog.text
    assert network.run(mni_crops[:1]).shape == (1, 6, 40, 56, 56)
    with caplog.at_level(logging.WARNING, logger="hsf_bids.engines"):
        assert resolve_engine("auto", device="cuda")[2] == "cpu"
        assert resolve_engine("onnxruntime", device="cuda") == ("onnxruntime", "fp32", "cpu")


def test_unknown_engine_device_or_precision_is_a_clear_error(demo_models):
    with pytest.raises(UnknownEngineError, match="unknown engine 'tensorrt'.*onnxruntime"):
        open_network(demo_models[0], engine="tensorrt")
    with pytest.raises(UnknownEngineError, match="unknown device 'tpu'"):
        resolve_engine("auto", device="tpu")
    with pytest.raises(UnknownEngineError, match="unknown precision 'fp8'"):
        open_network(demo_models[0], engine="openvino", precision="fp8")
    assert issubclass(UnknownEngineError, ValueError)


@pytest.mark.skipif(deepsparse_available(), reason="deepsparse is installed")
def test_deepsparse_missing_names_the_extra(demo_models):
    for call in (
        lambda: open_network(demo_models[0], engine="deepsparse"),
        lambda: resolve_engine("deepsparse"),
    ):
        with pytest.raises(EngineUnavailableError, match=r"hsf_bids\[deepsparse\].*3\.11.*numpy"):
            call()
    assert not any(e == "deepsparse" for e, _, _ in available_engines())


def test_cpu_supports_bf16_follows_openvino_and_cpu_flags():
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert cpu_supports_bf16() == ("BF16" in capabilities)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set(cpuinfo.read_text().split())
        if not {"avx512_bf16", "amx_bf16"} & flags:
            assert not cpu_supports_bf16()


def test_openvino_bf16_reports_the_precision_that_runs(demo_models, mni_crops, caplog):
    with caplog.at_level(logging.WARNING, logger="hsf_bids.engines"):
        network = open_network(demo_models[0], engine="openvino", precision="bf16", threads=2)
    probs = network.run(mni_crops[:1])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-2)
    if cpu_supports_bf16():
        assert network.precision == "bf16"
        assert resolve_engine("openvino", precision="bf16") == ("openvino", "bf16", "cpu")
    else:
        # OpenVINO silently compiles f32 here; the network says so and a warning is logged.
        assert network.precision == "fp32"
        assert "bf16 requested" in caplog.text
        with pytest.raises(EngineUnavailableError, match="AMX or AVX512-BF16"):
            resolve_engine("openvino", precision="bf16")


def test_resolve_engine_choices():
    choices = available_engines()
    assert ("onnxruntime", "fp32", "cpu") in choices
    assert ("openvino", "fp32", "cpu") in choices
    assert (("openvino", "bf16", "cpu") in choices) == cpu_supports_bf16()
    # auto's faster choices are made per model through the agreement gate (test_gate.py); with
    # nothing measured it is the reference.
    assert resolve_engine("auto", "cpu") == ("onnxruntime", "fp32", "cpu")
    assert resolve_engine("auto", "cpu", "fp32") == ("onnxruntime", "fp32", "cpu")
    assert resolve_engine("onnxruntime", "cpu") == ("onnxruntime", "fp32", "cpu")
    assert resolve_engine("openvino", "cpu", "fp32") == ("openvino", "fp32", "cpu")
    with pytest.raises(EngineUnavailableError, match="onnxruntime.*bf16"):
        resolve_engine("onnxruntime", "cpu", "bf16")
    with pytest.raises(EngineUnavailableError, match="CPU only"):
        resolve_engine("openvino", "cuda")


def test_auto_network_uses_the_resolved_engine(demo_models, mni_crops):
    network = open_network(demo_models[0], engine="auto", threads=1)
    engine, precision, device = resolve_engine("auto", "cpu")
    assert (network.engine, network.precision, network.device) == (engine, precision, device)
    assert isinstance(network, Network)
    assert network.threads == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_an_ensemble_holds_one_run_s_working_memory_not_one_per_model(demo_models, engine):
    """After a run, a network gives its working memory back, so running every model of an
    ensemble in turn needs about one model's working memory, not the sum (measured in a fresh
    process: without the release each demo model keeps about 340 MiB for this batch)."""
    import subprocess
    import sys

    code = f"""
import numpy as np
from hsf_bids.engines import open_network

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

paths = {[str(p) for p in demo_models]!r}
networks = [open_network(p, engine={engine!r}, threads=2) for p in paths]
batch = np.random.default_rng(0).standard_normal((4, 1, 64, 64, 64)).astype(np.float32)
marks = []
for network in networks:
    network.run(batch)
    marks.append(rss_mib())
print(*marks)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    marks = [float(v) for v in done.stdout.split()]
    assert len(marks) == len(demo_models) >= 3
    assert marks[-1] - marks[0] < 150, marks
