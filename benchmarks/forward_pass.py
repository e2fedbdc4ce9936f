"""Forward-pass benchmark of the inference engines on the demo models and a full-size ARUNet.

For each model x engine/precision x batch size, a fresh Python process loads a network and times
loading, the first run and the median of N runs after warm-up on a seeded random crop,
and reports its peak RSS (``VmHWM``), so configurations do not share memory or caches. Outputs are
compared with onnxruntime fp32 on the same input (max |difference| of probabilities and argmax
agreement). The result is a Markdown table headed by a description of the machine.

DeepSparse rows run where DeepSparse imports (its own Python 3.11 environment with numpy < 2:
``pip install '.[deepsparse]'``) and say which share of the graph its optimised runtime runs.

    python benchmarks/forward_pass.py --threads 2 --output forward_pass.md
    python benchmarks/forward_pass.py --quick          # a short check that everything runs
    python benchmarks/forward_pass.py --interleave --no-demo   # engines side by side, one process

``--interleave`` loads every engine in one process and times them in turns (one pass of each per
round), so that a machine whose load changes during the run (a shared one) slows every engine alike;
it reports no per-engine memory.

The full-size random ARUNet (37.5 M parameters, 150 MB) is generated once into ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("deepsparse", "fp32"),
]


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``VmHWM``, else ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> dict:
    """Run one configuration in this (fresh) process and return its measurements."""
    import importlib

    from hsf_bids.engines import open_network
    from hsf_bids.engines.deepsparse import import_deepsparse

    # The engine's own import cost is not the model's.
    if spec["engine"] == "deepsparse":
        import_deepsparse()  # with its usage analytics off, as the app imports it
    else:
        importlib.import_module(spec["engine"])
    rss_imports = _peak_rss_mib()
    rng = np.random.default_rng(spec["seed"])
    batch = rng.standard_normal((spec["batch"], 1, *spec["shape"]), dtype=np.float32)

    start = time.perf_counter()
    network = open_network(
        spec["model"], engine=spec["engine"], precision=spec["precision"], threads=spec["threads"]
    )
    create_s = time.perf_counter() - start

    start = time.perf_counter()
    probs = network.run(batch)
    first_s = time.perf_counter() - start
    if spec.get("save_output"):
        np.save(spec["save_output"], probs)

    for _ in range(spec["warmup"]):
        network.run(batch)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        network.run(batch)
        times.append(time.perf_counter() - start)
    # DeepSparse runs what its optimised runtime does not support in its onnxruntime fallback.
    optimised = None
    if spec["engine"] == "deepsparse":
        optimised = network.engine_for(batch.shape).fraction_of_supported_ops
    return {
        "optimised": optimised,
        "ran_precision": network.precision,
        "ran_device": network.device,
        "create_s": create_s,
        "first_s": first_s,
        "median_s": statistics.median(times) if times else float("nan"),
        "min_s": min(times) if times else float("nan"),
        "rss_imports_mib": rss_imports,
        "peak_rss_mib": _peak_rss_mib(),
    }


def run_in_subprocess(spec: dict, timeout: float) -> dict:
    """Measure one configuration in a fresh interpreter; errors come back as ``{"error": ...}``."""
    env = dict(os.environ)
    # One thread budget for every library: the engines get ``threads`` explicitly; numpy and
    # OpenMP should not add their own pools.
    env.update(OMP_NUM_THREADS=str(spec["threads"]), OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


ISA_REPORTED = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def machine_description(threads: int) -> list[str]:
    """Lines describing the CPU, memory and library versions."""
    from hsf_bids.engines.cpu import cpu_model, instruction_sets

    lines = [f"- CPU: {cpu_model()}; instruction sets: {', '.join(instruction_sets()) or 'none'}"
             f" (of {', '.join(ISA_REPORTED)})"]  # fmt: skip
    lines.append(
        f"- CPUs usable by this process: {len(os.sched_getaffinity(0))}; threads: {threads}"
    )
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        total = next(int(x.split()[1]) for x in meminfo if x.startswith("MemTotal:"))
        lines.append(f"- Memory: {total / 1024**2:.1f} GiB")
    except (OSError, StopIteration):
        pass
    import onnxruntime
    import openvino

    from hsf_bids.engines.openvino import cpu_capabilities

    lines.append(
        f"- onnxruntime {onnxruntime.__version__}, OpenVINO {openvino.__version__} "
        f"(CPU capabilities: {', '.join(cpu_capabilities())}), Python {platform.python_version()}"
    )
    if deepsparse_version():
        from deepsparse.cpu import cpu_architecture

        arch = cpu_architecture()
        lines.append(
            f"- DeepSparse {deepsparse_version()} (instruction set it uses: {arch.isa}, "
            f"VNNI {'yes' if arch.vnni else 'no'})"
        )
    else:
        lines.append("- DeepSparse not installed here: its rows are left out")
    try:
        load = os.getloadavg()
        lines.append(f"- Load average at start: {load[0]:.2f} (1 min)")
    except OSError:
        pass
    return lines


def deepsparse_version() -> str | None:
    """DeepSparse's version, None where it does not import."""
    from hsf_bids.engines.deepsparse import EngineUnavailableError, import_deepsparse

    try:
        return import_deepsparse().__version__
    except EngineUnavailableError:
        return None


def ensure_arunet(cache: Path) -> Path:
    """The full-size random ARUNet in ``cache``, generated on first use."""
    from hsf_bids.arunet import build_arunet

    path = cache / "arunet_random_seed0.onnx"
    if not path.is_file():
        print(f"generating {path} (150 MB) ...", file=sys.stderr)
        build_arunet(path, seed=0)
    return path


