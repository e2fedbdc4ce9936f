"""int8 versions of the models: NNCF post-training quantisation, stored beside the fp32 files.

``hsf-bids-models quantize`` writes, for each model ``<name>.onnx`` of a preset,
``<models folder>/<preset folder>/int8/<name>.xml`` and ``.bin`` (an OpenVINO model whose
convolutions run in int8) and ``<name>.json``, its record: the checksum of the ONNX file it was
made from, the checksums of the two files, the NNCF and OpenVINO versions, the settings and the
calibration set. A record whose checksums do not match the files is never used.

Quantising needs NNCF (``pip install 'hsf_bids[quantize]'``); running the result needs only
OpenVINO. Quantisation is seeded (the calibration set is), so quantising twice writes the same
files (tested).

The settings: NNCF's ``mixed`` preset (symmetric weights, asymmetric activations: the GELU and
normalisation outputs the ARUNet feeds its convolutions are not centred on zero) on every
calibration input (no sub-sampling), with NNCF's full bias correction; the first convolution (the
raw, z-scored intensities) and the last (the logits) stay in f32. Both are cheap (one input
channel; a 1x1x1 head) and the most sensitive: on demo model b0, keeping them raised the lowest
per-structure Dice of the fused labels against onnxruntime fp32 from 0.969 to 0.987 on the
template crops and from 0.951 to 0.985 on ds-mini's sub-02 T2w (NNCF 3.4.0, OpenVINO 2026.4.1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsf_bids.atomic import atomic_files
from hsf_bids.errors import EX_USAGE, HsfBidsError

__all__ = [
    "INT8_FOLDER",
    "QUANTIZATION",
    "Int8Model",
    "QuantizeUnavailableError",
    "find_int8",
    "int8_paths",
    "quantize_model",
]

log = logging.getLogger(__name__)

INT8_FOLDER = "int8"
QUANTIZATION = {
    "preset": "mixed",
    "fast_bias_correction": False,
    "calibration_augmentations": 4,
    "float_convolutions": "first and last",
}


class QuantizeUnavailableError(HsfBidsError, RuntimeError):
    """NNCF is not installed."""

    exit_code = EX_USAGE


@dataclass(frozen=True)
class Int8Model:
    """A verified int8 version of one ONNX model."""

    xml: Path
    bin: Path
    record: dict[str, Any]

    @property
    def xxh3_64(self) -> str:
        """Checksum of the weights file (the XML is covered by the record too)."""
        return self.record["bin_xxh3_64"]


def int8_paths(folder: Path, model_name: str) -> tuple[Path, Path, Path]:
    """``(xml, bin, record)`` of the int8 version of ``model_name`` in a preset's folder."""
    stem = Path(model_name).name.removesuffix(".onnx")
    base = Path(folder) / INT8_FOLDER
    return base / f"{stem}.xml", base / f"{stem}.bin", base / f"{stem}.json"


def find_int8(folder: Path, model_name: str, model_xxh3_64: str) -> Int8Model | None:
    """The int8 version of the model with checksum ``model_xxh3_64``, if present and intact."""
    import json

    from hsf_bids.hub import xxh3_64_file

    xml, bin_, record_path = int8_paths(folder, model_name)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("source_xxh3_64") != model_xxh3_64:
        log.info("%s: made from another version of %s; ignored", record_path, model_name)
        return None
    try:
        intact = xxh3_64_file(xml) == record.get("xml_xxh3_64") and xxh3_64_file(
            bin_
        ) == record.get("bin_xxh3_64")
    except OSError:
        intact = False
    if not intact:
        log.warning("%s: the int8 files do not match their record; ignored", record_path)
        return None
    return Int8Model(xml, bin_, record)


def _nncf():  # noqa: ANN202 - the nncf module
    try:
        import nncf
    except ImportError as exc:
        raise QuantizeUnavailableError(
            "quantising needs NNCF: pip install 'hsf_bids[quantize]'"
        ) from exc
    return nncf


def _stable_names(model) -> None:  # noqa: ANN001 - openvino.Model
    """Name every node after its kind and place in the graph. OpenVINO names the nodes it
    creates from a process-wide counter (``Constant_42339``, and NNCF derives names from those),
    so without this the saved file would depend on what the process did before. Input and
    output tensor names, which the contract uses, are not node names and stay."""
    for index, op in enumerate(model.get_ordered_ops()):
        kind = op.get_type_name()
        if kind not in ("Parameter", "Result"):
            op.set_friendly_name(f"{kind}_{index}")


def quantize_model(
    onnx_path: Path, folder: Path, model_xxh3_64: str, *, crops: list | None = None
) -> Int8Model:
    """Quantise ``onnx_path`` with NNCF on the calibration set; write its int8 files and record
    into ``folder/int8/`` (atomically: a crash leaves no partial model under the final names)."""
    import openvino as ov

    from hsf_bids.calibration import CALIBRATION_SEED, calibration_batches
    from hsf_bids.hub import xxh3_64_file
    from hsf_bids.outputs.derivatives import write_json

    nncf = _nncf()
    nncf.set_log_level(logging.ERROR)  # its per-layer INFO lines are noise for users
    batches = calibration_batches(crops, n_augmentations=QUANTIZATION["calibration_augmentations"])
    model = ov.Core().read_model(str(onnx_path))
    convolutions = [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() in ("Convolution", "GroupConvolution")
    ]
    quantized = nncf.quantize(
        model,
        nncf.Dataset(batches),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(batches),
        fast_bias_correction=QUANTIZATION["fast_bias_correction"],
        ignored_scope=nncf.IgnoredScope(names=sorted({convolutions[0], convolutions[-1]}))
        if convolutions
        else None,
    )
    _stable_names(quantized)
    xml, bin_, record_path = int8_paths(folder, onnx_path.name)
    # OpenVINO writes the .bin beside the .xml, named after it: the two temporary names match.
    with atomic_files(bin_, xml) as (_, tmp_xml):
        ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    record = {
        "source": onnx_path.name,
        "source_xxh3_64": model_xxh3_64,
        "xml_xxh3_64": xxh3_64_file(xml),
        "bin_xxh3_64": xxh3_64_file(bin_),
        "nncf_version": nncf.__version__,
        "openvino_version": ov.get_version(),
        "settings": QUANTIZATION,
        "calibration": {
            "seed": CALIBRATION_SEED,
            "inputs": len(batches),
            "crops": "MNI152NLin2009cSym T1w and T2w, both hippocampi"
            if crops is None
            else [c.name for c in crops],
        },
    }
    write_json(record, record_path)
    return Int8Model(xml, bin_, record)
