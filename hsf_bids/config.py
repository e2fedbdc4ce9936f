"""The settings of one run, as one immutable object.

The command line builds a :class:`RunConfig` once; everything downstream (the BIDS query, the
workflow builders, the provenance written next to the outputs) reads it and never changes it.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hsf_bids import __version__
from hsf_bids.atomic import atomic_file
from hsf_bids.hub.presets import DEFAULT_PRESET
from hsf_bids.vocabulary import CONTRASTS, ENGINES

CONTRAST_CHOICES = (*CONTRASTS, "both")
ENGINE_CHOICES = ("auto", *ENGINES)
# Crops per forward pass by device. On the CPU a batch of 4 saved under 10 % per crop with
# same-size ARUNets (OpenVINO fp32, 2 cores) but held about 1 GiB more working memory for a
# five-model ensemble (measured); GPUs are usually faster with batches (not measured here).
DEFAULT_BATCH_SIZE: dict[str, int] = {"cpu": 1, "cuda": 4}


def new_run_id() -> str:
    """A sortable, unique name for this run's log folder (fMRIPrep style)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{uuid.uuid4()}"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Paths are absolute; labels are stored without ``sub-``/``ses-``."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip_bids_validation: bool = False
    contrast: str = "both"
    # Resources
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    stop_on_first_crash: bool = False
    write_graph: bool = False
    reports_only: bool = False
    list_participants: bool = False
    verbosity: int = 0
    # Models and segmentation
    preset: str | None = DEFAULT_PRESET
    hub: Path | None = None
    models_dir: Path | None = None
    offline: bool = False
    engine: str = "auto"
    device: str = "cpu"
    precision: str | None = None  # None: the engine's fastest here
    ca_mode: str | None = None  # None: the preset's own
    fusion: str = "vote"
    seed: int = 42
    margin: tuple[int, int, int] | None = None  # None: automatic from the voxel size
    batch_size: int = 1  # see DEFAULT_BATCH_SIZE
    # Bookkeeping
    run_id: str = field(default_factory=new_run_id)
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (paths as strings), written to the log folder as provenance."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def write(self, path: Path) -> None:
        """Write the settings as JSON (atomically: a reader never sees half a file)."""
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @property
    def log_dir(self) -> Path:
        """Top-level log folder of this run (per-subject crash files go under ``sub-XX/log``)."""
        return self.output_dir / "logs" / self.run_id

    def subject_log_dir(self, subject: str) -> Path:
        """Where a subject's crash files and settings go: ``<output>/sub-XX/log/<run-id>/``."""
        return self.output_dir / f"sub-{subject}" / "log" / self.run_id
