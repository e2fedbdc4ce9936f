"""The one small interface every inference engine implements."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Session(Protocol):
    """A loaded model, ready to run batches of crops.

    ``run`` takes a float32 array ``[batch, 1, x, y, z]`` (x, y, z multiples of 8) and returns the
    model's float32 probabilities ``[batch, C, x, y, z]`` (softmax is inside the published models).
    A session is created once per process and reused for both sides and every subject.
    """

    path: Path
    engine: str  # "onnxruntime", "openvino" or "deepsparse"
    precision: str  # "fp32", "bf16", "int8"
    device: str  # "cpu" or "cuda" (what actually runs, after any fallback)

    def run(self, batch: np.ndarray) -> np.ndarray: ...
