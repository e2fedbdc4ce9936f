"""The participant level: validate, get the models, query the images, run the workflow.

Start-up is kept short: the BIDS validator runs in its own process while the dataset is queried
and the heavy libraries are imported, and with the Linear plugin the models are loaded in a
thread while the first registration runs. The run's own phases are timed into
``<work_dir>/timing_<run-id>.json`` (diagnostics for ``benchmarks/participant.py``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from hsf_bids import errors as ex
from hsf_bids.bids import (
    BIDSQueryError,
    PendingValidation,
    SegmentationJob,
    collect_jobs,
    start_validation,
)
from hsf_bids.cli.messages import adopt_nipype_logging
from hsf_bids.config import RunConfig
from hsf_bids.logs import crash_files, crash_reason
from hsf_bids.timing import StageTimer

LOGGER = logging.getLogger(__name__)


def _start_validation(config: RunConfig) -> PendingValidation | None:
    """Start the BIDS validator on the input in the background (None when skipped)."""
    if config.skip_bids_validation:
        return None
    try:
        return start_validation(config.bids_dir)
    except FileNotFoundError as exc:
        LOGGER.warning("BIDS validation skipped: %s", exc)
        return None


def _warm_up(pending: PendingValidation) -> None:
    """While the validator runs in its own process: import the workflow and its stages
    (Nipype, SciPy, nibabel), which costs this process about a second it would spend anyway."""
    if not pending.running():
        return
    try:
        __import__("hsf_bids.workflows.base")
    except ImportError:  # the stage that needs it reports the problem
        return


def _validate_input(pending: PendingValidation | None) -> int | None:
    """The BIDS validator's verdict on the input; an exit code when the dataset is invalid."""
    if pending is None:
        return None
    try:
        errors, _ = pending.result()
    except RuntimeError as exc:
        LOGGER.warning("BIDS validation skipped: %s", exc)
        return None
    if errors:
        LOGGER.error(
            "the input dataset %s is not valid BIDS (%d kind(s) of error); fix it or pass "
            "--skip-bids-validation:\n  %s",
            pending.path,
            len(errors),
            "\n  ".join(errors),
        )
        return ex.EX_BIDS_INVALID
    return None


def _check_images(jobs: list[SegmentationJob]) -> tuple[list[SegmentationJob], list[str]]:
    """Read every selected image once before any work.

    A truncated, 4D or empty image is reported with its file name and its job dropped (a bad
    second contrast only leaves the first one alone), so other images and subjects still run.
    """
    from hsf_bids.image import InvalidImageError, load_anat, nonfinite_voxels

    def problem(path: Path) -> str | None:
        try:
            count = nonfinite_voxels(load_anat(path))
        except InvalidImageError as exc:
            return str(exc)
        if count:
            LOGGER.warning(
                "%s: %d voxel(s) are NaN or infinite: segmented as background, which can change "
                "the volumes; the results are flagged (qc_flags nonfinite_input)", path, count,
            )  # fmt: skip
        return None

    usable, invalid = [], []
    for job in jobs:
        primary = problem(job.image.path)
        if primary:
            invalid.append(primary)
            LOGGER.error("%s; %s is not segmented", primary, job.image.name)
            continue
        secondary = problem(job.secondary.path) if job.secondary else None
        if secondary:
            invalid.append(secondary)
            LOGGER.error("%s; %s is segmented without it", secondary, job.image.name)
            job = SegmentationJob(job.image)
        usable.append(job)
    return usable, invalid


def _check_templates(jobs: list[SegmentationJob]) -> None:
    """Find (or fetch) the templates before any work, so a missing TemplateFlow file is one
    clear error rather than a crash in every subject."""
    from hsf_bids.templates import atlas_path, template_path

    for contrast in sorted({job.image.contrast for job in jobs}):
        template_path(contrast)
    atlas_path()


def _models(config: RunConfig):  # noqa: ANN202
    """The preset and its verified local model files (downloaded unless --offline), each
    checked against the HSF contract before any image is registered."""
    from hsf_bids.engines.contract import check_model_contract
    from hsf_bids.hub import ensure_models, resolve_models_dir, resolve_preset

    preset = resolve_preset(config.preset, config.hub)
    models_dir = resolve_models_dir(config.models_dir)
    paths = ensure_models(preset, models_dir, offline=config.offline)
    for path in paths:
        check_model_contract(path)
    return preset, paths


