"""``hsf-bids-models``: list, fetch and verify the model files of presets and hub files; make
their int8 versions (``quantize``) and measure the agreement gate (``check``).

Results go to standard output; errors, one line each, to the console channel of
:mod:`hsf_bids.cli.messages`. Exit codes (:mod:`hsf_bids.errors`): 0 success; 1 a checksum
mismatch (or, for ``verify`` of one preset, a missing file); 64 usage error (bad option, unknown
preset); 65 invalid hub file; 66 hub file or one of its local model files missing; 74 network or
I/O error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hsf_bids import errors as ex
from hsf_bids.cli.messages import setup_console
from hsf_bids.hub.cache import (
    MODELS_DIR_ENV,
    FileState,
    ensure_models,
    fetch_command,
    resolve_models_dir,
    verify_models,
)
from hsf_bids.hub.download import ChecksumError
from hsf_bids.hub.presets import (
    DEFAULT_PRESET,
    Preset,
    list_presets,
    load_hub,
    load_preset,
)

PROG = "hsf-bids-models"
# For this command a model file is what it verifies: a wrong checksum is a failed verification,
# as for ``verify`` (the participant level, which reads the models as input data, says 65).
EX_CHECKSUM = ex.EX_FAILURE

LOGGER = logging.getLogger("hsf_bids.hub.cli")  # not __name__: also run as __main__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own channel, as ``hsf-bids``'s parser: one line (no usage), exit code 64
        self.exit(ex.EX_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands list, fetch, verify)."""
    parser = _Parser(
        prog=PROG,
        description="List, download and verify the model files of hsf_bids presets and hub files.",
        epilog=(
            f"Models folder: --models-dir, else ${MODELS_DIR_ENV}, else the per-user cache "
            "folder. Exit codes: 0 ok, 1 checksum mismatch/missing file, 64 usage error, "
            "65 invalid hub file, 66 hub file missing, 74 network or I/O error."
        ),
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{list,fetch,verify,quantize,check}", parser_class=_Parser
    )
    sub.required = True
    helps = {
        "list": "show presets, their model files, checksums and cache state (no network)",
        "fetch": "download the missing or corrupt model files",
        "verify": "re-hash the cached model files",
        "quantize": "write int8 versions of the models (OpenVINO, NNCF post-training "
        "quantisation on the template's hippocampus crops) and measure their agreement",
        "check": "measure each engine and precision against onnxruntime fp32 on the fused "
        "labels (the gate of engine auto), on the template's crops or on your images",
    }
    for name, help_text in helps.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        choice = cmd.add_mutually_exclusive_group()
        choice.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(list_presets())}")
        choice.add_argument("--hub", metavar="FILE", type=Path, help="a hub YAML file")
        choice.add_argument("--all", action="store_true", help="every shipped preset")
        cmd.add_argument(
            "--models-dir", metavar="DIR", type=Path, help="the models folder (see below)"
        )
        if name == "fetch":
            cmd.add_argument(
                "--no-progress", action="store_true", help="no progress bar (default: on a TTY)"
            )
        if name in ("quantize", "check"):
            cmd.add_argument(
                "--threads", type=int, metavar="N", help="CPU threads (default: all available)"
            )
            cmd.add_argument(
                "--offline", action="store_true", help="never download a missing model file"
            )
        if name == "quantize":
            cmd.add_argument(
                "--force", action="store_true", help="quantise again even when up to date"
            )
            cmd.add_argument(
                "--no-check", action="store_true", help="do not measure the agreement gate"
            )
            cmd.add_argument(
                "--remove-failing", action="store_true",
                help="remove the int8 version of a model whose int8 fails the gate here "
                "(container builds keep only int8 versions that passed)",
            )  # fmt: skip
        if name == "check":
            cmd.add_argument(
                "--images", nargs="+", type=Path, metavar="NIFTI",
                help="measure on both hippocampi of these images (localised as the participant "
                "level does; contrast from the BIDS suffix _T1w/_T2w) instead of the template's "
                "crops; such results are printed, not cached",
            )  # fmt: skip
            cmd.add_argument(
                "--precision", choices=("fp32", "bf16", "int8"), help="only this precision"
            )
        if name != "list":
            cmd.epilog = (
                f"Without --preset, --hub or --all: the default preset {DEFAULT_PRESET}."
                + (
                    " With --all, missing files are reported but only corrupt ones fail."
                    if name == "verify"
                    else ""
                )
            )
    return parser


