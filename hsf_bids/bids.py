"""Which images a run segments: pybids queries over the input dataset.

One :class:`SegmentationJob` per image to segment. With ``--contrast both`` a T1w and a T2w of the
same subject and session form one multispectral job (the T2w is registered to the T1w and its
predictions join the same vote); images without a partner are segmented alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsf_bids.errors import EX_EMPTY_SELECTION, EX_NOINPUT, EX_USAGE, HsfBidsError, brief
from hsf_bids.outputs.derivatives import Entities, EntitiesError
from hsf_bids.vocabulary import CONTRASTS


class BIDSQueryError(HsfBidsError, ValueError):
    """The dataset, the labels or the filters select nothing usable (exit code 18, or the
    ``exit_code=`` given: a filter file that cannot be read or is malformed)."""

    exit_code = EX_EMPTY_SELECTION


@dataclass(frozen=True)
class AnatImage:
    """One anatomical image of the input dataset."""

    path: Path
    entities: Entities  # its BIDS entities; ``contrast`` is its suffix (T1w, T2w)

    @property
    def contrast(self) -> str:
        return str(self.entities.contrast)

    @property
    def subject(self) -> str:
        return self.entities.sub

    @property
    def session(self) -> str | None:
        return self.entities.ses

    @property
    def name(self) -> str:
        """``sub-01_ses-01_acq-x_run-1_T1w``: the file name without extension."""
        return "_".join([*(f"{k}-{v}" for k, v in self.entities.items()), self.contrast])


@dataclass(frozen=True)
class SegmentationJob:
    """One segmentation: the image whose grid the outputs share, and an optional second contrast."""

    image: AnatImage
    secondary: AnatImage | None = None

    @property
    def subject(self) -> str:
        return self.image.subject

    @property
    def session(self) -> str | None:
        return self.image.session

    @property
    def name(self) -> str:
        """Unique within a run; used for workflow and node names (letters, digits, underscores)."""
        return self.image.name.replace("-", "_")

    @property
    def images(self) -> tuple[AnatImage, ...]:
        return (self.image,) if self.secondary is None else (self.image, self.secondary)


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` and ``01`` both mean ``01``."""
    return label[len(prefix) :] if label.startswith(prefix) else label


def load_bids_filters(path: Path) -> dict[str, dict[str, Any]]:
    """Read a ``--bids-filter-file``: ``{"t1w": {entity: value}, "t2w": {...}}`` (as fMRIPrep)."""
    try:
        filters = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BIDSQueryError(
            f"cannot read the BIDS filter file {path}: {exc.strerror}", exit_code=EX_NOINPUT
        ) from exc
    except json.JSONDecodeError as exc:
        raise BIDSQueryError(
            f"the BIDS filter file {path} is not valid JSON: {exc}", exit_code=EX_USAGE
        ) from exc
    allowed = {c.lower() for c in CONTRASTS}
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise BIDSQueryError(
            f"the BIDS filter file {path} must map query names ({', '.join(sorted(allowed))}) "
            "to objects of entity filters",
            exit_code=EX_USAGE,
        )
    unknown = set(filters) - allowed
    if unknown:
        raise BIDSQueryError(
            f"the BIDS filter file {path} has unknown queries {brief(sorted(unknown))}; "
            f"expected {sorted(allowed)}",
            exit_code=EX_USAGE,
        )
    return filters


def _layout(bids_dir: Path):  # noqa: ANN202 - pybids type
    from bids import BIDSLayout, BIDSLayoutIndexer

    # Validation is our own step (bids-validator-deno); pybids' own would silently drop files.
    # Queries use file names only, so the JSON sidecars are not read (the slow part of indexing
    # a large dataset).
    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False)
    return BIDSLayout(str(bids_dir), validate=False, derivatives=False, indexer=indexer)


def _anat_images(
    layout,  # noqa: ANN001 - pybids type
    contrast: str,
    query: dict[str, Any],
    problems: list[str],
) -> list[AnatImage]:
    files = layout.get(
        datatype="anat",
        suffix=contrast,
        extension=[".nii", ".nii.gz"],
        return_type="object",
        **query,
    )
    images = []
    for f in files:
        try:
            entities = Entities.from_filename(f.path)
        except EntitiesError as exc:
            problems.append(f"{f.path}: skipped: {exc}")
            continue
        images.append(AnatImage(path=Path(f.path), entities=entities))
    return sorted(images, key=lambda i: str(i.path))


def _pair_key(image: AnatImage) -> tuple[str | None, str | None]:
    return image.entities.acq, image.entities.run


def _jobs_for_session(t1ws: list[AnatImage], t2ws: list[AnatImage], contrast: str):  # noqa: ANN202
    if contrast == "T1w":
        return [SegmentationJob(i) for i in t1ws]
    if contrast == "T2w":
        return [SegmentationJob(i) for i in t2ws]
    jobs = []
    unpaired = list(t2ws)
    for t1w in t1ws:
        partner = next((t2 for t2 in unpaired if _pair_key(t2) == _pair_key(t1w)), None)
        if partner is None and unpaired:
            partner = unpaired[0]
        if partner is not None:
            unpaired.remove(partner)
        jobs.append(SegmentationJob(t1w, partner))
    jobs.extend(SegmentationJob(t2w) for t2w in unpaired)
    return jobs