def _plan(config: RunConfig, preset, model_paths: list[Path]):  # noqa: ANN001, ANN202
    """Which engine and precision runs each model (``engine auto``: through the agreement gate,
    measured once per model, engine version and CPU; see :mod:`hsf_bids.engines.plan`)."""
    from hsf_bids.engines.plan import plan_models
    from hsf_bids.hub import resolve_models_dir

    folder = resolve_models_dir(config.models_dir) / preset.subfolder
    plan = plan_models(
        model_paths, [m.xxh3_64 for m in preset.models], folder, engine=config.engine,
        device=config.device, precision=config.precision, threads=config.omp_nthreads,
        mem_gb=config.mem_gb, cache_dir=config.work_dir,
    )  # fmt: skip
    LOGGER.info("inference: %s", plan.describe())
    return plan


def _accepted_jobs(jobs: list[SegmentationJob], preset) -> list[SegmentationJob]:  # noqa: ANN001
    """The jobs the preset's models accept (its ``contrasts``); the others are skipped with a
    warning, as an image of a contrast a BIDS App does not process."""
    from hsf_bids.settings import select_jobs

    accepted, warnings = select_jobs(jobs, preset.contrasts)
    for warning in warnings:
        LOGGER.warning("%s", warning)
    return accepted


def select_images(config: RunConfig) -> tuple[list[SegmentationJob], list[str]]:
    """The segmentations the run's selection asks for (labels, contrast, BIDS filters), and the
    problems met; see :func:`hsf_bids.bids.collect_jobs`, whose errors it raises (and pybids'
    refusal of a filter, as a usage error)."""
    try:
        return collect_jobs(
            config.bids_dir,
            participant_labels=config.participant_labels,
            session_labels=config.session_labels,
            contrast=config.contrast,
            bids_filters=config.bids_filters,
        )
    except BIDSQueryError:
        raise
    except ValueError as exc:
        if not config.bids_filters:
            raise
        raise BIDSQueryError(
            f"the BIDS filters cannot be applied: {ex.brief(str(exc), limit=300, quote=False)}",
            exit_code=ex.EX_USAGE,
        ) from exc


def run_participant(config: RunConfig) -> int:
    """Segment every selected image; returns the BIDS Apps exit code."""
    from hsf_bids.engines import EngineError
    from hsf_bids.hub import HubError, ModelsError
    from hsf_bids.templates import TemplateError

    if config.reports_only:
        return _reports_only(config)
    phases = StageTimer("participant")
    pending = _start_validation(config)
    # The query runs while the validator does; its outcome is only acted on once the dataset is
    # known to be valid, so an invalid dataset still ends with its own exit code first.
    query_error: Exception | None = None
    try:
        jobs, without = select_images(config)
    except Exception as exc:  # noqa: BLE001 - re-raised or reported after validation
        query_error = exc
    phases.lap("query")
    if pending is not None:
        if query_error is None:
            _warm_up(pending)
        phases.lap("imports")
        code = _validate_input(pending)
        phases.lap("validation")
        if code is not None:
            return code
    if isinstance(query_error, BIDSQueryError):
        LOGGER.error("%s", query_error)
        return ex.exit_code(query_error)
    if query_error is not None:
        raise query_error
    for reason in without:
        LOGGER.error("%s", reason)
    jobs, invalid = _check_images(jobs)
    phases.lap("check_images")
    if not jobs:
        return ex.EX_DATAERR

    try:
        preset, model_paths = _models(config)
        phases.lap("models")
    except (HubError, ModelsError, EngineError, OSError) as exc:
        LOGGER.error("%s", exc)
        return ex.exit_code(exc)
    jobs = _accepted_jobs(jobs, preset)
    if not jobs:
        LOGGER.error(
            "the models of %s accept %s only and no selected image has that contrast",
            preset.source, ", ".join(preset.contrasts),
        )  # fmt: skip
        return ex.EX_USAGE
    try:
        _check_templates(jobs)
    except TemplateError as exc:
        LOGGER.error("%s", exc)
        return ex.exit_code(exc)
    phases.lap("templates")
    try:
        plan = _plan(config, preset, model_paths)
    except (TemplateError, EngineError, ValueError) as exc:
        # TemplateError: the agreement gate's calibration crops need both templates;
        # ValueError: options the engines refuse
        LOGGER.error("%s", exc)
        return ex.exit_code(exc, default=ex.EX_USAGE)
    phases.lap("engine_plan")

    from hsf_bids.outputs import DerivativesError, LutConflictError

    try:
        failed = _run_workflow(config, jobs, preset, plan, phases)
    except (LutConflictError, DerivativesError) as exc:
        LOGGER.error("%s", exc)
        return ex.exit_code(exc)
    _report(config, jobs, failed)
    _report_qc_flags(config, jobs, failed)
    try:
        _write_reports(config, jobs)
    except DerivativesError as exc:  # the disk is full: the report is an output like the others
        LOGGER.error("%s", exc)
        return ex.exit_code(exc)
    phases.lap("reports")
    phases.write(config.work_dir, f"timing_{config.run_id}.json")
    if failed:
        return ex.EX_FAILURE
    if invalid:
        return ex.EX_DATAERR
    if without:
        return ex.EX_NOINPUT
    return ex.EX_OK


