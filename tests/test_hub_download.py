"""Downloads and the models folder against a real HTTP server on 127.0.0.1 (hsf_bids.hub)."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import xxhash

from hsf_bids.hub import (
    ChecksumError,
    DownloadError,
    FileState,
    ModelsMissingError,
    download_file,
    ensure_models,
    load_hub,
    load_preset,
    resolve_models_dir,
    verify_models,
    xxh3_64_file,
)


def _bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _xxh(data: bytes) -> str:
    return xxhash.xxh3_64(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.plan[path]``: a list of responses used in turn, the last one repeated.

    A response is ("ok", body), ("status", code), ("truncate", body): announce the full length
    and close half-way, ("redirect", location) or ("stall", seconds, body).
    """

    def do_GET(self):  # noqa: N802 - http.server's hook name
        path = self.path.split("?")[0]
        server = self.server
        with server.lock:
            server.hits[path] += 1
            plan = server.plan.get(path, [("status", 404)])
            response = plan.pop(0) if len(plan) > 1 else plan[0]
        kind = response[0]
        if kind == "status":
            self.send_error(response[1])
            return
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", response[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = response[-1]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "stall":
            time.sleep(response[1])
        if kind == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.plan = {}
        self.httpd.hits = Counter()
        self.httpd.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def serve(self, path: str, *responses) -> str:
        self.httpd.plan[path] = list(responses)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def hits(self, path: str) -> int:
        return self.httpd.hits[path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    # A proxy set in the environment must not capture requests to the local test server.
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    srv = _Server()
    yield srv
    srv.close()


class _Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part-" in p.name)


# --- download_file -------------------------------------------------------------------------


def test_good_download_verified(server, tmp_path):
    body = _bytes(1, 2_500_000)  # several read chunks
    url = server.serve("/m.onnx", ("ok", body))
    dest = tmp_path / "sub" / "m.onnx"
    assert download_file(url, dest, _xxh(body), progress=False) == dest
    assert dest.read_bytes() == body
    assert xxh3_64_file(dest) == _xxh(body)
    assert dest.stat().st_mode & 0o777 == 0o644
    assert _leftovers(dest.parent) == []


def test_redirect_followed(server, tmp_path):
    body = _bytes(2, 1000)
    server.serve("/cdn/m.onnx", ("ok", body))
    url = server.serve("/resolve/m.onnx", ("redirect", "/cdn/m.onnx"))
    dest = download_file(url, tmp_path / "m.onnx", _xxh(body), progress=False)
    assert dest.read_bytes() == body


def test_wrong_checksum_rejected_nothing_left(server, tmp_path):
    body = _bytes(3, 5000)
    url = server.serve("/m.onnx", ("ok", body))
    dest = tmp_path / "m.onnx"
    with pytest.raises(ChecksumError) as info:
        download_file(url, dest, "0123456789abcdef", progress=False)
    message = str(info.value)
    assert "0123456789abcdef" in message and _xxh(body) in message and url in message
    assert info.value.expected == "0123456789abcdef" and info.value.got == _xxh(body)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
    assert server.hits("/m.onnx") == 1  # a checksum mismatch is not retried


def test_server_error_then_ok_is_retried(server, tmp_path):
    body = _bytes(4, 5000)
    url = server.serve("/m.onnx", ("status", 500), ("status", 503), ("ok", body))
    sleeps = _Sleeps()
    dest = download_file(
        url, tmp_path / "m.onnx", _xxh(body), progress=False, retries=3, backoff=0.5, sleep=sleeps
    )
    assert dest.read_bytes() == body
    assert server.hits("/m.onnx") == 3
    assert sleeps == [0.5, 1.0]  # exponential backoff
    assert _leftovers(tmp_path) == []


def test_server_error_always_fails_clearly(server, tmp_path):
    url = server.serve("/m.onnx", ("status", 500))
    sleeps = _Sleeps()
    with pytest.raises(DownloadError, match="after 3 attempt.*HTTP 500") as info:
        download_file(
            url, tmp_path / "m.onnx", "0123456789abcdef", progress=False, retries=2, sleep=sleeps
        )
    assert url in str(info.value)
    assert server.hits("/m.onnx") == 3 and len(sleeps) == 2
    assert list(tmp_path.iterdir()) == []


def test_not_found_fails_at_once(server, tmp_path):
    url = server.url("/absent.onnx")
    sleeps = _Sleeps()
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(url, tmp_path / "m.onnx", "0123456789abcdef", progress=False, sleep=sleeps)
    assert info.value.status == 404 and url in str(info.value)
    assert server.hits("/absent.onnx") == 1 and sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_truncated_transfer_retried(server, tmp_path):
    body = _bytes(5, 200_000)
    url = server.serve("/m.onnx", ("truncate", body), ("ok", body))
    dest = download_file(url, tmp_path / "m.onnx", _xxh(body), progress=False, sleep=_Sleeps())
    assert dest.read_bytes() == body
    assert server.hits("/m.onnx") == 2


def test_truncated_transfer_always_fails(server, tmp_path):
    body = _bytes(6, 200_000)
    url = server.serve("/m.onnx", ("truncate", body))
    dest = tmp_path / "m.onnx"
    with pytest.raises(DownloadError, match=r"truncated transfer .* 100000 of 200000 bytes"):
        download_file(url, dest, _xxh(body), progress=False, retries=1, sleep=_Sleeps())
    assert server.hits("/m.onnx") == 2
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_connection_refused_retried_then_fails(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = _Sleeps()
    url = f"http://127.0.0.1:{port}/m.onnx"
    with pytest.raises(DownloadError, match="cannot connect") as info:
        download_file(url, tmp_path / "m.onnx", "0123456789abcdef", retries=2, sleep=sleeps)
    assert url in str(info.value) and len(sleeps) == 2
    assert list(tmp_path.iterdir()) == []


def test_read_timeout(server, tmp_path):
    body = _bytes(7, 1000)
    url = server.serve("/m.onnx", ("stall", 1.0, body))
    with pytest.raises(DownloadError, match="interrupted|timed out"):
        download_file(
            url, tmp_path / "m.onnx", _xxh(body), retries=0, read_timeout=0.2, progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_concurrent_fetches_of_one_file_are_safe(server, tmp_path):
    body = _bytes(8, 1_500_000)
    url = server.serve("/m.onnx", ("ok", body))
    dest = tmp_path / "m.onnx"
    errors = []

    def fetch():
        try:
            download_file(url, dest, _xxh(body), progress=False)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert dest.read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# --- the models folder -----------------------------------------------------------------------


def _served_hub(server, tmp_path, n=3, version=None) -> tuple[Path, list[bytes]]:
    bodies = [_bytes(100 + i, 20_000 + i) for i in range(n)]
    lines = ['ca_mode: "1/2/3"']
    if version:
        lines.append(f'version: "{version}"')
    lines.append("models:")
    for i, body in enumerate(bodies):
        url = server.serve(f"/hub/m{i}.onnx", ("ok", body))
        lines += [f"  m{i}.onnx:", f'    url: "{url}?download=1"', f'    xxh3_64: "{_xxh(body)}"']
    lines += ["segmentation:", "  test_time_augmentation: false", "  test_time_num_aug: 0"]
    hub_file = tmp_path / "served.yaml"
    hub_file.write_text("\n".join(lines) + "\n")
    return hub_file, bodies


def _refuse_sockets(patch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")

    patch.setattr(socket, "socket", refuse)
    patch.setattr(socket, "create_connection", refuse)
    patch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def no_sockets(monkeypatch):
    """Any attempt to open a socket or resolve a name fails the test."""
    _refuse_sockets(monkeypatch)


def test_ensure_models_downloads_then_uses_cache_without_network(server, tmp_path, monkeypatch):
    hub_file, bodies = _served_hub(server, tmp_path)
    hub = load_hub(hub_file)
    models_dir = tmp_path / "models"
    paths = ensure_models(hub, models_dir, offline=False, progress=False)
    assert paths == [models_dir / hub.subfolder / f"m{i}.onnx" for i in range(3)]
    assert [p.read_bytes() for p in paths] == bodies
    hits = [server.hits(f"/hub/m{i}.onnx") for i in range(3)]
    assert hits == [1, 1, 1]

    with monkeypatch.context() as patch:
        _refuse_sockets(patch)
        assert ensure_models(hub, models_dir, offline=True) == paths
        assert ensure_models(hub, models_dir, offline=False) == paths
    assert [server.hits(f"/hub/m{i}.onnx") for i in range(3)] == hits


def test_offline_missing_names_files_urls_and_command(tmp_path, no_sockets):
    preset = load_preset("bagging_fast")
    models_dir = tmp_path / "models dir"
    # One file present and valid would be fine; here the first is corrupt, the rest absent.
    (models_dir / "4.0.0").mkdir(parents=True)
    (models_dir / "4.0.0" / "arunet_bag_0.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelsMissingError) as info:
        ensure_models(preset, models_dir, offline=True)
    message = str(info.value)
    for model in preset.models:
        assert model.name in message and model.url in message
    assert "corrupt" in message
    command = f"hsf-bids-models fetch --preset bagging_fast --models-dir '{models_dir}'"
    assert command in message and info.value.command == command
    assert len(info.value.missing) == 5
    assert not any(models_dir.glob("4.0.0/.*"))  # offline writes nothing


def test_offline_missing_hub_command(server, tmp_path):
    hub_file, _ = _served_hub(server, tmp_path, n=1)
    hub = load_hub(hub_file)
    with pytest.raises(ModelsMissingError) as info:
        ensure_models(hub, tmp_path / "models", offline=True)
    assert f"hsf-bids-models fetch --hub {hub_file} --models-dir {tmp_path / 'models'}" in str(
        info.value
    )
    assert server.hits("/hub/m0.onnx") == 0


def test_corrupt_cached_file_is_downloaded_again(server, tmp_path):
    hub_file, bodies = _served_hub(server, tmp_path, n=2, version="9.9")
    hub = load_hub(hub_file)
    models_dir = tmp_path / "models"
    (models_dir / "9.9").mkdir(parents=True)
    (models_dir / "9.9" / "m0.onnx").write_bytes(bodies[1])  # the wrong model
    (models_dir / "9.9" / "m1.onnx").write_bytes(bodies[1])
    states = [s.state for s in verify_models(hub, models_dir)]
    assert states == [FileState.CORRUPT, FileState.VERIFIED]
    paths = ensure_models(hub, models_dir, progress=False)
    assert [p.read_bytes() for p in paths] == bodies
    assert server.hits("/hub/m0.onnx") == 1 and server.hits("/hub/m1.onnx") == 0


def test_download_checksum_failure_through_ensure(server, tmp_path):
    hub_file, _ = _served_hub(server, tmp_path, n=1)
    server.serve("/hub/m0.onnx", ("ok", b"something else"))
    hub = load_hub(hub_file)
    models_dir = tmp_path / "models"
    with pytest.raises(ChecksumError, match="expected xxh3_64"):
        ensure_models(hub, models_dir, progress=False)
    assert list((models_dir / hub.subfolder).iterdir()) == []


def test_only_the_preset_files_are_used(server, tmp_path):
    hub_file, _ = _served_hub(server, tmp_path, n=2)
    hub = load_hub(hub_file)
    models_dir = tmp_path / "models"
    folder = models_dir / hub.subfolder
    folder.mkdir(parents=True)
    for stray in ("m2.onnx", "arunet_bag_0.onnx", "zz.onnx"):
        (folder / stray).write_bytes(b"stray model")
    paths = ensure_models(hub, models_dir, progress=False)
    assert [p.name for p in paths] == ["m0.onnx", "m1.onnx"]
    assert [s.model.name for s in verify_models(hub, models_dir)] == ["m0.onnx", "m1.onnx"]


def test_local_hub_files_used_in_place(demo_hub, tmp_path, no_sockets):
    hub = load_hub(demo_hub)
    models_dir = tmp_path / "models"
    paths = ensure_models(hub, models_dir, offline=False)
    assert paths == [demo_hub.parent / f"demo_unet_b{i}.onnx" for i in range(3)]
    assert not models_dir.exists()  # verified in place, never copied


def test_local_hub_file_missing_or_corrupt(tmp_path):
    good, bad = b"model one", b"model two"
    (tmp_path / "a.onnx").write_bytes(good)
    (tmp_path / "b.onnx").write_bytes(bad)
    hub_file = tmp_path / "local.yaml"
    hub_file.write_text(
        'ca_mode: "123"\nmodels:\n'
        f'  a.onnx: {{url: "a.onnx", xxh3_64: "{_xxh(good)}"}}\n'
        f'  b.onnx: {{url: "file:b.onnx", xxh3_64: "{_xxh(good)}"}}\n'
        f'  c.onnx: {{url: "file://{tmp_path}/c.onnx", xxh3_64: "{_xxh(good)}"}}\n'
        "segmentation: {test_time_augmentation: false, test_time_num_aug: 0}\n"
    )
    hub = load_hub(hub_file)
    with pytest.raises(ChecksumError, match="b.onnx") as info:
        ensure_models(hub, tmp_path / "models")
    assert str(hub_file) in str(info.value)
    (tmp_path / "b.onnx").write_bytes(good)
    with pytest.raises(ModelsMissingError, match="c.onnx") as info:
        ensure_models(hub, tmp_path / "models")
    assert str(hub_file) in str(info.value)
    (tmp_path / "c.onnx").write_bytes(good)
    assert ensure_models(hub, tmp_path / "models") == [
        tmp_path / n for n in ("a.onnx", "b.onnx", "c.onnx")
    ]


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HSF_BIDS_MODELS_DIR", str(tmp_path / "env"))
    assert resolve_models_dir(tmp_path / "cli") == tmp_path / "cli"
    assert resolve_models_dir(None) == tmp_path / "env"
    monkeypatch.delenv("HSF_BIDS_MODELS_DIR")
    default = resolve_models_dir(None)
    assert default.name == "models" and "hsf_bids" in default.parts
