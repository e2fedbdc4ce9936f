"""Download one model file: streamed, retried, verified, then renamed into place atomically.

The file is written to a hidden temporary file in the destination folder
(:func:`hsf_bids.atomic.atomic_file`), its XXH3-64 (and SHA-256 when the hub file gives one)
checked, and only then renamed to its final name, so a reader never sees a partial or wrong file
and concurrent processes fetching the same file cannot corrupt each other (the last rename wins,
and every candidate was verified).

What a server may do is held to the hub file's word: a transfer stops as soon as it exceeds the
model's ``size``; redirects are followed to http(s) only and never from https down to http; plain
http is refused for any host but this machine's loopback unless the hub file sets
``allow_http: true`` (XXH3-64 detects accidents, not tampering; SHA-256 does).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

import xxhash

if TYPE_CHECKING:
    from tqdm import tqdm

from hsf_bids import __version__
from hsf_bids.atomic import atomic_file
from hsf_bids.errors import EX_DATAERR, EX_IOERR, HsfBidsError, brief

__all__ = [
    "CHUNK",
    "ChecksumError",
    "DownloadError",
    "ModelsError",
    "check_url",
    "download_file",
    "file_digests",
    "is_loopback",
    "xxh3_64_file",
]

CHUNK = 1 << 20
_USER_AGENT = f"hsf_bids/{__version__} (+model download)"


class ModelsError(HsfBidsError, RuntimeError):
    """Base class of the errors about model files (download, checksum, missing)."""

    exit_code = EX_DATAERR


class DownloadError(ModelsError):
    """A download failed (network error, HTTP error, truncated transfer) after any retries."""

    exit_code = EX_IOERR

    def __init__(self, message: str, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class ChecksumError(ModelsError):
    """A file's XXH3-64 does not match the one its preset publishes (an invalid input file,
    65; ``hsf-bids-models`` reports it as a failed verification, 1)."""

    exit_code = EX_DATAERR

    def __init__(self, message: str, path: Path, expected: str, got: str) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.got = got


class _Retryable(Exception):
    """An attempt failed in a way worth retrying (connection, 5xx, truncation)."""


def file_digests(
    path: Path | str, *, sha256: bool = False, chunk: int = CHUNK
) -> tuple[str, str | None]:
    """XXH3-64 (16 lowercase hexadecimal characters) and, when ``sha256``, SHA-256 (64) of a
    whole file, streamed in one pass."""
    fast = xxhash.xxh3_64()
    secure = hashlib.sha256() if sha256 else None
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            fast.update(block)
            if secure is not None:
                secure.update(block)
    return fast.hexdigest(), secure.hexdigest() if secure is not None else None


def xxh3_64_file(path: Path | str, chunk: int = CHUNK) -> str:
    """XXH3-64 of a whole file, streamed: 16 lowercase hexadecimal characters."""
    return file_digests(path, chunk=chunk)[0]


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine (``localhost``, 127.0.0.0/8, ::1): traffic to it never
    crosses a network, so plain http to it is as safe as https."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_http: bool = False, came_from: str | None = None) -> None:
    """Raise :class:`DownloadError` unless ``url`` may be fetched: http(s) only; plain http only
    to a loopback host or with ``allow_http``; never http after https (``came_from``, the URL
    that redirected here)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    via = f" (redirected from {brief(came_from, quote=False)})" if came_from else ""
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"refusing to fetch {brief(url, quote=False)}{via}: only http(s) URLs are followed",
            url,
        )
    if scheme == "http" and came_from and urlsplit(came_from).scheme.lower() == "https":
        raise DownloadError(
            f"refusing the redirect from {brief(came_from, quote=False)} to "
            f"{brief(url, quote=False)}: https is never followed down to plain http",
            url,
        )
    if scheme == "http" and not allow_http and not is_loopback(parts.hostname):
        raise DownloadError(
            f"refusing to fetch {brief(url, quote=False)}{via} over plain http, which anyone on "
            "the network path can alter; use https, or set 'allow_http: true' in the hub file",
            url,
        )