def _write_shared_files(config: RunConfig, ca_mode: str) -> None:
    """The top-level files every participant job writes identically (safe in parallel)."""
    from hsf_bids.outputs import lut_path, write_bidsignore, write_dataset_description, write_lut

    warning = write_dataset_description(
        config.output_dir, version=config.version, source_dataset=config.bids_dir
    )
    if warning:
        LOGGER.warning("%s", warning)
    write_lut(lut_path(config.output_dir), ca_mode)
    write_bidsignore(config.output_dir)


def _configure_nipype(config: RunConfig) -> None:
    from nipype import config as ncfg
    from nipype import logging as nlogging

    ncfg.set("execution", "crashfile_format", "txt")
    ncfg.set("execution", "stop_on_first_crash", str(config.stop_on_first_crash).lower())
    ncfg.set("execution", "remove_unnecessary_outputs", "false")
    ncfg.set("execution", "check_version", "false")  # no network at start-up
    level = "INFO" if config.verbosity else "WARNING"
    ncfg.set("logging", "workflow_level", level)
    ncfg.set("logging", "interface_level", level)
    ncfg.set("logging", "utils_level", "WARNING")
    nlogging.update_logging(ncfg)
    adopt_nipype_logging()


def _run_workflow(
    config: RunConfig,
    jobs: list[SegmentationJob],
    preset,  # noqa: ANN001 - hub Preset
    plan,  # noqa: ANN001 - engines.plan.Plan
    phases: StageTimer,
) -> dict[str, list[Path]]:
    """Build and run the workflow; returns the failed subjects with their crash files."""
    from hsf_bids.settings import SegmentationSettings
    from hsf_bids.workflows.base import init_hsf_wf

    settings = SegmentationSettings.from_run(config, preset, plan)
    # The shared files decide whether this output folder is ours at all: a refusal must come
    # before any model starts loading, or the process would exit with a thread inside an
    # engine's C++ code (an abort, exit 134, instead of the refusal's code).
    _write_shared_files(config, settings.ca_mode)
    subjects = sorted({job.subject for job in jobs})
    for subject in subjects:
        config.write(config.subject_log_dir(subject) / "config.json")
    loader = _prefetch_networks(settings) if config.plugin == "Linear" else None
    try:
        _configure_nipype(config)
        wf = init_hsf_wf(jobs, config, settings)
        if config.write_graph:
            try:
                wf.write_graph(graph2use="colored", format="svg", simple_form=True)
            except Exception as exc:  # noqa: BLE001 - graphviz missing: the graph is optional
                LOGGER.warning("could not write the workflow graph: %s", exc)
        phases.lap("workflow_build")
        try:
            wf.run(plugin=config.plugin, plugin_args=config.plugin_args)
        except OSError as exc:
            # Nipype could not write its own files (node results, crash files): the disk is
            # full, and every later step would fail the same way.
            from hsf_bids.outputs import DerivativesError

            where = exc.filename or "the work folder or a crash file"
            raise DerivativesError(
                f"could not write {where}: {exc.strerror or exc}; make room and run the same "
                "command again"
            ) from exc
        except Exception as exc:
            failed = _failed_subjects(config, subjects)
            if not failed:  # not a node's failure (those leave crash files): the run's own
                raise
            LOGGER.debug("workflow ended with errors: %s", exc)
    finally:
        if loader is not None:
            loader.join()  # on every way out: never exit with a thread inside an engine
    phases.lap("workflow_run")
    return _failed_subjects(config, subjects)


