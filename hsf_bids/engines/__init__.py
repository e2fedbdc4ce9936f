"""Inference engines: load an ONNX model once, run batches of crops.

Public interface:

* :func:`open_session` loads a model with one engine (``onnxruntime``, ``openvino`` or
  ``deepsparse``) and returns a :class:`~hsf_bids.engines.base.Session`;
* :func:`get_session` is the same behind a process-wide, thread-safe cache, so a model is loaded
  once per process and reused for both sides and every subject;
* :func:`available_engines` lists the ``(engine, precision, device)`` choices that run here;
* :func:`resolve_engine` turns a user's choice (``auto`` or explicit) into one of them.

The agreement gate of ``auto``: a faster engine or precision is only picked automatically when
its segmentations are recorded in :data:`AGREEMENT` as agreeing with the reference (onnxruntime
fp32 on the CPU) at a Dice of at least :data:`MIN_AGREEMENT_DICE` for every structure. The table
holds measurements, not guesses: ``python benchmarks/participant.py --agreement`` measures it
(demo models on the ds-mini crops, with and without test-time augmentation) and the tests check
the OpenVINO fp32 entry on a real crop. A combination never measured (``None``: bf16 needs a CPU
with AMX or AVX512-BF16, CUDA a GPU, neither of which the project's machines had) is not picked
by ``auto``; it still runs when asked for explicitly, and ``--device cuda`` (the user's choice of
device) still gets onnxruntime fp32 on the GPU. A static table costs nothing at start-up
and cannot be skewed by one run on a noisy machine; its limit is that it is per engine version,
so it is measured again when an engine is upgraded.

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
    Session,
    check_model_file,
    default_threads,
)

__all__ = [
    "DEVICES",
    "ENGINES",
    "AGREEMENT",
    "MIN_AGREEMENT_DICE",
    "PRECISIONS",
    "EngineError",
    "EngineUnavailableError",
    "InputShapeError",
    "ModelLoadError",
    "Session",
    "UnknownEngineError",
    "agrees_with_reference",
    "available_engines",
    "clear_session_cache",
    "cpu_supports_bf16",
    "estimated_memory_gb",
    "get_session",
    "open_session",
    "resolve_engine",
]

log = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "openvino", "deepsparse")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "int8")

REFERENCE = ("onnxruntime", "fp32", "cpu")
MIN_AGREEMENT_DICE = 0.98
# Lowest Dice per structure against REFERENCE, over the demo models' segmentations of the
# ds-mini heads (benchmarks/participant.py --agreement: sub-04 ses-01 and sub-01, both sides,
# TTA on and off, vote fusion; CA2, which the demo models never predict, is left out). Measured
# with onnxruntime 1.32.0 and OpenVINO 2026.4.1 on an AMD EPYC (AVX2). None: never measured.
AGREEMENT: dict[tuple[str, str, str], float | None] = {
    REFERENCE: 1.0,
    ("openvino", "fp32", "cpu"): 1.0,
    ("openvino", "bf16", "cpu"): None,  # needs AMX / AVX512-BF16 to run at all
    ("onnxruntime", "fp32", "cuda"): None,  # no GPU was available to measure it
}


# Peak resident memory of a participant run on the CPU, by engine: a base (libraries, images,
# localisation) plus a multiple of the models' total file size, fitted on the runs of
# benchmarks/participant.py (one to five same-size ARUNets of 143 MiB on 48x56x56 crops, with
# and without test-time augmentation; OpenVINO 2026.4.1 and onnxruntime 1.32.0, 2-core AVX2 CPU;
# the largest multiple kept). OpenVINO keeps repacked weights and per-shape buffers for each
# model after its first run (bagging_accurate: 3.61 GiB); onnxruntime gives its working memory
# back (1.94 GiB), at about the same speed for an ensemble on that CPU (528 s against 523 s).
RUN_BASE_GB = 0.7
MEMORY_PER_MODEL_BYTE = {"openvino": 4.2, "onnxruntime": 1.8, "deepsparse": 4.2}


def estimated_memory_gb(engine: str, models: Sequence[str | Path]) -> float:
    """Rough peak memory (GiB) of a participant run of ``models`` with ``engine`` on the CPU."""
    size = sum(Path(m).stat().st_size for m in models)
    return RUN_BASE_GB + MEMORY_PER_MODEL_BYTE.get(engine, 4.2) * size / 1024**3


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


def agrees_with_reference(choice: tuple[str, str, str]) -> bool:
    """True when ``(engine, precision, device)`` is recorded in :data:`AGREEMENT` as agreeing
    with onnxruntime fp32 on the CPU at Dice >= :data:`MIN_AGREEMENT_DICE` per structure."""
    dice = AGREEMENT.get(tuple(choice))
    return dice is not None and dice >= MIN_AGREEMENT_DICE


def available_engines() -> list[tuple[str, str, str]]:
    """The ``(engine, precision, device)`` choices that can run in this process, fastest first.

    The order is the preference of ``resolve_engine("auto", ...)``: onnxruntime on CUDA, then
    OpenVINO bf16 (only where the CPU has bf16 hardware), OpenVINO fp32, onnxruntime fp32, then
    DeepSparse (never picked automatically; it is listed when installed).
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
    engine: str = "auto",
    device: str = "cpu",
    precision: str | None = None,
    *,
    models: Sequence[str | Path] = (),
    mem_gb: float | None = None,
) -> tuple[str, str, str]:
    """Turn a requested engine/device/precision into the ``(engine, precision, device)`` to run.

    ``auto`` picks the first entry of :func:`available_engines` for the device (and precision,
    if given) that :func:`agrees_with_reference`, so never DeepSparse nor a combination whose
    agreement is unmeasured or below the threshold; onnxruntime fp32 on CUDA is picked when the
    user asks for ``--device cuda`` (their choice of device, the same precision). On the CPU,
    with ``models`` and a memory budget ``mem_gb`` (``--mem-gb``), ``auto`` passes over an
    engine whose :func:`estimated_memory_gb` exceeds it (OpenVINO holds about twice what
    onnxruntime does for an ensemble); when none fits, the smallest is used. A CUDA request
    without a usable CUDA provider falls back to the CPU with a logged warning (for ``auto`` and
    ``onnxruntime``). An explicit engine or precision that cannot run here raises
    :class:`EngineUnavailableError` naming what is missing; an unknown name raises
    :class:`UnknownEngineError`.
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
        skipped, candidates = [], []
        for choice in choices:
            if choice[0] == "deepsparse" or choice[2] != device:
                continue
            if precision is not None and choice[1] != precision:
                continue
            # --device cuda is the user's own choice of device, and fp32 there runs the same
            # graph in the same precision: only a shortcut the user did not ask for is gated.
            asked_for = choice[2] == "cuda" and choice[1] == "fp32"
            if not asked_for and not agrees_with_reference(choice):
                skipped.append("/".join(choice))
                continue
            candidates.append(choice)
        if not candidates:
            raise EngineUnavailableError(
                f"no engine runs precision {precision!r} on {device} here; available: "
                + ", ".join("/".join(c) for c in choices)
            )
        if skipped:
            log.info(
                "engine auto: skipped %s (no recorded agreement with onnxruntime fp32 at "
                "Dice >= %s; ask for it explicitly to use it)", ", ".join(skipped),
                MIN_AGREEMENT_DICE,
            )  # fmt: skip
        if mem_gb is None or not models or device != "cpu":
            return candidates[0]
        return _within_memory(candidates, models, mem_gb)

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
    raise EngineUnavailableError(
        f"engine {engine!r} cannot run precision {precision!r} on {device} here; "
        f"it offers {', '.join(supported) or 'nothing'}"
    )


def _within_memory(
    candidates: list[tuple[str, str, str]], models: Sequence[str | Path], mem_gb: float
) -> tuple[str, str, str]:
    """The first candidate whose estimated memory fits ``mem_gb``, else the smallest."""
    need = {c: estimated_memory_gb(c[0], models) for c in candidates}
    for choice in candidates:
        if need[choice] <= mem_gb:
            if choice != candidates[0]:
                log.info(
                    "engine auto: %s would need about %.1f GB for these %d model(s), more than "
                    "--mem-gb %g; using %s (about %.1f GB)", "/".join(candidates[0]),
                    need[candidates[0]], len(models), mem_gb, "/".join(choice), need[choice],
                )  # fmt: skip
            return choice
    smallest = min(candidates, key=need.__getitem__)
    log.warning(
        "engine auto: no engine fits --mem-gb %g with these %d model(s); using %s, the "
        "smallest (about %.1f GB)", mem_gb, len(models), "/".join(smallest), need[smallest],
    )  # fmt: skip
    return smallest


def open_session(
    path: str | Path,
    *,
    engine: str = "onnxruntime",
    device: str = "cpu",
    precision: str | None = None,
    threads: int | None = None,
) -> Session:
    """Load the ONNX model at ``path`` with one engine and return a new session.

    ``engine`` may be ``auto`` (see :func:`resolve_engine`). ``precision`` ``None`` means the
    engine's default (fp32). ``threads`` is the intra-op CPU thread count (default: the CPUs this
    process may use). The session's ``device`` and ``precision`` attributes say what actually
    runs after any fallback (CUDA unavailable -> CPU; OpenVINO bf16 without hardware -> fp32).
    """
    _check_names(engine, device, precision, allow_auto=True)
    if engine == "auto":
        engine, precision, device = resolve_engine(engine, device, precision)
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if engine == "onnxruntime":
        from hsf_bids.engines.onnxruntime import OnnxRuntimeSession as cls
    elif engine == "openvino":
        if not _openvino_available():
            raise EngineUnavailableError(
                "engine 'openvino' is not installed (pip install openvino)"
            )
        from hsf_bids.engines.openvino import OpenVinoSession as cls
    else:
        from hsf_bids.engines.deepsparse import DeepSparseSession as cls
    session = cls(path, device=device, precision=precision, threads=threads)
    log.info("loaded %r", session)
    return session


_cache: dict[tuple, Session] = {}
_cache_locks: dict[tuple, threading.Lock] = {}
_cache_guard = threading.Lock()


def get_session(
    path: str | Path,
    *,
    engine: str = "onnxruntime",
    device: str = "cpu",
    precision: str | None = None,
    threads: int | None = None,
) -> Session:
    """Like :func:`open_session`, but a given model and settings are loaded once per process.

    The key is the resolved file (path, size and modification time, so a replaced file is
    reloaded) plus the settings. Thread-safe: concurrent calls for one key load the model once
    and all receive the same session; different keys load in parallel.
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
        session = _cache.get(key)
        if session is not None:
            return session
        lock = _cache_locks.setdefault(key, threading.Lock())
    with lock:
        with _cache_guard:
            session = _cache.get(key)
        if session is None:
            session = open_session(
                resolved, engine=engine, device=device, precision=precision, threads=key[-1]
            )
            with _cache_guard:
                _cache[key] = session
    return session


def clear_session_cache() -> None:
    """Close and forget every cached session (tests, or to free memory between runs)."""
    with _cache_guard:
        sessions = list(_cache.values())
        _cache.clear()
        _cache_locks.clear()
    for session in sessions:
        session.close()
