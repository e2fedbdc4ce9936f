"""DeepSparse engine: a legacy optional backend for HSF's sparse + int8 3.0.0 models.

DeepSparse reached end of life in June 2025: 1.8 installs only on CPython 3.8-3.11 with numpy < 2,
so it is an optional extra and imported only when a network is opened. Its engines have static
shapes, so one engine is compiled per input shape and kept.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from hsf_bids.engines.base import BaseNetwork, EngineUnavailableError, ModelLoadError

log = logging.getLogger(__name__)

ENGINE = "deepsparse"
INSTALL_HINT = "pip install 'hsf_bids[deepsparse]' (Python <= 3.11 with numpy < 2)"
# Quantised ONNX operators: a model containing any of them runs in int8.
_INT8_OPS = {"QLinearConv", "ConvInteger", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul"}


def import_deepsparse() -> ModuleType:
    """Return the ``deepsparse`` module, or raise :class:`EngineUnavailableError` saying how to
    install it."""
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


def stored_precision(path: Path) -> str:
    """``"int8"`` when the ONNX graph at ``path`` holds quantised operators, else ``"fp32"``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return "int8" if any(n.op_type in _INT8_OPS for n in model.graph.node) else "fp32"


class DeepSparseNetwork(BaseNetwork):
    """A model run by DeepSparse on the CPU, compiled once per input shape.

    ``precision`` is what the stored graph holds (``int8`` for HSF's sparse+QAT models, else
    ``fp32``); DeepSparse has no precision switch, so a different request only logs a warning.
    """

    engine = ENGINE

    def _open(self, device: str, precision: str | None) -> None:
        self._deepsparse = import_deepsparse()
        if device != "cpu":
            raise EngineUnavailableError(f"deepsparse runs on the CPU only, not {device!r}")
        self.device = "cpu"
        try:
            self.precision = stored_precision(self.path)
        except Exception as exc:
            raise ModelLoadError(f"cannot read ONNX model {self.path}: {exc}") from exc
        if precision not in (None, self.precision):
            # DeepSparse has no precision switch: the file decides, and the attribute says so.
            log.warning(
                "%s: %s requested but deepsparse runs the model as stored (%s)",
                self.path.name,
                precision,
                self.precision,
            )
        self._engines: dict[tuple[int, ...], object] = {}
        self._lock = threading.Lock()

    def _engine_for(self, shape: tuple[int, ...]) -> Any:
        engine = self._engines.get(shape)
        if engine is None:
            try:
                engine = self._deepsparse.compile_model(
                    str(self.path),
                    batch_size=shape[0],
                    num_cores=self.threads,
                    input_shapes=[list(shape)],
                )
            except Exception as exc:
                raise ModelLoadError(
                    f"deepsparse cannot compile {self.path} for input {list(shape)}: {exc}"
                ) from exc
            self._engines[shape] = engine
        return engine

    def _infer(self, array: np.ndarray) -> np.ndarray:
        with self._lock:
            outputs = self._engine_for(array.shape).run([array])
        return np.asarray(outputs[0], dtype=np.float32)

    def close(self) -> None:
        """Drop every compiled engine."""
        self._engines.clear()
