"""One atomic writer (:mod:`hsf_bids.atomic`): the destination is whole or untouched."""

from __future__ import annotations

import os
import stat

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
