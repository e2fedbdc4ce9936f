"""The one small interface every inference engine implements."""

from __future__ import annotations

import os
from collections.abc import Sized
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from hsf_bids.errors import EX_USAGE, HsfBidsError


@runtime_checkable
class Network(Protocol):
    """A loaded model, ready to run batches of crops.

    ``run`` takes a float32 array ``[batch, 1, x, y, z]`` (x, y, z multiples of 8) and returns the
    model's float32 probabilities ``[batch, C, x, y, z]`` (softmax is inside the published models).
    A network is loaded once per process and reused for both sides and every subject.
    """

    path: Path
    engine: str  # "onnxruntime", "openvino" or "deepsparse"
    precision: str  # "fp32", "bf16", "int8"
    device: str  # "cpu" or "cuda" (what actually runs, after any fallback)
    threads: int  # intra-op CPU threads

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:
        """Release the backend's resources; the network must not be used afterwards."""
        ...


class EngineError(HsfBidsError, RuntimeError):
    """Base class of the errors raised by the inference engines (a usage error: the engine,
    precision or device asked for cannot run these models here)."""

    exit_code = EX_USAGE


class EngineUnavailableError(EngineError):
    """The requested engine, precision or device cannot run in this installation or machine."""


class ModelLoadError(EngineError, ValueError):
    """A model file is missing, unreadable or outside the HSF contract (one input, one output)."""


class InputShapeError(ValueError):
    """A batch given to ``Network.run`` is not ``[batch, 1, x, y, z]`` with multiples of 8."""


def check_model_file(path: str | Path) -> Path:
    """Return ``path`` resolved, or raise :class:`ModelLoadError` naming it if it is not a file."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ModelLoadError(f"model file not found: {resolved}")
    return resolved


def check_batch(batch: np.ndarray, path: Path) -> np.ndarray:
    """Validate a batch for the model at ``path``; return it as C-contiguous float32.

    Raises :class:`InputShapeError` (naming the model file) unless ``batch`` is a real-valued
    array of shape ``[batch >= 1, 1, x, y, z]`` with x, y, z positive multiples of 8.
    """
    array = np.asarray(batch)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputShapeError(f"{path.name}: input must be a real array, got dtype {array.dtype}")
    if array.ndim != 5 or array.shape[1] != 1 or array.shape[0] < 1:
        raise InputShapeError(
            f"{path.name}: input must have shape [batch, 1, x, y, z], got {list(array.shape)}"
        )
    spatial = array.shape[2:]
    if any(d < 8 or d % 8 for d in spatial):
        raise InputShapeError(
            f"{path.name}: spatial size {list(spatial)} must be positive multiples of 8 "
            "(pad the crop first)"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def check_one_input_one_output(path: Path, inputs: Sized, outputs: Sized) -> None:
    """Raise :class:`ModelLoadError` naming ``path`` unless the loaded model has exactly one
    input and one output (the HSF contract)."""
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(
            f"{path}: expected one input and one output, found {len(inputs)} and {len(outputs)}"
        )


def default_threads() -> int:
    """CPU cores this process may use (its affinity mask), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


class BaseNetwork:
    """What the engines' networks share (each is a :class:`Network`).

    In: the model file, the requested ``device`` and ``precision`` (``None``: the engine's
    default) and the intra-op ``threads`` (default :func:`default_threads`). The file is checked
    and the thread count fixed here; a subclass names its ``engine`` and implements ``_open``
    (load the model, set ``device`` and ``precision`` to what actually runs, or raise
    :class:`EngineUnavailableError` / :class:`ModelLoadError`), ``_infer`` (a batch already
    checked by :func:`check_batch` in, float32 probabilities out) and ``close``.
    """

    engine: str
    device: str
    precision: str

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        precision: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = check_model_file(path)
        self.threads = int(threads) if threads else default_threads()
        self._open(device, precision)

    def _open(self, device: str, precision: str | None) -> None:
        raise NotImplementedError

    def _infer(self, array: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[b, C, x, y, z]`` float32 for a ``[b, 1, x, y, z]`` batch."""
        return self._infer(check_batch(batch, self.path))

    def close(self) -> None:
        """Release the backend's resources; the network must not be used afterwards."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path.name}, device={self.device}, "
            f"precision={self.precision}, threads={self.threads})"
        )
