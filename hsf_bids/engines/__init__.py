"""Inference engines: load an ONNX model once, run batches of crops.

A loaded model is a *network* (:class:`~hsf_bids.engines.base.Network`); in hsf_bids "session"
means a BIDS session (``ses-``) only.

Public interface:

* :func:`open_network` loads a model with one engine (``onnxruntime``, ``openvino`` or
  ``deepsparse``) and returns a :class:`~hsf_bids.engines.base.Network`;
* :func:`load_network` is the same behind a process-wide, thread-safe cache, so a model is loaded
  once per process and reused for both sides and every subject;
* :func:`available_engines` lists the ``(engine, precision, device)`` choices that run here;
* :func:`resolve_engine` checks an explicit choice (or ``auto`` on a GPU) and names what runs;
* :func:`~hsf_bids.engines.plan.plan_models` decides, per model of a preset, what ``auto`` runs
  on the CPU, through the agreement gate (:mod:`hsf_bids.engines.agreement`): a faster engine or
  precision only where its fused labels were measured, on this CPU and engine version, to agree
  with onnxruntime fp32 (the reference) at Dice >= 0.98 for every structure.

Errors: :class:`UnknownEngineError` for a name that is not an engine, device or precision;
:class:`EngineUnavailableError` for a valid choice that cannot run here; :class:`ModelLoadError`
for a model file that cannot be loaded; :class:`InputShapeError` for a bad batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from hsf_bids.engines.base import (
    EngineError,
    EngineUnavailableError,
    InputShapeError,
    ModelLoadError,
    Network,
    check_model_file,
    default_threads,
)
from hsf_bids.vocabulary import DEVICES, ENGINES, PRECISIONS

__all__ = [
    "REFERENCE",
    "REFERENCE_CHOICE",
    "EngineError",
    "EngineUnavailableError",
    "InputShapeError",
    "ModelLoadError",
    "Network",
    "UnknownEngineError",
    "available_engines",
    "clear_network_cache",
    "cpu_supports_bf16",
    "estimated_memory_gb",
    "load_network",
    "open_network",
    "resolve_engine",
]

log = logging.getLogger(__name__)


#: What every faster choice is measured against, and what ``auto`` falls back to.
REFERENCE = ("onnxruntime", "fp32", "cpu")
REFERENCE_CHOICE = "/".join(REFERENCE)

# Peak resident memory of a participant run on the CPU: a base (libraries, images, localisation)
# plus, per model, a multiple of the size of the file its engine reads, fitted on the runs of
# benchmarks/participant.py (same-size ARUNets, 143 MiB fp32 files, on 48x56x56 crops, with and
# without test-time augmentation; OpenVINO 2026.4.1 and onnxruntime 1.32.0; the largest multiple
# kept). OpenVINO keeps repacked weights and per-shape buffers for each model after its first
# run (about 440 MiB per fp32 ARUNet, 250 MiB per int8 one whose weights file is 37 MiB);
# onnxruntime gives its working memory back.
RUN_BASE_GB = 0.7
MEMORY_PER_MODEL_BYTE = {"openvino": 4.2, "onnxruntime": 1.8, "deepsparse": 4.2}
MEMORY_PER_INT8_BYTE = 7.0


def estimated_memory_gb(runs: Sequence[tuple[str, str, str | Path]]) -> float:
    """Rough peak memory (GiB) of a participant run of models each given as ``(engine,
    precision, file it reads)`` on the CPU."""
    size = 0.0
    for engine, precision, path in runs:
        if precision == "int8":
            factor = MEMORY_PER_INT8_BYTE
        else:
            factor = MEMORY_PER_MODEL_BYTE.get(engine, 4.2)
        size += factor * _model_bytes(Path(path))
    return RUN_BASE_GB + size / 1024**3


def _model_bytes(path: Path) -> int:
    if path.suffix == ".xml":  # an OpenVINO model: the weights are in the .bin beside it
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return path.stat().st_size


class UnknownEngineError(EngineError, ValueError):
    """An engine, device or precision name that hsf_bids does not know."""


def _check_names(engine: str, device: str, precision: str | None, *, allow_auto: bool) -> None:
    engines = ("auto", *ENGINES) if allow_auto else ENGINES
    if engine not in engines:
        raise UnknownEngineError(f"unknown engine {engine!r}; choose one of {', '.join(engines)}")
    if device not in DEVICES:
        raise UnknownEngineError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if precision is not None and precision not in PRECISIONS:
        raise UnknownEngineError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )


def cpu_supports_bf16() -> bool:
    """True when OpenVINO reports native bf16 (``BF16`` in the CPU's optimisation capabilities).

    False when OpenVINO is not installed.
    """
    try:
        from hsf_bids.engines.openvino import cpu_supports_bf16 as _bf16
    except ImportError:
        return False
    try:
        return _bf16()
    except ImportError:
        return False


def _openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def available_engines() -> list[tuple[str, str, str]]:
    """The ``(engine, precision, device)`` choices that can run in this process from the ONNX
    models: onnxruntime on CUDA, OpenVINO bf16 (only where the CPU has bf16 hardware), OpenVINO
    fp32, onnxruntime fp32, then DeepSparse when installed. An explicit engine without a
    precision gets the first of its entries. (OpenVINO int8 runs the models' int8 versions; see
    :mod:`hsf_bids.engines.plan`.)
    """
    from hsf_bids.engines.deepsparse import deepsparse_available
    from hsf_bids.engines.onnxruntime import cuda_available

    choices: list[tuple[str, str, str]] = []
    if cuda_available():
        choices.append(("onnxruntime", "fp32", "cuda"))
    if _openvino_available():
        if cpu_supports_bf16():
            choices.append(("openvino", "bf16", "cpu"))
        choices.append(("openvino", "fp32", "cpu"))
    choices.append(("onnxruntime", "fp32", "cpu"))
    if deepsparse_available():
        choices += [("deepsparse", "fp32", "cpu"), ("deepsparse", "int8", "cpu")]
    return choices


def resolve_engine(
    engine: str = "auto", device: str = "cpu", precision: str | None = None
) -> tuple[str, str, str]:
    """Turn a requested engine/device/precision into the ``(engine, precision, device)`` to run.

    An explicit engine is checked against what runs here: one that cannot raises
    :class:`EngineUnavailableError` naming what is missing (bf16 on a CPU without bf16 hardware,
    where OpenVINO would silently run fp32, included); an unknown name raises
    :class:`UnknownEngineError`. Without a precision an engine gets its fastest here. ``auto``
    gives onnxruntime fp32 on the requested device (the reference: a faster choice for the CPU
    is made per model, through the agreement gate, by
    :func:`~hsf_bids.engines.plan.plan_models`). A CUDA request without a usable CUDA provider
    falls back to the CPU with a logged warning (for ``auto`` and ``onnxruntime``). int8 is not
    resolved here: it needs the models' int8 versions (see the plan).
    """
    _check_names(engine, device, precision, allow_auto=True)
    choices = available_engines()

    if device == "cuda" and engine in ("auto", "onnxruntime"):
        if ("onnxruntime", "fp32", "cuda") not in choices:
            log.warning(
                "device cuda requested but onnxruntime has no usable CUDA provider "
                "(install onnxruntime-gpu); falling back to the CPU"
            )
            device = "cpu"

    if engine == "auto":
        if precision in (None, "fp32", "int8"):
            return ("onnxruntime", "fp32", device)
        if device == "cpu" and ("openvino", precision, "cpu") in choices:
            return ("openvino", precision, "cpu")
        if precision == "bf16" and _openvino_available():
            engine = "openvino"  # explains below why bf16 cannot run here
        else:
            raise EngineUnavailableError(
                f"no engine runs precision {precision!r} on {device} here; available: "
                + ", ".join("/".join(c) for c in choices)
            )

    if engine == "openvino" and not _openvino_available():
        raise EngineUnavailableError("engine 'openvino' is not installed (pip install openvino)")
    if engine == "deepsparse":
        from hsf_bids.engines.deepsparse import import_deepsparse

        import_deepsparse()  # raises EngineUnavailableError with the install hint
    if device == "cuda" and engine != "onnxruntime":
        raise EngineUnavailableError(
            f"engine {engine!r} runs on the CPU only in hsf_bids; use --device cpu, or engine "
            "onnxruntime for cuda"
        )

    if precision is None:
        # The engine's fastest precision here: bf16 for OpenVINO where the CPU has it.
        for choice in choices:
            if choice[0] == engine and choice[2] == device:
                return choice
        raise EngineUnavailableError(f"engine {engine!r} cannot run on {device} here")

    if (engine, precision, device) in choices:
        return (engine, precision, device)
    if engine == "openvino" and precision == "bf16":
        from hsf_bids.engines.openvino import cpu_capabilities

        raise EngineUnavailableError(
            "precision bf16 needs a CPU with AMX or AVX512-BF16; OpenVINO reports this CPU's "
            f"capabilities as {', '.join(cpu_capabilities())} (it would silently run fp32); "
            "use --precision fp32"
        )
    supported = sorted({c[1] for c in choices if c[0] == engine})
    hint = ""
    if precision == "int8":
        hint = "; int8 runs with engine openvino (the models' int8 versions)"
    raise EngineUnavailableError(
        f"engine {engine!r} cannot run precision {precision!r} on {device} here; "
        f"it offers {', '.join(supported) or 'nothing'}{hint}"
    )


def open_network(
    path: str | Path,
    *,
    engine: str = "onnxruntime",
    device: str = "cpu",
    precision: str | None = None,
    threads: int | None = None,
) -> Network:
    """Load the ONNX model at ``path`` with one engine and return a new network.

    ``engine`` may be ``auto`` (see :func:`resolve_engine`). ``precision`` ``None`` means the
    engine's default (fp32). ``threads`` is the intra-op CPU thread count (default: the CPUs this
    process may use). The network's ``device`` and ``precision`` attributes say what actually
    runs after any fallback (CUDA unavailable -> CPU; OpenVINO bf16 without hardware -> fp32).
    """
    _check_names(engine, device, precision, allow_auto=True)
    if engine == "auto":
        engine, precision, device = resolve_engine(engine, device, precision)
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if engine == "onnxruntime":
        from hsf_bids.engines.onnxruntime import OnnxRuntimeNetwork as cls
    elif engine == "openvino":
        if not _openvino_available():
            raise EngineUnavailableError(
                "engine 'openvino' is not installed (pip install openvino)"
            )
        from hsf_bids.engines.openvino import OpenVinoNetwork as cls
    else:
        from hsf_bids.engines.deepsparse import DeepSparseNetwork as cls
    network = cls(path, device=device, precision=precision, threads=threads)
    log.info("loaded %r", network)
    return network


_cache: dict[tuple, Network] = {}
_cache_locks: dict[tuple, threading.Lock] = {}
_cache_guard = threading.Lock()


def load_network(
    path: str | Path,
    *,
    engine: str = "onnxruntime",
    device: str = "cpu",
    precision: str | None = None,
    threads: int | None = None,
) -> Network:
    """Like :func:`open_network`, but a given model and settings are loaded once per process.

    The key is the resolved file (path, size and modification time, so a replaced file is
    reloaded) plus the settings. Thread-safe: concurrent calls for one key load the model once
    and all receive the same network; different keys load in parallel.
    """
    resolved = check_model_file(path)
    stat = resolved.stat()
    key = (
        str(resolved),
        stat.st_size,
        stat.st_mtime_ns,
        engine,
        device,
        precision,
        int(threads) if threads else default_threads(),
    )
    with _cache_guard:
        network = _cache.get(key)
        if network is not None:
            return network
        lock = _cache_locks.setdefault(key, threading.Lock())
    with lock:
        with _cache_guard:
            network = _cache.get(key)
        if network is None:
            network = open_network(
                resolved, engine=engine, device=device, precision=precision, threads=key[-1]
            )
            with _cache_guard:
                _cache[key] = network
    return network


def clear_network_cache() -> None:
    """Close and forget every cached network (tests, or to free memory between runs)."""
    with _cache_guard:
        networks = list(_cache.values())
        _cache.clear()
        _cache_locks.clear()
    for network in networks:
        network.close()
