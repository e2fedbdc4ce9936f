"""The random-weight ARUNet generator: a valid HSF-contract model of the published size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from hsf_bids.arunet import (
    INPUT_NAME,
    OUTPUT_NAME,
    PUBLISHED_PARAMETERS,
    build_arunet,
    build_arunet_model,
    count_parameters,
    expected_parameters,
    main,
)
from hsf_bids.engines import open_network

SMALL = (4, 8, 16, 32)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return build_arunet(tmp_path_factory.mktemp("arunet") / "small.onnx", seed=3, widths=SMALL)


@pytest.fixture(scope="module")
def crop_batch() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((2, 1, 40, 56, 56), dtype=np.float32)


def test_model_passes_the_checker_and_follows_the_contract(small_model):
    model = onnx.load(str(small_model))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 1, "x", "y", "z"]
    assert out_dims == ["batch", 6, "x", "y", "z"]
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "ConvTranspose", "Erf", "ReduceMean", "Sigmoid", "Softmax"} <= ops
    assert model.graph.node[-1].op_type == "Softmax"


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_runs_in_both_engines_on_a_crop(small_model, crop_batch, engine):
    probs = open_network(small_model, engine=engine, threads=2).run(crop_batch)
    assert probs.shape == (2, 6, 40, 56, 56)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Random, yet not degenerate: the winner is not certain everywhere and several classes win.
    assert 0.2 < probs.max(axis=1).mean() < 0.95
    assert len(np.unique(probs.argmax(axis=1))) >= 3


def test_engines_agree_and_instances_are_independent(small_model, crop_batch):
    ort = open_network(small_model, engine="onnxruntime", threads=2)
    ov = open_network(small_model, engine="openvino", threads=2)
    together = ort.run(crop_batch)
    assert np.abs(ov.run(crop_batch) - together).max() < 1e-3
    # Per-instance normalisation: batch composition does not change an instance's output.
    np.testing.assert_allclose(ort.run(crop_batch[1:]), together[1:], atol=1e-5)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = build_arunet(tmp_path / "a.onnx", seed=5, widths=SMALL).read_bytes()
    b = build_arunet(tmp_path / "b.onnx", seed=5, widths=SMALL).read_bytes()
    c = build_arunet(tmp_path / "c.onnx", seed=6, widths=SMALL).read_bytes()
    assert a == b
    assert a != c


def test_parameter_count_of_small_model_matches_analytic_count(small_model):
    assert count_parameters(small_model) == expected_parameters(SMALL)
    assert count_parameters(onnx.load(str(small_model))) == expected_parameters(SMALL)


def test_full_size_parameter_count_is_the_published_one():
    # Analytic, then from the real full-size graph (built in memory, not run).
    assert expected_parameters() == PUBLISHED_PARAMETERS == 37_483_047
    assert count_parameters(build_arunet_model(seed=0)) == PUBLISHED_PARAMETERS


def test_count_parameters_on_a_demo_model(demo_hub):
    # The demo report states 1,136,646 parameters for its torch-exported U-Nets.
    assert count_parameters(demo_hub.parent / "demo_unet_b0.onnx") == 1_136_646


def test_cli_writes_the_model(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.onnx"
    assert main([str(out), "--seed", "1", "--widths", *map(str, SMALL)]) == 0
    assert out.is_file()
    assert out.read_bytes() == build_arunet_model(seed=1, widths=SMALL).SerializeToString()
    assert f"{expected_parameters(SMALL):,} parameters" in capsys.readouterr().out


def test_bad_widths_are_rejected():
    with pytest.raises(ValueError, match="widths"):
        build_arunet_model(widths=(8,))
