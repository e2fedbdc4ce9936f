"""The SLURM path of the README, run on a real one-node SLURM cluster (marker ``slurm``).

A fixture starts ``munged`` (a generated key, its own socket), ``slurmctld`` and ``slurmd`` on
127.0.0.1 with a ``slurm.conf`` written here (no cgroup plugins, no accounting database: job states
come from the job completion log), and removes everything at the end, whatever happened. The test
submits ds-mini with the example scripts of ``examples/slurm`` themselves, as a user would: the
participant array, the dependent group job, then a second submission with one task cancelled
and the failed ones resubmitted from the app's own failure table.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import compare_outputs_tool, require

from hsf_bids.bids import validate_dataset

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "slurm"
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
# ds-mini: four subjects, five T1w images (sub-04 has two sessions)
SUBJECTS = ("01", "02", "03", "04")
N_IMAGES = 5

pytestmark = pytest.mark.slurm


# ---------------------------------------------------------------------------------------------
# The container variant, without a container engine


def test_container_wrapper_passes_the_task_in(tmp_path: Path) -> None:
    """``hsf-bids-container`` binds the folders at their own paths and passes SLURM's share."""
    fake = tmp_path / "bin" / "apptainer"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    (tmp_path / "ds").mkdir()
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "HSF_BIDS_IMAGE": "/images/hsf_bids.sif",
        "SLURM_JOB_ID": "7",
        "SLURM_CPUS_PER_TASK": "3",
        "TMPDIR": str(tmp_path / "scratch"),
    }
    args = subprocess.run(
        [EXAMPLES / "hsf-bids-container", tmp_path / "ds", tmp_path / "out", "participant"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert args[:2] == ["run", "--containall"]
    assert f"{tmp_path / 'ds'}:{tmp_path / 'ds'}:ro" in args
    assert f"{tmp_path / 'out'}:{tmp_path / 'out'}" in args
    assert "SLURM_CPUS_PER_TASK=3" in args and "SLURM_JOB_ID=7" in args
    assert args[-4:] == ["/images/hsf_bids.sif", str(tmp_path / "ds"), str(tmp_path / "out"),
                         "participant"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A one-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A running one-node SLURM cluster: its files, and the environment its clients need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "jobcomp.txt"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str | Path, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in args], env=kwargs.pop("env", self.env), capture_output=True,
            text=True, timeout=120, **kwargs,
        )  # fmt: skip

    def active(self, *job_ids: str) -> list[str]:
        """``JOBID STATE`` lines of the jobs still pending or running."""
        done = self.run("squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids))
        return done.stdout.split("\n") if done.stdout.strip() else []

    def wait(self, *job_ids: str, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while self.active(*job_ids):
            if time.monotonic() > end:
                pytest.fail(
                    f"jobs {job_ids} still queued after {timeout} s: {self.active(*job_ids)}"
                )
            time.sleep(2)
        time.sleep(1)  # the job completion log is written as the job leaves the queue

    def states(self) -> list[dict[str, str]]:
        """Every ended job (array tasks one each) from the job completion log."""
        if not self.jobcomp.is_file():
            return []
        rows = []
        for line in self.jobcomp.read_text().splitlines():
            rows.append(dict(f.split("=", 1) for f in line.split() if "=" in f))
        return rows

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.root.rglob("*.log"))
        )


def _node_line() -> str:
    """The node as ``slurmd -C`` sees it, reached on 127.0.0.1."""
    found = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True)
    line = found.stdout.splitlines()[0]
    return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"


