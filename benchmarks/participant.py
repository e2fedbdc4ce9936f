"""Participant-level benchmark: per-stage wall time and peak memory of whole runs, per preset and
engine/precision (``auto`` first), HSF 1.2.3 side by side in the same run (``--hsf``), each
engine/precision's time per forward pass and its agreement with onnxruntime fp32 as the gate of
``engine auto`` measures it, and the CPU's instruction sets.

Five same-size random ARUNets (seeds 0-4, 37.5 M parameters each, written once into ``--cache``)
make three hub files equivalent to ``bagging_accurate`` (5 models x 21 inputs), ``bagging_fast``
(5 x 1) and ``single_fast`` (1 x 1), with relative URLs, XXH3-64 checksums and one ``version``,
so their int8 versions and agreement measurements live in one folder of ``--models-dir``. Before
any timed run the benchmark prepares what a user prepares once: the int8 versions
(``hsf-bids-models quantize``) and the gate's measurements (what the first ``auto`` run on a
machine does); both are timed and reported. Each run is ``python -m hsf_bids <ds-mini> <out>
participant --participant-label 04 --session-label 01 --hub <hub> --models-dir <dir> --engine E
[--precision P]`` in a fresh process with a fresh work folder; wall time is measured from before
the process starts to its exit, peak memory is its ``ru_maxrss`` (``wait4``). Stage times come
from the timing records the run writes into its work folder (``timing.json`` per node,
``timing_<run-id>.json`` for the run's own phases; see :mod:`hsf_bids.stages`). With ``--hsf``,
HSF 1.2.3 (:mod:`hsf_baseline`) runs the same presets on the same head and models right after.

    python benchmarks/participant.py --presets single_fast bagging_accurate --engine auto \
        openvino/int8 --hsf --runs 3 --output bench.md
    python benchmarks/participant.py --quick                                     # a short check
    python benchmarks/participant.py --agreement-only                            # gate tables

The gate tables: the random ARUNet (seed 0) and the demo models (``../shared/models/demo``, or
``--demo-models``), each choice against onnxruntime fp32 on the fused labels of the template's
hippocampus crops (the gate ``auto`` applies, :mod:`hsf_bids.engines.agreement`), and the demo
models also on ds-mini crops (``--agreement-images``, as ``hsf-bids-models check --images``).
Random weights make no segmentation: their agreement says how a precision treats an untrained
network, not how it treats the published models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_pass import machine_description  # noqa: E402

SHARED = Path(os.environ.get("HSF_BIDS_SHARED", REPO.parent / "shared"))
PRESETS = {  # name: (number of models, test-time augmentation)
    "bagging_accurate": (5, True),
    "bagging_fast": (5, False),
    "single_fast": (1, False),
}
# (engine, precision, device); "auto" leaves the precision to the gate.
CONFIGS = [
    ("auto", "auto", "cpu"),
    ("onnxruntime", "fp32", "cpu"),
    ("openvino", "fp32", "cpu"),
    ("openvino", "bf16", "cpu"),
    ("openvino", "int8", "cpu"),
]
MODELS_VERSION = "bench-random-arunet"
COLUMNS = [  # (column, how it is computed from the records)
    ("start-up", "startup"),
    ("input query", "query"),
    ("registration", "registration"),
    ("crop", "crop"),
    ("model load (wait)", "load_models"),
    ("inference", "network"),
    ("augmentation + inversion", "aug_inv"),
    ("fusion", "fusion"),
    ("paste back", "paste_back"),
    ("writing", "writing"),
    ("report", "reports"),
    ("other (Nipype, overlap)", "other"),
]


def make_models(cache: Path, n: int) -> list[Path]:
    """The random ARUNets of seeds 0..n-1 in ``cache`` (built once, by ``hsf_bids.arunet``)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(n):
        path = cache / f"arunet_random_seed{seed}.onnx"
        if not path.is_file():
            print(f"building {path.name} ...", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "hsf_bids.arunet", str(path), "--seed", str(seed)],
                check=True, cwd=REPO,
            )  # fmt: skip
        paths.append(path)
    return paths


