"""``hsf-bids``: check the arguments, build one workflow per subject and session, run it.

Every error a user can cause ends here as one clear message on the console
(:mod:`hsf_bids.cli.messages`) and the BIDS Apps exit code it carries (:mod:`hsf_bids.errors`),
never a traceback.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from hsf_bids import errors as ex
from hsf_bids.cli.messages import setup_console, verbosity_level
from hsf_bids.cli.parser import PROG, build_parser
from hsf_bids.config import DEFAULT_BATCH_SIZE, DEFAULT_PRESET, RunConfig
from hsf_bids.errors import UsageError

LOGGER = logging.getLogger(__name__)


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _check_folders(bids_dir: Path, output_dir: Path, work_dir: Path, level: str) -> None:
    """The guards of NiPreps apps: never write into the input dataset except its derivatives.

    The group level reads what the participant level wrote, so its output folder must exist.
    """
    if not bids_dir.is_dir():
        raise UsageError(f"the BIDS folder {bids_dir} does not exist", exit_code=ex.EX_NOINPUT)
    if not (bids_dir / "dataset_description.json").is_file():
        raise UsageError(
            f"{bids_dir} is not a BIDS dataset: {bids_dir / 'dataset_description.json'} is missing",
            exit_code=ex.EX_NOINPUT,
        )
    suggestion = bids_dir / "derivatives" / "hsf_bids"
    if output_dir == bids_dir:
        raise UsageError(
            f"the output folder is the input BIDS folder {bids_dir}; choose another one "
            f"(suggestion: {suggestion})"
        )
    if _is_within(output_dir, bids_dir) and not _is_within(output_dir, bids_dir / "derivatives"):
        raise UsageError(
            f"the output folder {output_dir} is inside the input BIDS folder {bids_dir}, where it "
            f"would be read as input; use {suggestion} or a folder outside the dataset"
        )
    if _is_within(work_dir, bids_dir):
        raise UsageError(
            f"the work folder {work_dir} is inside the input BIDS folder {bids_dir}; "
            "choose a folder outside the dataset (-w/--work-dir)"
        )
    if level == "participant" and _is_within(work_dir, output_dir):
        raise UsageError(
            f"the work folder {work_dir} is inside the output folder {output_dir}, whose "
            "derivatives would then fail the BIDS validator; choose a folder outside it "
            "(-w/--work-dir)"
        )
    if level == "list":
        return
    if level == "group":
        if not output_dir.is_dir():
            raise UsageError(
                f"no participant results in {output_dir}: the folder does not exist; "
                "run the participant level first",
                exit_code=ex.EX_NOINPUT,
            )
        return
    for folder, what in ((output_dir, "output"), (work_dir, "work")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create the {what} folder {folder}: {exc.strerror}",
                exit_code=ex.EX_CANTCREAT,
            ) from exc
        if not os.access(folder, os.W_OK):
            raise UsageError(
                f"the {what} folder {folder} is not writable", exit_code=ex.EX_CANTCREAT
            )


def scheduler_cpus(environ: Mapping[str, str] | None = None) -> int:
    """CPUs this process may use: the scheduler's share, not the node's.

    Inside a SLURM task nothing binds the process to its CPUs (no cgroup or affinity plugin on
    many sites), so ``os.cpu_count()`` would count the whole node and every task on it would
    oversubscribe it; ``SLURM_CPUS_PER_TASK`` is the only record of the share. Elsewhere the
    process's CPU affinity (``taskset``, cgroup cpusets, ``docker --cpuset-cpus``) is the share.
    """
    env = os.environ if environ is None else environ
    value = env.get("SLURM_CPUS_PER_TASK", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def scheduler_mem_gb(environ: Mapping[str, str] | None = None) -> float | None:
    """The memory SLURM gave the task, in GB (``--mem`` or ``--mem-per-cpu``); None elsewhere."""
    env = os.environ if environ is None else environ
    node = env.get("SLURM_MEM_PER_NODE", "")
    if node.isdigit() and int(node) > 0:
        return int(node) / 1024
    per_cpu, cpus = env.get("SLURM_MEM_PER_CPU", ""), env.get("SLURM_CPUS_PER_TASK", "1")
    if per_cpu.isdigit() and int(per_cpu) > 0 and cpus.isdigit():
        return int(per_cpu) * max(int(cpus), 1) / 1024
    return None


def scheduler_scratch(environ: Mapping[str, str] | None = None) -> Path | None:
    """The node-local scratch folder of a SLURM task (``$SLURM_TMPDIR``, else ``$TMPDIR``).

    Only inside a SLURM job: the work folder's many small files then stay off the shared file
    system. Outside one, ``$TMPDIR`` is often a small ``/tmp`` and the default is unchanged.
    """
    env = os.environ if environ is None else environ
    if not env.get("SLURM_JOB_ID"):
        return None
    folder = env.get("SLURM_TMPDIR") or env.get("TMPDIR")
    return Path(folder) if folder else None


def _plugin(path: Path | None, nprocs: int, omp_nthreads: int, mem_gb: float | None):  # noqa: ANN202
    """Nipype plugin name and arguments (from a YAML file when given)."""
    if path is not None:
        from hsf_bids.hub.yamlfile import YamlFileError, read_yaml

        try:
            settings = read_yaml(path) or {}
        except OSError as exc:
            raise UsageError(f"cannot read the plugin file {path}: {exc.strerror or exc}") from exc
        except YamlFileError as exc:
            raise UsageError(f"the plugin file {path}: {exc}") from exc
        if not isinstance(settings, dict) or not isinstance(settings.get("plugin"), str):
            raise UsageError(f"the plugin file {path} must have a 'plugin' key naming a plugin")
        from nipype.pipeline import plugins

        name = settings["plugin"]
        known = sorted(
            n[: -len("Plugin")] for n in dir(plugins) if n.endswith("Plugin") and n[0].isupper()
        )
        if name not in known:
            raise UsageError(
                f"the plugin file {path}: unknown Nipype plugin {ex.brief(name)}; "
                f"choose one of {', '.join(known)}"
            )
        args = settings.get("plugin_args") or {}
        if not isinstance(args, dict):
            raise UsageError(f"the plugin file {path}: 'plugin_args' must be a mapping")
        return name, dict(args)
    # With one node able to use every CPU, MultiProc only adds worker processes that each load
    # the models again; Linear keeps one process, so the loaded models serve every subject.
    if nprocs <= omp_nthreads:
        return "Linear", {}
    args: dict[str, object] = {"n_procs": nprocs, "raise_insufficient": False}
    if mem_gb:
        args["memory_gb"] = mem_gb
    return "MultiProc", args


def build_config(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse the command line into a :class:`RunConfig`, applying every guard."""
    opts = build_parser().parse_args(argv)
    if opts.analysis_level not in ("participant", "group"):
        raise UsageError(
            f"unknown analysis level {opts.analysis_level!r}: use 'participant' or 'group'",
            exit_code=ex.EX_UNKNOWN_LEVEL,
        )
    if opts.preset and opts.hub:
        raise UsageError("--preset and --hub are exclusive: a hub file is a preset")
    bids_dir = opts.bids_dir.expanduser().resolve()
    output_dir = opts.output_dir.expanduser().resolve()
    scratch = scheduler_scratch()
    default_work = scratch / "hsf_bids" if scratch else output_dir.parent / "work" / "hsf_bids"
    work_dir = (opts.work_dir or default_work).expanduser().resolve()
    if opts.work_dir is None and _is_within(work_dir, bids_dir):
        # An output in <bids_dir>/derivatives/: the work folder goes beside the dataset, as
        # neither the dataset nor the output folder may hold it.
        work_dir = bids_dir.parent / "work" / "hsf_bids"
    # Listing the participants only reads the dataset: it creates no folder.
    level = "list" if opts.list_participants else opts.analysis_level
    _check_folders(bids_dir, output_dir, work_dir, level)

    filters = {}
    if opts.bids_filter_file is not None:
        from hsf_bids.bids import load_bids_filters

        filters = load_bids_filters(opts.bids_filter_file)

    nprocs = opts.nprocs or scheduler_cpus()
    omp = opts.omp_nthreads or min(nprocs, 8)
    if omp > nprocs:
        raise UsageError(f"--omp-nthreads {omp} exceeds --nprocs {nprocs}")
    mem_gb = opts.mem_gb or scheduler_mem_gb()
    plugin, plugin_args = _plugin(opts.use_plugin, nprocs, omp, mem_gb)
    hub = opts.hub.expanduser().resolve() if opts.hub else None
    if hub is not None and not hub.is_file():
        raise UsageError(f"the hub file {hub} does not exist", exit_code=ex.EX_NOINPUT)
    return RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=opts.analysis_level,
        work_dir=work_dir,
        participant_labels=tuple(opts.participant_label),
        session_labels=tuple(opts.session_label),
        bids_filters=filters,
        skip_bids_validation=opts.skip_bids_validation,
        contrast=opts.contrast,
        nprocs=nprocs,
        omp_nthreads=omp,
        mem_gb=mem_gb,
        plugin=plugin,
        plugin_args=plugin_args,
        stop_on_first_crash=opts.stop_on_first_crash,
        write_graph=opts.write_graph,
        reports_only=opts.reports_only,
        list_participants=opts.list_participants,
        verbosity=opts.verbosity,
        preset=None if hub else (opts.preset or DEFAULT_PRESET),
        hub=hub,
        models_dir=opts.models_dir.expanduser().resolve() if opts.models_dir else None,
        offline=opts.offline,
        engine=opts.engine,
        device=opts.device,
        precision=opts.precision,
        ca_mode=opts.ca_mode,
        fusion=opts.fusion,
        seed=opts.seed,
        margin=tuple(opts.margin) if opts.margin else None,
        batch_size=opts.batch_size or DEFAULT_BATCH_SIZE[opts.device],
    )


