"""OpenVINO engine (CPU): fp32, bf16 on CPUs with AMX / AVX512-BF16, and int8.

int8 runs a model quantised by :mod:`hsf_bids.quantize` (an OpenVINO ``.xml``/``.bin`` pair whose
convolutions carry int8 weights and quantise their inputs); the rest of its graph runs in f32.

What OpenVINO does when bf16 is asked for on a CPU without bf16 hardware (measured with OpenVINO
2026.4 on an AVX2-only AMD EPYC): no error and no emulation; the CPU plugin silently compiles the
model in f32, and the compiled model's ``INFERENCE_PRECISION_HINT`` reads ``f32``. This module
makes that explicit: it logs a warning and the network's ``precision`` attribute is read back from
the compiled model, so it always names the precision that runs.

Compiled models are cached on disk (OpenVINO's ``CACHE_DIR``, in ``<user cache>/hsf_bids/openvino``
when that can be written; OpenVINO keys each blob by the model, the settings, its own version and
the CPU): a five-model ensemble of int8 ARUNets then loads in about 3 s instead of 16 (measured:
3.3 -> 0.6 s per int8 model, 1.8 -> 0.25 s per fp32 one), with the same outputs.

Shapes stay dynamic (one compiled model for every crop size). Compiling one static-shape model per
crop size was measured as no faster on this CPU (demo U-Net and full-size ARUNet, 48x64x48) and
costs a recompilation (about 1 s for the full ARUNet) per new size.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import openvino as ov

from hsf_bids.engines.base import (
    BaseNetwork,
    EngineUnavailableError,
    ModelLoadError,
    check_one_input_one_output,
)

log = logging.getLogger(__name__)

ENGINE = "openvino"
# hsf_bids precision names -> OpenVINO INFERENCE_PRECISION_HINT values, and back.
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
_FROM_OV = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}

_core_lock = threading.Lock()


@functools.cache
def _core() -> ov.Core:
    import openvino as ov

    return ov.Core()


@functools.cache
def compile_cache_dir() -> Path | None:
    """Where compiled models are cached; None (no cache) where that folder cannot be written,
    e.g. a read-only home in a container."""
    import os

    import platformdirs

    folder = Path(platformdirs.user_cache_dir("hsf_bids")) / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK | os.X_OK) else None


def cpu_capabilities() -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU device (e.g. ``['FP32', 'BF16']``)."""
    with _core_lock:
        return [str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def cpu_supports_bf16() -> bool:
    """True when OpenVINO can run bf16 natively on this CPU (AMX or AVX512-BF16)."""
    return "BF16" in cpu_capabilities()


class OpenVinoNetwork(BaseNetwork):
    """A model compiled by OpenVINO for the CPU (see :class:`~.base.Network`).

    ``precision`` is what the compiled model reports, which is ``fp32`` when bf16 was requested
    on a CPU without bf16 support. ``run`` is serialised by a lock because one infer request is
    reused for every call (an infer request is not thread-safe).
    """

    engine = ENGINE

    def _open(self, device: str, precision: str | None) -> None:
        requested = precision or "fp32"
        if requested not in _HINTS:
            raise EngineUnavailableError(
                f"openvino precision must be one of {sorted(_HINTS)}, not {requested!r}"
            )
        if (requested == "int8") != (self.path.suffix == ".xml"):
            raise EngineUnavailableError(
                f"{self.path.name}: openvino runs int8 from a quantised model (.xml, written by "
                "hsf-bids-models quantize) and fp32/bf16 from the ONNX model"
            )
        if device != "cpu":
            raise EngineUnavailableError(
                f"hsf_bids runs openvino on the CPU only, not {device!r}; "
                "use engine 'onnxruntime' for cuda"
            )
        self.device = "cpu"

        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[requested],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        cache = compile_cache_dir()
        if cache is not None:
            config["CACHE_DIR"] = str(cache)
        core = _core()
        try:
            with _core_lock:
                # From the path, so that a cached compilation is imported without reading the
                # model at all.
                self._compiled = core.compile_model(str(self.path), "CPU", config)
        except Exception as exc:  # OpenVINO raises plain RuntimeError with its own text
            raise ModelLoadError(f"openvino cannot load {self.path}: {exc}") from exc
        check_one_input_one_output(self.path, self._compiled.inputs, self._compiled.outputs)

        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        actual = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.precision = "int8" if requested == "int8" else _FROM_OV.get(actual, actual)
        if self.precision != requested:
            log.warning(
                "%s: %s requested but this CPU (OpenVINO capabilities %s) runs %s",
                self.path.name,
                requested,
                ",".join(cpu_capabilities()),
                self.precision,
            )
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def _infer(self, array: np.ndarray) -> np.ndarray:
        with self._lock:
            self._request.infer({0: array})
            # Copy: the output tensor's memory is reused by the next inference.
            probs = np.array(self._request.get_output_tensor(0).data, dtype=np.float32)
            # The compiled model otherwise keeps its intermediate buffers (about 440 MiB for a
            # 48x56x56 crop of the ARUNet) until it is dropped: with a five-model ensemble that
            # is five sets held at once where one is in use. Released, a pass costs the same
            # (measured, ARUNet and demo models).
            if hasattr(self._compiled, "release_memory"):  # OpenVINO >= 2024.3
                self._compiled.release_memory()
            return probs

    def close(self) -> None:
        """Drop the compiled model and its infer request."""
        self._request = None
        self._compiled = None