def make_hub(cache: Path, preset: str) -> Path:
    """A hub YAML next to the models, equivalent to ``preset`` (relative URLs, XXH3-64)."""
    import yaml

    from hsf_bids.hub import xxh3_64_file

    n_models, tta = PRESETS[preset]
    models = {}
    for path in make_models(cache, n_models):
        models[path.name] = {"url": path.name, "xxh3_64": xxh3_64_file(path)}
    hub = {
        "version": MODELS_VERSION,
        "ca_mode": "1/2/3",
        "models": models,
        "segmentation": {"test_time_augmentation": tta, "test_time_num_aug": 20 if tta else 0},
    }
    out = cache / f"{preset}.yaml"
    text = yaml.safe_dump(hub, sort_keys=False)
    if not out.is_file() or out.read_text() != text:
        out.write_text(text)
    return out


def engine_status(engine: str, precision: str, device: str) -> str | None:
    """None when the combination runs here as asked, else why not."""
    from hsf_bids.engines import EngineError, resolve_engine

    if engine == "auto":
        return None
    try:
        if precision == "int8":
            resolve_engine("openvino", device, "fp32")
            if device != "cpu":
                return "int8 runs on the CPU"
        else:
            resolve_engine(engine, device, precision)
    except EngineError as exc:
        return str(exc).split(";")[0]
    return None


def models_folder(args: argparse.Namespace) -> Path:
    """Where the benchmark hubs' int8 versions and agreement measurements live."""
    return args.models_dir / MODELS_VERSION


def prepare(args: argparse.Namespace, configs: list[tuple[str, str, str]]) -> dict:
    """What a user does once per machine, timed: the int8 versions of the benchmark models
    (when int8 or auto runs) and the agreement gate's measurements behind ``auto``."""
    from hsf_bids.engines.plan import plan_models
    from hsf_bids.hub import xxh3_64_file
    from hsf_bids.quantize import find_int8, quantize_model

    n_models = max(PRESETS[p][0] for p in args.presets)
    paths = make_models(args.cache, n_models)
    checksums = [xxh3_64_file(p) for p in paths]
    folder = models_folder(args)
    out: dict = {"models": n_models}
    wanted = {c[1] for c in configs}
    if wanted & {"int8", "auto"}:
        start = time.perf_counter()
        made = 0
        for path, xxh in zip(paths, checksums, strict=True):
            if find_int8(folder, path.name, xxh) is None:
                print(f"quantising {path.name} ...", file=sys.stderr, flush=True)
                quantize_model(path, folder, xxh)
                made += 1
        out["quantize_s"] = time.perf_counter() - start
        out["quantized"] = made
    if "auto" in wanted:
        start = time.perf_counter()
        plan = plan_models(paths, checksums, folder, engine="auto", threads=args.nprocs)
        out["gate_s"] = time.perf_counter() - start
        out["plan"] = [r.choice for r in plan.runs]
    # OpenVINO's compiled-model cache (the first load of a model on a machine compiles it).
    from hsf_bids.engines import open_network
    from hsf_bids.engines.openvino import compile_cache_dir

    if compile_cache_dir() is not None:
        start = time.perf_counter()
        loads = set()
        for engine, precision, _ in configs:
            for path, xxh in zip(paths, checksums, strict=True):
                found = find_int8(folder, path.name, xxh) if precision == "int8" else None
                if engine == "openvino" and (precision != "int8" or found is not None):
                    loads.add((found.xml if found else path, engine, precision))
        for run in plan.runs if "auto" in wanted else []:
            if run.engine == "openvino":
                loads.add((run.path, run.engine, run.precision))
        for path, engine, precision in sorted(loads):
            open_network(path, engine=engine, precision=precision, threads=args.nprocs).close()
        out["compile_s"] = time.perf_counter() - start
    return out