def _selected(args: argparse.Namespace, default_all: bool) -> list[Preset]:
    if args.hub is not None:
        return [load_hub(args.hub)]
    if args.preset is not None:
        return [load_preset(args.preset)]
    if getattr(args, "all", False) or default_all:
        return [load_preset(name) for name in list_presets()]
    return [load_preset(DEFAULT_PRESET)]


def _size(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / 1e6:.1f} MB ({size} bytes)"


def _cmd_list(args: argparse.Namespace, models_dir: Path) -> int:
    presets = _selected(args, default_all=True)
    print(f"models folder: {models_dir}")
    for preset in presets:
        tta = (
            f"TTA on, {preset.test_time_num_aug} augmentations"
            if preset.test_time_augmentation
            else "TTA off"
        )
        label = preset.name if preset.builtin else f"{preset.name} (hub file {preset.source})"
        print()
        print(label)
        print(
            f"  version {preset.version or '-'}, ca_mode {preset.ca_mode!r}, {tta}, "
            f"{len(preset.models)} model(s), contrasts {', '.join(preset.contrasts)}"
            + (f", engine {preset.engine}" if preset.engine else "")
        )
        if preset.description:
            print(f"  {preset.description}")
        for status in verify_models(preset, models_dir):
            model = status.model
            where = "local file" if model.local_path is not None else "cached"
            state = {
                FileState.VERIFIED: f"{where}, verified",
                FileState.CORRUPT: f"{where} but corrupt ({status.mismatch[0]} "
                f"{status.mismatch[2]})",
                FileState.MISSING: "missing",
            }[status.state]
            print(f"  - {model.name}  xxh3_64 {model.xxh3_64}  {_size(model.size)}  [{state}]")
            print(f"      url:  {model.url}")
            if model.sha256:
                print(f"      sha256: {model.sha256}")
            print(f"      path: {status.path}")
    return ex.EX_OK


def _cmd_fetch(args: argparse.Namespace, models_dir: Path) -> int:
    progress = False if args.no_progress else None
    for preset in _selected(args, default_all=False):
        paths = ensure_models(preset, models_dir, offline=False, progress=progress)
        print(f"{preset.name}: {len(paths)} model file(s) present and verified")
        for path in paths:
            print(f"  {path}")
    return ex.EX_OK


def _cmd_verify(args: argparse.Namespace, models_dir: Path) -> int:
    strict_missing = not args.all
    failed = False
    presets = _selected(args, default_all=False)
    for preset in presets:
        for status in verify_models(preset, models_dir):
            model = status.model
            if status.state is FileState.VERIFIED:
                print(f"OK       {preset.name}: {model.name}  {status.path}")
            elif status.state is FileState.CORRUPT:
                failed = True
                kind, expected, got = status.mismatch
                print(
                    f"CORRUPT  {preset.name}: {model.name}  {kind} {got}, expected {expected}  "
                    f"{status.path}"
                )
            else:
                failed = failed or strict_missing
                print(f"MISSING  {preset.name}: {model.name}  {status.path}")
    if failed:
        again = (
            fetch_command(presets[0], models_dir) if len(presets) == 1 else f"{PROG} fetch --all"
        )
        LOGGER.error("verification failed; fetch again with: %s", again)
        return EX_CHECKSUM
    return ex.EX_OK


def _threads(args: argparse.Namespace) -> int | None:
    if args.threads is not None and args.threads < 1:
        raise ex.UsageError("--threads must be >= 1")
    return args.threads


def _dice_text(per: dict) -> str:
    return ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in per.items())


def _print_measurements(measurements, plan_choices=None) -> None:  # noqa: ANN001
    from hsf_bids.engines.agreement import GATE_DICE

    for measurement in measurements:
        for agreement in measurement.agreements.values():
            verdict = "passes" if agreement.passed else "FAILS"
            print(
                f"  {agreement.model}  {agreement.choice:<22} lowest Dice {agreement.min_dice:.4f}"
                f"  {verdict} (gate {GATE_DICE})  {agreement.seconds_per_pass:.3f} s/pass "
                f"(onnxruntime fp32 {agreement.reference_seconds_per_pass:.3f})"
            )
            for contrast, per in agreement.dice.items():
                print(f"      {contrast}: {_dice_text(per)}")


