"""Wall-time records of the stages of a run (diagnostics for ``benchmarks/participant.py``).

Standard library only, so the command line can time its own start-up without importing the
image and model libraries.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TIMING_JSON = "timing.json"

timing_log = logging.getLogger("hsf_bids.timing")


class StageTimer:
    """Wall time of the steps of one stage, written as a small JSON record.

    ``with timer.step("name"): ...`` adds the block's seconds to ``seconds["name"]``;
    :meth:`write` saves ``{"stage", "started" (Unix time), "total", "seconds", "peak_rss_mib"}``,
    the last being the process's memory high-water mark when the record is made (with the
    Linear plugin every stage runs in one process, so the marks show which stage raised it).
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.started = time.time()
        self._start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    def lap(self, name: str) -> None:
        """Add the time since the previous lap (or the start) to ``seconds[name]``."""
        now = time.perf_counter()
        self.add(name, now - getattr(self, "_lap", self._start))
        self._lap = now

    def record(self) -> dict[str, Any]:
        """The record as written: stage name, start time, total and per-step seconds."""
        return {
            "stage": self.stage,
            "started": self.started,
            "total": time.perf_counter() - self._start,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "peak_rss_mib": peak_rss_mib(),
        }

    def write(self, out_dir: str | os.PathLike[str], name: str = TIMING_JSON) -> Path:
        """Write the record to ``out_dir/name`` (``timing.json``); returns its path."""
        record = self.record()
        timing_log.debug("%s: %.3f s %s", self.stage, record["total"], record["seconds"])
        path = Path(out_dir) / name
        # Diagnostics only: a plain write, and a failure must not fail the stage.
        try:
            path.write_text(json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            timing_log.debug("cannot write %s: %s", path, exc)
        return path


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, in MiB (None where it cannot be read)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(peak / (1024**2 if sys.platform == "darwin" else 1024), 1)


def read_timing(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A record written by :meth:`StageTimer.write`."""
    return json.loads(Path(path).read_text())