def _read_records(work: Path) -> tuple[dict, list[dict]]:
    phases = {}
    for path in work.glob("timing_*.json"):
        phases = json.loads(path.read_text())
    stages = [json.loads(p.read_text()) for p in work.rglob("timing.json")]
    return phases, stages


def summarise(wall: float, started: float, phases: dict, stages: list[dict]) -> dict[str, float]:
    """Per-stage seconds of one run from its timing records (see ``COLUMNS``)."""
    out = dict.fromkeys([key for _, key in COLUMNS], 0.0)
    seconds = phases.get("seconds", {})
    out["startup"] = phases.get("started", started) - started
    # The validator runs in its own process meanwhile; what the run waits for is listed.
    out["query"] = sum(seconds.get(k, 0.0) for k in
                       ("query", "imports", "validation", "check_images", "models",
                        "templates", "engine_plan"))  # fmt: skip
    out["reports"] = seconds.get("reports", 0.0)
    for record in stages:
        name, steps = record["stage"], record["seconds"]
        if name in ("localise", "coregister"):
            out["registration"] += record["total"]
        elif name.startswith("segment_"):
            out["crop"] += steps.get("crop", 0.0)
            out["load_models"] += steps.get("load_models", 0.0)
            out["network"] += steps.get("network", 0.0)
            out["aug_inv"] += steps.get("augment", 0.0) + steps.get("invert", 0.0)
            out["fusion"] += steps.get("fusion", 0.0)
            out["writing"] += steps.get("write", 0.0)
        elif name == "paste_back":
            out["paste_back"] += record["total"]
        elif name == "derivatives":
            out["writing"] += record["total"]
    out["other"] = wall - sum(v for k, v in out.items() if k != "other")
    return out


def memory_marks(phases: dict, stages: list[dict]) -> dict[str, float]:
    """The run's memory high-water mark (MiB) at the end of each stage, in time order."""
    records = sorted(stages, key=lambda r: r["started"])
    marks = {r["stage"]: r["peak_rss_mib"] for r in records if r.get("peak_rss_mib")}
    if phases.get("peak_rss_mib"):
        marks["reports"] = phases["peak_rss_mib"]
    return marks


def timed_process(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> dict:
    """Run ``cmd`` in a fresh process, its output into ``log_path``: its Unix start time, wall
    seconds from before the start to the exit, exit code and peak RSS (GiB, from ``wait4``)."""
    started = time.time()
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"started": started, "wall": time.perf_counter() - start,
            "exit": os.waitstatus_to_exitcode(status),
            "peak_rss_gib": usage.ru_maxrss / 1024**2}  # fmt: skip


def run_participant(
    hub: Path, engine: str, precision: str, device: str, args: argparse.Namespace, root: Path,
    attempt: int = 0,
) -> dict:  # fmt: skip
    """One participant run in a fresh process; wall time, peak RSS and per-stage seconds."""
    tag = f"{hub.stem}_{engine}_{precision}_{device}_{attempt}"
    out, work = root / tag / "out", root / tag / "work"
    cmd = [
        sys.executable, "-m", "hsf_bids", str(args.bids_dir), str(out), "participant",
        "--participant-label", args.participant, "--hub", str(hub), "-w", str(work),
        "--models-dir", str(args.models_dir), "--engine", engine, "--device", device,
        "--nprocs", str(args.nprocs), "--omp-nthreads", str(args.nprocs),
    ]  # fmt: skip
    if precision != "auto":
        cmd += ["--precision", precision]
    if args.session:
        cmd += ["--session-label", args.session]
    env = dict(os.environ)
    env.setdefault("TEMPLATEFLOW_HOME", str(SHARED / "data" / "templateflow"))
    log_path = root / f"{tag}.log"
    timed = timed_process(cmd, log_path, env, REPO)
    started, wall = timed["started"], timed["wall"]
    result = {"tag": tag, "wall": wall, "peak_rss_gib": timed["peak_rss_gib"],
              "exit": timed["exit"], "log": str(log_path)}  # fmt: skip
    if timed["exit"] != 0:
        result["error"] = log_path.read_text().strip().splitlines()[-1:]
        return result
    phases, stages = _read_records(work)
    result["stages"] = summarise(wall, started, phases, stages)
    result["memory"] = memory_marks(phases, stages)
    return result


