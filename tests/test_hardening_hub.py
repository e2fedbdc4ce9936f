"""Hardening of the model hub (issue 15): hostile hub files, and downloads held to the hub's word
(size, scheme, redirects, SHA-256), against real HTTP and HTTPS servers on 127.0.0.1."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hsf_bids.hub import HubError, load_hub

SEGMENTATION = "segmentation: {test_time_augmentation: false, test_time_num_aug: 0}\n"
MODEL = '  m.onnx: {url: "m.onnx", xxh3_64: "0123456789abcdef"}\n'


def _laughs(levels: int = 9) -> str:
    """A YAML list whose last element stands for 9**levels strings ("billion laughs")."""
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


def _hub(tmp_path: Path, **top: str) -> Path:
    lines = {"ca_mode": '"1/2/3"', **top}
    text = "".join(f"{key}: {value}\n" for key, value in lines.items())
    path = tmp_path / "hub.yaml"
    path.write_text(text + "models:\n" + MODEL + SEGMENTATION)
    return path


def _limit_memory() -> None:  # in the child: a bomb that gets through fails fast, harmlessly
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _models_command(*argv: str | Path) -> tuple[int, str, float, float]:
    """``hsf-bids-models`` in a child process: exit status, stderr, seconds, peak RSS in MiB."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsf_bids.hub.cli", *map(str, argv)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_limit_memory,
    )  # fmt: skip
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak memory
    finally:
        watchdog.cancel()
        proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, time.perf_counter() - start, usage.ru_maxrss / 1024


@pytest.mark.parametrize("key", ["ca_mode", "version", "description", "labels"])
def test_yaml_alias_bomb_refused_quickly_in_bounded_memory(tmp_path, key):
    """Issue 15.2: a billion-laughs value ran the process out of memory while its error message
    was formatted (about 30 s and 2-3 GB, then a MemoryError traceback)."""
    path = _hub(tmp_path, **{key: _laughs()})
    code, err, seconds, peak_mib = _models_command("list", "--hub", path)
    assert code == 65, err[-2000:]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: line " in err
    assert "YAML aliases (*name) are not allowed; write the value out" in err
    assert seconds < 20
    assert peak_mib < 300  # the imports alone: the bomb never grows


def test_an_alias_in_a_plugin_file_is_refused(capsys, ds_mini, tmp_path):
    from hsf_bids.cli.run import main

    plugin = tmp_path / "plugin.yml"
    plugin.write_text(f"plugin: Linear\nplugin_args: {{x: {_laughs()}}}\n")
    code = main([str(ds_mini), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)])
    err = capsys.readouterr().err
    assert code == 64
    assert f"the plugin file {plugin}: line 2" in err and "aliases" in err


def test_anchor_without_alias_is_fine(tmp_path):
    path = _hub(tmp_path, description="&d just text")
    assert load_hub(path).description == "just text"


def test_a_huge_value_is_quoted_short(tmp_path):
    """A 900 kB checksum was printed whole in the error message."""
    checksum = "f" * 900_000
    path = tmp_path / "hub.yaml"
    path.write_text(
        f'ca_mode: "1/2/3"\nmodels:\n  m.onnx: {{url: m.onnx, xxh3_64: {checksum}}}\n'
        + SEGMENTATION
    )
    with pytest.raises(HubError) as info:
        load_hub(path)
    message = str(info.value)
    assert len(message) < 400
    assert "xxh3_64 'ffff" in message and "(900000 characters) is not 16 lowercase" in message


@pytest.mark.parametrize(
    "field, text",
    [
        ("name", "n" * 500_000),
        ("version", "v" * 500_000),
        ("ca_mode", "c" * 500_000),
        ("url", "u" * 500_000),
        ("file name", "f" * 500_000 + ".onnx"),
        ("key", "k" * 500_000),
    ],
)
def test_every_message_quotes_a_huge_value_short(tmp_path, field, text):
    model = MODEL
    top = {"ca_mode": '"1/2/3"'}
    if field in ("name", "version", "ca_mode"):
        top[field] = text
    elif field == "url":
        model = f'  m.onnx: {{url: "{text}", xxh3_64: "0123456789abcdef"}}\n'
    elif field == "file name":
        model = f'  {text}: {{url: "m.onnx", xxh3_64: "0123456789abcdef"}}\n'
    else:
        top[text] = "1"
    path = tmp_path / "hub.yaml"
    path.write_text(
        "".join(f"{k}: {v}\n" for k, v in top.items()) + "models:\n" + model + SEGMENTATION
    )
    with pytest.raises(HubError) as info:
        load_hub(path)
    assert len(str(info.value)) < 600, str(info.value)[:1000]


def test_an_oversized_hub_file_is_refused_unread(tmp_path):
    path = tmp_path / "hub.yaml"
    path.write_text(f'ca_mode: "1/2/3"\ndescription: "{"x" * (5 << 20)}"\n')
    with pytest.raises(HubError, match=r"hub.yaml: larger than 1048576 bytes") as info:
        load_hub(path)
    assert len(str(info.value)) < 300
