"""HSF 1.2.3 side by side: wall time and peak memory of the original Hippocampal Segmentation
Factory on the head and random-weight models of :mod:`participant`, as a baseline for its table.

HSF 1.2.3 is installed from PyPI into its own virtual environment (``--venv``, created on first
use with the base interpreter of the running Python, ``--python``): ``hsf==1.2.3`` with the pins
it declares (antspyx ~0.5, torchio ~0.20, hydra-core ~1.3, xxhash ~3.2, roiloc), plus what it
imports without declaring: ``onnxruntime`` (pinned to the version of the running environment, so
both sides use the same runtime) and ``torch`` (through torchio; a CPU-only wheel when pip's
``find-links`` holds one for this Python, else PyPI's default wheel with its CUDA libraries;
``--torch-spec`` chooses). The installed versions are printed and go into the table's heading.

Each run is one fresh process, ``<venv>/bin/python driver.py <Hydra overrides>``: a small driver
(written into the run's folder) that calls ``hsf.factory.main``, HSF's Hydra entry point, instead
of the ``hsf`` console script, whose banner queries PyPI and GitHub. The driver installs an audit
hook that makes any socket connection or name look-up fail loudly, so nothing reaches the network,
and wraps ``InferenceEngine.set_ort_engine`` to print the execution providers of each
onnxruntime session HSF opens (HSF itself prints nothing about its engine). Per run, a fresh
folder holds a private copy of the head (HSF writes its outputs next to its input), a models
folder with symbolic links to only the preset's models (HSF runs every ``*.onnx`` of the folder),
and a Hydra config group ``segmentation/hsf_baseline.yaml`` (added with ``hydra.searchpath``)
equivalent to the preset's hub file from :func:`participant.make_hub`: the same models and
XXH3-64 checksums (checked here before the run, so HSF finds its models up to date and downloads
nothing), ``ca_mode``, ``test_time_augmentation`` and ``test_time_num_aug``. Other overrides:
``roiloc=default_t2iso`` with ``roiloc.contrast=t1`` (``t2`` for a T2w head) and
``roiloc.margin=[8,8,8]`` (``--margin``; the app's automatic margin for 1 mm voxels), onnxruntime
on ``CPUExecutionProvider`` only (HSF's default asks for CUDA first), batch size 1,
``hydra.run.dir`` inside the run's folder (HSF changes its working directory there). The
environment (thread variables included) is passed on as it is, less ``PYTHONPATH``.

    python benchmarks/hsf_baseline.py --presets single_fast --runs 1          # ~half a minute
    python benchmarks/hsf_baseline.py --presets single_fast bagging_fast --output hsf123.md
    python benchmarks/hsf_baseline.py --install-only                           # the venv only

Measured: wall time from before the process starts to its exit (imports, registration, crops,
inference, inversion and writing included), and its peak RSS (``ru_maxrss`` from ``wait4``), as
``run_participant`` in :mod:`participant` does; the median of ``--runs`` runs with their range,
and the highest peak RSS. A run counts only when HSF wrote both native-space segmentations
(``<stem>_{right,left}_hippocampus_seg.nii.gz`` next to the input, on the input's grid); the
script exits non-zero, naming the run's log, when it did not. The files HSF wrote are listed
under the table. The run of median wall time is split into phases from the time stamps of HSF's
log (see :func:`hsf_phases`): start-up, registration, segmentation (both sides), other. Run
folders (logs, Hydra's ``.hydra/config.yaml``, HSF's outputs) are kept under ``--work``.

What HSF does differently from the app (its quirks, see ``../shared/docs/hsf-contract.md``): it
uses onnxruntime's default thread count (all physical cores) and ITK's and torch's defaults, with
no option to set them; it loads every model again for each hemisphere (2 x models sessions per
head); it registers the full-resolution head (``AffineFast``, 1 mm here); it writes crops,
cropped segmentations (and, with several predictions, uncertainty maps) to ``hsf_outputs/`` next
to the input and the native segmentations beside the input, not BIDS derivatives; its augmented
copies are not seeded (the ``*_accurate`` presets are not reproducible run to run), made in a
pool of as many threads as augmentations, inverted with nearest-neighbour resampling, and all
soft predictions are held in memory. It hashes every model at each start (4 KiB reads).
``*_fast`` presets run exactly one input per model, as in the app.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_pass import machine_description  # noqa: E402
from participant import PRESETS, SHARED, make_hub, timed_process  # noqa: E402

from hsf_bids.hub import xxh3_64_file  # noqa: E402

HSF_VERSION = "1.2.3"
DEFAULT_VENV = Path(tempfile.gettempdir()) / "hsf123-venv"
DEFAULT_HEAD = SHARED / "data" / "bids" / "ds-mini" / "sub-04" / "ses-01" / "anat"
DEFAULT_HEAD = DEFAULT_HEAD / "sub-04_ses-01_T1w.nii.gz"
REPORTED = ("hsf", "torch", "torchio", "onnxruntime", "antspyx", "roiloc", "hydra-core", "numpy")
MARKER = "HSF_BASELINE_SESSION "
SIDES = ("right", "left")
# HSF's log lines, as Hydra's job logging formats them: [date time,ms][logger][LEVEL] - message
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[\w.]+\]\[\w+\] - (.*)$")
COLUMNS = [  # (column, key of hsf_phases)
    ("start-up", "startup"),
    ("registration", "registration"),
    ("segmentation", "segmentation"),
    ("other", "other"),
]

# Written into each run's folder and run with the HSF venv's Python; not part of HSF.
DRIVER = '''"""Run HSF 1.2.3's Hydra entry point (hsf.factory.main) offline with these overrides."""
import json
import sys

