"""DeepSparse engine: a legacy optional backend, made for HSF's sparse + int8 3.0.0 models.

DeepSparse is no longer maintained (Neural Magic ceased its development in June 2025; 1.8.0 is the
last release with wheels): it installs only on CPython 3.8-3.11 with numpy < 2 and onnx < 1.15, so
it is an optional extra (``hsf_bids[deepsparse]``), imported only when a network is opened.

Its optimised runtime compiles a graph for static input shapes only. Given the HSF models'
dynamic ``[batch, 1, x, y, z]`` input it silently runs everything in its bundled onnxruntime
instead (``fraction_of_supported_ops`` 0; the C library prints "Optimized runtime disabled" on
standard error). So each input shape gets its own engine, compiled once from a copy of the model
whose input dimensions are set to that shape, and kept: a run sees a few shapes (one padded crop
size per side and batch size), all known before their first pass.

The copy is written here, never by DeepSparse: its own ``input_shapes`` argument rewrites the
model file in place (``deepsparse.utils.override_onnx_input_shapes`` with ``inplace=True``), which
would change a verified model file, or fail on a read-only models folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from hsf_bids.engines.base import (
    BaseNetwork,
    EngineUnavailableError,
    ModelLoadError,
    check_one_input_one_output,
)

log = logging.getLogger(__name__)

ENGINE = "deepsparse"
INSTALL_HINT = (
    "pip install 'hsf_bids[deepsparse]' (CPython 3.8-3.11 with numpy < 2; DeepSparse is no "
    "longer maintained)"
)
# Quantised ONNX operators: a model containing any of them runs in int8.
_INT8_OPS = {"QLinearConv", "ConvInteger", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul"}


def import_deepsparse() -> ModuleType:
    """Return the ``deepsparse`` module, or raise :class:`EngineUnavailableError` saying how to
    install it."""
    # Without this, importing DeepSparse asks a geolocation web service whether its usage
    # analytics may be sent, and then sends them: a run must not phone home.
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    try:
        import deepsparse
    except ImportError as exc:
        raise EngineUnavailableError(
            f"engine 'deepsparse' is not installed ({exc}); it is a legacy optional extra: "
            f"{INSTALL_HINT}"
        ) from exc
    return deepsparse


def deepsparse_available() -> bool:
    """True when the ``deepsparse`` package imports."""
    try:
        import_deepsparse()
    except EngineUnavailableError:
        return False
    return True


def _graph_inputs(graph: Any) -> list[Any]:
    """The graph's real inputs (older exporters also list every initializer as an input)."""
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def _read_graph(path: Path) -> Any:
    """The graph of the ONNX model at ``path`` (weights left on disk), or
    :class:`ModelLoadError`."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's DecodeError and others
        raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from exc


def _graph_precision(graph: Any) -> str:
    return "int8" if any(n.op_type in _INT8_OPS for n in graph.node) else "fp32"


def stored_precision(path: Path) -> str:
    """``"int8"`` when the ONNX graph at ``path`` holds quantised operators, else ``"fp32"``."""
    return _graph_precision(_read_graph(path))


def write_static_copy(path: Path, shape: tuple[int, ...], target: Path) -> Path:
    """Write the ONNX model at ``path`` to ``target`` with its one input's dimensions set to
    ``shape``; return ``target``.

    Raises :class:`ModelLoadError` when the model has not one input of ``len(shape)`` dimensions,
    or a fixed dimension that differs from ``shape`` (the model cannot take that input).
    """
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's DecodeError and others
        raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from exc
    inputs = _graph_inputs(model.graph)
    check_one_input_one_output(path, inputs, model.graph.output)
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ModelLoadError(
            f"{path}: input {inputs[0].name!r} has {len(dims)} dimensions, the batch "
            f"{list(shape)} has {len(shape)}"
        )
    for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
        if dim.HasField("dim_value") and dim.dim_value not in (0, size):
            raise ModelLoadError(
                f"{path}: input dimension {axis} is fixed at {dim.dim_value}, the batch has {size}"
            )
        dim.dim_value = size  # replaces a symbolic dim_param: the field is a oneof
    onnx.save(model, str(target))
    return target


class DeepSparseNetwork(BaseNetwork):
    """A model run by DeepSparse's optimised runtime on the CPU, one engine per input shape.

    ``precision`` is what the stored graph holds (``int8`` for HSF's sparse+QAT models, else
    ``fp32``); DeepSparse has no precision switch, so a different request only logs a warning.
    ``threads`` is the number of cores each engine runs on (the run's per-node CPU budget).
    """

    engine = ENGINE

    def _open(self, device: str, precision: str | None) -> None:
        self._deepsparse = import_deepsparse()
        if device != "cpu":
            raise EngineUnavailableError(f"deepsparse runs on the CPU only, not {device!r}")
        self.device = "cpu"
        graph = _read_graph(self.path)
        check_one_input_one_output(self.path, _graph_inputs(graph), graph.output)
        self.precision = _graph_precision(graph)
        if precision not in (None, self.precision):
            # DeepSparse has no precision switch: the file decides, and the attribute says so.
            log.warning(
                "%s: %s requested but deepsparse runs the model as stored (%s)",
                self.path.name,
                precision,
                self.precision,
            )
        self._engines: dict[tuple[int, ...], Any] = {}
        self._lock = threading.Lock()

    def _compile(self, shape: tuple[int, ...]) -> Any:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hsf_bids-deepsparse-") as folder:
            static = write_static_copy(self.path, shape, Path(folder) / self.path.name)
            try:
                # DeepSparse reads the file while compiling; the engine does not need it after.
                engine = self._deepsparse.Engine(
                    str(static), batch_size=shape[0], num_cores=self.threads
                )
            except Exception as exc:  # noqa: BLE001 - DeepSparse raises plain RuntimeError
                raise ModelLoadError(
                    f"deepsparse cannot compile {self.path} for input {list(shape)}: {exc}"
                ) from exc
        supported = float(engine.fraction_of_supported_ops)
        if supported < 1.0:
            log.warning(
                "%s: DeepSparse's optimised runtime runs %.0f %% of the operators for input %s; "
                "the rest run in its onnxruntime fallback",
                self.path.name,
                100 * supported,
                list(shape),
            )
        else:
            log.info(
                "%s: DeepSparse optimised runtime compiled for input %s in %.1f s (all "
                "operators; %d cores, %s%s)",
                self.path.name,
                list(shape),
                time.perf_counter() - start,
                engine.num_cores,
                engine.cpu_avx_type,
                " VNNI" if engine.cpu_vnni else "",
            )
        return engine

    def engine_for(self, shape: tuple[int, ...]) -> Any:
        """The DeepSparse engine compiled for inputs of ``shape`` (compiled on first use)."""
        with self._lock:
            engine = self._engines.get(shape)
            if engine is None:
                engine = self._engines[shape] = self._compile(shape)
            return engine

    def _infer(self, array: np.ndarray) -> np.ndarray:
        engine = self.engine_for(array.shape)
        with self._lock:
            outputs = engine.run([array], val_inp=False)
        return np.asarray(outputs[0], dtype=np.float32)

    def close(self) -> None:
        """Drop every compiled engine."""
        with self._lock:
            self._engines.clear()