def _cmd_quantize(args: argparse.Namespace, models_dir: Path) -> int:
    from hsf_bids.engines.plan import measure_models
    from hsf_bids.quantize import find_int8, int8_paths, quantize_model

    threads = _threads(args)
    for preset in _selected(args, default_all=False):
        paths = ensure_models(preset, models_dir, offline=args.offline)
        folder = models_dir / preset.subfolder
        checksums = [m.xxh3_64 for m in preset.models]
        print(f"{preset.name}: int8 versions in {folder / 'int8'}")
        for path, xxh in zip(paths, checksums, strict=True):
            existing = None if args.force else find_int8(folder, path.name, xxh)
            if existing is not None:
                print(f"  {path.name}: up to date ({existing.xml.name}, {existing.xxh3_64})")
                continue
            made = quantize_model(path, folder, xxh)
            size = made.bin.stat().st_size / 1e6
            print(f"  {path.name}: wrote {made.xml.name} + {made.bin.name} ({size:.1f} MB)")
        if args.no_check:
            continue
        print(f"{preset.name}: agreement of int8 with onnxruntime fp32 (fused labels)")
        measurements = measure_models(paths, checksums, folder, threads=threads, precision="int8")
        _print_measurements(measurements)
        for measurement in measurements:
            failed = [a for a in measurement.agreements.values() if not a.passed]
            for agreement in failed if args.remove_failing else []:
                for path in int8_paths(folder, agreement.model):
                    path.unlink(missing_ok=True)
                print(f"  {agreement.model}: int8 version removed (fails the gate)")
    return ex.EX_OK


def _cmd_check(args: argparse.Namespace, models_dir: Path) -> int:
    from hsf_bids.engines import REFERENCE_CHOICE
    from hsf_bids.engines.agreement import ensemble_dice
    from hsf_bids.engines.plan import auto_choice, measure_models

    threads = _threads(args)
    crops = None
    if args.images:
        from hsf_bids.calibration import image_crops

        contrasts = []
        for path in args.images:
            found = [c for c in ("T1w", "T2w") if path.name.split(".")[0].endswith(f"_{c}")]
            if not found:
                raise ex.UsageError(f"{path}: the file name must end with _T1w or _T2w")
            contrasts.append(found[0])
        crops = image_crops(args.images, contrasts)
    for preset in _selected(args, default_all=False):
        paths = ensure_models(preset, models_dir, offline=args.offline)
        folder = models_dir / preset.subfolder
        checksums = [m.xxh3_64 for m in preset.models]
        where = "your images" if crops else "the template's hippocampus crops"
        print(f"{preset.name}: agreement with onnxruntime fp32 on {where} (fused labels)")
        measurements = measure_models(
            paths, checksums, folder, crops=crops, threads=threads, precision=args.precision
        )
        _print_measurements(measurements)
        if measurements and len(measurements) == len(paths):
            best = [auto_choice(m.agreements) or REFERENCE_CHOICE for m in measurements]
            print(f"  engine auto's rule on these measurements: {', '.join(best)}")
            for contrast, per in ensemble_dice(measurements, best).items():
                print(f"  ensemble (fused labels), {contrast}: {_dice_text(per)}")
    return ex.EX_OK


def _error_line(exc: BaseException) -> str:
    """The one line an error is reported with."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return str(exc).replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (see the module docstring). A usage error on the
    command line exits from the parser (``SystemExit`` 64), as ``hsf-bids`` does."""
    setup_console(PROG, logging.WARNING)
    args = build_parser().parse_args(argv)
    commands = {
        "list": _cmd_list,
        "fetch": _cmd_fetch,
        "verify": _cmd_verify,
        "quantize": _cmd_quantize,
        "check": _cmd_check,
    }
    try:
        models_dir = resolve_models_dir(args.models_dir)
        return commands[args.command](args, models_dir)
    except (ex.HsfBidsError, OSError, KeyboardInterrupt) as exc:
        # engines, NNCF, images, hub files, downloads: one line, no traceback
        LOGGER.error("%s", _error_line(exc))
        return EX_CHECKSUM if isinstance(exc, ChecksumError) else ex.exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - unexpected: the traceback goes to a crash file
        from hsf_bids.cli.crash import report_crash

        LOGGER.error("%s", report_crash(exc, None, PROG))
        return ex.exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
