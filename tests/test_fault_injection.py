"""Fault injection: a participant run killed, starved of disk or stopped by its scheduler at
named points, then run again, ends with the outputs of a run that nothing disturbed.

Every run is the installed command in its own process group, on sub-01 of ds-mini (the smallest
head) with the demo models without augmentation, one process, engine onnxruntime fp32. The points
are reached with the app's testing hook ``HSF_BIDS_FAULT_AT=<point>`` (:mod:`hsf_bids.faults`):
the process stops itself there (``SIGSTOP``), and the test does the rest from outside, as the
world would:

- ``kill -9`` of the whole process group at 15 points over every stage (registration, each
  side's inference, paste back, each output file being written, the report), each run resuming
  in the output and work folders the killed one left: after each kill, no partial file under a
  final name and nothing left by the kill before; after the last rerun, outputs byte-identical to
  a clean run's (run ids and times masked in the report, as ``tools/compare_outputs.py`` masks
  them), no ``.part-*`` file and no private temporary folder left;
- a full disk: ``RLIMIT_FSIZE`` 0 set on the stopped process (``prlimit``: the kernel's limit on
  that process from that point on; a limit set when it starts would stop the work folder's
  first files instead) while each kind of output is written (sidecar, label image, uncertainty
  map, volumes table, report): one clear line, exit 73, no partial file under a final name; the
  next run, with room, resumes and completes;
- ``SIGTERM`` (what schedulers send at a time limit): the run stops within seconds, says so,
  exits 143, and a rerun reuses the work folder's finished steps; also while ANTs runs.

Chained runs (each resuming from the previous one's kill) keep the suite's cost near that of
one run per point rather than two (about 3 minutes in all on 2 busy CPUs).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compare_outputs_tool

from hsf_bids.errors import EX_CANTCREAT, EX_OK, EX_TERMINATED
from hsf_bids.faults import FAULT_ENV

pytestmark = [pytest.mark.slow, pytest.mark.faults]

PREFIX = "sub-01_space-T1w_desc-subfields"
ANAT = "sub-01/anat"
# In the order a run reaches them (a later run resumes after the finished steps, so an earlier
# point would not be reached again): point -> the folder (relative to the output) where a kill
# there leaves a temporary file.
KILL_POINTS = {
    "write:dataset_description.json": ".",  # the shared top-level files, first
    "write:desc-subfields_dseg.tsv": ".",
    "write:.bidsignore": ".",
    "registration": None,
    "segment:right": None,
    "segment:left": None,
    "paste_back": None,
    f"write:{PREFIX}_dseg.json": ANAT,
    f"write:{PREFIX}_uncertainty.json": ANAT,
    f"write:{PREFIX}_dseg.nii.gz": ANAT,
    f"write:{PREFIX}_uncertainty.nii.gz": ANAT,
    "write:sub-01_desc-subfields_volumes.tsv": ANAT,
    "write:sub-01_desc-subfields_volumes.json": ANAT,
    "write:sub-01.html": ".",
    "write:CITATION.md": ".",
}
# One output of each kind: label image, uncertainty map, volumes table, sidecar, report.
FULL_DISK_POINTS = [
    f"{ANAT}/{PREFIX}_dseg.json",
    f"{ANAT}/{PREFIX}_dseg.nii.gz",
    f"{ANAT}/{PREFIX}_uncertainty.nii.gz",
    f"{ANAT}/sub-01_desc-subfields_volumes.tsv",
    "sub-01.html",
]


mask = compare_outputs_tool().mask


class Run:
    """One output folder, work folder and temporary folder, and the runs made in them."""

    def __init__(self, root: Path, ds_mini: Path, hub: Path) -> None:
        self.out, self.work, self.tmp = root / "out", root / "work", root / "tmp"
        self.tmp.mkdir(parents=True)
        self.args = [
            sys.executable, "-m", "hsf_bids", str(ds_mini), str(self.out), "participant",
            "--participant-label", "01", "--hub", str(hub), "-w", str(self.work),
            "--nprocs", "1", "--seed", "7", "--engine", "onnxruntime", "--skip-bids-validation",
        ]  # fmt: skip

    def start(self, fault: str | None = None) -> subprocess.Popen:
        env = {**os.environ, "TMPDIR": str(self.tmp)}
        env.pop(FAULT_ENV, None)
        if fault:
            env[FAULT_ENV] = fault
        return subprocess.Popen(
            self.args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip

    def complete(self) -> str:
        proc = self.start()
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == EX_OK, log
        return log

    def leftovers(self) -> list[str]:
        """Temporary files in the output and work folders, private folders in the temporary one."""
        parts = [p for root in (self.out, self.work) for p in root.rglob(".part-*")]
        return [str(p) for p in parts] + [str(p) for p in self.tmp.iterdir()]


def stop_at(proc: subprocess.Popen, point: str) -> str:
    """Read the run's output until it stops at ``point``; returns what it printed."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"{FAULT_ENV}: stopped at {point} " in line:
            break
    else:
        proc.wait()
        pytest.fail(f"the run ended (exit {proc.returncode}) before {point}:\n{''.join(lines)}")
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "the run did not stop"
        time.sleep(0.02)
    return "".join(lines)


