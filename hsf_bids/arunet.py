"""A same-size, random-weight ARUNet in the HSF ONNX contract, for benchmarks.

The published HSF 4.0.0 models are ~150 MB downloads; this builds a network with the same layers,
widths and parameter count (37,483,047 at the default widths) directly with ``onnx.helper``, so
engines can be timed offline. The weights are random: the output is a valid softmax, not a
segmentation.

Architecture (hsf-contract.md, "The network"; layer order "conv -> GELU -> SwitchNorm"):

* conv layer: Conv3d k3 p1 with bias -> GELU -> SwitchNorm (instance + layer statistics mixed by
  softmax-normalised learned weights, per-channel affine);
* residual block: conv1, conv2, conv3 (conv3 without GELU), ``GELU(conv3 + conv1)``;
* encoder level 0: residual block 1 -> w0; level i > 0: strided Conv3d (k3, s2, p1, no bias,
  w[i-1] -> w[i-1]) then residual block w[i-1] -> w[i];
* decoder level: ConvTranspose3d (k3, s2, p1, output padding 1, with bias) w[i] -> w[i-1]; attention
  gate on the skip ``skip * sigmoid(SN(psi(GELU(SN(Wg up) + SN(Wx skip)))))`` with 1x1x1 convs of
  inner width w[i-1] // 2; sum join; residual block w[i-1] -> w[i-1];
* head: Conv3d 1x1x1 w0 -> 6 with bias, Softmax over channels.

With these choices the parameter count is exactly 37,483,047 (see :func:`expected_parameters`),
which pins the details the contract leaves open: the down-sampling conv keeps the width
(w[i-1] -> w[i-1], 27*w^2 weights), each SwitchNorm holds 2*C affine weights plus 2 + 2 mixing
weights (no batch-norm branch), the attention gate normalises all three of its convs (the psi
norm has C = 1), and the transposed convs have a bias.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hsf_bids.atomic import atomic_file

INPUT_NAME = "cropped_hippocampus"
OUTPUT_NAME = "segmented_hippocampus"
N_CLASSES = 6
PUBLISHED_PARAMETERS = 37_483_047
OPSET = 17
DEFAULT_WIDTHS = (64, 128, 256, 512)
_SN_EPS = 1e-5


class _GraphBuilder:
    """Accumulates nodes and (parameter) initializers with unique, readable names.

    Only learned parameters become initializers; scalar constants are ``Constant`` nodes so that
    :func:`count_parameters` can simply sum the initializers.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[str, str] = {}
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def param(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def const(self, value: float) -> str:
        out = f"const_{len(self._consts)}"
        return self._constant(repr(float(value)), out, np.array(value, dtype=np.float32))

    def index(self, value: int) -> str:
        return self._constant(f"int64:{value}", f"index_{value}", np.array(value, dtype=np.int64))

    def _constant(self, key: str, out: str, array: np.ndarray) -> str:
        """The name of a ``Constant`` node holding ``array``: added as ``out`` the first time
        ``key`` is asked for, reused afterwards."""
        if key not in self._consts:
            tensor = numpy_helper.from_array(array, out)
            self.nodes.append(helper.make_node("Constant", [], [out], value=tensor))
            self._consts[key] = out
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], prefix: str, **attrs: Any) -> str:
        out = self.name(prefix)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def gaussian(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _gelu(g: _GraphBuilder, x: str, prefix: str) -> str:
    # Exact (erf) GELU as torch exports it for opset < 20.
    scaled = g.op("Div", [x, g.const(math.sqrt(2.0))], f"{prefix}_div")
    erf = g.op("Erf", [scaled], f"{prefix}_erf")
    one_plus = g.op("Add", [erf, g.const(1.0)], f"{prefix}_add")
    half_x = g.op("Mul", [x, g.const(0.5)], f"{prefix}_halfx")
    return g.op("Mul", [half_x, one_plus], f"{prefix}_gelu")


def _switch_norm(g: _GraphBuilder, x: str, channels: int, prefix: str) -> str:
    """SwitchNorm3d without its batch-norm branch, on a [N, C, X, Y, Z] tensor."""
    weight = g.param(f"{prefix}.weight", 1.0 + g.gaussian((1, channels, 1, 1, 1), 0.1))
    bias = g.param(f"{prefix}.bias", g.gaussian((1, channels, 1, 1, 1), 0.1))
    mean_w = g.param(f"{prefix}.mean_weight", 1.0 + g.gaussian((2,), 0.5))
    var_w = g.param(f"{prefix}.var_weight", 1.0 + g.gaussian((2,), 0.5))

    spatial = [2, 3, 4]
    mean_in = g.op("ReduceMean", [x], f"{prefix}_mean_in", axes=spatial, keepdims=1)
    centred = g.op("Sub", [x, mean_in], f"{prefix}_centred")
    sq = g.op("Mul", [centred, centred], f"{prefix}_sq")
    var_pop = g.op("ReduceMean", [sq], f"{prefix}_var_pop", axes=spatial, keepdims=1)
    # torch's var() is unbiased: scale by n / (n - 1), n = number of voxels (dynamic).
    shape = g.op("Shape", [x], f"{prefix}_shape", start=2)
    n_int = g.op("ReduceProd", [shape], f"{prefix}_n_int", keepdims=1)
    n = g.op("Cast", [n_int], f"{prefix}_n", to=TensorProto.FLOAT)
    n_minus = g.op("Sub", [n, g.const(1.0)], f"{prefix}_n1")
    bessel = g.op("Div", [n, n_minus], f"{prefix}_bessel")
    var_in = g.op("Mul", [var_pop, bessel], f"{prefix}_var_in")

    mean_ln = g.op("ReduceMean", [mean_in], f"{prefix}_mean_ln", axes=[1], keepdims=1)
    mean_sq = g.op("Mul", [mean_in, mean_in], f"{prefix}_mean_sq")
    second = g.op("Add", [var_in, mean_sq], f"{prefix}_second")
    second_ln = g.op("ReduceMean", [second], f"{prefix}_second_ln", axes=[1], keepdims=1)
    mean_ln_sq = g.op("Mul", [mean_ln, mean_ln], f"{prefix}_mean_ln_sq")
    var_ln = g.op("Sub", [second_ln, mean_ln_sq], f"{prefix}_var_ln")

    def mix(weights: str, a: str, b: str, tag: str) -> str:
        soft = g.op("Softmax", [weights], f"{prefix}_{tag}_soft", axis=0)
        w0 = g.op("Gather", [soft, g.index(0)], f"{prefix}_{tag}_w0", axis=0)
        w1 = g.op("Gather", [soft, g.index(1)], f"{prefix}_{tag}_w1", axis=0)
        return g.op(
            "Add",
            [g.op("Mul", [a, w0], f"{prefix}_{tag}_a"), g.op("Mul", [b, w1], f"{prefix}_{tag}_b")],
            f"{prefix}_{tag}",
        )

    mean = mix(mean_w, mean_in, mean_ln, "mean")
    var = mix(var_w, var_in, var_ln, "var")
    std = g.op("Sqrt", [g.op("Add", [var, g.const(_SN_EPS)], f"{prefix}_var_eps")], f"{prefix}_std")
    centred_x = g.op("Sub", [x, mean], f"{prefix}_xc")
    normed = g.op("Div", [centred_x, std], f"{prefix}_norm")
    scaled = g.op("Mul", [normed, weight], f"{prefix}_scale")
    return g.op("Add", [scaled, bias], f"{prefix}_out")


def _conv(
    g: _GraphBuilder,
    x: str,
    c_in: int,
    c_out: int,
    prefix: str,
    *,
    kernel: int = 3,
    stride: int = 1,
    bias: bool = True,
    gain: float = 2.0,
) -> str:
    """Conv3d, weights N(0, gain / fan_in) (He for GELU-ish activations with gain 2)."""
    pad = kernel // 2
    fan_in = c_in * kernel**3
    w = g.param(
        f"{prefix}.weight",
        g.gaussian((c_out, c_in, kernel, kernel, kernel), math.sqrt(gain / fan_in)),
    )
    inputs = [x, w]
    if bias:
        inputs.append(g.param(f"{prefix}.bias", g.gaussian((c_out,), 0.01)))
    return g.op(
        "Conv",
        inputs,
        prefix,
        kernel_shape=[kernel] * 3,
        strides=[stride] * 3,
        pads=[pad] * 6,
    )


def _conv_layer(
    g: _GraphBuilder, x: str, c_in: int, c_out: int, prefix: str, *, activation: bool = True
) -> str:
    """Conv3d k3 + bias -> GELU -> SwitchNorm ("cgs"); without GELU for a block's conv3."""
    y = _conv(g, x, c_in, c_out, f"{prefix}.conv")
    if activation:
        y = _gelu(g, y, f"{prefix}.gelu")
    return _switch_norm(g, y, c_out, f"{prefix}.norm")


def _residual_block(g: _GraphBuilder, x: str, c_in: int, c_out: int, prefix: str) -> str:
    first = _conv_layer(g, x, c_in, c_out, f"{prefix}.conv1")
    y = _conv_layer(g, first, c_out, c_out, f"{prefix}.conv2")
    y = _conv_layer(g, y, c_out, c_out, f"{prefix}.conv3", activation=False)
    y = g.op("Add", [y, first], f"{prefix}.residual")
    return _gelu(g, y, f"{prefix}.gelu")


def _attention_gate(g: _GraphBuilder, up: str, skip: str, channels: int, prefix: str) -> str:
    inner = max(channels // 2, 1)
    gate = _conv(g, up, channels, inner, f"{prefix}.W_g", kernel=1, gain=1.0)
    gate = _switch_norm(g, gate, inner, f"{prefix}.W_g.norm")
    local = _conv(g, skip, channels, inner, f"{prefix}.W_x", kernel=1, gain=1.0)
    local = _switch_norm(g, local, inner, f"{prefix}.W_x.norm")
    psi = _gelu(g, g.op("Add", [gate, local], f"{prefix}.sum"), f"{prefix}.gelu")
    psi = _conv(g, psi, inner, 1, f"{prefix}.psi", kernel=1, gain=1.0)
    psi = _switch_norm(g, psi, 1, f"{prefix}.psi.norm")
    psi = g.op("Sigmoid", [psi], f"{prefix}.sigmoid")
    return g.op("Mul", [skip, psi], f"{prefix}.gated")


def _up(g: _GraphBuilder, x: str, c_in: int, c_out: int, prefix: str) -> str:
    # Each output voxel of a stride-2 k3 transposed conv sums about c_in * 27 / 8 products.
    std = math.sqrt(2.0 * 8 / (27 * c_in))
    w = g.param(f"{prefix}.weight", g.gaussian((c_in, c_out, 3, 3, 3), std))
    b = g.param(f"{prefix}.bias", g.gaussian((c_out,), 0.01))
    # Inputs are multiples of 8, so every level halves exactly and output padding 1 restores
    # the skip size: (n/2 - 1) * 2 - 2 + 3 + 1 = n.
    return g.op(
        "ConvTranspose",
        [x, w, b],
        prefix,
        kernel_shape=[3, 3, 3],
        strides=[2, 2, 2],
        pads=[1] * 6,
        output_padding=[1, 1, 1],
    )


def build_arunet_model(*, seed: int = 0, widths: Sequence[int] = DEFAULT_WIDTHS) -> onnx.ModelProto:
    """Build the random-weight ARUNet as an in-memory ONNX model (see the module docstring).

    ``seed`` drives a ``numpy.random.Generator``; the same seed and widths give the same bytes.
    ``widths`` are the feature widths per level (default 64/128/256/512, as published).
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or any(w < 2 for w in widths):
        raise ValueError(f"widths must be >= 2 levels of >= 2 channels, got {widths}")
    g = _GraphBuilder(np.random.default_rng(seed))

    x = INPUT_NAME
    skips: list[str] = []
    for level, width in enumerate(widths):
        if level == 0:
            x = _residual_block(g, x, 1, width, "encoders.0.block")
        else:
            prev = widths[level - 1]
            x = _conv(g, x, prev, prev, f"encoders.{level}.down", stride=2, bias=False)
            x = _residual_block(g, x, prev, width, f"encoders.{level}.block")
        skips.append(x)

    for i, level in enumerate(range(len(widths) - 1, 0, -1)):
        c_in, c_out = widths[level], widths[level - 1]
        skip = skips[level - 1]
        up = _up(g, x, c_in, c_out, f"decoders.{i}.up")
        gated = _attention_gate(g, up, skip, c_out, f"decoders.{i}.attention")
        x = g.op("Add", [gated, up], f"decoders.{i}.join")
        x = _residual_block(g, x, c_out, c_out, f"decoders.{i}.block")

    logits = _conv(g, x, widths[0], N_CLASSES, "final_conv", kernel=1, gain=1.0)
    g.nodes.append(helper.make_node("Softmax", [logits], [OUTPUT_NAME], name="softmax", axis=1))

    dims_in = ["batch", 1, "x", "y", "z"]
    dims_out = ["batch", N_CLASSES, "x", "y", "z"]
    graph = helper.make_graph(
        g.nodes,
        "arunet_random",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims_in)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, dims_out)],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="hsf_bids.arunet",
        doc_string=f"Random-weight ARUNet (seed={seed}, widths={list(widths)}); benchmark only.",
    )
    # Fixed IR version so the bytes do not depend on the installed onnx release.
    model.ir_version = 8
    return model


def build_arunet(
    path: str | Path, *, seed: int = 0, widths: Sequence[int] = DEFAULT_WIDTHS
) -> Path:
    """Write the random-weight ARUNet to ``path`` (ONNX file) and return the path.

    Full size is about 150 MB; the file is written whole, so a reader never sees a partial model.
    """
    path = Path(path)
    data = build_arunet_model(seed=seed, widths=widths).SerializeToString()
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def count_parameters(model: onnx.ModelProto | str | Path) -> int:
    """Number of learned parameters: the total element count of the graph's initializers.

    ``model`` is an ONNX model or a path to one. Scalar constants stored as ``Constant`` nodes (as
    in :func:`build_arunet_model`) are not counted.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return sum(math.prod(t.dims) for t in model.graph.initializer)


def expected_parameters(widths: Sequence[int] = DEFAULT_WIDTHS, n_classes: int = N_CLASSES) -> int:
    """The parameter count of the architecture, computed analytically (no graph built)."""

    def norm(c: int) -> int:
        return 2 * c + 4  # per-channel weight and bias + 2 mean and 2 variance mixing weights

    def layer(a: int, b: int) -> int:
        return 27 * a * b + b + norm(b)

    def block(a: int, b: int) -> int:
        return layer(a, b) + 2 * layer(b, b)

    total = block(1, widths[0])
    for prev, width in zip(widths[:-1], widths[1:], strict=True):
        total += 27 * prev * prev + block(prev, width)
    for wide, narrow in zip(widths[:0:-1], widths[-2::-1], strict=True):
        inner = max(narrow // 2, 1)
        gate = 2 * (narrow * inner + inner + norm(inner)) + inner + 1 + norm(1)
        total += 27 * wide * narrow + narrow + gate + block(narrow, narrow)
    return total + widths[0] * n_classes + n_classes


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hsf_bids.arunet OUT.onnx [--seed N] [--widths 64 128 256 512]``."""
    parser = argparse.ArgumentParser(
        prog="python -m hsf_bids.arunet",
        description="Write a random-weight, same-size ARUNet ONNX model (benchmarks only).",
    )
    parser.add_argument("output", type=Path, help="ONNX file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
    args = parser.parse_args(argv)
    path = build_arunet(args.output, seed=args.seed, widths=args.widths)
    print(f"{path}: {expected_parameters(args.widths):,} parameters, {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
