"""What every image of a run is segmented with, as one frozen object.

:class:`SegmentationSettings` is built once, before the workflow, from the run's settings
(:class:`~hsf_bids.config.RunConfig`), the model set (a hub :class:`~hsf_bids.hub.presets.Preset`)
and the inference plan (:class:`~hsf_bids.engines.plan.Plan`). It travels whole through the
workflow (as the JSON-ready dict of :meth:`SegmentationSettings.to_dict`, which Nipype hashes
deterministically) and each layer reads what it needs: the localisation its seed and margins,
the segmentation its models and :class:`~hsf_bids.segment.EnsembleSettings`, the derivatives
their ``ca_mode`` and provenance.

The preset's ``contrasts`` decide which images are segmented (:func:`select_jobs`), its
``margins`` the box margin unless ``--margin`` is given (:meth:`SegmentationSettings.box_margin`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hsf_bids import __version__
from hsf_bids.bids import SegmentationJob
from hsf_bids.segment.augment import TTASettings
from hsf_bids.segment.ensemble import EnsembleSettings

if TYPE_CHECKING:
    from hsf_bids.config import RunConfig
    from hsf_bids.engines.plan import Plan
    from hsf_bids.hub import Preset

__all__ = ["ModelSpec", "SegmentationSettings", "select_jobs"]

TEMPLATE_DESCRIPTION = "MNI152NLin2009cSym res-1 (TemplateFlow), CerebrA hippocampus labels"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the ensemble as it runs: the file its engine reads (ONNX, or its int8
    version), that file's XXH3-64 (so a changed model reruns the segmentation) and its
    ``engine/precision/device`` (:attr:`hsf_bids.engines.plan.ModelRun.choice`)."""

    path: str
    xxh3_64: str
    choice: str


@dataclass(frozen=True)
class SegmentationSettings:
    """Every setting of a run's segmentations (one object, resolved once).

    models : the ensemble, in the preset's order.
    ensemble : ``ca_mode``, fusion, test-time augmentation, batch size.
    seed : seeds registration sampling and the augmentations.
    threads : each node's intra-op CPU threads (``--omp-nthreads``).
    margin : the box margin of ``--margin`` (voxels, RAS+), or None for the preset's rule.
    isotropic_margin, thick_slice_margin : the preset's margins: ``[x, y, z]`` for nearly
        isotropic voxels, ``(thin, thick)`` for thick-slice images (see :meth:`box_margin`).
    contrasts : the contrasts the models accept (the preset's).
    provenance : the block every sidecar carries (software, preset, models, engine, seed).
    """

    models: tuple[ModelSpec, ...]
    ensemble: EnsembleSettings
    seed: int
    threads: int = 1
    margin: tuple[int, int, int] | None = None
    isotropic_margin: tuple[int, int, int] = (8, 8, 8)
    thick_slice_margin: tuple[int, int] = (16, 4)
    contrasts: tuple[str, ...] = ("T1w", "T2w")
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ca_mode(self) -> str:
        return self.ensemble.ca_mode

    @property
    def fusion(self) -> str:
        return self.ensemble.fusion

    def box_margin(self, zooms: Sequence[float]) -> tuple[int, int, int]:
        """The margin (voxels per RAS+ axis) of the boxes of an image with voxel sizes
        ``zooms`` (mm, RAS+ order): ``--margin`` when given, else the preset's margins by
        :func:`hsf_bids.localisation.auto_margin`'s rule."""
        from hsf_bids.localisation import auto_margin

        if self.margin is not None:
            return self.margin
        return auto_margin(zooms, self.isotropic_margin, self.thick_slice_margin)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (tuples as lists); :meth:`from_dict` gives the object back."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentationSettings:
        """The object written by :meth:`to_dict`."""
        ensemble = dict(data["ensemble"])
        augmentation = dict(ensemble.pop("augmentation"))
        augmentation["scales"] = tuple(augmentation["scales"])
        margin = data.get("margin")
        return cls(
            models=tuple(ModelSpec(**m) for m in data["models"]),
            ensemble=EnsembleSettings(**ensemble, augmentation=TTASettings(**augmentation)),
            seed=int(data["seed"]),
            threads=int(data["threads"]),
            margin=None if margin is None else tuple(margin),
            isotropic_margin=tuple(data["isotropic_margin"]),
            thick_slice_margin=tuple(data["thick_slice_margin"]),
            contrasts=tuple(data["contrasts"]),
            provenance=dict(data["provenance"]),
        )

    @classmethod
    def from_run(cls, config: RunConfig, preset: Preset, plan: Plan) -> SegmentationSettings:
        """Combine the run settings, the preset (or hub file) and the inference plan; also the
        provenance block of every sidecar."""
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
            "Template": TEMPLATE_DESCRIPTION,
        }
        return cls(
            models=tuple(ModelSpec(str(run.path), run.xxh3_64, run.choice) for run in plan.runs),
            ensemble=EnsembleSettings(
                ca_mode=ca_mode,
                fusion=config.fusion,
                test_time_augmentation=preset.test_time_augmentation,
                num_augmentations=preset.test_time_num_aug,
                batch_size=config.batch_size,
            ),
            seed=config.seed,
            threads=config.omp_nthreads,
            margin=config.margin,
            isotropic_margin=preset.margins.isotropic,
            thick_slice_margin=preset.margins.thick_slice,
            contrasts=preset.contrasts,
            provenance=provenance,
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def select_jobs(
    jobs: Sequence[SegmentationJob], contrasts: Sequence[str]
) -> tuple[list[SegmentationJob], list[str]]:
    """The jobs the models can segment, and a warning for each image left out.

    ``contrasts``: those the models accept (a preset's). A second contrast they do not accept
    is dropped (the first is segmented alone); a job whose first image they do not accept is
    segmented from its second one if they accept that, else skipped.
    """
    accepted = set(contrasts)
    accepts = " and ".join(contrasts)
    kept, warnings = [], []
    for job in jobs:
        images = [image for image in job.images if image.contrast in accepted]
        for image in job.images:
            if image.contrast not in accepted:
                alone = f"; {images[0].name} is segmented alone" if images else ""
                warnings.append(
                    f"{image.name} is not segmented: the models accept {accepts} only{alone}"
                )
        if images:
            kept.append(job if len(images) == len(job.images) else SegmentationJob(images[0]))
    return kept, warnings