def differences(out: Path, reference: Path) -> list[str]:
    """Files of the two output folders (without the runs' logs) that are not byte-identical;
    run ids and times are masked, as they differ between any two runs."""

    def files(root: Path) -> set[str]:
        return {
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and "log" not in p.relative_to(root).parts
        }

    found, expected = files(out), files(reference)
    problems = [f"missing {name}" for name in sorted(expected - found)]
    problems += [f"unexpected {name}" for name in sorted(found - expected)]
    for name in sorted(found & expected):
        a, b = (out / name).read_bytes(), (reference / name).read_bytes()
        if a != b and (
            name.endswith(".nii.gz") or mask(a.decode()) != mask(b.decode())
        ):  # fmt: skip
            problems.append(f"differs {name}")
    return problems


def damaged(out: Path, reference: Path) -> list[str]:
    """Files under a final name that are not the reference's (a partial or wrong file); files
    not written yet and hidden temporary files do not count."""
    return [
        d
        for d in differences(out, reference)
        if not d.startswith("missing ") and not Path(d.split(" ", 1)[1]).name.startswith(".part-")
    ]


@pytest.fixture(scope="module")
def reference(ds_mini, fast_hub, templateflow_home, tmp_path_factory) -> Path:
    """The outputs of a run that nothing disturbed."""
    run = Run(tmp_path_factory.mktemp("reference"), ds_mini, fast_hub)
    run.complete()
    assert run.leftovers() == []
    return run.out


def others_parts(run: Run, proc: subprocess.Popen) -> list[str]:
    """The temporary files in the output folder that are not the process ``proc``'s."""
    return [p.name for p in run.out.rglob(".part-*") if f".{proc.pid}-" not in p.name]


def test_kill_at_every_point_then_rerun_gives_the_same_outputs(
    reference, ds_mini, fast_hub, tmp_path
):
    """One output and work folder; each run is killed at the next point and the next run
    resumes from what the killed one left, as a user rerunning after each crash would."""
    run = Run(tmp_path, ds_mini, fast_hub)
    for point, folder in KILL_POINTS.items():
        proc = run.start(point)
        stop_at(proc, point)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, point
        # What the kill left: its private folder (the previous run's was removed when this one
        # started) and, at a write, the temporary file (the previous run's were removed when
        # this one wrote into their folder again); never a partial file under a final name.
        private = [p.name for p in run.tmp.iterdir()]
        assert len(private) == 1 and f".{proc.pid}-" in private[0], (point, private)
        assert others_parts(run, proc) == [], point
        if folder is not None:
            name = point.removeprefix("write:")
            assert list((run.out / folder).glob(f".part-*.{proc.pid}-*-{name}")), point
        if point == "registration":  # the registration's temporary folder is in the private one
            assert list(run.tmp.glob("hsf_bids-*/tmp/hsf_bids_reg_*/fixed.nii")), point
        assert damaged(run.out, reference) == [], point

    run.complete()
    assert differences(run.out, reference) == []
    assert run.leftovers() == []


