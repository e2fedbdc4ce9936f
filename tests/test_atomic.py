"""One atomic writer (:mod:`hsf_bids.atomic`): the destination is whole or untouched."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hsf_bids.atomic import TEMP_PREFIX, atomic_file, atomic_files


def test_writes_into_a_new_folder(tmp_path):
    dest = tmp_path / "a" / "b" / "x.nii.gz"
    with atomic_file(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.name.startswith(TEMP_PREFIX)
        assert tmp.name.endswith(".nii.gz") and not dest.exists()
        tmp.write_bytes(b"data")
    assert dest.read_bytes() == b"data"
    assert os.listdir(dest.parent) == ["x.nii.gz"]


def test_a_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    dest = tmp_path / "x.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert dest.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.json"]


def test_mode_and_default_mode(tmp_path):
    with atomic_file(tmp_path / "m.onnx", mode=0o644) as tmp:
        tmp.write_bytes(b"model")
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o644
    umask = os.umask(0)
    os.umask(umask)
    with atomic_file(tmp_path / "t.txt") as tmp:
        tmp.write_text("text")
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o666 & ~umask


def test_files_written_side_by_side_share_their_temporary_stem(tmp_path):
    with atomic_files(tmp_path / "m.bin", tmp_path / "m.xml") as (tmp_bin, tmp_xml):
        assert tmp_bin.with_suffix(".xml") == tmp_xml
        tmp_bin.write_bytes(b"weights")
        tmp_xml.write_text("<net/>")
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.xml"]


# A child process that writes ``x.json`` into the folder argv[1] and, inside the write, either
# dies by SIGKILL (a killed run) or waits to be killed (a run still writing).
WRITER = """
import os, signal, sys, time
from hsf_bids.atomic import atomic_file
with atomic_file(os.path.join(sys.argv[1], "x.json")) as tmp:
    tmp.write_text("half")
    print("writing", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def _writer(folder, how):  # noqa: ANN001, ANN202
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder), how], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "writing\n"
    return proc


def test_a_write_removes_what_dead_writers_of_this_machine_left_in_its_folder(tmp_path):
    alive = _writer(tmp_path, "wait")  # first: a writer clears the folder before it writes
    dead = _writer(tmp_path, "die")
    dead.wait()
    try:
        elsewhere = tmp_path / f"{TEMP_PREFIX}otherhost.{dead.pid}-0123abcd-x.json"
        elsewhere.write_text("another machine's writer: its lock cannot be seen from here")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert len(left) == 3 and any(f".{dead.pid}-" in name for name in left)

        with atomic_file(tmp_path / "y.json") as tmp:
            tmp.write_text("whole")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert not any(f".{dead.pid}-" in n and "otherhost" not in n for n in left), left
        assert any(f".{alive.pid}-" in name for name in left), left  # still being written
        assert elsewhere.exists() and (tmp_path / "y.json").read_text() == "whole"
    finally:
        alive.kill()
        alive.wait()


PRIVATE = """
import os, signal, sys, time
from hsf_bids.runtime import prepare_runtime
info = prepare_runtime(sys.argv[1], {"TMPDIR": sys.argv[1]})
print(info.scratch, flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
"""


def test_a_run_removes_the_private_folders_of_killed_runs_of_this_machine(tmp_path):
    from hsf_bids.runtime import prepare_runtime

    def start(how):  # noqa: ANN001, ANN202
        proc = subprocess.Popen(
            [sys.executable, "-c", PRIVATE, str(tmp_path), how], stdout=subprocess.PIPE, text=True
        )
        return proc, Path(proc.stdout.readline().strip())

    alive, alive_folder = start("wait")  # first: a run clears the folder when it starts
    dead, dead_folder = start("die")
    dead.wait()
    try:
        assert dead_folder.is_dir() and alive_folder.is_dir()
        env = {"TMPDIR": str(tmp_path)}
        info = prepare_runtime(tmp_path / "work", env, cleanup=False)
        assert not dead_folder.exists()
        assert alive_folder.is_dir()
        assert env["TMPDIR"] == str(info.scratch / "tmp") and info.scratch.parent == tmp_path
    finally:
        alive.kill()
        alive.wait()