class _RedirectPolicy(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only where :func:`check_url` allows (urllib alone follows ftp too)."""

    def __init__(self, allow_http: bool) -> None:
        super().__init__()
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN202
        try:
            check_url(newurl, allow_http=self.allow_http, came_from=req.full_url)
        except DownloadError:
            fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _progress_bar(total: int | None, desc: str, enabled: bool | None) -> tqdm:
    from tqdm import tqdm  # imported lazily: only downloads need it

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )


def _set_read_timeout(response: Any, read_timeout: float) -> None:
    # urllib applies one timeout to connect and reads; a slow CDN may need a longer read timeout
    # than the connect timeout, so set it on the socket once connected (best effort: private API).
    raw = getattr(getattr(response, "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(read_timeout)


def _attempt(
    url: str,
    out: BinaryIO,
    name: str,
    connect_timeout: float,
    read_timeout: float,
    progress: bool | None,
    size: int | None,
    allow_http: bool,
) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    opener = urllib.request.build_opener(_RedirectPolicy(allow_http))
    try:
        response = opener.open(request, timeout=connect_timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        message = f"HTTP {exc.code} {exc.reason} for {url}"
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retryable(message) from exc
        raise DownloadError(message, url, exc.code) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Retryable(f"cannot connect to {url}: {reason}") from exc

    with response:
        _set_read_timeout(response, read_timeout)
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if size is not None and expected is not None and expected > size:
            raise DownloadError(
                f"{url} announces {expected} bytes but the hub file gives {name} a size of "
                f"{size} bytes; nothing was downloaded",
                url,
            )
        received = 0
        out.seek(0)
        out.truncate()
        with _progress_bar(expected if size is None else size, name, progress) as bar:
            while True:
                # Never read past the announced size: one byte more proves the file too large.
                want = CHUNK if size is None else min(CHUNK, size + 1 - received)
                try:
                    block = response.read(want)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retryable(
                        f"transfer of {url} interrupted after {received} bytes: {exc}"
                    ) from exc
                if not block:
                    break
                # A write error (disk full, ...) is not the network's fault: no retry.
                out.write(block)
                received += len(block)
                bar.update(len(block))
                if size is not None and received > size:
                    raise DownloadError(
                        f"{url} sent more than the {size} bytes the hub file gives {name}; "
                        "the transfer was stopped and nothing kept",
                        url,
                    )
        # http.client returns b"" when the server closes early instead of raising, so count.
        if expected is not None and received != expected:
            raise _Retryable(
                f"truncated transfer of {url}: received {received} of {expected} bytes"
            )


def download_file(
    url: str,
    dest: Path | str,
    xxh3_64: str,
    *,
    size: int | None = None,
    sha256: str | None = None,
    allow_http: bool = False,
    retries: int = 3,
    backoff: float = 2.0,
    connect_timeout: float = 30.0,
    read_timeout: float = 120.0,
    progress: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch ``url`` to ``dest`` and verify its XXH3-64 (and ``sha256`` when given); return
    ``dest``.

    ``size`` (bytes) is a hard limit: a larger announced length or transfer stops at once.
    ``allow_http`` lets plain http reach hosts other than the loopback (:func:`check_url`, also
    applied to every redirect). Retries ``retries`` times (waiting ``backoff * 2**attempt``
    seconds) on connection errors, timeouts, HTTP 5xx/408/429 and truncated transfers; an HTTP
    4xx, a refused URL or redirect and an oversized transfer fail at once. ``progress``:
    True/False forces the tqdm bar on stderr on/off, None shows it only on a terminal.
    On any failure nothing is left under ``dest`` (nor any temporary file); a wrong checksum raises
    :class:`ChecksumError` (expected vs got, URL), other failures :class:`DownloadError`.
    """
    dest = Path(dest)
    check_url(url, allow_http=allow_http)
    # Models are shared read-only data: 0644, whatever the umask.
    with atomic_file(dest, mode=0o644) as tmp:
        with open(tmp, "w+b") as out:
            attempt = 0
            while True:
                try:
                    _attempt(
                        url, out, dest.name, connect_timeout, read_timeout, progress, size,
                        allow_http,
                    )  # fmt: skip
                    break
                except _Retryable as exc:
                    if attempt >= retries:
                        raise DownloadError(
                            f"download failed after {attempt + 1} attempt(s): {exc}", url
                        ) from exc
                    sleep(backoff * 2**attempt)
                    attempt += 1
        got, got_sha256 = file_digests(tmp, sha256=sha256 is not None)
        for kind, wanted, found in (("xxh3_64", xxh3_64, got), ("sha256", sha256, got_sha256)):
            if wanted is not None and found != wanted:
                raise ChecksumError(
                    f"checksum mismatch for {dest.name} downloaded from {url}: expected {kind} "
                    f"{wanted}, got {found}; the file was discarded",
                    dest,
                    wanted,
                    found or "",
                )
    return dest
