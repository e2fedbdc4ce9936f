"""The agreement gate: does a faster engine or precision segment like onnxruntime fp32?

``engine auto`` may run a model with a faster choice (OpenVINO fp32, bf16 or int8) only when that
choice's **fused labels** agree with the reference's (onnxruntime fp32 on the CPU) at a Dice of at
least :data:`GATE_DICE` for every structure, in every contrast. The measurement
(:func:`measure_agreement`) runs the model on the calibration set (:mod:`hsf_bids.calibration`:
the template's T1w and T2w hippocampus crops, both sides), each crop as the original and
``n_augmentations`` seeded HSF augmentations, maps every prediction back and fuses them with HSF's
vote, exactly as the participant level does (fewer augmentations, so it costs about a minute per
ARUNet-size model instead of the preset's 21 inputs). Dice is pooled over both sides per contrast;
a structure that neither labelling contains (the demo models never predict CA2) is left out.

The same passes time each choice (``seconds_per_pass``) for the log, ``hsf-bids-models check`` and
the benchmarks; ``auto`` does not choose by these timings (they vary from run to run), but by the
CPU's instruction sets (:func:`hsf_bids.engines.plan.auto_order`).

Results are cached as JSON in the models folder (``<preset folder>/agreement/``; where that is
read-only, as in a container, in the per-user cache folder ``<user cache>/hsf_bids/agreement/
<preset folder>/``), one file per model and choice, named after a key of the model's checksum,
the file that runs (an int8 model's checksum), the engine and its version, the precision, the
device, the CPU
(:func:`~hsf_bids.engines.cpu.cpu_signature`) and the measurement's own settings: a new engine
version, CPU or model is measured again; nothing else is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsf_bids.engines.base import Network

__all__ = [
    "GATE_DICE",
    "MEASUREMENT",
    "Agreement",
    "Choice",
    "Measurement",
    "dice_per_structure",
    "engine_version",
    "load_cached",
    "measure_agreement",
    "store",
]

log = logging.getLogger(__name__)

GATE_DICE = 0.98
#: The measurement's own settings; part of the cache key, so changing them measures again.
MEASUREMENT = {"version": 1, "n_augmentations": 2, "fusion": "vote", "ca_mode": "1/2/3"}
STRUCTURES = ("DG", "CA1", "CA2", "CA3", "SUB")  # model channels 1-5


@dataclass(frozen=True)
class Choice:
    """One way to run one model: the engine, precision and device, and the file it reads (the
    ONNX model, or its int8 OpenVINO version)."""

    engine: str
    precision: str
    device: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.engine}/{self.precision}/{self.device}"


@dataclass(frozen=True)
class Agreement:
    """A choice's measured agreement with the reference on one model (cached as JSON)."""

    model: str  # file name of the ONNX model
    model_xxh3_64: str
    choice: str  # engine/precision/device
    run_file: str
    run_file_xxh3_64: str
    engine_version: str
    cpu: str
    dice: dict[str, dict[str, float | None]]  # contrast -> structure -> Dice (None: absent)
    min_dice: float
    passed: bool
    seconds_per_pass: float
    reference_seconds_per_pass: float
    n_predictions: int
    crops: list[str]
    measurement: dict[str, Any] = field(default_factory=lambda: dict(MEASUREMENT))
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        worst = min(
            ((c, s, d) for c, per in self.dice.items() for s, d in per.items() if d is not None),
            key=lambda item: item[2],
            default=None,
        )
        where = f" ({worst[1]} {worst[0]})" if worst else ""
        verdict = "passes" if self.passed else "fails"
        return (
            f"{self.model} {self.choice}: lowest Dice {self.min_dice:.4f}{where} {verdict} the "
            f"gate {GATE_DICE}; {self.seconds_per_pass:.2f} s per pass (onnxruntime fp32 "
            f"{self.reference_seconds_per_pass:.2f} s)"
        )


def engine_version(engine: str) -> str:
    """The installed version of an engine's package."""
    if engine == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    if engine == "openvino":
        import openvino

        return openvino.get_version()
    if engine == "deepsparse":
        import deepsparse

        return deepsparse.__version__
    raise ValueError(f"unknown engine {engine!r}")