BLOCKED = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr")


def no_network(event, args):
    if event in BLOCKED:
        raise RuntimeError(f"hsf_baseline: network access attempted: {event} {args!r:.200}")


sys.addaudithook(no_network)

from hsf import engines, factory  # noqa: E402

original = engines.InferenceEngine.set_ort_engine


def reporting_set_ort_engine(self, model):
    original(self, model)
    record = {"model": model.name, "providers": self.engine.get_providers()}
    print("MARKER" + json.dumps(record), flush=True)


engines.InferenceEngine.set_ort_engine = reporting_set_ort_engine
factory.main()
'''.replace("MARKER", MARKER)


def base_python() -> Path:
    """The interpreter that the running virtual environment was made from (else this one)."""
    if sys.prefix != sys.base_prefix:
        return Path(getattr(sys, "_base_executable", "") or Path(sys.base_prefix) / "bin/python3")
    return Path(sys.executable)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_versions(venv: Path) -> dict[str, str | None]:
    """Versions of ``REPORTED`` in the venv (None: not installed), and its Python's."""
    code = (
        "import importlib.metadata as m, json, platform\n"
        f"names = {list(REPORTED)!r}\n"
        "out = {'python': platform.python_version()}\n"
        "for n in names:\n"
        "    try:\n"
        "        out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


def find_links(python: Path) -> list[Path]:
    """Local folders that pip's ``find-links`` (environment or configuration) names."""
    values = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        res = subprocess.run([str(python), "-m", "pip", "config", "list"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        for line in res.stdout.splitlines():
            key, _, value = line.partition("=")
            if key.strip().endswith("find-links"):
                values += value.strip().strip("'\"").split()
    except (OSError, subprocess.CalledProcessError):
        pass
    folders = [Path(v.removeprefix("file://")) for v in values if "://" not in v
               or v.startswith("file://")]  # fmt: skip
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


def torch_requirement(python: Path, spec: str, version: str) -> str:
    """``spec``, or for ``auto`` a CPU-only torch wheel that pip can find locally for Python
    ``version`` (``3.11.7``), else ``torch``."""
    if spec != "auto":
        return spec
    tag = "cp" + "".join(version.split(".")[:2])
    pattern = re.compile(rf"torch-([^-]+\+cpu)-{tag}-{tag}-.*{platform.machine()}\.whl$")
    for folder in find_links(python):
        versions = sorted(m.group(1) for p in folder.iterdir() if (m := pattern.match(p.name)))
        if versions:
            return f"torch=={versions[-1]}"
    return "torch"


def ensure_venv(venv: Path, python: Path, torch_spec: str) -> dict[str, str | None]:
    """Create ``venv`` with HSF 1.2.3 and its run-time needs unless it has them; their versions."""
    if not venv_python(venv).exists():
        print(f"creating {venv} with {python} ...", file=sys.stderr, flush=True)
        subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    versions = installed_versions(venv)
    if versions["hsf"] == HSF_VERSION and versions["onnxruntime"] and versions["torch"]:
        return versions
    try:
        onnxruntime = f"onnxruntime=={importlib.metadata.version('onnxruntime')}"
    except importlib.metadata.PackageNotFoundError:
        onnxruntime = "onnxruntime"
    torch = torch_requirement(python, torch_spec, str(versions["python"]))
    requirements = [f"hsf=={HSF_VERSION}", onnxruntime, torch]
    print(f"installing {' '.join(requirements)} into {venv} ...", file=sys.stderr, flush=True)
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", *requirements], check=True)
    versions = installed_versions(venv)
    if versions["hsf"] != HSF_VERSION:
        raise SystemExit(f"error: {venv} has hsf {versions['hsf']}, not {HSF_VERSION}")
    return versions


def preset_models(cache: Path, preset: str) -> tuple[dict, dict[str, Path]]:
    """The preset's hub (:func:`participant.make_hub`, which builds missing models) and its
    model files by name, their checksums checked."""
    import yaml

    hub_path = make_hub(cache, preset)
    hub = yaml.safe_load(hub_path.read_text())
    paths = {}
    for name, entry in hub["models"].items():
        path = (hub_path.parent / entry["url"]).resolve()
        if not path.is_file() or xxh3_64_file(path) != entry["xxh3_64"]:
            raise SystemExit(f"error: {path} does not match the checksum in {hub_path}")
        paths[name] = path
    return hub, paths


def quote(value: str) -> str:
    """A Hydra override value quoted as a string."""
    return "'" + value.replace("'", "\\'") + "'"


def hsf_stem(name: str) -> str:
    """The stem HSF gives a file name (every suffix removed, as ``"".join(Path.suffixes)``)."""
    return name.replace("".join(Path(name).suffixes), "")


def prepare_run(folder: Path, head: Path, hub: dict, models: dict[str, Path],
                margin: list[int]) -> list[str]:  # fmt: skip
    """Fill a fresh run folder (input copy, models, config group); HSF's Hydra overrides."""
    import yaml

    inputs, model_dir, group = folder / "input", folder / "models", folder / "conf" / "segmentation"
    for path in (inputs, model_dir, group):
        path.mkdir(parents=True)
    shutil.copy2(head, inputs / head.name)
    for name, model in models.items():
        (model_dir / name).symlink_to(model)
    segmentation = {
        "ca_mode": str(hub.get("ca_mode", "1/2/3")),
        "models_path": str(model_dir),
        "models": {
            name: {"url": str(entry["url"]), "xxh3_64": str(entry["xxh3_64"])}
            for name, entry in hub["models"].items()
        },  # fmt: skip
        "segmentation": dict(hub["segmentation"]),
    }
    (group / "hsf_baseline.yaml").write_text(yaml.safe_dump(segmentation, sort_keys=False))
    (folder / "driver.py").write_text(DRIVER)
    contrast = "t2" if "T2w" in head.name else "t1"
    return [
        f"files.path={quote(str(inputs))}",
        f"files.pattern={quote(head.name)}",
        "files.overwrite=true",
        "roiloc=default_t2iso",
        f"roiloc.contrast={contrast}",
        f"roiloc.margin=[{','.join(str(m) for m in margin)}]",
        "segmentation=hsf_baseline",
        "hardware=onnxruntime",
        "hardware.engine_settings.execution_providers=[CPUExecutionProvider]",
        "hardware.engine_settings.batch_size=1",
        f"hydra.run.dir={quote(str(folder / 'hydra'))}",
        f"hydra.searchpath=[{quote('file://' + str(folder / 'conf'))}]",
    ]


def check_outputs(folder: Path, head: Path) -> tuple[list[str], str | None]:
    """The files HSF wrote (relative to the input folder) and what is missing or wrong, if any."""
    import nibabel as nib

    inputs = folder / "input"
    written = sorted(str(p.relative_to(inputs)) for p in inputs.rglob("*")
                     if p.is_file() and p.name != head.name)  # fmt: skip
    shape = nib.load(head).shape[:3]
    problems = []
    for side in SIDES:
        path = inputs / f"{hsf_stem(head.name)}_{side}_hippocampus_seg.nii.gz"
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"no {path.name}")
        elif nib.load(path).shape[:3] != shape:
            problems.append(f"{path.name} has shape {nib.load(path).shape}, the input {shape}")
    return written, "; ".join(problems) or None


def run_hsf(preset: str, hub: dict, models: dict[str, Path], args: argparse.Namespace,
            root: Path, attempt: int) -> dict:  # fmt: skip
    """One HSF run in a fresh process and folder: wall time, peak RSS, engine, outputs."""
    folder = Path(tempfile.mkdtemp(prefix=f"{preset}_{attempt}_", dir=root))
    overrides = prepare_run(folder, args.head, hub, models, args.margin)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(args.venv)
    log_path = folder / "hsf.log"
    cmd = [str(venv_python(args.venv)), str(folder / "driver.py"), *overrides]
    (folder / "command.json").write_text(json.dumps(cmd, indent=1))
    timed = timed_process(cmd, log_path, env, folder)
    started, wall, code = timed["started"], timed["wall"], timed["exit"]
    text = log_path.read_text(errors="replace")
    sessions = [json.loads(line.split(MARKER, 1)[1]) for line in text.splitlines()
                if MARKER in line]  # fmt: skip
    written, problem = check_outputs(folder, args.head)
    if code != 0:
        tail = [line for line in text.strip().splitlines() if line.strip()][-3:]
        problem = f"exit {code}: " + " / ".join(t.strip() for t in tail)
    return {"preset": preset, "wall": wall, "peak_rss_gib": timed["peak_rss_gib"],
            "exit": code, "log": str(log_path), "sessions": sessions, "outputs": written,
            "error": problem, "phases": hsf_phases(text, started, wall)}  # fmt: skip


def hsf_phases(text: str, started: float, wall: float) -> dict[str, float]:
    """Seconds per phase from the time stamps of HSF's log (millisecond resolution).

    ``startup``: process start to HSF's first message (interpreter, imports, Hydra, HSF hashing
    the models); ``registration``: ROILoc (ANTs ``AffineFast`` of the whole head, atlas warp,
    crops); ``segmentation``: both sides, each from its first message to its native-space
    segmentation written (model loading, preprocessing, inference, inversion, writing);
    ``other``: the rest of the wall time (mostly interpreter exit). Empty when the log does not
    have these messages.
    """
    events = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            events.append((stamp.timestamp(), match.group(2)))
    side_starts = [t for t, m in events if re.match(r"Subject \d+/\d+, side \d+/2", m)]
    side_ends = [t for t, m in events if m.startswith("Saved segmentation in native space")]
    located = [t for t, m in events if m.startswith("Started locating")]
    saved = [t for t, m in events if m.startswith("Saving left and right hippocampi")]
    if not (events and located and saved and side_starts
            and len(side_starts) == len(side_ends)):  # fmt: skip
        return {}
    out = {
        "startup": events[0][0] - started,
        "registration": saved[0] - located[0],
        "segmentation": sum(end - begin for begin, end in zip(side_starts, side_ends, strict=True)),
    }
    out["other"] = wall - sum(out.values())
    return out


def engine_cell(run: dict) -> str:
    providers = sorted({"/".join(s["providers"]) for s in run["sessions"]})
    if not providers:
        return "unknown (no session reported)"
    return f"onnxruntime [{', '.join(providers)}], {len(run['sessions'])} sessions"


def summarise(attempts: list[dict]) -> dict:
    """The run of median wall time (a failed run if any), the range and the highest peak RSS."""
    failed = [run for run in attempts if run["error"]]
    ranked = sorted(attempts, key=lambda r: r["wall"])
    run = dict(failed[0] if failed else ranked[(len(ranked) - 1) // 2])
    walls = [r["wall"] for r in attempts]
    run.update(runs=len(attempts), wall_min=min(walls), wall_max=max(walls),
               wall_median=statistics.median(walls),
               peak_rss_gib=max(r["peak_rss_gib"] for r in attempts))  # fmt: skip
    return run


def markdown(machine: list[str], versions: dict, rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"## HSF {HSF_VERSION} baseline", "", *machine]
    lines.append("- HSF venv: " + ", ".join(f"{k} {versions.get(k)}" for k in ("python",
                 *REPORTED)))  # fmt: skip
    lines.append("")
    lines.append(f"HSF {HSF_VERSION} (`hsf.factory.main` with Hydra overrides, offline) on "
                 f"`{args.head.name}` with the random ARUNets of the app's benchmark, a fresh "
                 f"process and folder each, {args.runs} run(s) per row: median wall time from "
                 "process start to exit, the range, and the highest peak RSS.")  # fmt: skip
    lines.append("")
    header = ["preset", "models x inputs", f"HSF {HSF_VERSION} wall (s)", "range (s)",
              *[f"{c} (s)" for c, _ in COLUMNS], "peak RSS (GiB)", "engine"]  # fmt: skip
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for run in rows:
        n_models, tta = PRESETS[run["preset"]]
        shape = f"{n_models} x {21 if tta else 1}"
        if run["error"]:
            error = run["error"].replace("|", "/")
            lines.append(f"| {run['preset']} | {shape} | failed: {error} |")
            continue
        phases = [f"{run['phases'][k]:.2f}" if k in run["phases"] else "n/a" for _, k in COLUMNS]
        lines.append(f"| {run['preset']} | {shape} | {run['wall_median']:.1f} | "
                     f"{run['wall_min']:.1f}-{run['wall_max']:.1f} | " + " | ".join(phases)
                     + f" | {run['peak_rss_gib']:.2f} | {engine_cell(run)} |")  # fmt: skip
    lines.append("")
    lines.append(
        "Phases (of the run of median wall time) from the time stamps of HSF's log: "
        "start-up = process start to HSF's first message (imports, Hydra, HSF hashing "
        "the models); registration = ROILoc (ANTs `AffineFast` of the whole head, "
        "atlas warp, crops); segmentation = both sides (model loading, each side "
        "again, preprocessing, inference, inversion, writing); other = the rest."
    )
    lines.append("")
    for run in rows:
        written = ", ".join(f"`{o}`" for o in run["outputs"]) or "nothing"
        lines.append(f"- {run['preset']}: HSF wrote {written} (log `{run['log']}`)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["single_fast"])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument(
        "--python",
        type=Path,
        default=base_python(),
        help="interpreter that creates the venv (default: %(default)s)",
    )
    parser.add_argument("--torch-spec", default="auto",
                        help="pip requirement for torch (default: a local CPU-only wheel, if "
                        "pip's find-links has one for this Python, else 'torch')")  # fmt: skip
    parser.add_argument("--install-only", action="store_true")
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD)
    parser.add_argument("--margin", type=int, nargs=3, default=[8, 8, 8])
    parser.add_argument("--runs", type=int, default=3, help="runs per preset (median shown)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hsf_bench")
    parser.add_argument("--work", type=Path, help="runs' folders (default: a temporary one)")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    args.venv, args.head = args.venv.absolute(), args.head.resolve()

    versions = ensure_venv(args.venv, args.python, args.torch_spec)
    print("HSF venv: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    if args.install_only:
        return 0

    root = args.work or Path(tempfile.mkdtemp(prefix="hsf_baseline_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"runs in {root}", file=sys.stderr, flush=True)
    rows = []
    for preset in args.presets:
        hub, models = preset_models(args.cache, preset)
        attempts = []
        for attempt in range(args.runs):
            print(f"HSF {HSF_VERSION} {preset} run {attempt + 1}/{args.runs} ...",
                  file=sys.stderr, flush=True)  # fmt: skip
            run = run_hsf(preset, hub, models, args, root, attempt)
            keys = ("wall", "peak_rss_gib", "exit", "error", "phases")
            print(json.dumps({k: run[k] for k in keys}), file=sys.stderr, flush=True)
            attempts.append(run)
            if run["error"]:
                print(f"error: HSF {HSF_VERSION} {preset} did not produce its segmentations "
                      f"({run['error']}); see {run['log']}", file=sys.stderr)  # fmt: skip
                break
        rows.append(summarise(attempts))
    threads = len(os.sched_getaffinity(0))
    text = markdown(machine_description(threads), versions, rows, args)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 1 if any(run["error"] for run in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