def test_a_full_disk_while_writing_each_kind_of_output_is_one_clear_error(
    reference, ds_mini, fast_hub, tmp_path
):
    """One output and work folder; each run finds the disk full at the next kind of output,
    the next run has room until its own point, the last one has room throughout."""
    run = Run(tmp_path, ds_mini, fast_hub)
    for output in FULL_DISK_POINTS:
        point = f"write:{Path(output).name}"
        proc = run.start(point)
        stop_at(proc, point)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, 0))
        os.kill(proc.pid, signal.SIGCONT)
        log, _ = proc.communicate(timeout=120)

        assert proc.returncode == EX_CANTCREAT, (output, log)
        errors = [line for line in log.splitlines() if line.startswith("hsf-bids: error:")]
        assert len(errors) == 1, (output, log)
        assert "Traceback" not in log, (output, log)
        assert "could not write" in errors[0] and "File too large" in errors[0], errors
        if output == "sub-01.html":  # written by the main process, which names it
            assert str(run.out / output) in errors[0]
        # Nothing half-written under a final name: the file is absent, what exists is whole.
        assert not (run.out / output).exists(), output
        assert damaged(run.out, reference) == [], output
        assert not list(run.out.rglob(".part-*")), output

    run.complete()
    assert differences(run.out, reference) == []
    assert run.leftovers() == []


def _results(work: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}


def test_sigterm_stops_the_run_at_once_and_a_rerun_resumes(reference, ds_mini, fast_hub, tmp_path):
    run = Run(tmp_path, ds_mini, fast_hub)
    proc = run.start("segment:left")
    stop_at(proc, "segment:left")
    finished = _results(run.work)
    assert {"result_localise.pklz", "result_segment_right.pklz"} <= set(finished)
    # As SLURM does at a time limit: every process of the job gets SIGTERM.
    os.killpg(proc.pid, signal.SIGTERM)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGCONT)
    log, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - start
    print(f"stopped {elapsed:.2f} s after SIGTERM")

    assert proc.returncode == EX_TERMINATED, log
    assert elapsed < 5
    assert "stopped by SIGTERM" in log.splitlines()[-1], log
    assert run.leftovers() == []  # the private folder is removed on the way out
    assert not (run.out / ANAT / f"{PREFIX}_dseg.nii.gz").exists()

    run.complete()
    assert differences(run.out, reference) == []
    after = _results(run.work)
    assert {name: after[name] for name in finished} == finished  # reused, not recomputed
    assert run.leftovers() == []


def test_sigterm_during_the_registration_stops_the_run_within_seconds(
    reference, ds_mini, fast_hub, tmp_path
):
    """No hook: the signal comes while ANTs runs (native code), as a time limit would."""
    run = Run(tmp_path, ds_mini, fast_hub)
    proc = run.start()
    node = run.work.glob("hsf_bids_*_wf/sub_01_wf/sub_01_T1w_wf/localise/_node.pklz")
    deadline = time.monotonic() + 120
    while not list(node):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
        node = run.work.glob("hsf_bids_*_wf/sub_01_wf/sub_01_T1w_wf/localise/_node.pklz")
    time.sleep(0.5)  # the registration has started (it takes seconds)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - start
    print(f"stopped {elapsed:.2f} s after SIGTERM during the registration")

    assert proc.returncode == EX_TERMINATED, log
    assert elapsed < 3
    assert not list(run.work.rglob("result_localise.pklz"))  # it was stopped, not finished
    assert run.leftovers() == []
