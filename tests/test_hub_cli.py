"""The ``hsf-bids-models`` command, run as a subprocess (``python -m hsf_bids.hub.cli``)."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import pytest
import xxhash

HF = "https://huggingface.co/poiretclement/hsf/resolve/main/onnx/"
BAGGING_4 = [  # local name, remote file, xxh3_64: the contract table
    ("arunet_bag_0.onnx", "arunet_4.0.0b0_1706633574.onnx", "535af004dc7251af"),
    ("arunet_bag_1.onnx", "arunet_4.0.0b1_1706699484.onnx", "ca97ac4be073149f"),
    ("arunet_bag_2.onnx", "arunet_4.0.0b2_1706714241.onnx", "f9de9d5392460c3a"),
    ("arunet_bag_3.onnx", "arunet_4.0.0b3_1706858428.onnx", "85259d3c0c8baa21"),
    ("arunet_bag_4.onnx", "arunet_4.0.0b4_1706874562.onnx", "cb04f34305ec33af"),
]


def _run(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "HSF_BIDS_MODELS_DIR"}
    base.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hsf_bids.hub.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=base,
        timeout=60,
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def file_server(tmp_path):
    """Serves ``tmp_path/www`` over HTTP on 127.0.0.1; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _hub(tmp_path: Path, www: Path, base: str, checksums: dict[str, str] | None = None) -> Path:
    """A hub file of two models served by ``file_server``; ``checksums`` overrides some."""
    lines = ['ca_mode: "1/23"', "models:"]
    for i in range(2):
        data = random.Random(i).randbytes(30_000)
        (www / f"r{i}.onnx").write_bytes(data)
        checksum = (checksums or {}).get(f"m{i}.onnx", xxhash.xxh3_64(data).hexdigest())
        lines += [f"  m{i}.onnx:", f'    url: "{base}/r{i}.onnx"', f'    xxh3_64: "{checksum}"']
    lines += ["segmentation:", "  test_time_augmentation: true", "  test_time_num_aug: 4"]
    hub_file = tmp_path / "served.yaml"
    hub_file.write_text("\n".join(lines) + "\n")
    return hub_file


def test_console_script_declared():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("hsf-bids-models") == "hsf_bids.hub.cli:main"


def test_list_bagging_accurate_as_published(tmp_path):
    result = _run("list", "--preset", "bagging_accurate", "--models-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "bagging_accurate" in out and "version 4.0.0" in out
    assert "ca_mode '1/2/3'" in out and "TTA on, 20 augmentations" in out
    assert "5 model(s)" in out
    for local, remote, checksum in BAGGING_4:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"- {local}"))
        assert f"xxh3_64 {checksum}" in line and "[missing]" in line
        assert f"url:  {HF}{remote}" in out
        assert str(tmp_path / "4.0.0" / local) in out
    assert "bagging_fast" not in out


def test_list_everything(tmp_path):
    result = _run("list", "--models-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("bagging_accurate", "single_fast", "bagging_fast_3.0.0", "single_sparse_3.0.0"):
        assert f"\n{name}\n" in result.stdout
    assert "engine deepsparse" in result.stdout and "TTA off" in result.stdout


def test_list_uses_env_models_dir(tmp_path):
    result = _run("list", "--preset", "single_fast", env={"HSF_BIDS_MODELS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert f"models folder: {tmp_path}" in result.stdout
    assert str(tmp_path / "4.0.0" / "arunet_single.onnx") in result.stdout


def test_fetch_verify_corrupt_and_repair(tmp_path, file_server):
    www, base = file_server
    hub_file = _hub(tmp_path, www, base)
    models = tmp_path / "models"

    result = _run("fetch", "--hub", hub_file, "--models-dir", models, "--no-progress")
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in models.rglob("*") if p.is_file())
    assert files == ["m0.onnx", "m1.onnx"]  # no temporary files left
    cached = next(models.rglob("m1.onnx"))
    assert cached.read_bytes() == (www / "r1.onnx").read_bytes()

    result = _run("verify", "--hub", hub_file, "--models-dir", models)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("OK ") == 2

    cached.write_bytes(b"corrupted")
    result = _run("verify", "--hub", hub_file, "--models-dir", models)
    assert result.returncode == 1
    assert "CORRUPT" in result.stdout and "m1.onnx" in result.stdout
    listing = _run("list", "--hub", hub_file, "--models-dir", models).stdout
    assert "cached but corrupt" in listing and "cached, verified" in listing

    assert _run("fetch", "--hub", hub_file, "--models-dir", models).returncode == 0
    assert _run("verify", "--hub", hub_file, "--models-dir", models).returncode == 0


def test_verify_missing_and_all(tmp_path):
    result = _run("verify", "--preset", "single_fast", "--models-dir", tmp_path)
    assert result.returncode == 1
    assert "MISSING  single_fast: arunet_single.onnx" in result.stdout
    # --all re-hashes what is cached: missing files are listed, only corrupt ones fail.
    result = _run("verify", "--all", "--models-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MISSING  bagging_sparse_3.0.0" in result.stdout
    (tmp_path / "4.0.0").mkdir()
    (tmp_path / "4.0.0" / "arunet_bag_2.onnx").write_bytes(b"truncated model")
    result = _run("verify", "--all", "--models-dir", tmp_path)
    assert result.returncode == 1
    assert "CORRUPT  bagging_accurate: arunet_bag_2.onnx" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("list", "--preset", "bagging_turbo"),
        ("list", "--preset", "single_fast", "--hub", "x.yaml"),
        ("fetch", "--frobnicate"),
        (),
        ("explode",),
    ],
)
def test_usage_errors_exit_64(args, tmp_path):
    result = _run(*args, "--models-dir", tmp_path) if args else _run()
    assert result.returncode == 64
    assert _one_line_error(result)


def test_missing_hub_exit_66(tmp_path):
    result = _run("list", "--hub", tmp_path / "nope.yaml", "--models-dir", tmp_path)
    assert result.returncode == 66
    assert "nope.yaml" in _one_line_error(result)


def test_invalid_hub_exit_65(tmp_path):
    hub_file = tmp_path / "bad.yaml"
    hub_file.write_text(
        'ca_mode: "1/2/3"\nmodels:\n'
        '  ../x.onnx: {url: "s3://b/x.onnx", xxh3_64: "0123456789abcdef"}\n'
        "segmentation: {test_time_augmentation: false, test_time_num_aug: 0}\n"
    )
    result = _run("verify", "--hub", hub_file, "--models-dir", tmp_path)
    assert result.returncode == 65
    line = _one_line_error(result)
    assert str(hub_file) in line and "../x.onnx" in line


def test_fetch_not_found_exit_74(tmp_path, file_server):
    www, base = file_server
    hub_file = _hub(tmp_path, www, base)
    (www / "r1.onnx").unlink()
    result = _run("fetch", "--hub", hub_file, "--models-dir", tmp_path / "models")
    assert result.returncode == 74
    line = _one_line_error(result)
    assert "HTTP 404" in line and f"{base}/r1.onnx" in line


def test_fetch_checksum_mismatch_exit_1(tmp_path, file_server):
    www, base = file_server
    hub_file = _hub(tmp_path, www, base, checksums={"m0.onnx": "0123456789abcdef"})
    models = tmp_path / "models"
    result = _run("fetch", "--hub", hub_file, "--models-dir", models)
    assert result.returncode == 1
    line = _one_line_error(result)
    assert "expected xxh3_64 0123456789abcdef" in line and f"{base}/r0.onnx" in line
    assert not any(models.rglob("m0.onnx")) and not any(models.rglob(".*part*"))