def collect_jobs(
    bids_dir: Path,
    *,
    participant_labels: Sequence[str] = (),
    session_labels: Sequence[str] = (),
    contrast: str = "both",
    bids_filters: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[SegmentationJob], list[str]]:
    """Query the dataset.

    Returns the jobs, sorted by subject, session and name, and the problems met (requested
    subjects without a usable image, files whose names cannot be carried to derivatives), each
    a message naming the path. Raises :class:`BIDSQueryError` when a requested participant
    or session does not exist, or when nothing at all is selected.
    """
    layout = _layout(bids_dir)
    subjects = sorted(layout.get_subjects())
    wanted = [strip_prefix(p, "sub-") for p in participant_labels] or subjects
    unknown = sorted(set(wanted) - set(subjects))
    if unknown:
        raise BIDSQueryError(
            f"participant label(s) not found in {bids_dir}: {', '.join(unknown)} "
            f"(present: {', '.join(subjects) or 'none'})"
        )
    sessions = [strip_prefix(s, "ses-") for s in session_labels]
    if sessions:
        present = set(layout.get_sessions(subject=wanted))
        missing = sorted(set(sessions) - present)
        if missing:
            raise BIDSQueryError(
                f"session label(s) not found for the selected participants in {bids_dir}: "
                f"{', '.join(missing)} (present: {', '.join(sorted(present)) or 'none'})"
            )

    filters = bids_filters or {}
    contrasts = CONTRASTS if contrast == "both" else (contrast,)
    jobs: list[SegmentationJob] = []
    problems: list[str] = []
    for subject in wanted:
        found: dict[str, list[AnatImage]] = {}
        for c in contrasts:
            query = {"subject": subject, **filters.get(c.lower(), {})}
            if sessions:
                query["session"] = sessions
            found[c] = _anat_images(layout, c, query, problems)
        by_session: dict[str | None, tuple[list[AnatImage], list[AnatImage]]] = {}
        for c in contrasts:
            for image in found[c]:
                pair = by_session.setdefault(image.session, ([], []))
                pair[0 if c == "T1w" else 1].append(image)
        subject_jobs = [
            job
            for session in sorted(by_session, key=lambda s: s or "")
            for job in _jobs_for_session(*by_session[session], contrast)
        ]
        if not subject_jobs:
            want = " or ".join(contrasts)
            folder = bids_dir / f"sub-{subject}"
            problems.append(f"sub-{subject}: no {want} image found in {folder}")
        jobs.extend(subject_jobs)
    if not jobs:
        detail = "; ".join(problems) if problems else "no images"
        raise BIDSQueryError(f"nothing to segment: {detail}")
    return jobs, problems


def subjects_of(jobs: Iterable[SegmentationJob]) -> list[str]:
    """The distinct subjects of the jobs, in order."""
    return sorted({job.subject for job in jobs})


class PendingValidation:
    """A BIDS validator running in the background (:func:`start_validation`).

    The validator is a separate process, so the app can query the dataset and load its libraries
    meanwhile; :meth:`result` waits for it.
    """

    def __init__(self, path: Path, proc, stdout, stderr, timeout: float) -> None:  # noqa: ANN001
        self.path = path
        self._proc = proc
        self._stdout = stdout
        self._stderr = stderr
        self._timeout = timeout
        self._started = time.monotonic()

    def running(self) -> bool:
        """True while the validator has not exited."""
        return self._proc.poll() is None

    def result(self) -> tuple[list[str], list[str]]:
        """Wait for the validator; ``(errors, warnings)`` as :func:`validate_dataset`.

        Raises ``subprocess.TimeoutExpired`` (after killing it) when it runs past its timeout,
        ``RuntimeError`` when its output cannot be read.
        """
        import subprocess

        left = max(0.0, self._timeout - (time.monotonic() - self._started))
        try:
            self._proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise
        finally:
            self._stdout.seek(0)
            self._stderr.seek(0)
            stdout = self._stdout.read().decode("utf-8", "replace")
            stderr = self._stderr.read().decode("utf-8", "replace")
            self._stdout.close()
            self._stderr.close()
        return _parse_validator_output(self.path, stdout, stderr)


def start_validation(path: Path, timeout: float = 600) -> PendingValidation:
    """Start the BIDS validator (``bids-validator-deno``) on a dataset in the background.

    Raises ``FileNotFoundError`` when the validator is not installed.
    """
    import shutil
    import subprocess
    import sys
    import tempfile

    exe = shutil.which("bids-validator-deno") or str(
        Path(sys.executable).with_name("bids-validator-deno")
    )
    if not Path(exe).is_file():
        raise FileNotFoundError(
            "bids-validator-deno is not installed (pip install bids-validator-deno)"
        )
    # Files, not pipes: a validator with much to say never blocks on a full pipe while the app
    # is busy elsewhere.
    stdout, stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [exe, "--format", "json", str(path)], stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL
    )
    return PendingValidation(Path(path), proc, stdout, stderr, timeout)


def validate_dataset(path: Path, timeout: float = 600) -> tuple[list[str], list[str]]:
    """Run the BIDS validator (``bids-validator-deno``) on a dataset.

    Returns ``(errors, warnings)``, one line each (``CODE: location``, grouped per code). Raises
    ``FileNotFoundError`` when the validator is not installed.
    """
    return start_validation(path, timeout).result()


def _parse_validator_output(path: Path, stdout: str, stderr: str) -> tuple[list[str], list[str]]:
    try:
        issues = json.loads(stdout)["issues"]["issues"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise RuntimeError(f"the BIDS validator failed on {path}: {stderr.strip()[:2000]}") from exc
    grouped: dict[tuple[str, str], list[str]] = {}
    for issue in issues:
        where = issue.get("location") or issue.get("affects") or ""
        grouped.setdefault((issue["severity"], issue["code"]), []).append(str(where))
    errors, warnings = [], []
    for (severity, code), where in sorted(grouped.items()):
        shown = ", ".join(w for w in where[:5] if w)
        more = f" (+{len(where) - 5} more)" if len(where) > 5 else ""
        line = f"{code}: {shown}{more}" if shown else code
        (errors if severity == "error" else warnings).append(line)
    return errors, warnings