def list_participants(config: RunConfig) -> int:
    """``--list-participants``: print, one per line, the participants that have an image this run
    would segment (the selection, filters, contrast and the models' contrasts), then exit.

    A scheduler's array maps its task index to a line of this list, so no task starts for a
    subject without a usable image, whatever ``participants.tsv`` says.
    """
    from hsf_bids.bids import BIDSQueryError
    from hsf_bids.cli.participant import select_images
    from hsf_bids.hub import HubError, resolve_preset
    from hsf_bids.settings import select_jobs

    try:
        jobs, _ = select_images(config)
        preset = resolve_preset(config.preset, config.hub)
    except (BIDSQueryError, HubError) as exc:
        LOGGER.error("%s", exc)
        return ex.exit_code(exc)
    accepted, _ = select_jobs(jobs, preset.contrasts)
    for subject in sorted({job.subject for job in accepted}):
        print(subject)
    return ex.EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hsf-bids``; returns the exit code.

    An error the user can cause is one line on the console and its code; anything else is
    unexpected: its traceback goes to a crash file (:mod:`hsf_bids.cli.crash`) and the console
    gets one line naming it.
    """
    setup_console(PROG)
    try:
        config = build_config(argv)
    except (ex.HsfBidsError, ValueError) as exc:  # ValueError: an option RunConfig refuses
        LOGGER.error("%s", exc)
        return ex.exit_code(exc, default=ex.EX_USAGE)
    except KeyboardInterrupt:
        LOGGER.error("interrupted")
        return ex.EX_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - reported with its crash file
        return _unexpected(exc, None)
    try:
        return _run(config)
    except ex.HsfBidsError as exc:
        LOGGER.error("%s", exc)
        return ex.exit_code(exc)
    except KeyboardInterrupt:
        LOGGER.error("interrupted")
        return ex.EX_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - reported with its crash file
        return _unexpected(exc, config)


def _unexpected(exc: Exception, config: RunConfig | None) -> int:
    from hsf_bids.cli.crash import report_crash

    LOGGER.error("%s", report_crash(exc, config, PROG))
    return ex.exit_code(exc)


def _run(config: RunConfig) -> int:
    setup_console(PROG, verbosity_level(config.verbosity))
    if config.list_participants:
        return list_participants(config)
    logging.getLogger("nipype.workflow").setLevel(
        logging.INFO if config.verbosity else logging.WARNING
    )
    from hsf_bids.runtime import end_runtime, prepare_runtime

    # before any library that writes to $HOME or phones home is imported
    runtime = prepare_runtime(config.work_dir)
    try:
        if config.analysis_level == "group":
            from hsf_bids.cli.group import run_group

            return run_group(config)
        from hsf_bids.cli.participant import run_participant

        return run_participant(config)
    finally:
        end_runtime(runtime)


def cli() -> None:
    """Console script ``hsf-bids``."""
    from hsf_bids.cli.signals import stop_on_sigterm
    from hsf_bids.runtime import remove_private_folder

    stop_on_sigterm(cleanup=remove_private_folder)
    code = main()
    # Everything is written and closed by now. Interpreter shutdown would otherwise run the
    # cyclic garbage collector over the ~1,500 modules Nipype, pybids and the engines load:
    # about 0.5 s per run here (measured), a few percent of a fast preset. atexit handlers and
    # reference-counted finalisers still run.
    gc.freeze()
    sys.exit(code)
