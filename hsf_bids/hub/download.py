"""Download one model file: streamed, retried, verified, then renamed into place atomically.

The file is written to a hidden temporary file in the destination folder
(:func:`hsf_bids.atomic.atomic_file`), its XXH3-64 checked, and only then renamed to its final
name, so a reader never sees a partial or wrong file and concurrent processes fetching the same
file cannot corrupt each other (the last rename wins, and every candidate was verified).
"""

from __future__ import annotations

import http.client
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

if TYPE_CHECKING:
    from tqdm import tqdm

from hsf_bids import __version__
from hsf_bids.atomic import atomic_file
from hsf_bids.errors import EX_DATAERR, EX_IOERR, HsfBidsError

__all__ = [
    "CHUNK",
    "ChecksumError",
    "DownloadError",
    "ModelsError",
    "download_file",
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


def xxh3_64_file(path: Path | str, chunk: int = CHUNK) -> str:
    """XXH3-64 of a whole file, streamed: 16 lowercase hexadecimal characters."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=connect_timeout)
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
        received = 0
        out.seek(0)
        out.truncate()
        with _progress_bar(expected, name, progress) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
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
    retries: int = 3,
    backoff: float = 2.0,
    connect_timeout: float = 30.0,
    read_timeout: float = 120.0,
    progress: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch ``url`` to ``dest`` and verify its XXH3-64; return ``dest``.

    Retries ``retries`` times (waiting ``backoff * 2**attempt`` seconds) on connection errors,
    timeouts, HTTP 5xx/408/429 and truncated transfers; an HTTP 4xx fails at once. ``progress``:
    True/False forces the tqdm bar on stderr on/off, None shows it only on a terminal.
    On any failure nothing is left under ``dest`` (nor any temporary file); a wrong checksum raises
    :class:`ChecksumError` (expected vs got, URL), other failures :class:`DownloadError`.
    """
    dest = Path(dest)
    # Models are shared read-only data: 0644, whatever the umask.
    with atomic_file(dest, mode=0o644) as tmp:
        with open(tmp, "w+b") as out:
            attempt = 0
            while True:
                try:
                    _attempt(url, out, dest.name, connect_timeout, read_timeout, progress)
                    break
                except _Retryable as exc:
                    if attempt >= retries:
                        raise DownloadError(
                            f"download failed after {attempt + 1} attempt(s): {exc}", url
                        ) from exc
                    sleep(backoff * 2**attempt)
                    attempt += 1
        got = xxh3_64_file(tmp)
        if got != xxh3_64:
            raise ChecksumError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected xxh3_64 "
                f"{xxh3_64}, got {got}; the file was discarded",
                dest,
                xxh3_64,
                got,
            )
    return dest
