"""Which engine and precision runs each model of a preset: the run's inference plan.

An explicit ``--engine``/``--precision`` runs every model that way (int8 needs the models' int8
versions, written by ``hsf-bids-models quantize``). ``--engine auto`` on the CPU decides **per
model**: it tries the choices that run here, fastest first (:func:`auto_order`: OpenVINO int8 where
the model has an int8 version, OpenVINO bf16 where this CPU's bf16 outruns its fp32, OpenVINO fp32),
and takes the first whose fused labels agree with onnxruntime fp32 (the reference) at Dice >=
:data:`~hsf_bids.engines.agreement.GATE_DICE` for every structure and contrast
(:mod:`hsf_bids.engines.agreement`). A model whose faster choices all fail runs in onnxruntime
fp32. ``--device cuda`` runs onnxruntime fp32 on the GPU (the user's choice of device, the same
graph in the same precision: nothing to gate).

The order comes from the CPU's instruction sets, not from timing the choices in this process:
timings vary from run to run, and a choice that followed them would make two runs on the same CPU
with separate caches write different labels. The gate's passes are timed all the same, for the log
and ``hsf-bids-models check``. Measurements are cached in the models folder, so they are made once
per model, engine version and CPU; each model is measured only until a choice passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsf_bids.engines import REFERENCE, REFERENCE_CHOICE
from hsf_bids.engines.agreement import GATE_DICE, Agreement, Choice, Measurement

__all__ = [
    "ModelRun",
    "Plan",
    "auto_choice",
    "auto_order",
    "measure_models",
    "plan_models",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRun:
    """How one model of the preset runs."""

    model: str  # the ONNX model's file name
    model_xxh3_64: str
    path: Path  # the file the engine reads (the ONNX model, or its int8 version)
    xxh3_64: str  # that file's checksum
    engine: str
    precision: str
    device: str
    agreement: Agreement | None = None  # the gate's measurement behind this choice, if any

    @property
    def choice(self) -> str:
        return f"{self.engine}/{self.precision}/{self.device}"

    def provenance(self) -> dict[str, Any]:
        """This model's entry in the sidecars' provenance: what ran, and the measurement that let
        it (no timings: the same run gives the same sidecars whether it measured or read the
        cache)."""
        entry: dict[str, Any] = {
            "Engine": self.engine,
            "Precision": self.precision,
            "Device": self.device,
            "RunFile": self.path.name,
            "RunXXH3_64": self.xxh3_64,
        }
        if self.agreement is not None:
            a = self.agreement
            entry["Agreement"] = {
                "Reference": REFERENCE_CHOICE,
                "Gate": GATE_DICE,
                "MinDice": a.min_dice,
                "Dice": a.dice,
                "EngineVersion": a.engine_version,
                "CPU": a.cpu,
                "Crops": a.crops,
                "Predictions": a.n_predictions,
            }
        return entry


@dataclass(frozen=True)
class Plan:
    """The inference plan of a run: one :class:`ModelRun` per model, in preset order."""

    runs: tuple[ModelRun, ...]
    # Measured in this run (logged; not in the sidecars, which must not depend on the cache).
    ensemble_dice: dict[str, dict[str, float | None]] | None = None

    def summary(self) -> dict[str, str]:
        """The ``Engine`` block of the provenance: engine, precision and device, each a list of
        the distinct values (``"openvino"``, ``"int8 (4 models), fp32 (1 model)"``)."""

        def describe(values: list[str]) -> str:
            distinct = list(dict.fromkeys(values))
            if len(distinct) == 1:
                return distinct[0]
            return ", ".join(
                f"{v} ({values.count(v)} model{'s' if values.count(v) > 1 else ''})"
                for v in distinct
            )

        return {
            "Name": describe([r.engine for r in self.runs]),
            "Precision": describe([r.precision for r in self.runs]),
            "Device": describe([r.device for r in self.runs]),
        }

    def describe(self) -> str:
        """One line for the log: each model and how it runs."""
        return "; ".join(f"{r.model}: {r.choice}" for r in self.runs)


def _int8_choice(folder: Path, model: str, model_xxh3_64: str) -> tuple[Choice, str] | None:
    from hsf_bids.quantize import find_int8

    found = find_int8(folder, model, model_xxh3_64)
    if found is None:
        return None
    return Choice("openvino", "int8", "cpu", found.xml), found.xxh3_64


def _no_int8(path: Path, folder: Path) -> Exception:
    from hsf_bids.engines import EngineUnavailableError

    return EngineUnavailableError(
        f"precision int8: {path.name} has no int8 version in {folder}; make one with "
        "hsf-bids-models quantize (same --preset/--hub and --models-dir)"
    )


def _deepsparse_precision(path: Path, asked: str | None) -> str:
    """The precision DeepSparse runs ``path`` in: the stored graph's (it has no precision switch),
    so the provenance names what runs; a different ``--precision`` is refused."""
    from hsf_bids.engines import EngineUnavailableError
    from hsf_bids.engines.deepsparse import stored_precision

    stored = stored_precision(path)
    if asked not in (None, stored):
        raise EngineUnavailableError(
            f"engine deepsparse runs {path.name} as stored, in {stored}, not {asked}; drop "
            "--precision or choose another engine"
        )
    return stored


def _explicit(
    paths: Sequence[Path],
    checksums: Sequence[str],
    folder: Path,
    choice: tuple[str, str, str],
    asked: str | None = None,
) -> Plan:
    """Every model run as the user asked (no gate, so no agreement in the provenance);
    ``asked`` is the precision the user gave, if any."""
    engine, precision, device = choice
    runs = []
    for path, xxh in zip(paths, checksums, strict=True):
        run_path, run_xxh = path, xxh
        if engine == "deepsparse":
            precision = _deepsparse_precision(path, asked)
        if engine == "openvino" and precision == "int8":
            found = _int8_choice(folder, path.name, xxh)
            if found is None:
                raise _no_int8(path, folder)
            run_path, run_xxh = found[0].path, found[1]
        runs.append(ModelRun(path.name, xxh, run_path, run_xxh, engine, precision, device))
    return Plan(tuple(runs))


def candidate_choices(
    path: Path, xxh: str, folder: Path, precision: str | None
) -> dict[Choice, str]:
    """The faster choices ``auto`` may gate for one model on the CPU, with the checksum of the
    file each reads (the reference, onnxruntime fp32, is not among them)."""
    from hsf_bids.engines import _openvino_available, cpu_supports_bf16

    out: dict[Choice, str] = {}
    if not _openvino_available():
        return out
    wanted = {"fp32", "bf16", "int8"} if precision is None else {precision}
    if "fp32" in wanted:
        out[Choice("openvino", "fp32", "cpu", path)] = xxh
    if "bf16" in wanted and cpu_supports_bf16():
        out[Choice("openvino", "bf16", "cpu", path)] = xxh
    if "int8" in wanted:
        found = _int8_choice(folder, path.name, xxh)
        if found is not None:
            out[found[0]] = found[1]
    return out


class _Measurer:
    """Loads the reference and candidate networks and the calibration crops once, on demand;
    caches what it measures on the template crops (never on a user's own crops)."""

    def __init__(
        self, threads: int, folder: Path, crops: list | None = None, fallback: Path | None = None
    ) -> None:
        self.threads = threads
        self.folder = folder
        self.fallback = fallback
        self._crops = crops
        self.cache = crops is None
        self.measurements: dict[str, Measurement] = {}

    def crops(self) -> list:
        if self._crops is None:
            from hsf_bids.calibration import template_crops

            self._crops = template_crops()
        return self._crops

    def measure(self, path: Path, xxh: str, choices: dict[Choice, str]) -> dict[str, Agreement]:
        from hsf_bids.engines import open_network
        from hsf_bids.engines.agreement import measure_agreement, store

        start = time.perf_counter()
        previous = self.measurements.get(path.name)
        reference = (
            None if previous else open_network(path, engine="onnxruntime", threads=self.threads)
        )
        networks = {
            c: (open_network(c.path, engine=c.engine, precision=c.precision, threads=self.threads),
                run_xxh)
            for c, run_xxh in choices.items()
        }  # fmt: skip
        try:
            measurement = measure_agreement(
                path, xxh, reference, networks, self.crops(), previous=previous
            )
        finally:
            if reference is not None:
                reference.close()
            for network, _ in networks.values():
                network.close()
        if previous is None:
            self.measurements[path.name] = measurement
        else:
            previous.merge(measurement)
        for agreement in measurement.agreements.values():
            if self.cache:
                store(self.folder, agreement, self.fallback)
            log.info("agreement gate: %s", agreement.summary())
        log.info(
            "agreement gate: measured %s with %s in %.0f s", path.name,
            ", ".join(c.name for c in choices), time.perf_counter() - start,
        )  # fmt: skip
        return measurement.agreements


def plan_models(
    paths: Sequence[str | Path],
    checksums: Sequence[str],
    folder: str | Path,
    *,
    engine: str = "auto",
    device: str = "cpu",
    precision: str | None = None,
    threads: int | None = None,
    mem_gb: float | None = None,
    cache_dir: Path | None = None,
) -> Plan:
    """The inference plan for the models ``paths`` (checksums ``checksums``) of one preset whose
    models folder is ``folder`` (``<models folder>/<preset folder>``: int8 versions and cached
    agreements live there; ``cache_dir``, e.g. the work folder, keeps measurements where neither
    the models folder nor the user's cache folder can be written).

    Raises :class:`~hsf_bids.engines.UnknownEngineError` for an unknown name and
    :class:`~hsf_bids.engines.EngineUnavailableError` for a choice that cannot run here
    (including ``--precision int8`` without int8 versions).
    """
    from hsf_bids.engines import EngineUnavailableError, default_threads, resolve_engine
    from hsf_bids.engines.agreement import load_cached

    paths = [Path(p) for p in paths]
    folder = Path(folder)
    threads = int(threads) if threads else default_threads()
    if precision == "int8" and engine in ("auto", "openvino"):
        if device != "cpu":
            raise EngineUnavailableError(
                "precision int8 runs with engine openvino on the CPU (the models' int8 versions)"
            )
        resolve_engine("openvino", "cpu", "fp32")  # raises when OpenVINO is not installed
        if engine == "openvino":
            return _explicit(paths, checksums, folder, ("openvino", "int8", "cpu"))
    else:
        resolved = resolve_engine(engine, device, precision)
        if engine != "auto" or resolved[2] == "cuda":
            return _explicit(paths, checksums, folder, resolved, precision)
        device = resolved[2]  # cuda asked for but not usable: the CPU, gated as usual

    measurer = _Measurer(threads, folder, fallback=cache_dir)
    runs: list[ModelRun] = []
    for path, xxh in zip(paths, checksums, strict=True):
        candidates = candidate_choices(path, xxh, folder, precision)
        if precision == "int8" and not candidates:
            raise _no_int8(path, folder)
        known: dict[str, Agreement] = {}
        # A choice outside the order (bf16 slower than fp32 here) is never worth its loss of
        # precision.
        order = auto_order(precision)
        tried = sorted(
            (c for c in candidates if c.name in order), key=lambda c: order.index(c.name)
        )
        for choice in tried:
            cached = load_cached(folder, path.name, xxh, choice, candidates[choice], cache_dir)
            if cached is None:
                cached = measurer.measure(path, xxh, {choice: candidates[choice]})[choice.name]
            known[choice.name] = cached
            if cached.passed:
                break
        best = auto_choice(known, precision)
        if best is None:
            failed = ", ".join(f"{a.choice} {a.min_dice:.4f}" for a in known.values())
            if failed:
                log.warning(
                    "engine auto: %s runs in onnxruntime fp32: no faster choice passes the "
                    "agreement gate (lowest Dice %s; gate %s)", path.name, failed, GATE_DICE,
                )  # fmt: skip
            runs.append(ModelRun(path.name, xxh, path, xxh, *REFERENCE))
            continue
        agreement = known[best]
        choice = next(c for c in candidates if c.name == best)
        runs.append(
            ModelRun(path.name, xxh, choice.path, candidates[choice], choice.engine,
                     choice.precision, choice.device, agreement)
        )  # fmt: skip
    plan = _within_memory(Plan(tuple(runs)), paths, checksums, mem_gb)
    measured = [measurer.measurements.get(p.name) for p in paths]
    if all(
        m is not None and (r.choice == REFERENCE_CHOICE or r.choice in m.votes)
        for m, r in zip(measured, plan.runs, strict=True)
    ):
        from hsf_bids.engines.agreement import ensemble_dice

        plan = Plan(plan.runs, ensemble_dice(measured, [r.choice for r in plan.runs]))
        log.info("engine auto: ensemble agreement (fused labels) %s", plan.ensemble_dice)
    log.info("engine auto: %s", plan.describe())
    return plan


_SPEED_ORDER = ("openvino/int8/cpu", "openvino/bf16/cpu", "openvino/fp32/cpu")


def auto_order(precision: str | None = None) -> tuple[str, ...]:
    """The choices ``auto`` tries on this CPU, fastest first: int8, then bf16 where it outruns
    fp32 (:func:`~hsf_bids.engines.cpu.bf16_beats_fp32`; always when ``precision`` asks for it),
    then OpenVINO fp32. OpenVINO fp32 runs the ARUNet in 0.63-0.73 of onnxruntime's time and int8
    in 0.34-0.42 of fp32's on the two AVX-512 CPUs measured (README, Speed)."""
    from hsf_bids.engines.cpu import bf16_beats_fp32

    keep_bf16 = precision == "bf16" or bf16_beats_fp32()
    return tuple(c for c in _SPEED_ORDER if keep_bf16 or c != "openvino/bf16/cpu")


def auto_choice(known: dict[str, Agreement], precision: str | None = None) -> str | None:
    """The choice ``auto`` takes among the measurements ``known``: the first of
    :func:`auto_order` that passed the gate. None: the reference, onnxruntime fp32."""
    for name in auto_order(precision):
        if name in known and known[name].passed:
            return name
    return None


def _within_memory(
    plan: Plan,
    paths: Sequence[Path],
    checksums: Sequence[str],
    mem_gb: float | None,
) -> Plan:
    """With a budget (``--mem-gb``): when the plan's estimated peak is over it, run the models
    whose choice holds the most memory in onnxruntime fp32 instead, until it fits."""
    from hsf_bids.engines import estimated_memory_gb

    if mem_gb is None:
        return plan
    runs = list(plan.runs)

    def need(items: list[ModelRun]) -> float:
        return estimated_memory_gb([(r.engine, r.precision, r.path) for r in items])

    while need(runs) > mem_gb:
        heavy = [i for i, r in enumerate(runs) if r.choice != REFERENCE_CHOICE]
        if not heavy:
            log.warning(
                "engine auto: these %d model(s) need about %.1f GB, more than --mem-gb %g, "
                "even in onnxruntime fp32", len(runs), need(runs), mem_gb,
            )  # fmt: skip
            break
        worst = max(heavy, key=lambda i: estimated_memory_gb([(runs[i].engine,
                    runs[i].precision, runs[i].path)]))  # fmt: skip
        before = need(runs)
        r = runs[worst]
        runs[worst] = ModelRun(r.model, r.model_xxh3_64, paths[worst], checksums[worst],
                               *REFERENCE)  # fmt: skip
        log.info(
            "engine auto: %s would need about %.1f GB with %s, more than --mem-gb %g; it runs "
            "in onnxruntime fp32", r.model, before, r.choice, mem_gb,
        )  # fmt: skip
    return Plan(tuple(runs), plan.ensemble_dice)


def measure_models(
    paths: Sequence[str | Path],
    checksums: Sequence[str],
    folder: str | Path,
    *,
    crops: list | None = None,
    threads: int | None = None,
    precision: str | None = None,
) -> list[Measurement]:
    """Measure every faster choice of every model against onnxruntime fp32 (no shortcut, no
    cache read), on the template crops (the results are cached for ``auto``) or on ``crops``
    (:class:`hsf_bids.calibration.CalibrationCrop`, e.g. a user's own images; not cached)."""
    from hsf_bids.engines import default_threads

    folder = Path(folder)
    measurer = _Measurer(int(threads) if threads else default_threads(), folder, crops)
    out = []
    for path, xxh in zip([Path(p) for p in paths], checksums, strict=True):
        choices = candidate_choices(path, xxh, folder, precision)
        if not choices:
            continue
        measurer.measure(path, xxh, choices)
        out.append(measurer.measurements[path.name])
    return out
