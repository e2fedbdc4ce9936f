"""Nipype workflows of the participant level: wiring only, the stages do the work.

Three levels, built from the selected jobs (:class:`hsf_bids.bids.SegmentationJob`) and the
run's :class:`~hsf_bids.settings.SegmentationSettings`:

* :func:`init_hsf_wf`: the run, one :func:`init_session_wf` per subject and session;
* :func:`init_session_wf`: the images of one subject and session, and their volumes table;
* :func:`init_image_wf`: one image (with its second contrast, if any): localisation,
  coregistration, both sides' segmentation, paste back, derivatives.

Building a workflow runs nothing (no ANTs, no model): ``tests/test_workflow_build.py`` builds
them all for a fake dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import groupby

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
from hsf_bids.settings import SegmentationSettings
from hsf_bids.vocabulary import SIDES

LOGGER = logging.getLogger("hsf_bids")

# Peak memory of one node, for the MultiProc scheduler: inference holds the models and a batch of
# activations; the rest holds a head image or two.
SEGMENT_MEM_GB = 3.0
OTHER_MEM_GB = 1.0

IMAGE_INPUTS = ("in_file", "in_contrast", "secondary_file", "sources", "contrast")
IMAGE_OUTPUTS = ("dseg", "uncertainty", "volumes_part")


def init_image_wf(
    settings: SegmentationSettings, output_dir: str, *, multispectral: bool, name: str
) -> pe.Workflow:
    """Segment one image (and its second contrast, if any) and write its derivatives.

    Parameters
    ----------
    settings : what the image is segmented with (every node that reads it gets it whole).
    output_dir : the derivatives folder.
    multispectral : whether a second contrast joins (registered to the image, fused in).
    name : the workflow's name.

    Inputs (``inputnode``)
    ----------------------
    in_file : the image whose grid the outputs share.
    in_contrast : its contrast (``T1w`` or ``T2w``; picks the template).
    secondary_file : the second contrast (only when ``multispectral``).
    sources : BIDS URIs of every input image (the sidecars' ``Sources``).
    contrast : what the volumes table calls the input (``T1w``, ``T2w`` or ``T1w+T2w``).

    Outputs (``outputnode``)
    ------------------------
    dseg, uncertainty : the derivatives written under ``output_dir``.
    volumes_part : this image's rows of the session's volumes table (TSV in the work folder).
    """
    fields = [f for f in IMAGE_INPUTS if multispectral or f != "secondary_file"]
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(IMAGE_OUTPUTS)), name="outputnode")
    values = settings.to_dict()

    localise = pe.Node(Localise(settings=values), name="localise", mem_gb=OTHER_MEM_GB)
    inputs = pe.Node(niu.Merge(2), name="inputs", run_without_submitting=True)
    wf.connect([
        (inputnode, localise, [("in_file", "in_file"), ("in_contrast", "contrast")]),
        (inputnode, inputs, [("in_file", "in1")]),
    ])  # fmt: skip
    if multispectral:
        coregister = pe.Node(Coregister(settings=values), name="coregister", mem_gb=OTHER_MEM_GB)
        wf.connect([
            (inputnode, coregister, [("secondary_file", "in_file"), ("in_file", "reference")]),
            (coregister, inputs, [("out_file", "in2")]),
        ])  # fmt: skip
    else:
        inputs.inputs.in2 = []

    paste = pe.Node(PasteBack(), name="paste_back", mem_gb=OTHER_MEM_GB)
    wf.connect([
        (inputnode, paste, [("in_file", "in_file")]),
        (localise, paste, [("localisation", "localisation")]),
    ])  # fmt: skip
    derivatives = pe.Node(
        WriteDerivatives(output_dir=str(output_dir), settings=values),
        name="derivatives", mem_gb=OTHER_MEM_GB,
    )  # fmt: skip
    for side in SIDES:
        segment = pe.Node(
            SegmentSide(side=side, settings=values),
            name=f"segment_{side}", n_procs=settings.threads, mem_gb=SEGMENT_MEM_GB,
        )  # fmt: skip
        wf.connect([
            (inputs, segment, [("out", "in_files")]),
            (localise, segment, [("localisation", "localisation")]),
            (segment, paste, [("labels", f"{side}_labels"),
                              ("uncertainty", f"{side}_uncertainty")]),
            (segment, derivatives, [("predictions", f"{side}_predictions")]),
        ])  # fmt: skip

    wf.connect([
        (inputnode, derivatives, [("in_file", "source_file"), ("sources", "sources"),
                                  ("contrast", "contrast")]),
        (paste, derivatives, [("dseg", "dseg"), ("uncertainty", "uncertainty")]),
        (localise, derivatives, [("localisation", "localisation")]),
        (derivatives, outputnode, [("out_dseg", "dseg"), ("out_uncertainty", "uncertainty"),
                                   ("volumes_part", "volumes_part")]),
    ])  # fmt: skip
    if multispectral:  # its NaN voxels are counted in the image's QC flags
        wf.connect(inputnode, "secondary_file", derivatives, "secondary_file")
    return wf


def session_key(job: SegmentationJob) -> tuple[str, str]:
    """Subject and session (empty without sessions) of a job: what groups a session's jobs."""
    return job.subject, job.session or ""


def init_session_wf(
    jobs: Sequence[SegmentationJob],
    config: RunConfig,
    settings: SegmentationSettings,
    name: str,
) -> pe.Workflow:
    """All images of one subject and session, and their volumes table.

    Parameters
    ----------
    jobs : the session's jobs (one :func:`init_image_wf` each, its inputs set from the job).
    config : the run (input and output folders, log folder).
    settings : what every image is segmented with.
    name : the workflow's name.

    Outputs (``outputnode``)
    ------------------------
    volumes : the session's ``_desc-subfields_volumes.tsv`` under the output folder.

    Every node's crash file goes to ``<output>/sub-XX/log/<run-id>/`` as text.
    """
    from hsf_bids.outputs import bids_uri

    wf = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(fields=["volumes"]), name="outputnode")
    merge = pe.Node(niu.Merge(len(jobs)), name="volumes_parts", run_without_submitting=True)
    for number, job in enumerate(jobs, start=1):
        image_wf = init_image_wf(
            settings, str(config.output_dir), multispectral=job.secondary is not None,
            name=f"{job.name}_wf",
        )  # fmt: skip
        image_wf.inputs.inputnode.in_file = str(job.image.path)
        image_wf.inputs.inputnode.in_contrast = job.image.contrast
        if job.secondary is not None:
            image_wf.inputs.inputnode.secondary_file = str(job.secondary.path)
        image_wf.inputs.inputnode.sources = [bids_uri(i.path, config.bids_dir) for i in job.images]
        image_wf.inputs.inputnode.contrast = "+".join(i.contrast for i in job.images)
        wf.connect(image_wf, "outputnode.volumes_part", merge, f"in{number}")
    volumes = pe.Node(
        VolumesTable(source_file=str(jobs[0].image.path), output_dir=str(config.output_dir)),
        name="volumes", mem_gb=OTHER_MEM_GB,
    )  # fmt: skip
    wf.connect([
        (merge, volumes, [("out", "parts")]),
        (volumes, outputnode, [("out_file", "volumes")]),
    ])  # fmt: skip
    crash_dir = str(config.subject_log_dir(jobs[0].subject))
    for node_name in wf.list_node_names():
        node = wf.get_node(node_name)
        node.config = {"execution": {"crashdump_dir": crash_dir, "crashfile_format": "txt"}}
    return wf


def init_hsf_wf(
    jobs: Sequence[SegmentationJob], config: RunConfig, settings: SegmentationSettings
) -> pe.Workflow:
    """The run: one :func:`init_session_wf` per subject and session, side by side.

    Parameters
    ----------
    jobs : every selected job (the dataset is queried before the workflow is built).
    config : the run; its work folder is the workflow's ``base_dir``.
    settings : what every image is segmented with.

    The branches are independent and the workflow has no inputs or outputs: the derivatives
    are written by the image workflows. The top workflow's name carries the version so that a
    work folder never mixes results of two versions; with the same name and inputs, a rerun
    reuses every finished node.
    """
    version = __version__.replace(".", "_").replace("+", "_")
    wf = pe.Workflow(name=f"hsf_bids_{version}_wf", base_dir=str(config.work_dir))
    ordered = sorted(jobs, key=session_key)
    for (subject, session), group in groupby(ordered, key=session_key):
        name = f"sub_{subject}" + (f"_ses_{session}" if session else "") + "_wf"
        wf.add_nodes([init_session_wf(list(group), config, settings, name=name)])
    return wf
