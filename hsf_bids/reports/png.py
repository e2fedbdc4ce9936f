"""A minimal PNG encoder (stdlib ``zlib`` + ``struct``) for indexed-colour figures.

Figures here use at most 256 colours (a grey ramp, a heat ramp and the look-up table's colours),
so an 8-bit palette PNG is both exact and several times smaller than RGB, and needs no imaging
library.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

__all__ = ["PngError", "encode_indexed_png", "png_size", "data_uri"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PngError(ValueError):
    """An array or palette that cannot be written as an indexed PNG."""


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_indexed_png(indices: np.ndarray, palette: np.ndarray, *, level: int = 6) -> bytes:
    """Encode a 2D array of palette indices as an 8-bit indexed PNG.

    ``indices``: 2D integer array (rows top to bottom), values in ``[0, len(palette))``.
    ``palette``: ``(n, 3)`` integer RGB values in ``[0, 255]``, ``1 <= n <= 256``.
    Returns the PNG file's bytes.
    """
    indices = np.asarray(indices)
    palette = np.asarray(palette)
    if indices.ndim != 2 or min(indices.shape) < 1:
        raise PngError(f"expected a non-empty 2D index array, got shape {indices.shape}")
    if palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= palette.shape[0] <= 256:
        raise PngError(f"expected a palette of shape (n <= 256, 3), got {palette.shape}")
    if palette.min() < 0 or palette.max() > 255:
        raise PngError("palette values must be in [0, 255]")
    if not np.issubdtype(indices.dtype, np.integer):
        raise PngError(f"indices must be integers, got {indices.dtype}")
    if indices.min() < 0 or indices.max() >= palette.shape[0]:
        raise PngError(
            f"indices {indices.min()}..{indices.max()} outside the palette of {len(palette)}"
        )
    height, width = indices.shape
    # Filter type 0 on every row: the PNG specification's advice for palette images.
    rows = np.zeros((height, width + 1), dtype=np.uint8)
    rows[:, 1:] = indices
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return b"".join(
        (
            _SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"PLTE", palette.astype(np.uint8).tobytes()),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
            _chunk(b"IEND", b""),
        )
    )


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` read from a PNG's header."""
    if data[:8] != _SIGNATURE or data[12:16] != b"IHDR":
        raise PngError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:<mime>;base64,...``: the file embedded in the page, so opening it reads nothing."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