def _conf(root: Path, node: str) -> str:
    name = node.split()[0].removeprefix("NodeName=")
    return "\n".join([
        "ClusterName=hsftest",
        f"SlurmctldHost={name}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"AuthInfo=socket={root / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        # nothing here may need cgroups: tasks are tracked by their process tree
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "AccountingStorageType=accounting_storage/none",
        # job states without an accounting database
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'jobcomp.txt'}",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        "MinJobAge=600",
        node,
        f"PartitionName=test Nodes={name} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])  # fmt: skip


def _stop_pid(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """munged, slurmctld and slurmd on 127.0.0.1; stopped and removed at the end."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    require(not missing, f"SLURM and MUNGE are not installed ({', '.join(missing)} missing; "
                          "apt-get install slurm-wlm munge)")  # fmt: skip
    require(os.geteuid() == 0, "a test SLURM cluster runs its daemons as root")
    # short: a unix socket path is limited to 107 bytes
    root = Path(tempfile.mkdtemp(prefix="hsf_slurm_", dir="/tmp"))
    os.chmod(root, 0o755)  # slurmd's job steps read the spool folder
    cluster = Cluster(root)
    try:
        for folder in ("state", "spool"):
            (root / folder).mkdir()
        key = root / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        subprocess.run(
            ["munged", f"--key-file={key}", f"--socket={root / 'munge.socket'}",
             f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
             f"--seed-file={root / 'munged.seed'}", "--force"],
            check=True,
        )  # fmt: skip
        cluster.conf.write_text(_conf(root, _node_line()))
        for daemon in ("slurmctld", "slurmd"):
            done = cluster.run(
                daemon, "-f", cluster.conf, *(["-c"] if daemon == "slurmctld" else [])
            )
            assert done.returncode == 0, f"{daemon}: {done.stderr}\n{cluster.logs()}"
        end = time.monotonic() + 60
        while True:
            state = cluster.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state in ("idle", "mix", "alloc"):
                break
            if time.monotonic() > end:
                pytest.fail(f"the node is {state!r}, not idle\n{cluster.logs()}")
            time.sleep(1)
        yield cluster
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=cluster.env,
                       capture_output=True, check=False, timeout=30)  # fmt: skip
        subprocess.run(["scontrol", "shutdown"], env=cluster.env,
                       capture_output=True, check=False, timeout=30)  # fmt: skip
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            _stop_pid(root / pid_file)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# ds-mini through the example scripts


def _submit(
    cluster: Cluster, script: str, *args: str | Path, env: dict[str, str]
) -> tuple[str, str]:
    """Run ``submit.sh`` or ``resubmit.sh``; returns the array and group job ids."""
    done = cluster.run(EXAMPLES / script, *args, env=env)
    assert done.returncode == 0, f"{script}: {done.stdout}\n{done.stderr}"
    words = done.stdout.split()
    return words[words.index("participants:") + 2], words[words.index("group:") + 2].rstrip(";")


def _tasks(cluster: Cluster, array: str) -> dict[str, str]:
    """State of each ended task of an array job, by task index."""
    return {
        row.get("ArrayTaskId", ""): row["JobState"]
        for row in cluster.states()
        if row.get("ArrayJobId") == array
    }


def _state(cluster: Cluster, job: str) -> str | None:
    return next((r["JobState"] for r in cluster.states() if r.get("JobId") == job), None)


def test_dataset_on_slurm(cluster, ds_mini, fast_hub, templateflow_home, tmp_path) -> None:
    root = tmp_path
    scratch = root / "scratch"
    scratch.mkdir()
    env = {
        **cluster.env,
        # the tasks run this checkout's code with this interpreter, through the scripts' HSF_BIDS
        "HSF_BIDS": f"{sys.executable} -m hsf_bids",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TEMPLATEFLOW_HOME": str(templateflow_home),
        "HSF_BIDS_JOBS": str(root / "jobs"),
        # one CPU and 1.5 GB a task: two tasks at once on a two-CPU node
        "HSF_BIDS_SBATCH": "--cpus-per-task=1 --mem=1500M --time=00:20:00",
        "TMPDIR": str(scratch),  # node-local scratch, as a site sets it
    }
    options = [
        *("--hub", str(fast_hub), "--models-dir", str(root / "models")),
        *("--engine", "onnxruntime", "--precision", "fp32", "--seed", "42"),
        "--skip-bids-validation",
    ]
    out = root / "out"
    array, group = _submit(cluster, "submit.sh", ds_mini, out, *options, env=env)
    cluster.wait(array, group, timeout=900)
    tasks = _tasks(cluster, array)
    assert tasks == {str(i): "COMPLETED" for i in range(1, len(SUBJECTS) + 1)}, (
        f"{tasks}\n{cluster.logs()}"
    )
    assert _state(cluster, group) == "COMPLETED", cluster.logs()

    for subject in SUBJECTS:
        # the settings each task ran with: the scheduler's CPUs and memory, the node's scratch,
        # though no option said so and nproc counts every CPU of the node
        configs = list((out / f"sub-{subject}" / "log").glob("*/config.json"))
        assert len(configs) == 1, configs
        config = json.loads(configs[0].read_text())
        assert config["participant_labels"] == [subject]
        assert (config["nprocs"], config["omp_nthreads"]) == (1, 1)
        assert config["mem_gb"] == pytest.approx(1500 / 1024)
        assert config["work_dir"] == str(scratch / "hsf_bids")
        assert list((out / f"sub-{subject}").rglob("*_dseg.nii.gz")), subject
        assert (out / f"sub-{subject}.html").is_file()
    # the files every task writes (atomically) are whole, and no temporary file is left
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert not [p for p in out.rglob(".part-*")]
    errors, _ = validate_dataset(out)
    assert not errors, errors
    wide = pd.read_csv(out / "group_volumes_wide.tsv", sep="\t")
    assert len(wide) == N_IMAGES
    assert not wide.duplicated(["participant_id", "session_id"]).any()
    long = pd.read_csv(out / "group_volumes_long.tsv", sep="\t")
    assert long.groupby(["participant_id", "session_id"], dropna=False).ngroups == N_IMAGES
    failures = pd.read_csv(out / "group_failures.tsv", sep="\t")
    assert failures.empty, failures

    # A second submission of two subjects: one task is cancelled while it runs, the group job
    # records it in group_failures.tsv, and resubmit.sh runs that one again.
    second = root / "second"
    labels = ["--participant-label", "01", "02"]
    # other nodes' scratch: nothing of the first run's work folder is reused
    (root / "scratch2").mkdir()
    env = {**env, "TMPDIR": str(root / "scratch2")}
    array2, group2 = _submit(cluster, "submit.sh", ds_mini, second, *options, *labels, env=env)
    end = time.monotonic() + 300
    while f"{array2}_1 RUNNING" not in cluster.active(array2):
        assert time.monotonic() < end, f"task 1 never ran: {cluster.active(array2)}"
        assert _tasks(cluster, array2).get("1") is None, f"task 1 ended first\n{cluster.logs()}"
        time.sleep(0.5)
    time.sleep(2)  # inside the app (a task takes 8-16 s here), not yet done
    cancelled = cluster.run("scancel", f"{array2}_1")
    assert cancelled.returncode == 0, cancelled.stderr
    cluster.wait(array2, group2, timeout=600)
    assert _tasks(cluster, array2) == {"1": "CANCELLED", "2": "COMPLETED"}, cluster.logs()
    assert _state(cluster, group2) == "COMPLETED", cluster.logs()
    failures = pd.read_csv(second / "group_failures.tsv", sep="\t")
    assert failures["participant_id"].tolist() == ["sub-01"], failures

    array3, group3 = _submit(cluster, "resubmit.sh", ds_mini, second, *options, *labels, env=env)
    assert (root / "jobs").glob("resubmit_*.txt")
    cluster.wait(array3, group3, timeout=600)
    assert _tasks(cluster, array3) == {"1": "COMPLETED"}, cluster.logs()
    assert _state(cluster, group3) == "COMPLETED", cluster.logs()
    assert pd.read_csv(second / "group_failures.tsv", sep="\t").empty
    assert compare_outputs_tool().compare(out, second, ["01", "02"]) == []
    errors, _ = validate_dataset(second)
    assert not errors, errors
