"""The BIDS Apps command line: ``hsf-bids bids_dir output_dir {participant,group}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from hsf_bids import __version__
from hsf_bids.config import CONTRAST_CHOICES, DEFAULT_PRESET, ENGINE_CHOICES
from hsf_bids.errors import EX_USAGE
from hsf_bids.vocabulary import CA_MODES, DEVICES, FUSIONS, PRECISIONS

PROG = "hsf-bids"


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; the BIDS Apps spec says 64."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _mem_gb(text: str) -> float:
    """``--mem-gb 8``, also ``8G``/``8GB``/``8000M`` for users of fMRIPrep's ``--mem``."""
    t = text.strip().upper().removesuffix("B")
    scale = 1.0
    if t.endswith("G"):
        t = t[:-1]
    elif t.endswith("M"):
        t, scale = t[:-1], 1 / 1024
    try:
        value = float(t) * scale
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a memory size in GB: {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _ca_mode(text: str) -> str:
    if text not in CA_MODES:
        choices = ", ".join(repr(m) for m in CA_MODES)
        raise argparse.ArgumentTypeError(f"unknown ca mode {text!r} (choose from {choices})")
    return text


def build_parser() -> argparse.ArgumentParser:
    """All options of ``hsf-bids``."""
    p = _Parser(
        prog=PROG,
        description=(
            "Hippocampal subfield segmentation (dentate gyrus, CA1, CA2, CA3, subiculum) of T1w "
            "and "
            "T2w images of a BIDS dataset with the Hippocampal Segmentation Factory models."
        ),
    )
    p.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    p.add_argument(
        "output_dir",
        type=Path,
        help="where derivatives go: a folder outside the input dataset, or "
        "<bids_dir>/derivatives/hsf_bids",
    )
    p.add_argument("analysis_level", help="'participant' or 'group'")
    p.add_argument("--version", action="version", version=f"hsf-bids {__version__}")

    g = p.add_argument_group("selecting data")
    g.add_argument(
        "--participant-label",
        "--participant_label",
        dest="participant_label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="subjects to process, with or without 'sub-' (default: all)",
    )
    g.add_argument(
        "--session-label",
        "--session_label",
        dest="session_label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    g.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help='JSON file of pybids filters per query, e.g. {"t1w": {"acquisition": "mprage"}}',
    )
    g.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        dest="skip_bids_validation",
        action="store_true",
        help="do not run the BIDS validator on the input dataset",
    )
    g.add_argument(
        "--list-participants",
        action="store_true",
        help="print the participants that have an image this run would segment, one per line "
        "(for a scheduler's job array), and exit",
    )
    g.add_argument(
        "--contrast",
        choices=CONTRAST_CHOICES,
        default="both",
        help="images to segment; 'both' segments each T1w with its session's T2w (late fusion) "
        "and every image without a partner alone (default: both)",
    )

    g = p.add_argument_group("models and segmentation")
    g.add_argument(
        "--preset",
        default=None,
        help=f"named model set (see 'hsf-bids-models list'; default {DEFAULT_PRESET})",
    )
    g.add_argument("--hub", type=Path, metavar="FILE", help="a model author's preset YAML file")
    g.add_argument(
        "--models-dir",
        type=Path,
        metavar="DIR",
        help="models folder (default: $HSF_BIDS_MODELS_DIR, else the user cache folder)",
    )
    g.add_argument(
        "--offline",
        action="store_true",
        help="never use the network; a model file missing from the models folder is an error",
    )
    g.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="auto",
        help="inference engine; auto picks, per model, the fastest engine and precision whose "
        "fused labels agree with onnxruntime fp32 (Dice >= 0.98 per structure, measured once "
        "per model, engine version and CPU; default: auto)",
    )
    g.add_argument(
        "--device", choices=DEVICES, default="cpu", help="where the models run (default: cpu)"
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="numeric precision (default: auto's choice, or the engine's fastest here); bf16 "
        "needs a CPU with AMX or AVX512-BF16; int8 runs the models' int8 versions (OpenVINO; "
        "made by hsf-bids-models quantize)",
    )
    g.add_argument(
        "--ca-mode",
        type=_ca_mode,
        default=None,
        metavar="MODE",
        help="merge CA fields before the vote: '1/2/3' (none), '1/23', '123', or '' (whole "
        "hippocampus); default: the preset's",
    )
    g.add_argument(
        "--fusion",
        choices=FUSIONS,
        default="vote",
        help="vote: HSF's plurality vote of every prediction; mean: argmax of the mean "
        "probability (default: vote)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=42,
        help="seed of registration and augmentation: the same seed and settings give "
        "byte-identical outputs (default: 42)",
    )
    g.add_argument(
        "--margin",
        type=int,
        nargs=3,
        metavar=("LR", "PA", "IS"),
        help="box margin in voxels around each hippocampus (default: HSF's, from the voxel size)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        help="augmented copies sent to the engine at once; memory grows with it, results do "
        "not change (default: 1 on the CPU, 4 on a GPU)",
    )

    g = p.add_argument_group("resources and workflow")
    g.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="Nipype working folder (default: <output_dir>/../work/hsf_bids; in a "
        "SLURM task, $SLURM_TMPDIR/hsf_bids or $TMPDIR/hsf_bids when set)",
    )
    g.add_argument(
        "--nprocs",
        "--n-cpus",
        "--n_cpus",
        dest="nprocs",
        type=_positive_int,
        default=None,
        help="CPUs for the whole run (default: $SLURM_CPUS_PER_TASK in a SLURM task, else the "
        "CPUs this process may run on)",
    )
    g.add_argument(
        "--omp-nthreads",
        type=_positive_int,
        default=None,
        help="threads of each inference process (default: min(nprocs, 8)); registration runs "
        "on one thread so that results are reproducible",
    )
    g.add_argument(
        "--mem-gb",
        "--mem",
        dest="mem_gb",
        type=_mem_gb,
        default=None,
        metavar="GB",
        help="memory limit for the scheduler, in GB (default: the SLURM task's --mem, else none)",
    )
    g.add_argument(
        "--use-plugin",
        type=Path,
        metavar="FILE",
        help="Nipype plugin YAML (e.g. 'plugin: MultiProc' / 'Linear' with 'plugin_args')",
    )
    g.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        help="stop the whole run at the first failure instead of carrying on with other subjects",
    )
    g.add_argument(
        "--write-graph", action="store_true", help="write the workflow graph (SVG, needs graphviz)"
    )
    g.add_argument(
        "--reports-only",
        action="store_true",
        help="write the QC reports (sub-XX.html, CITATION.md) again from the outputs already in "
        "output_dir, without segmenting anything",
    )
    g.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0, help="-v, -vv")
    return p
