"""The methods paragraph ("boilerplate") of a run, from the provenance its sidecars recorded.

Written in the spirit of the NiPreps boilerplate: what a user can paste into a paper, with the
software versions, template, registration, models and their checksums, augmentation and fusion,
and the references to cite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from hsf_bids.localisation.registration import FAST_SCHEDULE
from hsf_bids.segment.augment import HSF_TTA, TTASettings

__all__ = ["REFERENCES", "Methods", "Reference", "library_versions", "methods"]


@dataclass(frozen=True)
class Reference:
    key: str
    text: str
    url: str


REFERENCES: dict[str, Reference] = {
    r.key: r
    for r in (
        Reference(
            "hsf",
            "Poiret C, Bouyeure A, Patil S, Grigis A, Duchesnay E, Faillot M, Bottlaender M, "
            "Lemaitre F, Noulhiane M. A fast and robust hippocampal subfields segmentation: HSF "
            "revealing lifespan volumetric dynamics. Frontiers in Neuroinformatics. "
            "2023;17:1130845.",
            "https://doi.org/10.3389/fninf.2023.1130845",
        ),
        Reference(
            "ants",
            "Avants BB, Tustison NJ, Song G, Cook PA, Klein A, Gee JC. A reproducible evaluation "
            "of ANTs similarity metric performance in brain image registration. NeuroImage. "
            "2011;54(3):2033-2044.",
            "https://doi.org/10.1016/j.neuroimage.2010.09.025",
        ),
        Reference(
            "templateflow",
            "Ciric R, Thompson WH, Lorenz R, Goncalves M, MacNicol EE, Markiewicz CJ, et al. "
            "TemplateFlow: FAIR-sharing of multi-scale, multi-species brain models. Nature "
            "Methods. 2022;19:1568-1571.",
            "https://doi.org/10.1038/s41592-022-01681-2",
        ),
        Reference(
            "mni2009c",
            "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average "
            "age-appropriate atlases for pediatric studies. NeuroImage. 2011;54(1):313-327.",
            "https://doi.org/10.1016/j.neuroimage.2010.07.033",
        ),
        Reference(
            "cerebra",
            "Manera AL, Dadar M, Fonov V, Collins DL. CerebrA, registration and manual label "
            "correction of Mindboggle-101 atlas for MNI-ICBM152 template. Scientific Data. "
            "2020;7:237.",
            "https://doi.org/10.1038/s41597-020-0557-9",
        ),
        Reference(
            "onnxruntime",
            "ONNX Runtime developers. ONNX Runtime: cross-platform, high performance ML "
            "inferencing and training accelerator. 2021.",
            "https://onnxruntime.ai",
        ),
        Reference(
            "openvino",
            "Intel Corporation. OpenVINO toolkit: an open-source toolkit for optimizing and "
            "deploying AI inference.",
            "https://github.com/openvinotoolkit/openvino",
        ),
        Reference(
            "nipype",
            "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, Waskom ML, Ghosh SS. "
            "Nipype: a flexible, lightweight and extensible neuroimaging data processing "
            "framework in Python. Frontiers in Neuroinformatics. 2011;5:13.",
            "https://doi.org/10.3389/fninf.2011.00013",
        ),
    )
}

_CITE = {
    "hsf": "Poiret et al. 2023",
    "ants": "Avants et al. 2011",
    "templateflow": "Ciric et al. 2022",
    "mni2009c": "Fonov et al. 2011",
    "cerebra": "Manera et al. 2020",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO",
    "nipype": "Gorgolewski et al. 2011",
}

_LIBRARIES = {
    "antspyx": "ANTsPy",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO",
    "nipype": "Nipype",
    "nibabel": "NiBabel",
    "templateflow": "TemplateFlow",
    "numpy": "NumPy",
}


@dataclass(frozen=True)
class Methods:
    """Paragraphs of plain text and the references they cite (in citation order)."""

    paragraphs: list[str]
    references: list[Reference]


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the methods name (display name -> version)."""
    versions = {}
    for dist, label in _LIBRARIES.items():
        try:
            versions[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _c(key: str, used: list[str]) -> str:
    if key not in used:
        used.append(key)
    return _CITE[key]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _schedule_text(loc: Mapping[str, Any]) -> str:
    """The registration levels that produced the localisation, and why when it was the retry."""
    schedule = loc.get("schedule") or FAST_SCHEDULE.to_dict()
    levels = "/".join(f"{level:g}" for level in schedule["levels_mm"]) + " mm levels"
    if schedule.get("name") == FAST_SCHEDULE.name:
        return levels
    fast = "/".join(f"{level:g}" for level in FAST_SCHEDULE.levels_mm)
    return (
        f"{levels}: a finer schedule, run because the first registration ({fast} mm levels) "
        "agreed poorly with the image around the hippocampi, and kept as the better of the two"
    )


def _augmentation_text(tta: TTASettings) -> str:
    scales = f"{tta.scales[0]:g}-{tta.scales[1]:g}"
    return (
        f"left-right flip with probability {tta.flip_probability:g}, then an affine transform "
        f"(probability {tta.affine_probability:g}: scaling {scales}, rotation up to "
        f"{tta.degrees:g} degrees and translation up to {tta.translation_mm:g} mm per axis) or "
        f"an elastic deformation (probability {tta.elastic_probability:g})"
    )


def methods(
    provenance: Mapping[str, Any],
    *,
    contrasts: Sequence[str] = (),
    multispectral: bool = False,
    versions: Mapping[str, str] | None = None,
    tta_settings: TTASettings = HSF_TTA,
) -> Methods:
    """The methods text of a run from one sidecar's ``Provenance`` block.

    ``contrasts`` are the contrasts segmented (``T1w``, ``T2w``), ``multispectral`` whether a
    T1w and a T2w were fused; ``versions`` maps library names to versions (default: the
    installed ones, :func:`library_versions`); ``tta_settings`` holds the augmentation ranges
    that ran. The registration levels are those of the schedule the sidecar records
    (``Localisation.schedule``; the fast one when it records none).
    """
    used: list[str] = []
    versions = dict(library_versions() if versions is None else versions)
    software = provenance.get("Software") or {}
    hsf_version = software.get("Version", "unknown")
    preset = provenance.get("Preset") or {}
    models = provenance.get("Models") or []
    engine = provenance.get("Engine") or {}
    loc = provenance.get("Localisation") or {}
    resolution = loc.get("resolution", 2.0)
    seed = provenance.get("Seed", loc.get("seed"))
    engine_name = str(engine.get("Name", "onnxruntime"))
    engine_key = "openvino" if engine_name == "openvino" else "onnxruntime"
    engine_label = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}.get(
        engine_name, engine_name
    )
    engine_version = versions.get(engine_label)
    contrast_text = " and ".join(sorted(set(contrasts))) or "anatomical"

    p1 = (
        f"Hippocampal subfields were segmented in each {contrast_text} image with hsf_bids "
        f"{hsf_version}, a BIDS App around the published models of the Hippocampal Segmentation "
        f"Factory (HSF; {_c('hsf', used)}), run with Nipype {versions.get('Nipype', '')} "
        f"({_c('nipype', used)}). Each image was reoriented to RAS+ voxel order without "
        "resampling. Both hippocampi were located by registering the MNI ICBM152 2009c "
        f"nonlinear symmetric template ({_c('mni2009c', used)}; MNI152NLin2009cSym from "
        f"TemplateFlow, {_c('templateflow', used)}) of the matching contrast to the image with "
        f"an affine transform in ANTs (ANTsPy {versions.get('ANTsPy', '')}; {_c('ants', used)}; "
        f"Mattes mutual information, centre-of-mass initialisation, {resolution:g} mm grid, "
        f"{_schedule_text(loc)}, single-threaded with seed {seed}). The CerebrA hippocampus labels "
        f"({_c('cerebra', used)}) were warped to the image with nearest-neighbour "
        "interpolation; the bounding box of each, grown by a margin, defined the crop of each "
        "side, segmented at the image's native resolution."
    )
    p1 = p1.replace("Nipype  (", "Nipype (").replace("ANTsPy ;", "ANTsPy;")

    model_list = (
        "; ".join(f"{m.get('File')} (XXH3-64 {m.get('XXH3_64')})" for m in models) or "unrecorded"
    )
    n_aug = int(provenance.get("NumAugmentations") or 0)
    tta = bool(provenance.get("TestTimeAugmentation")) and n_aug > 0
    if tta:
        aug = (
            f"Each crop was z-scored, zero-padded to multiples of 8 and segmented as is and as "
            f"{n_aug} augmented copies ({_augmentation_text(tta_settings)}), drawn "
            f"from seed {seed}; each prediction was mapped back to the crop with linear "
            "interpolation."
        )
    else:
        aug = "Each crop was z-scored, zero-padded to multiples of 8 and segmented once."
    fusion = provenance.get("Fusion", "vote")
    fusion_text = (
        "combined by a plurality vote of the per-prediction labels (ties to the lower label)"
        if fusion == "vote"
        else "combined by the argmax of the mean class probability"
    )
    multi = (
        " Where a session had both a T1w and a T2w image, the T2w image was registered rigidly "
        "(mutual information) to the T1w image, resampled onto its grid, and its predictions "
        "joined the same vote."
        if multispectral
        else ""
    )
    version_text = f" {engine_version}" if engine_version else ""
    gated = [m for m in models if m.get("Agreement")]  # models run in a gated faster choice
    gate_text = ""
    if gated:
        lowest = min(m["Agreement"]["MinDice"] for m in gated)
        int8 = any(m.get("Precision") == "int8" for m in gated)
        gate_text = (
            (" The int8 versions of the models were made with NNCF post-training quantisation "
             "(calibrated on the template's hippocampus crops; first and last convolutions in "
             "32-bit floating point)." if int8 else "")
            + " Each model ran in a faster engine or precision only after its fused labels had "
            "agreed with ONNX Runtime in 32-bit floating point at a Dice coefficient of at least "
            f"{gated[0]['Agreement']['Gate']} for every subfield, on the template's hippocampus "
            f"crops on the same CPU (lowest Dice {lowest:.3f})."
        )  # fmt: skip
    p2 = (
        f"Segmentation used the {preset.get('Name', 'unnamed')} preset"
        + (f" (models {preset['ModelVersion']})" if preset.get("ModelVersion") else "")
        + f": {_plural(len(models), 'model')}, {model_list}, run with {engine_label}"
        f"{version_text} ({_c(engine_key, used)}) at {engine.get('Precision', 'fp32')} "
        f"precision on the {str(engine.get('Device', 'cpu')).upper()}.{gate_text} {aug} All "
        "predictions were "
        f"{fusion_text}.{multi} The uncertainty of each voxel is the entropy of the mean class "
        f"probability over all predictions. Subfields (CA mode '{provenance.get('CaMode', '')}') "
        "were pasted back onto the grid of the input image, and volumes counted as voxels "
        "times the voxel volume."
    )
    return Methods([p1, p2], [REFERENCES[k] for k in used])
