"""The real image: built with podman (or docker) and run as its users run it.

The module builds a Debian base with ``docker/make_base.sh`` (no registry is needed), then the CPU
image with ``docker/build.sh``, baking a demo hub (the shared demo models without augmentation,
copied into the temporary build context, never into the repository) and the shared template
files. It runs the image ``--read-only --network none`` as uid 1000 with the dataset mounted
read-only and only the output and work folders (and a ``/tmp`` tmpfs) writable, and checks that a
``participant`` run of ds-mini gives the derivatives of the same run outside the container,
byte for byte, that ``group`` works inside, and that nothing was written anywhere else.

Marked ``container`` (``pytest -m container`` / ``-m "not container"``); it takes minutes. It needs
podman with mmdebstrap (or a docker daemon with the python base image): missing, it is skipped,
except under CI=true where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import require

import hsf_bids
from hsf_bids.bids import validate_dataset

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
BASE = "localhost/hsf-bids-base:bookworm"
TAG = "localhost/hsf-bids/hsf_bids:test"
HUB_NAME = "demo_fast.yaml"
HUB_IN_IMAGE = f"/opt/hsf_bids/hub/{HUB_NAME}"
UID = 1000
# The run of the comparison: one engine and precision chosen, not measured (engine auto would
# measure its gate on each side), the same seed and threads on both sides.
RUN_OPTIONS = [
    "--engine", "onnxruntime", "--precision", "fp32", "--seed", "42",
    "--nprocs", "2", "--omp-nthreads", "2",
]  # fmt: skip
# Packages whose versions decide the labels: the image must hold the ones this run uses.
DECISIVE = ("onnxruntime", "numpy", "scipy", "antspyx", "nibabel", "openvino", "pandas")


def _engine() -> tuple[str, list[str]]:
    """The container engine and the options its ``run`` needs on this kind of host."""
    if shutil.which("podman"):
        global_opts = ["podman"]
        if shutil.which("runc"):  # crun refuses hosts with hybrid cgroups
            global_opts += ["--runtime", "runc"]
        # podman's default rlimits are refused on some hosts; --read-only-tmpfs=false keeps
        # /var/tmp and /run read-only too, as docker's --read-only does.
        run_opts = ["--ulimit", "nofile=10000:10000", "--ulimit", "nproc=10000:10000",
                    "--read-only-tmpfs=false"]  # fmt: skip
        return "podman", [*global_opts, "run", *run_opts]
    docker = shutil.which("docker")
    up = docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0
    require(bool(up), "no container engine: install podman, runc and mmdebstrap (or docker)")
    return "docker", [str(docker), "run"]


def _write_hub(folder: Path, demo_hub: Path) -> Path:
    """The demo models without augmentation (as HSF's *_fast presets), next to copies of them."""
    folder.mkdir(parents=True)
    hub = yaml.safe_load(demo_hub.read_text())
    for name in hub["models"]:
        shutil.copy2(demo_hub.parent / name, folder / name)
        hub["models"][name]["url"] = name
    hub["segmentation"]["test_time_augmentation"] = False
    shutil.copy2(demo_hub.parent / "LICENSE-NOTE.md", folder / "LICENSE-NOTE.md")
    path = folder / HUB_NAME
    path.write_text(yaml.safe_dump(hub))
    return path


def _snapshot_sources(dest: Path) -> Path:
    """A copy of what the build reads: the image and the native run then run the same code,
    even while the checkout changes under a test that takes minutes."""
    dest.mkdir(parents=True)
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "setup.cfg", "README.md",
                 "LICENSE"):  # fmt: skip
        shutil.copy2(REPO / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("hsf_bids", "docker"):
        shutil.copytree(REPO / name, dest / name, ignore=skip, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def image(demo_hub, templateflow_home, tmp_path_factory):
    """Build the CPU image with the demo hub and the shared templates from a snapshot of the
    sources; (engine, run command prefix, the snapshot)."""
    engine, run = _engine()
    root = tmp_path_factory.mktemp("container")
    src = _snapshot_sources(root / "src")
    hub = _write_hub(root / "hub", demo_hub)
    build = [str(src / "docker" / "build.sh"), "--engine", engine, "--tag", TAG,
             "--hub", str(hub), "--templates", str(templateflow_home)]  # fmt: skip
    if engine == "podman":
        require(shutil.which("mmdebstrap") is not None, "mmdebstrap is not installed")
        build += ["--make-base", "--base", BASE]
    if os.environ.get("HSF_BIDS_TEST_QUANTIZE", "0") != "1":
        build.append("--no-quantize")  # NNCF's int8 step: see the README for its time
    start = time.monotonic()
    result = subprocess.run(build, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    print(f"{engine} build: {time.monotonic() - start:.0f} s")
    return engine, run, src


def _run(image, *args: str, mounts=(), entrypoint=None, name=None, timeout: float = 900):
    """Run the image as its users do; a named container is kept (for ``diff``), else removed."""
    engine, run, _ = image
    cmd = [*run, *(["--name", name] if name else ["--rm"]), "--read-only", "--tmpfs", "/tmp",
           "--network", "none", "--user", f"{UID}:{UID}"]  # fmt: skip
    for source, target, mode in mounts:
        cmd += ["--volume", f"{source}:{target}:{mode}"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return subprocess.run([*cmd, TAG, *args], capture_output=True, text=True, timeout=timeout)


def _writable(path: Path) -> Path:
    path.mkdir(parents=True)
    os.chown(path, UID, UID)
    return path


def test_the_image_starts_and_verifies_its_models(image):
    start = time.monotonic()
    version = _run(image, "--version")
    elapsed = time.monotonic() - start
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"hsf-bids {hsf_bids.__version__}"
    print(f"hsf-bids --version in the container: {elapsed:.2f} s")
    helped = _run(image)  # the image's CMD is --help
    assert helped.returncode == 0 and "usage: hsf-bids" in helped.stdout, helped.stderr
    verified = _run(image, "verify", "--hub", HUB_IN_IMAGE, entrypoint="hsf-bids-models")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("OK") >= 3, verified.stdout


PROBE = """
import json, os, socket
from importlib import metadata
paths = ["/", "/opt", "/opt/venv", os.environ["HOME"], os.environ["HSF_BIDS_MODELS_DIR"],
         os.environ["TEMPLATEFLOW_HOME"], "/opt/hsf_bids/hub", "/var/tmp", "/run", "/data",
         "/out", "/work", "/tmp"]
writable = {}
for p in paths:
    try:
        open(os.path.join(p, ".probe"), "w").close()
        os.unlink(os.path.join(p, ".probe"))
        writable[p] = True
    except OSError:
        writable[p] = False
try:
    socket.create_connection(("1.1.1.1", 53), timeout=3).close()
    network = True
except OSError:
    network = False
versions = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
print(json.dumps({"writable": writable, "network": network, "uid": os.getuid(),
                  "versions": versions}))
"""


@pytest.fixture(scope="module")
def runs(image, ds_mini, demo_hub, templateflow_home, tmp_path_factory):
    """ds-mini in the container and outside it, participant then group; times printed."""
    root = tmp_path_factory.mktemp("runs")
    out, work = _writable(root / "out"), _writable(root / "work")
    mounts = [(ds_mini, "/data", "ro"), (out, "/out", "rw"), (work, "/work", "rw")]
    probe = _run(image, "-c", PROBE, mounts=mounts, entrypoint="python")
    assert probe.returncode == 0, probe.stderr

    name = f"hsf-bids-test-{os.getpid()}"
    subprocess.run([image[1][0], "rm", "--force", name], capture_output=True)
    start = time.monotonic()
    inside = _run(image, "/data", "/out", "participant", "--hub", HUB_IN_IMAGE, *RUN_OPTIONS,
                  "-w", "/work", mounts=mounts, name=name)  # fmt: skip
    t_inside = time.monotonic() - start
    # What the container changed in the image's file system (mounts and tmpfs are not listed).
    diff = subprocess.run([image[1][0], "diff", name], capture_output=True, text=True)
    subprocess.run([image[1][0], "rm", "--force", name], capture_output=True)
    group = _run(image, "/data", "/out", "group", mounts=mounts)

    # Outside: this environment running the sources the image was built from, a copy of the
    # hub the image holds, the same options.
    hub = _write_hub(root / "native_hub", demo_hub)
    env = {
        **os.environ,
        "TEMPLATEFLOW_HOME": str(templateflow_home),
        "HSF_BIDS_MODELS_DIR": str(root / "native_models"),
        "PYTHONPATH": str(image[2]),
    }
    # cwd: python puts it first on sys.path, and the checkout's cwd holds hsf_bids/ too.
    imported = subprocess.run([sys.executable, "-c", "import hsf_bids; print(hsf_bids.__file__)"],
                              capture_output=True, text=True, env=env, cwd=root)  # fmt: skip
    assert Path(imported.stdout.strip()).is_relative_to(image[2]), imported
    native_out = root / "native_out"
    start = time.monotonic()
    native = subprocess.run(
        [sys.executable, "-m", "hsf_bids", str(ds_mini), str(native_out), "participant",
         "--hub", str(hub), *RUN_OPTIONS, "-w", str(root / "native_work")],
        capture_output=True, text=True, env=env, cwd=root, timeout=900,
    )  # fmt: skip
    t_native = time.monotonic() - start
    native_group = subprocess.run(
        [sys.executable, "-m", "hsf_bids", str(ds_mini), str(native_out), "group"],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )  # fmt: skip
    print(f"ds-mini participant: container {t_inside:.0f} s, native {t_native:.0f} s")
    return {
        "probe": json.loads(probe.stdout.strip().splitlines()[-1]),
        "inside": (out, inside.returncode, inside.stdout + inside.stderr),
        "group": (group.returncode, group.stdout + group.stderr),
        "native": (native_out, native.returncode, native.stdout + native.stderr),
        # Container paths -> native paths, for what the derivatives record of them.
        "paths": {
            HUB_IN_IMAGE: str(hub),
            "/data": str(ds_mini),
            "/out": str(native_out),
            "/work": str(root / "native_work"),
        },
        "native_group": (native_group.returncode, native_group.stdout + native_group.stderr),
        "work": work,
        "diff": (diff.returncode, diff.stdout, diff.stderr),
    }


def test_the_run_is_offline_read_only_and_non_root(runs):
    probe = runs["probe"]
    assert probe["uid"] == UID
    assert probe["network"] is False
    expected = {p: p in ("/out", "/work", "/tmp") for p in probe["writable"]}
    assert probe["writable"] == expected, "only the output, work and temporary folders"
    # What decides the labels is what this environment runs, so the comparison is meaningful.
    mine = {name: metadata.version(name) for name in DECISIVE}
    assert {name: probe["versions"].get(name) for name in DECISIVE} == mine


def test_participant_and_group_run_inside_and_write_only_their_folders(runs):
    out, code, log = runs["inside"]
    assert code == 0, log
    assert "finished sub-01, sub-02, sub-03, sub-04" in log
    # Work was done, not skipped: the work folder holds the subjects' workflows, and under the
    # read-only root any write elsewhere would have failed the run or left its trace here.
    assert any(runs["work"].rglob("*.pklz"))
    diff_code, changes, diff_err = runs["diff"]
    assert diff_code == 0, diff_err
    # The engine's own changes only: the mount points it made, and /etc, where it binds
    # hosts, hostname and resolv.conf (and adds the user, for a uid the image lacks).
    engine_made = {"A /data", "A /out", "A /work", "C /etc"}
    assert set(changes.split("\n")) - {""} <= engine_made, changes
    for noise in ("Traceback", "Read-only file system", "Permission denied", "telemetry"):
        assert noise not in log, noise
    group_code, group_log = runs["group"]
    assert group_code == 0, group_log
    assert list(out.glob("group/*.tsv")) or list(out.glob("*group*")), sorted(out.iterdir())
    errors, _ = validate_dataset(out)
    assert errors == [], errors


def _mask(text: str) -> str:
    """Remove what differs between any two runs: their ids and times."""
    text = re.sub(r"\d{8}-\d{6}_[0-9a-f-]{36}", "<run-id>", text)
    return re.sub(
        r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?( ?UTC|Z|[+-]\d{2}:?\d{2})?",
        "<time>",
        text,
    )


def _files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "/log/" not in p.relative_to(root).as_posix()
    }


def _to_native(text: str, paths: dict[str, str]) -> str:
    """The container's paths (whole path components only) as the native run's, in one pass (a
    native path may hold a container path: /work/shared/data)."""
    names = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    return re.sub(rf"(?<![\w./-])({names})(?![\w.-])", lambda m: paths[m[1]], text)


def _same_json(mine: Path, theirs: Path, paths: dict[str, str]) -> None:
    got = json.loads(_mask(_to_native(mine.read_text(), paths)))
    want = json.loads(_mask(theirs.read_text()))
    if mine.name == "dataset_description.json":
        container = got["GeneratedBy"][0].pop("Container")
        want["GeneratedBy"][0].pop("Container", None)
        assert container == {"Type": "docker", "Tag": f"hsf-bids/hsf_bids:{hsf_bids.__version__}"}
        got.pop("DatasetLinks", None), want.pop("DatasetLinks", None)
    assert got == want, mine


def test_the_container_gives_the_derivatives_of_a_native_run(runs):
    out, code, log = runs["inside"]
    native_out, native_code, native_log = runs["native"]
    paths = runs["paths"]
    assert native_code == 0, native_log
    assert code == 0, log
    assert runs["native_group"][0] == 0, runs["native_group"][1]
    assert _files(out) == _files(native_out)
    labels = sorted(rel for rel in _files(out) if rel.endswith("_dseg.nii.gz"))
    assert len(labels) >= 5, labels
    for rel in sorted(_files(out)):
        mine, theirs = out / rel, native_out / rel
        if rel.endswith("_dseg.nii.gz"):
            assert mine.read_bytes() == theirs.read_bytes(), rel  # byte-identical labels
        elif rel.endswith(".nii.gz"):
            a, b = nib.load(mine), nib.load(theirs)
            assert a.header.binaryblock == b.header.binaryblock, rel
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), rel
        elif rel.endswith(".json"):
            _same_json(mine, theirs, paths)
        elif rel.endswith(".tsv"):  # volumes tables and the group's: equal
            assert _mask(mine.read_text()) == _mask(theirs.read_text()), rel
        else:  # reports: the same but for paths, times and the run's id
            text = _to_native(mine.read_text(errors="replace"), paths)
            assert _mask(text) == _mask(theirs.read_text(errors="replace")), rel