def cache_key(model_xxh3_64: str, choice: Choice, run_file_xxh3_64: str) -> str:
    """The cache key of one measurement (hex, 16 digits)."""
    from hsf_bids.engines.cpu import cpu_signature

    text = json.dumps(
        [model_xxh3_64, run_file_xxh3_64, choice.engine, engine_version(choice.engine),
         choice.precision, choice.device, cpu_signature(), MEASUREMENT],
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file(folder: Path, model_name: str, choice: Choice, key: str) -> Path:
    stem = Path(model_name).name.removesuffix(".onnx")
    return folder / f"{stem}.{choice.engine}-{choice.precision}-{choice.device}.{key}.json"


def cache_folders(folder: Path, fallback: Path | None = None) -> list[Path]:
    """Where measurements for a preset folder are cached, in order of preference: its
    ``agreement/`` folder, one in the per-user cache folder, then ``fallback`` (the run's work
    folder: a read-only container still has that one)."""
    import platformdirs

    folder = Path(folder)
    user = Path(platformdirs.user_cache_dir("hsf_bids")) / "agreement" / folder.name
    folders = [folder / "agreement", user]
    if fallback is not None:
        folders.append(Path(fallback) / "agreement" / folder.name)
    return folders


def load_cached(
    folder: Path,
    model_name: str,
    model_xxh3_64: str,
    choice: Choice,
    run_file_xxh3_64: str,
    fallback: Path | None = None,
) -> Agreement | None:
    """The cached measurement for exactly this model, choice, engine version and CPU, if any
    (``folder``: the preset's folder in the models folder; ``fallback``: see
    :func:`cache_folders`)."""
    key = cache_key(model_xxh3_64, choice, run_file_xxh3_64)
    for base in cache_folders(folder, fallback):
        try:
            data = json.loads(_cache_file(base, model_name, choice, key).read_text())
            agreement = Agreement(**data)
        except (OSError, ValueError, TypeError):
            continue
        if agreement.key == key:
            return agreement
    return None


def store(folder: Path, agreement: Agreement, fallback: Path | None = None) -> Path | None:
    """Cache ``agreement`` (atomically) for the preset folder ``folder``; None, with a warning,
    when no cache folder can be written: the run goes on, and measures again next time."""
    from hsf_bids.outputs.derivatives import OutputWriteError, write_json

    choice_stub = Choice(*agreement.choice.split("/"), path=Path(agreement.run_file))
    problems = []
    for base in cache_folders(folder, fallback):
        try:
            return write_json(
                agreement.to_dict(), _cache_file(base, agreement.model, choice_stub, agreement.key)
            )
        except OutputWriteError as exc:
            problems.append(str(exc))
    log.warning(
        "agreement of %s %s not cached (no writable cache folder: %s); it will be measured "
        "again by the next run", agreement.model, agreement.choice, "; ".join(problems),
    )  # fmt: skip
    return None


def dice_per_structure(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> dict[str, float | None]:
    """Dice of labels 1-5 pooled over pairs of label maps; None where neither has the label."""
    out: dict[str, float | None] = {}
    for label, name in enumerate(STRUCTURES, start=1):
        both = size = 0
        for ref, cand in zip(reference, candidate, strict=True):
            a, b = ref == label, cand == label
            both += int(np.count_nonzero(a & b))
            size += int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        out[name] = None if size == 0 else 2.0 * both / size
    return out


def _labels(votes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HSF's vote from vote counts ``[classes, x, y, z]`` (as ``FusionAccumulator.result``: the
    first maximum, so ties go to the lower label); also for counts added over models."""
    return np.argmax(votes, axis=0).reshape(shape).astype(np.uint8)


@dataclass
class Measurement:
    """What one :func:`measure_agreement` call saw: per choice, the agreement, and the vote
    counts of each crop (so the agreement of an ensemble can be computed by adding them)."""

    agreements: dict[str, Agreement]
    votes: dict[str, list[np.ndarray]]  # choice name (and "reference") -> per crop
    crops: list[Any]
    reference_seconds_per_pass: float = 0.0

    def merge(self, other: Measurement) -> None:
        """Add another measurement of the same model on the same crops (other choices)."""
        self.agreements.update(other.agreements)
        self.votes.update({k: v for k, v in other.votes.items() if k != "reference"})


def measure_agreement(
    model: Path,
    model_xxh3_64: str,
    reference: Network | None,
    candidates: Mapping[Choice, tuple[Network, str]],
    crops: Sequence[Any],
    *,
    n_augmentations: int = MEASUREMENT["n_augmentations"],
    seed: int | None = None,
    previous: Measurement | None = None,
) -> Measurement:
    """Measure each candidate choice against ``reference`` (onnxruntime fp32) on ``crops``.

    ``candidates`` maps each :class:`Choice` to its loaded network and the XXH3-64 of the file it
    runs. ``crops`` are :class:`hsf_bids.calibration.CalibrationCrop`. Every crop is segmented as
    the participant level does (original plus ``n_augmentations`` seeded augmentations, each
    z-scored, padded, run, un-padded, mapped back, then HSF's vote) by the reference and by each
    candidate, on the same inputs. With ``previous`` (a measurement of the same model on the same
    crops) the reference is not run again (``reference`` may then be None).
    """
    from hsf_bids.calibration import CALIBRATION_SEED, augmentations
    from hsf_bids.engines.cpu import cpu_signature
    from hsf_bids.segment.fuse import FusionAccumulator
    from hsf_bids.segment.preprocess import pad_to_multiple, unpad, zscore
    from hsf_bids.vocabulary import N_MODEL_CLASSES

    networks = {c.name: s for c, (s, _) in candidates.items()}
    if previous is None:
        if reference is None:
            raise ValueError("measure_agreement needs the reference network or a previous run")
        networks = {"reference": reference, **networks}
    seconds = dict.fromkeys(networks, 0.0)
    votes: dict[str, list[np.ndarray]] = {name: [] for name in networks}
    passes = 0
    draws = augmentations(crops, n_augmentations, CALIBRATION_SEED if seed is None else seed)
    for item, augs in zip(crops, draws, strict=True):
        fusion = {name: FusionAccumulator(item.crop.shape, N_MODEL_CLASSES) for name in networks}
        for aug in [None, *augs]:
            image = item.crop if aug is None else aug.apply(item.crop)
            batch, pads = pad_to_multiple(zscore(image)[None, None])
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            for name, network in networks.items():
                start = time.perf_counter()
                probs = network.run(batch)
                seconds[name] += time.perf_counter() - start
                probs = unpad(probs, pads)[0]
                if aug is not None:
                    probs = aug.invert(probs)
                fusion[name].add(probs)
            passes += 1
        for name in networks:
            votes[name].append(fusion[name].vote_counts())

    if previous is not None:
        votes["reference"] = previous.votes["reference"]
        reference_seconds = previous.reference_seconds_per_pass
    else:
        reference_seconds = seconds["reference"] / passes
    reference_labels = [
        _labels(v, c.crop.shape) for v, c in zip(votes["reference"], crops, strict=True)
    ]
    cpu = cpu_signature()
    agreements = {}
    for choice, (_, run_xxh) in candidates.items():
        labels = [_labels(v, c.crop.shape) for v, c in zip(votes[choice.name], crops, strict=True)]
        dice = _dice_by_contrast(crops, reference_labels, labels)
        values = [d for per in dice.values() for d in per.values() if d is not None]
        lowest = min(values) if values else 0.0
        agreements[choice.name] = Agreement(
            model=model.name,
            model_xxh3_64=model_xxh3_64,
            choice=choice.name,
            run_file=choice.path.name,
            run_file_xxh3_64=run_xxh,
            engine_version=engine_version(choice.engine),
            cpu=cpu,
            dice=dice,
            min_dice=round(lowest, 6),
            passed=lowest >= GATE_DICE,
            seconds_per_pass=round(seconds[choice.name] / passes, 4),
            reference_seconds_per_pass=round(reference_seconds, 4),
            n_predictions=passes,
            crops=[c.name for c in crops],
            key=cache_key(model_xxh3_64, choice, run_xxh),
        )
    return Measurement(agreements, votes, list(crops), reference_seconds)


def _dice_by_contrast(
    crops: Sequence[Any], reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> dict[str, dict[str, float | None]]:
    out = {}
    for contrast in dict.fromkeys(c.contrast for c in crops):
        index = [i for i, c in enumerate(crops) if c.contrast == contrast]
        per = dice_per_structure([reference[i] for i in index], [candidate[i] for i in index])
        out[contrast] = {k: (None if v is None else round(v, 6)) for k, v in per.items()}
    return out


def ensemble_dice(
    measurements: Sequence[Measurement], plan: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Dice per contrast and structure of the ensemble's fused labels (every model voting, model
    ``i`` with choice ``plan[i]``) against the same ensemble in onnxruntime fp32."""
    from hsf_bids.engines import REFERENCE_CHOICE

    crops = measurements[0].crops
    reference, candidate = [], []
    for index, item in enumerate(crops):
        ref = sum(m.votes["reference"][index].astype(np.uint32) for m in measurements)
        cand = sum(
            m.votes["reference" if name == REFERENCE_CHOICE else name][index].astype(np.uint32)
            for m, name in zip(measurements, plan, strict=True)
        )
        reference.append(_labels(ref, item.crop.shape))
        candidate.append(_labels(cand, item.crop.shape))
    return _dice_by_contrast(crops, reference, candidate)
