"""ONNX Runtime engine: CPU, or CUDA when its execution provider is installed and usable."""

from __future__ import annotations

import logging

import numpy as np

from hsf_bids.engines.base import (
    BaseNetwork,
    EngineUnavailableError,
    ModelLoadError,
    check_one_input_one_output,
)

log = logging.getLogger(__name__)

ENGINE = "onnxruntime"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def cuda_available() -> bool:
    """True when this onnxruntime build offers the CUDA execution provider."""
    import onnxruntime as ort

    return CUDA_PROVIDER in ort.get_available_providers()


class OnnxRuntimeNetwork(BaseNetwork):
    """A model loaded in an ``onnxruntime.InferenceSession`` (see :class:`~.base.Network`).

    ``device`` says what actually runs: a CUDA request without a usable CUDA provider runs on
    the CPU (with a logged warning). Precision is always fp32: onnxruntime runs the graph as
    stored, and the published models are fp32.
    """

    engine = ENGINE

    def _open(self, device: str, precision: str | None) -> None:
        import onnxruntime as ort

        if precision not in (None, "fp32"):
            raise EngineUnavailableError(
                f"onnxruntime runs models in fp32 only, not {precision!r}; "
                "use engine 'openvino' for bf16"
            )
        if device not in ("cpu", "cuda"):
            raise EngineUnavailableError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
        self.precision = "fp32"

        options = ort.SessionOptions()
        # One crop at a time: parallelism inside each operator; the rest of the run's CPU budget
        # belongs to other work (other subjects, registration).
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initializers are noise here

        providers = [CPU_PROVIDER]
        if device == "cuda":
            if cuda_available():
                providers = [CUDA_PROVIDER, CPU_PROVIDER]
            else:
                log.warning(
                    "%s: CUDA requested but onnxruntime offers no %s (install onnxruntime-gpu "
                    "with a matching CUDA); running on the CPU",
                    self.path.name,
                    CUDA_PROVIDER,
                )
        try:
            self._ort = ort.InferenceSession(
                str(self.path), sess_options=options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {exc}") from exc

        # The provider can be offered yet fail to initialise (missing CUDA libraries); onnxruntime
        # then silently drops it, so ask onnxruntime what it really uses.
        active = self._ort.get_providers()
        self.device = "cuda" if CUDA_PROVIDER in active else "cpu"
        if device == "cuda" and self.device == "cpu" and CUDA_PROVIDER in providers:
            log.warning("%s: the CUDA provider failed to start; running on the CPU", self.path.name)

        inputs, outputs = self._ort.get_inputs(), self._ort.get_outputs()
        check_one_input_one_output(self.path, inputs, outputs)
        # By position, not by name: the contract does not promise the names.
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        # Give the arena's memory back after each run: otherwise every network of an ensemble
        # keeps the peak of its own runs (about 340 MiB for a 48x56x56 crop of the ARUNet), five
        # sets held at once where one is in use. The cost per pass is within noise (measured).
        arenas = "cpu:0;gpu:0" if self.device == "cuda" else "cpu:0"
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)

    def _infer(self, array: np.ndarray) -> np.ndarray:
        (probs,) = self._ort.run([self.output_name], {self.input_name: array}, self._run_options)
        return np.asarray(probs, dtype=np.float32)

    def close(self) -> None:
        """Drop the onnxruntime InferenceSession (its memory is freed with the last reference)."""
        self._ort = None
