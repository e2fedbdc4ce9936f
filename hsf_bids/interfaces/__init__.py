"""Thin Nipype interfaces over :mod:`hsf_bids.stages` (one per stage; no computation here).

The segmentation settings reach every interface that reads them as one input, ``settings``: the
JSON-ready dict of :meth:`hsf_bids.settings.SegmentationSettings.to_dict` (plain values, so the
node's hash is deterministic, and any change of a setting reruns the nodes that read it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from hsf_bids import stages
from hsf_bids.settings import SegmentationSettings

# What a stage returns to its interface: output name -> path written.
_Paths = dict[str, str | os.PathLike[str]]


def _settings_input() -> traits.Dict:
    # Hashed as values: the models' checksums name their content, and a file path in it (a
    # model, the hub file) must not rerun the work when only its timestamp changes.
    return traits.Dict(
        mandatory=True,
        hash_files=False,
        desc="SegmentationSettings.to_dict() of the run (models, seed, margins...)",
    )


def _settings(inputs) -> SegmentationSettings:  # noqa: ANN001
    return SegmentationSettings.from_dict(inputs.settings)


class _StageInterface(SimpleInterface):
    """Runs one stage in the node's folder; the stage's paths become the outputs.

    A subclass implements ``_run_stage``: the interface's inputs and the node's folder in, a
    ``{output name: path}`` dict out (each path stored as a string).
    """

    def _run_stage(self, inputs: Any, cwd: str) -> _Paths:
        raise NotImplementedError

    def _run_interface(self, runtime):  # noqa: ANN001, ANN202
        outputs = self._run_stage(self.inputs, runtime.cwd)
        self._results.update({name: str(path) for name, path in outputs.items()})
        return runtime


class _LocaliseInput(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="head image (any orientation)")
    contrast = traits.Enum("T1w", "T2w", mandatory=True, desc="picks the template")
    settings = _settings_input()


class _LocaliseOutput(TraitedSpec):
    localisation = File(exists=True, desc="boxes, template-to-subject affine and QC (JSON)")


class Localise(_StageInterface):
    """Register the template to the image and find the box of each hippocampus."""

    input_spec = _LocaliseInput
    output_spec = _LocaliseOutput

    def _run_stage(self, i: Any, cwd: str) -> _Paths:
        return {"localisation": stages.localise(i.in_file, i.contrast, cwd, _settings(i))}


class _CoregisterInput(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the second contrast")
    reference = File(exists=True, mandatory=True, desc="the image whose grid outputs share")
    settings = _settings_input()


class _CoregisterOutput(TraitedSpec):
    out_file = File(exists=True, desc="in_file on the RAS+ grid of the reference")


class Coregister(_StageInterface):
    """Register a second contrast to the reference image and resample it onto its grid."""

    input_spec = _CoregisterInput
    output_spec = _CoregisterOutput

    def _run_stage(self, i: Any, cwd: str) -> _Paths:
        return {"out_file": stages.coregister(i.in_file, i.reference, cwd, _settings(i))}


class _SegmentSideInput(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), minlen=1, mandatory=True)
    localisation = File(exists=True, mandatory=True)
    side = traits.Enum("right", "left", mandatory=True)
    settings = _settings_input()


class _SegmentSideOutput(TraitedSpec):
    labels = File(exists=True, desc="labels of the crop (ca_mode labels)")
    uncertainty = File(exists=True, desc="entropy of the mean probability in the crop")
    predictions = File(exists=True, desc="label counts of every prediction (JSON)")


class SegmentSide(_StageInterface):
    """Run the ensemble with test-time augmentation on one side's crop."""

    input_spec = _SegmentSideInput
    output_spec = _SegmentSideOutput

    def _run_stage(self, i: Any, cwd: str) -> _Paths:
        labels, uncertainty, predictions = stages.segment_side(
            i.in_files, i.localisation, i.side, cwd, _settings(i)
        )
        return {"labels": labels, "uncertainty": uncertainty, "predictions": predictions}


class _PasteBackInput(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    localisation = File(exists=True, mandatory=True)
    right_labels = File(exists=True, mandatory=True)
    right_uncertainty = File(exists=True, mandatory=True)
    left_labels = File(exists=True, mandatory=True)
    left_uncertainty = File(exists=True, mandatory=True)


class _PasteBackOutput(TraitedSpec):
    dseg = File(exists=True, desc="bilateral labels on the grid of in_file")
    uncertainty = File(exists=True, desc="uncertainty on the grid of in_file")


class PasteBack(_StageInterface):
    """Put both sides back into the input's grid and orientation."""

    input_spec = _PasteBackInput
    output_spec = _PasteBackOutput

    def _run_stage(self, i: Any, cwd: str) -> _Paths:
        dseg, uncertainty = stages.paste_back_sides(
            i.in_file,
            i.localisation,
            {"right": i.right_labels, "left": i.left_labels},
            {"right": i.right_uncertainty, "left": i.left_uncertainty},
            cwd,
        )
        return {"dseg": dseg, "uncertainty": uncertainty}


class _DerivativesInput(BaseInterfaceInputSpec):
    dseg = File(exists=True, mandatory=True)
    uncertainty = File(exists=True, mandatory=True)
    localisation = File(exists=True, mandatory=True)
    right_predictions = File(exists=True, mandatory=True, desc="SegmentSide's label counts")
    left_predictions = File(exists=True, mandatory=True, desc="SegmentSide's label counts")
    source_file = File(exists=True, mandatory=True, desc="the input image (names the outputs)")
    sources = traits.List(traits.Str, mandatory=True, desc="BIDS URIs of every input image")
    secondary_file = File(exists=True, desc="the second contrast fused in, if any")
    output_dir = traits.Str(mandatory=True)
    contrast = traits.Str(mandatory=True, desc="T1w, T2w or T1w+T2w")
    settings = _settings_input()


class _DerivativesOutput(TraitedSpec):
    out_dseg = File(exists=True)
    out_uncertainty = File(exists=True)
    volumes_part = File(exists=True, desc="this image's rows of the volumes table")


class WriteDerivatives(_StageInterface):
    """Write the derivatives of one image under the output folder (atomically)."""

    input_spec = _DerivativesInput
    output_spec = _DerivativesOutput

    def _run_stage(self, i: Any, cwd: str) -> _Paths:
        written, part = stages.write_derivatives(
            i.dseg,
            i.uncertainty,
            i.localisation,
            source_file=i.source_file,
            sources=i.sources,
            output_dir=i.output_dir,
            contrast=i.contrast,
            settings=_settings(i),
            out_dir=cwd,
            predictions={"right": i.right_predictions, "left": i.left_predictions},
            secondary_file=i.secondary_file if isdefined(i.secondary_file) else None,
        )
        return {
            "out_dseg": written["dseg"],
            "out_uncertainty": written["uncertainty"],
            "volumes_part": part,
        }


class _VolumesInput(BaseInterfaceInputSpec):
    parts = traits.List(File(exists=True), minlen=1, mandatory=True)
    source_file = File(exists=True, mandatory=True, desc="any image of the subject and session")
    output_dir = traits.Str(mandatory=True)


class _VolumesOutput(TraitedSpec):
    out_file = File(exists=True)


class VolumesTable(_StageInterface):
    """Assemble the volumes table of one subject and session."""

    input_spec = _VolumesInput
    output_spec = _VolumesOutput

    def _run_stage(self, i: Any, cwd: str) -> _Paths:
        return {"out_file": stages.write_volumes_table(i.parts, i.source_file, Path(i.output_dir))}
