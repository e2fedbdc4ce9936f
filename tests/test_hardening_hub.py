"""Hardening of the model hub (issue 15): hostile hub files, and downloads held to the hub's word
(size, scheme, redirects, SHA-256), against real HTTP and HTTPS servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import xxhash
from conftest import require

from hsf_bids.hub import (
    ChecksumError,
    DownloadError,
    FileState,
    HubError,
    ModelsMissingError,
    download_file,
    ensure_models,
    load_hub,
    load_preset,
    verify_models,
)

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


# Forks the command from a small Python and reports its peak memory: a child forked from pytest
# itself would count pytest's own memory (Linux keeps the larger of the two across exec).
_LAUNCHER = """
import os, resource, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    # a bomb that gets through fails fast, harmlessly
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    os.execv(sys.executable, [sys.executable, "-m", "hsf_bids.hub.cli", *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _models_command(*argv: str | Path) -> tuple[int, str, float, float]:
    """``hsf-bids-models`` in a child process: exit status, stderr, seconds, peak RSS in MiB."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *map(str, argv)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    peak_kib = int(proc.stdout.split()[-1])
    return proc.returncode, proc.stderr, time.perf_counter() - start, peak_kib / 1024


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


@pytest.mark.parametrize(
    "value",
    ["[" * 200_000 + "]" * 200_000, "{a: " * 100_000 + "}" * 100_000, "\n" + "- " * 400_000 + "x"],
    ids=["flow sequences", "flow mappings", "block sequences"],
)
def test_a_deeply_nested_hub_file_is_refused_quickly(tmp_path, value):
    """PyYAML took seconds to give up on thousands of nested flow collections."""
    path = tmp_path / "hub.yaml"
    path.write_text(f"ca_mode: {value}\n")
    start = time.perf_counter()
    with pytest.raises(HubError, match="hub.yaml: nested too deeply"):
        load_hub(path)
    assert time.perf_counter() - start < 2


def test_an_oversized_hub_file_is_refused_unread(tmp_path):
    path = tmp_path / "hub.yaml"
    path.write_text(f'ca_mode: "1/2/3"\ndescription: "{"x" * (5 << 20)}"\n')
    with pytest.raises(HubError, match=r"hub.yaml: larger than 1048576 bytes") as info:
        load_hub(path)
    assert len(str(info.value)) < 300


# --- downloads held to the hub file's word (issue 15.6) ------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.plan[path]``: ("ok", body), ("redirect", location), or ("stream", n):
    ``n`` bytes without a Content-Length, the connection closed at the end (HTTP/1.0); the bytes
    it managed to send are counted in ``server.sent[path]``."""

    def do_GET(self):  # noqa: N802 - http.server's hook name
        path = self.path.split("?")[0]
        self.server.hits[path] += 1
        kind, value = self.server.plan.get(path, ("status", 404))
        if kind == "status":
            self.send_error(value)
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "ok":
            self.send_response(200)
            self.send_header("Content-Length", str(len(value)))
            self.end_headers()
            self.wfile.write(value)
        else:
            self.protocol_version = "HTTP/1.0"
            self.send_response(200)
            self.end_headers()
            block = b"\0" * 65536
            try:
                while self.server.sent[path] < value:
                    self.wfile.write(block)
                    self.server.sent[path] += len(block)
            except OSError:  # the client hung up, as it should
                pass
            self.close_connection = True

    def log_message(self, *args):
        pass


class _Server:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.plan, self.httpd.hits, self.httpd.sent = {}, Counter(), Counter()
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def serve(self, path: str, kind: str, value: object) -> str:
        self.httpd.plan[path] = (kind, value)
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    """A self-signed certificate for 127.0.0.1 (key and certificate in one PEM file)."""
    require(shutil.which("openssl") is not None, "openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", folder / "key.pem", "-out", folder / "cert.pem"],
        check=True, capture_output=True,
    )  # fmt: skip
    pem = folder / "both.pem"
    pem.write_bytes((folder / "key.pem").read_bytes() + (folder / "cert.pem").read_bytes())
    return pem


@pytest.fixture
def http(monkeypatch):
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    server = _Server()
    yield server
    server.close()


@pytest.fixture
def https(monkeypatch, certificate):
    """An HTTPS server on 127.0.0.1 that this process trusts (``SSL_CERT_FILE``)."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate)
    server = _Server(tls)
    yield server
    server.close()


def _xxh(data: bytes) -> str:
    return xxhash.xxh3_64(data).hexdigest()


def _sleeps() -> list[float]:
    return []


def _hub_of(tmp_path: Path, url: str, body: bytes, *extra: str, top: str = "") -> Path:
    path = tmp_path / "served.yaml"
    lines = [f"  m.onnx: {{url: '{url}', xxh3_64: {_xxh(body)}{''.join(', ' + e for e in extra)}}}"]
    path.write_text(f'ca_mode: "1/2/3"\n{top}models:\n' + "\n".join(lines) + "\n" + SEGMENTATION)
    return path


def test_size_is_a_hard_limit_while_streaming(http, tmp_path):
    """Issue 15.6: a URL with size 1000 streamed 60 MB before the checksum refused it."""
    body = b"\0" * 1000
    url = http.serve("/m.onnx", "stream", 60 << 20)
    hub = load_hub(_hub_of(tmp_path, url, body, "size: 1000"))
    sleeps = []
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="sent more than the 1000 bytes the hub file gives"):
        ensure_models(hub, tmp_path / "models", progress=False, sleep=sleeps.append)
    assert time.perf_counter() - start < 10
    assert http.httpd.sent["/m.onnx"] < 16 << 20  # stopped, not streamed to the end
    assert http.httpd.hits["/m.onnx"] == 1 and sleeps == []  # not retried
    assert list((tmp_path / "models" / hub.subfolder).iterdir()) == []


def test_size_refuses_a_larger_announced_length_before_reading(http, tmp_path):
    body = b"x" * 5_000_000
    url = http.serve("/m.onnx", "ok", body)
    dest = tmp_path / "m.onnx"
    with pytest.raises(DownloadError, match="announces 5000000 bytes but the hub file gives"):
        download_file(url, dest, _xxh(body), size=1000, progress=False, sleep=_sleeps().append)
    assert list(tmp_path.iterdir()) == []
    # The size the hub file gives is the size: an exact one passes.
    assert download_file(url, dest, _xxh(body), size=len(body), progress=False).exists()


def test_redirect_to_another_scheme_is_refused(http, tmp_path):
    url = http.serve("/m.onnx", "redirect", "ftp://127.0.0.1/m.onnx")
    sleeps = []
    with pytest.raises(
        DownloadError, match=r"ftp://127.0.0.1/m.onnx \(redirected from .*only http"
    ):
        download_file(url, tmp_path / "m.onnx", "0123456789abcdef", sleep=sleeps.append)
    assert sleeps == [] and list(tmp_path.iterdir()) == []


def test_redirect_from_https_down_to_http_is_refused(https, http, tmp_path):
    body = b"model" * 100
    plain = http.serve("/m.onnx", "ok", body)
    url = https.serve("/m.onnx", "redirect", plain)
    with pytest.raises(DownloadError, match="https is never followed down to plain http"):
        download_file(url, tmp_path / "m.onnx", _xxh(body), progress=False)
    assert http.httpd.hits["/m.onnx"] == 0
    assert list(tmp_path.iterdir()) == []


def test_https_with_redirects_within_https(https, tmp_path):
    body = b"model" * 100
    https.serve("/cdn/m.onnx", "ok", body)
    url = https.serve("/m.onnx", "redirect", "/cdn/m.onnx")
    assert download_file(url, tmp_path / "m.onnx", _xxh(body)).read_bytes() == body


def test_redirect_from_loopback_to_a_remote_http_host_is_refused(http, tmp_path):
    url = http.serve("/m.onnx", "redirect", "http://192.0.2.1/m.onnx")  # TEST-NET-1
    with pytest.raises(DownloadError, match="over plain http, which anyone on the network path"):
        download_file(url, tmp_path / "m.onnx", "0123456789abcdef", retries=0)


def test_plain_http_to_a_remote_host_needs_allow_http(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "create_connection", refuse)
    url = "http://models.example.org/m.onnx"
    with pytest.raises(DownloadError, match="set 'allow_http: true' in the hub file"):
        download_file(url, tmp_path / "m.onnx", "0123456789abcdef")
    with pytest.raises(HubError, match=r"uses plain http.*set 'allow_http: true' in the hub file"):
        load_hub(_hub_of(tmp_path, url, b""))
    assert load_hub(_hub_of(tmp_path, url, b"", top="allow_http: true\n")).allow_http
    with pytest.raises(HubError, match="'allow_http' must be true or false"):
        load_hub(_hub_of(tmp_path, url, b"", top="allow_http: 'yes please'\n"))


def test_sha256_is_verified_as_well(http, tmp_path):
    body = b"model bytes" * 1000
    url = http.serve("/m.onnx", "ok", body)
    right = hashlib.sha256(body).hexdigest()
    wrong = hashlib.sha256(b"another file").hexdigest()
    hub = load_hub(_hub_of(tmp_path, url, body, f"sha256: {wrong}"))
    assert hub.models[0].sha256 == wrong
    models = tmp_path / "models"
    with pytest.raises(ChecksumError, match=f"expected sha256 {wrong}, got {right}"):
        ensure_models(hub, models, progress=False)
    assert list((models / hub.subfolder).iterdir()) == []
    # A cached file whose XXH3-64 matches but whose SHA-256 does not is not used.
    (models / hub.subfolder / "m.onnx").write_bytes(body)
    [status] = verify_models(hub, models)
    assert status.state is FileState.CORRUPT and status.mismatch == ("sha256", wrong, right)
    hub = load_hub(_hub_of(tmp_path, url, body, f"sha256: {right}"))
    assert [s.state for s in verify_models(hub, models)] == [FileState.VERIFIED]
    with pytest.raises(HubError, match="sha256 'abc' is not 64 lowercase hexadecimal"):
        load_hub(_hub_of(tmp_path, url, body, "sha256: abc"))


def test_offline_names_a_corrupt_file_as_present(tmp_path):
    """Issue 15.9: the offline error said "not in the models folder" for a file that is there
    but corrupt."""
    preset = load_preset("single_fast")
    folder = tmp_path / "models" / preset.subfolder
    folder.mkdir(parents=True)
    (folder / preset.models[0].name).write_bytes(b"half a model")
    with pytest.raises(ModelsMissingError) as info:
        ensure_models(preset, tmp_path / "models", offline=True)
    message = str(info.value)
    assert "not in the models folder" not in message
    assert f"cannot be used from the models folder {folder} (1 present but corrupt" in message
    assert (
        f"{preset.models[0].name}: present at {folder / preset.models[0].name} but corrupt: its "
        f"xxh3_64 is {_xxh(b'half a model')}, expected {preset.models[0].xxh3_64}"
    ) in message
    assert (
        "fetching replaces it" in message
        and "hsf-bids-models fetch --preset single_fast" in message
    )