def median_run(attempts: list[dict], preset: str, engine: str) -> dict:
    """The run of median wall time among ``attempts`` (all must succeed), with their range.

    This machine is a shared virtual machine whose timings of identical runs vary by a second or
    two; one run is not a measurement.
    """
    failed = [run for run in attempts if "stages" not in run]
    run = dict(failed[0] if failed else sorted(attempts, key=lambda r: r["wall"])[
        (len(attempts) - 1) // 2])  # fmt: skip
    walls = [r["wall"] for r in attempts]
    run.update(preset=preset, engine=engine, runs=len(attempts), wall_min=min(walls),
               wall_max=max(walls))  # fmt: skip
    run["peak_rss_gib"] = max(r["peak_rss_gib"] for r in attempts)
    return run


def bare_forward(model: Path, engine: str, precision: str, shape: tuple, threads: int,
                 repeat: int) -> float:  # fmt: skip
    """Median seconds of one forward pass of ``model`` (an int8 version: its ``.xml``) on a
    seeded random ``[1, 1, *shape]``."""
    from hsf_bids.engines import open_network

    network = open_network(model, engine=engine, precision=precision, threads=threads)
    batch = np.random.default_rng(0).standard_normal((1, 1, *shape), dtype=np.float32)
    network.run(batch)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        network.run(batch)
        times.append(time.perf_counter() - start)
    network.close()
    return statistics.median(times)


def head_path(args: argparse.Namespace) -> Path:
    """The one image the participant runs segment (``--session`` empty: the first found)."""
    sub = args.bids_dir / f"sub-{args.participant}"
    pattern = f"ses-{args.session}/anat/*_T1w.nii*" if args.session else "**/anat/*_T1w.nii*"
    return sorted(sub.glob(pattern))[0]


def gate_tables(args: argparse.Namespace) -> list[dict]:
    """Agreement (lowest Dice per structure, fused labels) and seconds per pass of each choice
    against onnxruntime fp32: random ARUNet seed 0 on the template crops (from the cache the
    gate filled, measuring what is missing), the demo models on the template crops (quantised
    into ``--models-dir`` first) and on the ds-mini crops of ``--agreement-images``."""
    from hsf_bids.calibration import image_crops
    from hsf_bids.engines.plan import measure_models
    from hsf_bids.hub import load_hub, model_path, xxh3_64_file
    from hsf_bids.quantize import find_int8, quantize_model

    tables = []
    arunet = make_models(args.cache, 1)[0]
    folder = models_folder(args)
    if find_int8(folder, arunet.name, xxh3_64_file(arunet)) is None:
        quantize_model(arunet, folder, xxh3_64_file(arunet))
    (measured,) = measure_models([arunet], [xxh3_64_file(arunet)], folder, threads=args.nprocs)
    tables.append({"title": "random ARUNet (seed 0, random weights), template crops",
                   "agreements": list(measured.agreements.values())})  # fmt: skip
    hub_file = args.demo_models / "demo.yaml"
    preset = load_hub(hub_file)
    demo_folder = args.models_dir / preset.subfolder
    paths = [model_path(preset, m, args.models_dir) for m in preset.models]
    checksums = [m.xxh3_64 for m in preset.models]
    for path, xxh in zip(paths, checksums, strict=True):
        if find_int8(demo_folder, path.name, xxh) is None:
            quantize_model(path, demo_folder, xxh)
    measured = measure_models(paths, checksums, demo_folder, threads=args.nprocs)
    tables.append(
        {
            "title": "demo models, template crops (the gate)",
            "agreements": [a for m in measured for a in m.agreements.values()],
        }
    )
    contrasts = ["T2w" if "_T2w" in rel else "T1w" for rel in args.agreement_images]
    crops = image_crops([args.bids_dir / rel for rel in args.agreement_images], contrasts)
    measured = measure_models(paths, checksums, demo_folder, crops=crops, threads=args.nprocs)
    names = ", ".join(Path(rel).name for rel in args.agreement_images)
    tables.append(
        {
            "title": f"demo models, ds-mini crops ({names})",
            "agreements": [a for m in measured for a in m.agreements.values()],
        }
    )
    return tables


def hsf_side_by_side(args: argparse.Namespace, root: Path) -> tuple[dict, list[dict]]:
    """HSF 1.2.3 on the same presets, head and models (:mod:`hsf_baseline`), ``--runs`` each."""
    import hsf_baseline as hb

    options = argparse.Namespace(
        venv=hb.DEFAULT_VENV.absolute(), head=head_path(args).resolve(), margin=[8, 8, 8],
    )  # fmt: skip
    versions = hb.ensure_venv(options.venv, hb.base_python(), "auto")
    rows = []
    for preset in args.presets:
        hub, models = hb.preset_models(args.cache, preset)
        attempts = []
        for attempt in range(args.hsf_runs or args.runs):
            print(f"HSF {hb.HSF_VERSION} {preset} run {attempt + 1} ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            run = hb.run_hsf(preset, hub, models, options, root, attempt)
            print(json.dumps({k: run[k] for k in ("wall", "peak_rss_gib", "exit", "error")}),
                  file=sys.stderr, flush=True)  # fmt: skip
            attempts.append(run)
            if run["error"]:
                break
        rows.append(hb.summarise(attempts))
    return versions, rows


def markdown(machine: list[str], runs: list[dict], skipped: list[str], tables: list[dict],
             forward: dict, prepared: dict, hsf: tuple | None,
             args: argparse.Namespace) -> str:  # fmt: skip
    lines = ["## Participant-level benchmark", "", *machine, ""]
    head = f"`{args.participant}` `{args.session or ''}`".replace(" ``", "")
    lines.append(
        f"Participant runs of {head} of `{args.bids_dir.name}`, a fresh process and "
        f"work folder each, `--nprocs {args.nprocs}`, {args.runs} run(s) per row: the "
        "run of median total time, its seconds per stage (wall), the range of the "
        "totals and the highest peak RSS."
    )
    lines.append("")
    hsf_rows = {row["preset"]: row for row in (hsf[1] if hsf else [])}
    header = ["preset", "engine", "runs", "total (s)", "range (s)", "HSF 1.2.3 / this",
              *[c for c, _ in COLUMNS], "peak RSS (GiB)"]  # fmt: skip
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for run in runs:
        preset, engine = run["preset"], run["engine"]
        if "stages" not in run:
            lines.append(f"| {preset} | {engine} | failed (exit {run['exit']}): "
                         f"{' '.join(run.get('error', []))} |")  # fmt: skip
            continue
        cells = [f"{run['stages'][key]:.2f}" for _, key in COLUMNS]
        spread = f"{run['wall_min']:.1f}-{run['wall_max']:.1f}"
        ref = hsf_rows.get(preset)
        ratio = f"{ref['wall_median'] / run['wall']:.2f}x" if ref and not ref["error"] else "n/a"
        lines.append(f"| {preset} | {run.get('plan', engine)} | {run['runs']} | {run['wall']:.1f}"
                     f" | {spread} | {ratio} | " + " | ".join(cells)
                     + f" | {run['peak_rss_gib']:.2f} |")  # fmt: skip
    if hsf:
        versions, rows = hsf
        lines += ["", "HSF 1.2.3 on the same head and models, right after (`hsf_baseline.py`; "
                  + ", ".join(f"{k} {versions.get(k)}" for k in ("hsf", "onnxruntime", "torch"))
                  + "):", ""]  # fmt: skip
        for row in rows:
            if row["error"]:
                lines.append(f"- {row['preset']}: failed: {row['error']}")
                continue
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in row["phases"].items())
            lines.append(f"- {row['preset']}: {row['wall_median']:.1f} s "
                         f"({row['wall_min']:.1f}-{row['wall_max']:.1f}, {row['runs']} runs), "
                         f"peak {row['peak_rss_gib']:.2f} GiB; {phases}")  # fmt: skip
    marked = [run for run in runs if run.get("memory")]
    if marked:
        lines += ["", "Memory high-water mark of the process at the end of each stage (MiB, "
                  "same runs; every stage of one subject runs in that process):", ""]  # fmt: skip
        for run in marked:
            marks = ", ".join(f"{stage} {mib:.0f}" for stage, mib in run["memory"].items())
            lines.append(f"- {run['preset']} {run['engine']}: {marks}")
    for reason in skipped:
        lines.append(f"\nNot run: {reason}")
    if prepared:
        lines += ["", "Prepared once before the timed runs (as a user does once per machine):"]
        if "quantize_s" in prepared:
            lines.append(f"- int8 versions of the {prepared['models']} ARUNets "
                         f"(`hsf-bids-models quantize`): {prepared['quantized']} made in "
                         f"{prepared['quantize_s']:.0f} s")  # fmt: skip
        if "compile_s" in prepared:
            lines.append(f"- OpenVINO compilations of the models for the engines run, cached on "
                         f"disk: {prepared['compile_s']:.0f} s")  # fmt: skip
        if "gate_s" in prepared:
            lines.append(f"- the gate's measurements behind `auto` (the first `auto` run on a "
                         f"machine): {prepared['gate_s']:.0f} s; auto runs: "
                         f"{', '.join(prepared['plan'])}")  # fmt: skip
    if forward:
        lines += [
            "",
            "One bare forward pass of the random ARUNet (seed 0), "
            f"`[1, 1, {', '.join(map(str, args.shape))}]`, median of {args.repeat}:",
            "",
        ]
        lines += [f"- {engine}: {seconds:.3f} s" for engine, seconds in forward.items()]
    for table in tables:
        lines += ["", f"Agreement with onnxruntime fp32, {table['title']}: lowest Dice per "
                  "structure and contrast of the fused labels (original + 2 augmentations per "
                  "crop, HSF's vote), seconds per pass on those crops:", ""]  # fmt: skip
        lines.append(
            "| model | choice | lowest Dice | passes 0.98 | s per pass | "
            "onnxruntime fp32 s per pass | per contrast |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for a in table["agreements"]:
            per = "; ".join(
                f"{contrast}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items() if v is not None)
                for contrast, d in a.dice.items()
            )
            lines.append(f"| {a.model} | {a.choice} | {a.min_dice:.4f} | "
                         f"{'yes' if a.passed else 'no'} | {a.seconds_per_pass:.3f} | "
                         f"{a.reference_seconds_per_pass:.3f} | {per} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids-dir", type=Path, default=SHARED / "data" / "bids" / "ds-mini")
    parser.add_argument("--participant", default="04")
    parser.add_argument("--session", default="01", help="empty for every session")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS),
                        default=["single_fast", "bagging_accurate"])  # fmt: skip
    parser.add_argument("--engine", nargs="+",
                        help="engine or engine/precision to run, e.g. auto openvino/int8 "
                        "(default: all here)")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nprocs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hsf_bench")
    parser.add_argument(
        "--models-dir", type=Path, help="models folder of the runs (default: <cache>/models)"
    )
    parser.add_argument("--work", type=Path, help="runs' folders (default: a temporary one)")
    parser.add_argument("--demo-models", type=Path, default=SHARED / "models" / "demo")
    parser.add_argument("--agreement-images", nargs="+",
                        default=["sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz",
                                 "sub-02/anat/sub-02_T2w.nii.gz"])  # fmt: skip
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[48, 56, 56],
        help="bare forward-pass crop (default: sub-04's padded 40x53x53 box)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="bare forward passes per engine")
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="participant runs per preset and engine (the median is shown)",
    )
    parser.add_argument(
        "--hsf",
        action="store_true",
        help="also run HSF 1.2.3 on the same presets (hsf_baseline.py)",
    )
    parser.add_argument("--hsf-runs", type=int, help="HSF runs per preset (default: --runs)")
    parser.add_argument("--no-agreement", action="store_true")
    parser.add_argument("--agreement-only", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="single_fast with auto and onnxruntime fp32, one run, no tables",
    )
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models_dir = (args.models_dir or args.cache / "models").absolute()
    # Before templateflow is imported (the gate registers nothing, but reads the templates).
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(SHARED / "data" / "templateflow"))
    if args.quick:
        args.presets, args.engine, args.runs = ["single_fast"], ["auto", "onnxruntime/fp32"], 1
        args.no_agreement, args.repeat = True, 1

    configs, skipped = [], []
    for engine, precision, _ in CONFIGS:
        if args.engine and engine not in args.engine and f"{engine}/{precision}" not in args.engine:
            continue
        why = engine_status(engine, precision, args.device)
        if why:
            skipped.append(f"{engine} {precision} on {args.device}: {why}")
        else:
            configs.append((engine, precision, args.device))

    if args.prepare_only:
        print(json.dumps(prepare(args, configs)))
        return 0
    root = args.work or Path(tempfile.mkdtemp(prefix="hsf_bench_runs_"))
    root.mkdir(parents=True, exist_ok=True)
    runs, forward, prepared, hsf = [], {}, {}, None
    if not args.agreement_only:
        # In a child: a run's ru_maxrss starts from its parent's resident size at fork time
        # (the exec'd process inherits it), so this process stays small until the runs are done.
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--prepare-only"]  # fmt: skip
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        prepared = json.loads(done.stdout.strip().splitlines()[-1])
        for preset in args.presets:
            hub = make_hub(args.cache, preset)
            for engine in configs:
                attempts = []
                for attempt in range(args.runs):
                    print(f"{preset} {'/'.join(engine)} run {attempt + 1}/{args.runs} ...",
                          file=sys.stderr, flush=True)  # fmt: skip
                    run = run_participant(hub, *engine, args, root, attempt)
                    print(json.dumps(run), file=sys.stderr, flush=True)
                    attempts.append(run)
                row = median_run(attempts, preset, "/".join(engine))
                if engine[0] == "auto" and "plan" in prepared:
                    n_models = PRESETS[preset][0]
                    row["plan"] = "auto: " + ", ".join(sorted(set(prepared["plan"][:n_models])))
                runs.append(row)
        if args.hsf:
            hsf = hsf_side_by_side(args, root)
        from hsf_bids.hub import xxh3_64_file
        from hsf_bids.quantize import find_int8

        model = make_models(args.cache, 1)[0]
        for engine, precision, _ in configs:
            if engine == "auto":
                continue
            path = model
            if precision == "int8":
                found = find_int8(models_folder(args), model.name, xxh3_64_file(model))
                if found is None:
                    continue
                path = found.xml
            forward[f"{engine}/{precision}"] = bare_forward(
                path, engine, precision, tuple(args.shape), args.nprocs, args.repeat
            )
    tables = [] if args.no_agreement else gate_tables(args)
    text = markdown(machine_description(args.nprocs), runs, skipped, tables, forward, prepared,
                    hsf, args)  # fmt: skip
    print(text)
    if args.output:
        args.output.write_text(text)
    failed = any(run["exit"] != 0 for run in runs) or any(r["error"] for r in (hsf or ({}, []))[1])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
