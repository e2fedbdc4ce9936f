"""The HSF contract of a model file, checked on the file before any engine loads it.

A model with the wrong number of output channels would otherwise be found only when its first
prediction is merged into ``ca_mode`` labels, after the registrations of every image. Its ONNX
graph declares the output's shape: reading that declaration takes milliseconds, because the
protobuf walk below jumps over the weights (150 MB for an ARUNet) instead of parsing them.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from hsf_bids.engines.base import ModelLoadError
from hsf_bids.errors import EX_DATAERR
from hsf_bids.vocabulary import N_MODEL_CLASSES

__all__ = ["ModelContractError", "check_model_contract", "declared_outputs"]

# Field numbers of onnx.proto: ModelProto.graph, GraphProto.output, ValueInfoProto.type,
# TypeProto.tensor_type, TypeProto.Tensor.shape, TensorShapeProto.dim, and a dimension's
# dim_value (a varint) and dim_param (a string).
_MODEL_GRAPH, _GRAPH_OUTPUT, _VALUE_TYPE, _TENSOR_TYPE, _TENSOR_SHAPE, _SHAPE_DIM = (
    7,
    12,
    2,
    1,
    2,
    1,
)
_DIM_VALUE, _DIM_PARAM = 1, 2


class ModelContractError(ModelLoadError):
    """A model file is not an HSF model (an invalid input file, 65): not ONNX, or not one output
    of :data:`~hsf_bids.vocabulary.N_MODEL_CLASSES` channels."""

    exit_code = EX_DATAERR


def _varint(buf: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(field number, start, end)`` of each length-delimited field of one message, and
    ``(field number, value, -1)`` of each varint; fixed-size fields are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield key >> 3, value, -1
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("field runs past the end of its message")
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")
    if pos != end:
        raise ValueError("message runs past its end")


def _sub(buf: mmap.mmap | bytes, start: int, end: int, field: int) -> list[tuple[int, int]]:
    return [(s, e) for f, s, e in _fields(buf, start, end) if f == field and e >= 0]


def _dimension(buf: mmap.mmap | bytes, start: int, end: int) -> int | str | None:
    for field, value, stop in _fields(buf, start, end):
        if field == _DIM_VALUE and stop < 0:
            return value
        if field == _DIM_PARAM and stop >= 0:
            return bytes(buf[value:stop]).decode("utf-8", "replace")
    return None


def declared_outputs(path: Path) -> list[list[int | str | None]]:
    """The output shapes the ONNX graph at ``path`` declares (a dimension is its size, its
    symbolic name, or None). Raises ValueError or OSError when the file is not an ONNX model."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graphs = _sub(buf, 0, len(buf), _MODEL_GRAPH)
        if len(graphs) != 1:
            raise ValueError("no graph")
        shapes = []
        for output in _sub(buf, *graphs[0], _GRAPH_OUTPUT):
            dims: list[int | str | None] = []
            for kind in _sub(buf, *output, _VALUE_TYPE):
                for tensor in _sub(buf, *kind, _TENSOR_TYPE):
                    for shape in _sub(buf, *tensor, _TENSOR_SHAPE):
                        dims += [_dimension(buf, *d) for d in _sub(buf, *shape, _SHAPE_DIM)]
            shapes.append(dims)
    return shapes


def check_model_contract(path: str | Path) -> None:
    """Raise :class:`ModelContractError` naming ``path`` unless its graph has one output whose
    declared channels (dimension 1) are HSF's six, or are not declared (then the first
    prediction is checked). The inputs are left to the engines (older ONNX files count the
    weights among them)."""
    path = Path(path)
    try:
        shapes = declared_outputs(path)
    except (ValueError, IndexError, OSError) as exc:
        raise ModelContractError(f"{path}: not an ONNX model ({exc})") from exc
    if len(shapes) != 1:
        raise ModelContractError(
            f"{path}: expected one output (the HSF contract), found {len(shapes)}"
        )
    shape = shapes[0]
    channels = shape[1] if len(shape) > 1 else None
    if len(shape) not in (0, 5) or (isinstance(channels, int) and channels != N_MODEL_CLASSES):
        raise ModelContractError(
            f"{path}: the model's output has shape {shape}; HSF models output "
            f"[batch, {N_MODEL_CLASSES}, x, y, z] ({N_MODEL_CLASSES} channels: background and the "
            "five subfields), so this file is not one of them"
        )
