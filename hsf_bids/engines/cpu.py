"""What this CPU offers the engines: its model, the instruction sets that decide their kernels.

Agreement measurements are keyed by :func:`cpu_signature` (the same int8 or bf16 model can round
differently on AVX2, AVX-512 VNNI or AMX kernels), and the benchmarks print it with every figure.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["ISA_FLAGS", "bf16_beats_fp32", "cpu_model", "cpu_signature", "instruction_sets"]

# The /proc/cpuinfo flags that select different int8/bf16/fp32 kernels in OpenVINO and
# onnxruntime, in the order they are reported.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def instruction_sets() -> tuple[str, ...]:
    """The flags of :data:`ISA_FLAGS` this CPU has (empty where ``/proc/cpuinfo`` is absent)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return tuple(flag for flag in ISA_FLAGS if flag in flags)


def bf16_beats_fp32() -> bool:
    """Whether OpenVINO's bf16 kernels outrun its fp32 ones on this CPU.

    Measured with ``benchmarks/forward_pass.py`` (37.5 M-parameter ARUNet, crop 48x64x48,
    2 threads): on an AMD EPYC with AVX512-BF16, bf16 0.84 s per pass against 1.60 s for fp32; on
    an Intel Xeon with AVX512-BF16 but no AMX, 1.83 s against 1.29 s. Intel's bf16 needs AMX to
    pay; AMD's AVX512-BF16 pays on its own.
    """
    flags = set(_cpuinfo().get("flags", "").split())
    if "amx_bf16" in flags:
        return True
    return "avx512_bf16" in flags and _cpuinfo().get("vendor_id") == "AuthenticAMD"


@functools.cache
def cpu_signature() -> str:
    """One line naming the machine's kernel-relevant features, e.g.
    ``x86_64 avx2,fma,avx512f,avx512_vnni,avx512_bf16 | openvino BF16,FP32,INT8``."""
    signature = f"{platform.machine()} {','.join(instruction_sets()) or 'baseline'}"
    try:
        from hsf_bids.engines.openvino import cpu_capabilities
    except ImportError:
        return signature
    try:
        kinds = ("BF16", "FP16", "FP32", "INT8")
        capabilities = sorted(c for c in cpu_capabilities() if c in kinds)
    except (ImportError, RuntimeError):
        return signature
    return f"{signature} | openvino {','.join(capabilities)}"