def default_demo_hub() -> Path:
    shared = os.environ.get("HSF_BIDS_SHARED")
    root = Path(shared) if shared else REPO.parent / "shared"
    return root / "models" / "demo" / "demo.yaml"


def _fmt(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds:.3f}"


def _row(model: Path, batch: int, engine: str, precision: str, result: dict, reference) -> str:
    """One Markdown row; agreement against ``reference``, onnxruntime fp32's probabilities."""
    if "error" in result:
        return (
            f"| {model.name} | {batch} | {engine} | {precision} | error: {result['error']} |||||||"
        )
    probs = result["probs"]
    if engine == "onnxruntime":
        agreement = "reference"
    elif reference is None:
        agreement = "no reference"
    else:
        diff = float(np.abs(probs - reference).max())
        agree = float((probs.argmax(1) == reference.argmax(1)).mean())
        agreement = f"{diff:.1e} / {100 * agree:.3f} %"
    if result.get("optimised") is not None:
        engine = f"{engine} (optimised runtime: {100 * result['optimised']:.0f} %)"
    memory = "one process"
    if "peak_rss_mib" in result:
        memory = f"{result['peak_rss_mib']:.0f} ({result['rss_imports_mib']:.0f})"
    return (
        f"| {model.name} | {batch} | {engine} | {precision} -> {result['ran_precision']} "
        f"| {_fmt(result['create_s'])} | {_fmt(result['first_s'])} "
        f"| {_fmt(result['median_s'])} ({_fmt(result['min_s'])}) "
        f"| {_fmt(result['median_s'] / batch)} | {memory} | {agreement} |"
    )


def interleaved(model: Path, configs: list, spec: dict) -> list[dict]:
    """Every configuration of ``configs`` on ``model`` in this process, timed in turns."""
    from hsf_bids.engines import open_network

    rng = np.random.default_rng(spec["seed"])
    batch = rng.standard_normal((spec["batch"], 1, *spec["shape"]), dtype=np.float32)
    results = []
    for engine, precision in configs:
        start = time.perf_counter()
        network = open_network(model, engine=engine, precision=precision, threads=spec["threads"])
        create_s = time.perf_counter() - start
        start = time.perf_counter()
        probs = network.run(batch)
        first_s = time.perf_counter() - start
        optimised = None
        if engine == "deepsparse":
            optimised = network.engine_for(batch.shape).fraction_of_supported_ops
        results.append({"network": network, "probs": probs, "create_s": create_s,
                        "first_s": first_s, "optimised": optimised, "times": []})  # fmt: skip
    for _ in range(spec["warmup"]):
        for result in results:
            result["network"].run(batch)
    for _ in range(spec["repeats"]):
        for result in results:
            start = time.perf_counter()
            result["network"].run(batch)
            result["times"].append(time.perf_counter() - start)
    for result in results:
        network = result.pop("network")
        result.update(ran_precision=network.precision, median_s=statistics.median(result["times"]),
                      min_s=min(result["times"]))  # fmt: skip
        network.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 2)")
    parser.add_argument("--quick", action="store_true", help="2 timed runs, no extra warm-up")
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 64, 48])
    parser.add_argument("--demo-hub", type=Path, default=None, help="demo hub YAML")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo models")
    parser.add_argument("--no-arunet", action="store_true", help="skip the full-size ARUNet")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "hsf_bids_bench",
        help="folder for the generated ARUNet (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="per configuration, s")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    parser.add_argument(
        "--interleave", action="store_true", help="every engine in one process, timed in turns"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)

    models: list[tuple[Path, list[int]]] = []
    if not args.no_demo:
        import yaml

        hub = args.demo_hub or default_demo_hub()
        names = yaml.safe_load(hub.read_text())["models"]
        models += [(hub.parent / name, [1, 4]) for name in names]
    if not args.no_arunet:
        models.append((ensure_arunet(args.cache), [1]))

    shape = tuple(args.shape)
    configs = [c for c in CONFIGS if c[0] != "deepsparse" or deepsparse_version()]
    header = [
        f"# Forward pass, crop {'x'.join(map(str, shape))}, {args.threads} threads",
        "",
        *machine_description(args.threads),
        f"- Timed runs: median (min) of {repeats} after the first run and {warmup} warm-up runs;"
        + (
            " all engines in one process, one pass of each in turn"
            if args.interleave
            else " every row in a fresh process"
        ),
        "",
        "| model | batch | engine | precision asked -> run | create s | first run s "
        "| median s (min) | s per crop | peak RSS MiB (before loading) | max abs diff / argmax "
        "agreement vs onnxruntime fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model, batches in models:
            for batch in batches:
                spec = {
                    "model": str(model),
                    "threads": args.threads,
                    "batch": batch,
                    "shape": list(shape),
                    "seed": 0,
                    "warmup": warmup,
                    "repeats": repeats,
                }
                if args.interleave:
                    measured = interleaved(model, configs, spec)
                else:
                    measured = []
                    for engine, precision in configs:
                        out_file = Path(scratch) / f"{model.stem}_{batch}_{engine}_{precision}.npy"
                        result = run_in_subprocess(
                            {**spec, "engine": engine, "precision": precision,
                             "save_output": str(out_file)}, args.timeout,
                        )  # fmt: skip
                        if "error" not in result:
                            result["probs"] = np.load(out_file)
                            out_file.unlink()
                        measured.append(result)
                reference = None
                for (engine, precision), result in zip(configs, measured, strict=True):
                    row = _row(model, batch, engine, precision, result, reference)
                    if engine == "onnxruntime" and "error" not in result:
                        reference = result["probs"]  # first in CONFIGS
                    rows.append(row)
                    print(row, flush=True)

    if args.output:
        args.output.write_text("\n".join(header + rows) + "\n")
        print(f"\nwritten to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
