"""Nipype workflows of the participant level: wiring only, the stages do the work."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from hsf_bids import __version__
from hsf_bids.bids import SegmentationJob
from hsf_bids.config import RunConfig
from hsf_bids.interfaces import (
    Coregister,
    Localise,
    PasteBack,
    SegmentSide,
    VolumesTable,
    WriteDerivatives,
)
from hsf_bids.localisation import SIDES

LOGGER = logging.getLogger("hsf_bids")

# Peak memory of one node, for the MultiProc scheduler: inference holds the models and a batch of
# activations; the rest holds a head image or two.
SEGMENT_MEM_GB = 3.0
OTHER_MEM_GB = 1.0


@dataclass(frozen=True)
class Segmentation:
    """What every image of a run is segmented with (resolved once, before the workflow)."""

    models: tuple[str, ...]  # the file each model's engine reads (ONNX, or its int8 version)
    checksums: tuple[str, ...]  # their XXH3-64
    engines: tuple[str, ...]  # each model's engine/precision/device
    ca_mode: str
    fusion: str
    seed: int
    test_time_augmentation: bool
    num_augmentations: int
    batch_size: int
    threads: int
    margin: tuple[int, int, int] | None
    provenance: dict[str, Any]


def segmentation_settings(config: RunConfig, preset, plan) -> Segmentation:  # noqa: ANN001
    """Combine the run settings, the preset (a hub ``Preset``) and the inference plan (a
    :class:`hsf_bids.engines.plan.Plan`); also the provenance block that every sidecar carries."""
    ca_mode = preset.ca_mode if config.ca_mode is None else config.ca_mode
    provenance = {
        "Software": {"Name": "hsf_bids", "Version": __version__},
        "Preset": {
            "Name": preset.name,
            "ModelVersion": preset.version,
            "Source": str(preset.source),
        },
        "Models": [
            {"File": m.name, "URL": m.url, "XXH3_64": m.xxh3_64, **run.provenance()}
            for m, run in zip(preset.models, plan.runs, strict=True)
        ],
        "CaMode": ca_mode,
        "Fusion": config.fusion,
        "TestTimeAugmentation": preset.test_time_augmentation,
        "NumAugmentations": preset.test_time_num_aug if preset.test_time_augmentation else 0,
        "Engine": plan.summary(),
        "Seed": config.seed,
        "Template": "MNI152NLin2009cSym res-1 (TemplateFlow), CerebrA hippocampus labels",
    }

    return Segmentation(
        models=tuple(str(run.path) for run in plan.runs),
        checksums=tuple(run.xxh3_64 for run in plan.runs),
        engines=tuple(run.choice for run in plan.runs),
        ca_mode=ca_mode,
        fusion=config.fusion,
        seed=config.seed,
        test_time_augmentation=preset.test_time_augmentation,
        num_augmentations=preset.test_time_num_aug,
        batch_size=config.batch_size,
        threads=config.omp_nthreads,
        margin=config.margin,
        provenance=provenance,
    )


def init_image_wf(job: SegmentationJob, config: RunConfig, seg: Segmentation, name: str):  # noqa: ANN201
    """Segment one image (and its second contrast, if any) and write its derivatives.

    Outputs (``outputnode``): ``dseg`` and ``uncertainty`` (the derivatives written under the
    output folder) and ``volumes_part`` (this image's rows of the session's volumes table).
    """
    from hsf_bids.outputs import bids_uri

    wf = pe.Workflow(name=name)
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["dseg", "uncertainty", "volumes_part"]), name="outputnode"
    )
    image = job.image
    localise = pe.Node(
        Localise(in_file=str(image.path), contrast=image.contrast, seed=seg.seed,
                 margin=list(seg.margin) if seg.margin else None),
        name="localise", mem_gb=OTHER_MEM_GB,
    )  # fmt: skip
    inputs = pe.Node(niu.Merge(2), name="inputs", run_without_submitting=True)
    inputs.inputs.in1 = [str(image.path)]
    if job.secondary is not None:
        coregister = pe.Node(
            Coregister(in_file=str(job.secondary.path), reference=str(image.path), seed=seg.seed),
            name="coregister", mem_gb=OTHER_MEM_GB,
        )  # fmt: skip
        wf.connect(coregister, "out_file", inputs, "in2")
    else:
        inputs.inputs.in2 = []

    paste = pe.Node(PasteBack(in_file=str(image.path)), name="paste_back", mem_gb=OTHER_MEM_GB)
    wf.connect(localise, "localisation", paste, "localisation")
    for side in SIDES:
        segment = pe.Node(
            SegmentSide(
                side=side, models=list(seg.models), checksums=list(seg.checksums),
                engines=list(seg.engines), threads=seg.threads, ca_mode=seg.ca_mode,
                fusion=seg.fusion, seed=seg.seed,
                test_time_augmentation=seg.test_time_augmentation,
                num_augmentations=seg.num_augmentations, batch_size=seg.batch_size,
            ),
            name=f"segment_{side}", n_procs=seg.threads, mem_gb=SEGMENT_MEM_GB,
        )  # fmt: skip
        wf.connect([
            (inputs, segment, [("out", "in_files")]),
            (localise, segment, [("localisation", "localisation")]),
            (segment, paste, [("labels", f"{side}_labels"),
                              ("uncertainty", f"{side}_uncertainty")]),
        ])  # fmt: skip

    contrast = "+".join(i.contrast for i in job.images)
    derivatives = pe.Node(
        WriteDerivatives(
            source_file=str(image.path),
            sources=[bids_uri(i.path, config.bids_dir) for i in job.images],
            output_dir=str(config.output_dir), ca_mode=seg.ca_mode, contrast=contrast,
            provenance=seg.provenance,
        ),
        name="derivatives", mem_gb=OTHER_MEM_GB,
    )  # fmt: skip
    wf.connect([
        (paste, derivatives, [("dseg", "dseg"), ("uncertainty", "uncertainty")]),
        (localise, derivatives, [("localisation", "localisation")]),
        (derivatives, outputnode, [("out_dseg", "dseg"), ("out_uncertainty", "uncertainty"),
                                   ("volumes_part", "volumes_part")]),
    ])  # fmt: skip
    return wf


def session_key(job: SegmentationJob) -> tuple[str, str]:
    return job.subject, job.session or ""


def init_session_wf(
    jobs: Sequence[SegmentationJob], config: RunConfig, seg: Segmentation, name: str
):  # noqa: ANN201
    """All images of one subject and session, and their volumes table.

    Every node's crash file goes to ``<output>/sub-XX/log/<run-id>/`` as text.
    """
    wf = pe.Workflow(name=name)
    merge = pe.Node(niu.Merge(len(jobs)), name="volumes_parts", run_without_submitting=True)
    for number, job in enumerate(jobs, start=1):
        image_wf = init_image_wf(job, config, seg, name=f"{job.name}_wf")
        wf.connect(image_wf, "outputnode.volumes_part", merge, f"in{number}")
    volumes = pe.Node(
        VolumesTable(source_file=str(jobs[0].image.path), output_dir=str(config.output_dir)),
        name="volumes", mem_gb=OTHER_MEM_GB,
    )  # fmt: skip
    wf.connect(merge, "out", volumes, "parts")
    crash_dir = str(config.subject_log_dir(jobs[0].subject))
    for node_name in wf.list_node_names():
        node = wf.get_node(node_name)
        node.config = {"execution": {"crashdump_dir": crash_dir, "crashfile_format": "txt"}}
    return wf


def init_hsf_wf(jobs: Sequence[SegmentationJob], config: RunConfig, seg: Segmentation):  # noqa: ANN201
    """The run: one workflow per subject and session, side by side (independent branches).

    The top workflow's name carries the version so that a work folder never mixes results of
    two versions; with the same name and inputs, a rerun reuses every finished node.
    """
    version = __version__.replace(".", "_").replace("+", "_")
    wf = pe.Workflow(name=f"hsf_bids_{version}_wf", base_dir=str(config.work_dir))
    ordered = sorted(jobs, key=session_key)
    for (subject, session), group in groupby(ordered, key=session_key):
        name = f"sub_{subject}" + (f"_ses_{session}" if session else "") + "_wf"
        wf.add_nodes([init_session_wf(list(group), config, seg, name=name)])
    return wf