def _failed_subjects(config: RunConfig, subjects: list[str]) -> dict[str, list[Path]]:
    """The subjects whose nodes failed in this run, with their crash files."""
    failed = {}
    for subject in subjects:
        crashes = crash_files(config.subject_log_dir(subject))
        if crashes:
            failed[f"sub-{subject}"] = crashes
    return failed


def _prefetch_networks(settings) -> threading.Thread:  # noqa: ANN001 - SegmentationSettings
    """Load the models in a thread, so they are ready when the first side is segmented.

    Only for the Linear plugin, whose nodes run in this process and share its network cache
    (:func:`hsf_bids.stages.load_networks`, as :func:`hsf_bids.stages.segment_side` loads them);
    the engines load in native code, in parallel with the single-threaded registration. A model
    that fails to load here is loaded again by the stage, which reports the error.
    """
    from hsf_bids.stages import load_networks

    def load() -> None:
        try:
            load_networks(settings)
        except Exception as exc:  # noqa: BLE001 - the stage raises it with context
            LOGGER.debug("prefetching the models failed: %s", exc)

    thread = threading.Thread(target=load, name="hsf_bids-load-models", daemon=True)
    thread.start()
    return thread


def _report(config: RunConfig, jobs: list[SegmentationJob], failed: dict[str, list[Path]]) -> None:
    done = sorted({f"sub-{j.subject}" for j in jobs} - set(failed))
    if done:
        LOGGER.info("finished %s; outputs in %s", ", ".join(done), config.output_dir)
    for subject, crashfiles in sorted(failed.items()):
        for crashfile in crashfiles:
            LOGGER.error(
                "%s failed: %s; details in %s", subject, crash_reason(crashfile), crashfile
            )


def _report_qc_flags(
    config: RunConfig, jobs: list[SegmentationJob], failed: dict[str, list[Path]]
) -> None:
    """A warning per image of this run whose results are flagged (NaN input voxels, an empty or
    implausibly small hippocampus), then their number. The exit code stays 0 for them: their
    outputs are written and say what is wrong."""
    from hsf_bids.outputs.volumes import describe_qc_flags, read_qc_flags

    subjects = sorted({job.subject for job in jobs if f"sub-{job.subject}" not in failed})
    found = read_qc_flags(config.output_dir, subjects)
    flagged = [job for job in jobs if job.image.name in found]
    for job in flagged:
        LOGGER.warning(
            "%s flagged: %s; check it (sub-%s.html)",
            job.image.name, describe_qc_flags(*found[job.image.name]), job.subject,
        )  # fmt: skip
    if flagged:
        LOGGER.warning(
            "%d image%s flagged: %s", len(flagged), "s" if len(flagged) > 1 else "",
            ", ".join(job.image.name for job in flagged),
        )  # fmt: skip


def _write_reports(config: RunConfig, jobs: list[SegmentationJob]) -> None:
    """The QC report of every selected subject (failed ones too) and the run's CITATION.md.

    A report that cannot be written is a warning: the segmentations are already there, and
    ``--reports-only`` can write it again.
    """
    from hsf_bids.reports import write_reports

    expected: dict[str, list[str]] = {}
    for job in jobs:
        expected.setdefault(job.subject, []).append(job.image.name)
    written, errors = write_reports(
        config.output_dir, sorted(expected), bids_dir=config.bids_dir, run_id=config.run_id,
        expected=expected,
    )  # fmt: skip
    for message in errors.values():
        LOGGER.warning("%s", message)
    if written:
        LOGGER.info("reports: %s", ", ".join(str(p) for p in written.values()))


def _reports_only(config: RunConfig) -> int:
    """``--reports-only``: write the reports again from the outputs already in the output
    folder (selected subjects, default all), without running anything."""
    from hsf_bids.outputs.read import find_subjects
    from hsf_bids.reports import write_reports

    found = find_subjects(config.output_dir)
    wanted = [label.removeprefix("sub-") for label in config.participant_labels] or found
    unknown = [label for label in wanted if label not in found]
    for label in unknown:
        LOGGER.error("no outputs of sub-%s in %s", label, config.output_dir)
    written, errors = write_reports(
        config.output_dir, [label for label in wanted if label in found], bids_dir=config.bids_dir
    )
    for message in errors.values():
        LOGGER.error("%s", message)
    if written:
        LOGGER.info("reports: %s", ", ".join(str(p) for p in written.values()))
    if unknown or errors or not written:
        return ex.EX_NOINPUT
    return ex.EX_OK
