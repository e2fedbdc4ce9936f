"""Participant-level benchmark: per-stage wall time and peak memory of whole runs, per preset and
engine/precision, plus the agreement of each engine with onnxruntime fp32 and the cost of one bare
forward pass.

Five same-size random ARUNets (seeds 0-4, 37.5 M parameters each, written once into ``--cache``)
make three hub files equivalent to ``bagging_accurate`` (5 models x 21 inputs), ``bagging_fast``
(5 x 1) and ``single_fast`` (1 x 1), with relative URLs and XXH3-64 checksums. Each run is
``python -m hsf_bids <ds-mini> <out> participant --participant-label 04 --session-label 01 --hub
<hub> --engine E --precision P`` in a fresh process with a fresh work folder; wall time is measured
from before the process starts to its exit, peak memory is its ``ru_maxrss`` (``wait4``). Stage
times come from the timing records the run writes into its work folder (``timing.json`` per node,
``timing_<run-id>.json`` for the run's own phases; see :mod:`hsf_bids.stages`).

    python benchmarks/participant.py --output participant.md                    # fast presets
    python benchmarks/participant.py --presets bagging_accurate single_fast      # ~10 min here
    python benchmarks/participant.py --quick                                     # a short check
    python benchmarks/participant.py --agreement-only                            # Dice table only

The agreement table segments the ds-mini heads (``--agreement-images``) with the demo models
(``../shared/models/demo``, or ``--demo-models``) with each engine and with onnxruntime fp32, on
the same crops (boxes from one localisation), and gives the lowest Dice per structure over images
and sides; that is what :data:`hsf_bids.engines.AGREEMENT` records.
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
CONFIGS = [("onnxruntime", "fp32", "cpu"), ("openvino", "fp32", "cpu"), ("openvino", "bf16", "cpu")]
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

    try:
        resolve_engine(engine, device, precision)
    except EngineError as exc:
        return str(exc).split(";")[0]
    return None


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
                        "engine_templates"))  # fmt: skip
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
        "--engine", engine, "--precision", precision, "--device", device,
        "--nprocs", str(args.nprocs), "--omp-nthreads", str(args.nprocs),
    ]  # fmt: skip
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
    """Median seconds of one forward pass of ``model`` on a seeded random ``[1, 1, *shape]``."""
    from hsf_bids.engines import open_session

    session = open_session(model, engine=engine, precision=precision, threads=threads)
    batch = np.random.default_rng(0).standard_normal((1, 1, *shape), dtype=np.float32)
    session.run(batch)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(batch)
        times.append(time.perf_counter() - start)
    session.close()
    return statistics.median(times)


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: range) -> dict[int, float]:
    """Dice of each label between two label maps; NaN where neither has it."""
    out = {}
    for label in labels:
        x, y = a == label, b == label
        total = int(x.sum() + y.sum())
        out[label] = float("nan") if total == 0 else 2.0 * int((x & y).sum()) / total
    return out


def agreement(args: argparse.Namespace, configs: list[tuple[str, str, str]]) -> dict:
    """Lowest Dice per structure of each engine against onnxruntime fp32 (demo models)."""
    from hsf_bids.engines import get_session
    from hsf_bids.image import load_anat, to_ras
    from hsf_bids.locate import SIDES, crop, locate
    from hsf_bids.segment import label_names, segment_crop

    models = sorted(args.demo_models.glob("demo_unet_b*.onnx"))
    names = label_names("1/2/3")
    crops = []
    for rel in args.agreement_images:
        ras, _ = to_ras(load_anat(args.bids_dir / rel))
        contrast = "T2w" if "T2w" in rel else "T1w"
        loc = locate(ras, contrast, seed=42)
        spacing = tuple(float(z) for z in ras.header.get_zooms()[:3])
        for side in SIDES:
            crops.append((f"{Path(rel).name} {side}", crop(np.asarray(ras.dataobj),
                                                           loc.boxes[side]), spacing))
    modes = [False] if args.quick else [False, True]

    def segment(engine: tuple[str, str, str], image, spacing, tta: bool) -> np.ndarray:
        sessions = [get_session(m, engine=engine[0], precision=engine[1], device=engine[2],
                                threads=args.nprocs) for m in models]  # fmt: skip
        return segment_crop([(image, spacing)], sessions, test_time_augmentation=tta,
                            num_augmentations=20, seed=42).labels  # fmt: skip

    reference = ("onnxruntime", "fp32", "cpu")
    ref = {(name, tta): segment(reference, image, spacing, tta)
           for name, image, spacing in crops for tta in modes}  # fmt: skip
    results = {}
    for engine in configs:
        if engine == reference:
            continue
        lowest: dict[str, float] = {}
        for name, image, spacing in crops:
            for tta in modes:
                labels = segment(engine, image, spacing, tta)
                for label, dice in dice_per_label(ref[(name, tta)], labels, range(1, 6)).items():
                    if not np.isnan(dice):
                        key = names[label]
                        lowest[key] = min(lowest.get(key, 1.0), dice)
        results["/".join(engine)] = lowest
    return {"images": [c[0] for c in crops], "tta": modes, "dice": results}


def markdown(machine: list[str], runs: list[dict], skipped: list[str], agree: dict | None,
             forward: dict, args: argparse.Namespace) -> str:  # fmt: skip
    lines = ["## Participant-level benchmark", "", *machine, ""]
    head = f"`{args.participant}` `{args.session or ''}`".replace(" ``", "")
    lines.append(f"Participant runs of {head} of `{args.bids_dir.name}`, a fresh process and "
                 f"work folder each, `--nprocs {args.nprocs}`, {args.runs} run(s) per row: the "
                 "run of median total time, its seconds per stage (wall), the range of the "
                 "totals and the highest peak RSS.")
    lines.append("")
    header = ["preset", "engine", "total (s)", "range (s)", *[c for c, _ in COLUMNS],
              "peak RSS (GiB)"]
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
        lines.append(f"| {preset} | {engine} | {run['wall']:.1f} | {spread} | " + " | ".join(cells)
                     + f" | {run['peak_rss_gib']:.2f} |")  # fmt: skip
    marked = [run for run in runs if run.get("memory")]
    if marked:
        lines += ["", "Memory high-water mark of the process at the end of each stage (MiB, "
                  "same runs; every stage of one subject runs in that process):", ""]  # fmt: skip
        for run in marked:
            marks = ", ".join(f"{stage} {mib:.0f}" for stage, mib in run["memory"].items())
            lines.append(f"- {run['preset']} {run['engine']}: {marks}")
    for reason in skipped:
        lines.append(f"\nNot run: {reason}")
    if forward:
        lines += ["", "One bare forward pass of the random ARUNet (seed 0), "
                  f"`[1, 1, {', '.join(map(str, args.shape))}]`, median:", ""]  # fmt: skip
        lines += [f"- {engine}: {seconds:.2f} s" for engine, seconds in forward.items()]
    if agree:
        lines += ["", "Agreement with onnxruntime fp32 (demo models, lowest Dice per structure "
                  f"over {', '.join(agree['images'])}; TTA {agree['tta']}):", ""]  # fmt: skip
        structures = sorted({s for d in agree["dice"].values() for s in d})
        lines.append("| engine | " + " | ".join(structures) + " |")
        lines.append("|" + "---|" * (len(structures) + 1))
        for engine, dice in agree["dice"].items():
            cells = [f"{dice[s]:.4f}" if s in dice else "n/a" for s in structures]
            lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids-dir", type=Path, default=SHARED / "data" / "bids" / "ds-mini")
    parser.add_argument("--participant", default="04")
    parser.add_argument("--session", default="01", help="empty for every session")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS),
                        default=["bagging_fast", "single_fast"])  # fmt: skip
    parser.add_argument("--engine", nargs="+", help="engines to run (default: all here)")
    parser.add_argument("--precision", nargs="+", help="precisions to run (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nprocs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hsf_bench")
    parser.add_argument("--work", type=Path, help="runs' folders (default: a temporary one)")
    parser.add_argument("--demo-models", type=Path, default=SHARED / "models" / "demo")
    parser.add_argument("--agreement-images", nargs="+",
                        default=["sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz",
                                 "sub-01/anat/sub-01_T1w.nii.gz"])  # fmt: skip
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 56, 56],
                        help="bare forward-pass crop (default: sub-04's padded 40x53x53 box)")
    parser.add_argument("--repeat", type=int, default=3, help="bare forward passes per engine")
    parser.add_argument("--runs", type=int, default=3,
                        help="participant runs per preset and engine (the median is shown)")
    parser.add_argument("--no-agreement", action="store_true")
    parser.add_argument("--agreement-only", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="single_fast, fp32 engines, one agreement image without TTA")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    # Before templateflow is imported (the agreement step registers in this process).
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(SHARED / "data" / "templateflow"))
    if args.quick:
        args.presets = ["single_fast"]
        args.precision = ["fp32"]
        args.agreement_images = args.agreement_images[:1]
        args.repeat = 1

    configs, skipped = [], []
    for engine, precision, _ in CONFIGS:
        if args.engine and engine not in args.engine:
            continue
        if args.precision and precision not in args.precision:
            continue
        why = engine_status(engine, precision, args.device)
        if why:
            skipped.append(f"{engine} {precision} on {args.device}: {why}")
        else:
            configs.append((engine, precision, args.device))

    root = args.work or Path(tempfile.mkdtemp(prefix="hsf_bench_runs_"))
    root.mkdir(parents=True, exist_ok=True)
    runs, forward = [], {}
    if not args.agreement_only:
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
                runs.append(median_run(attempts, preset, "/".join(engine)))
        model = make_models(args.cache, 1)[0]
        for engine in configs:
            forward["/".join(engine)] = bare_forward(
                model, engine[0], engine[1], tuple(args.shape), args.nprocs, args.repeat
            )
    agree = None if args.no_agreement else agreement(args, configs)
    text = markdown(machine_description(args.nprocs), runs, skipped, agree, forward, args)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0 if all(run["exit"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
