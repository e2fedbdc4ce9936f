"""A complete derivatives folder written with hsf_bids.outputs passes the real bids-validator."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from hsf_bids.outputs.derivatives import (
    BIDSIGNORE_PATTERNS,
    Entities,
    bids_uri,
    lut_path,
    sidecar_path,
    volumes_path,
    write_bidsignore,
    write_dataset_description,
    write_json,
    write_segmentation,
    write_text,
)
from hsf_bids.outputs.lut import write_lut
from hsf_bids.outputs.volumes import compute_volumes, estimate_icv_mm3, write_volumes
from hsf_bids.vocabulary import bilateral_index, structures

CA_MODE = "1/2/3"
SOURCES = {
    # Volumes tables are per subject and session: sub-03's two contrasts share one.
    ("01", None): ["sub-01/anat/sub-01_T1w.nii.gz"],
    ("03", None): ["sub-03/anat/sub-03_T1w.nii.gz", "sub-03/anat/sub-03_T2w.nii.gz"],
    ("04", "01"): ["sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz"],
    ("04", "02"): ["sub-04/ses-02/anat/sub-04_ses-02_T1w.nii.gz"],
}


def _validator() -> str:
    found = shutil.which("bids-validator-deno") or str(
        Path(sys.executable).parent / "bids-validator-deno"
    )
    if not os.access(found, os.X_OK):
        reason = "bids-validator-deno is not installed (pip install bids-validator-deno)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _validate(folder: Path) -> tuple[list[dict], dict]:
    result = subprocess.run(
        [_validator(), str(folder), "--format", "json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"validator gave no JSON (rc {result.returncode}): {result.stderr[-2000:]}")
    return report["issues"]["issues"], report["summary"]


def _segmentation(reference: nib.Nifti1Image, rng: np.random.Generator) -> np.ndarray:
    """Blocks of every label but CA2 (the demo models never predict it), left on the left."""
    labels = np.zeros(reference.shape[:3], dtype=np.uint8)
    centre = reference.affine @ np.r_[(np.array(labels.shape) - 1) / 2, 1]
    for side, dx in (("left", -30.0), ("right", 30.0)):
        voxel = np.linalg.solve(reference.affine, np.r_[centre[:3] + [dx, 0, 0], 1])[:3]
        start = np.round(voxel).astype(int) - 4
        for s in structures(CA_MODE):
            size = rng.integers(2, 6, size=3)
            if s.abbreviation != "CA2":
                box = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
                labels[box] = bilateral_index(side, s.label)
            start = start + [0, size[1], 0]
    return labels


def _write_derivatives(output_dir: Path, bids_dir: Path) -> None:
    """What the participant workflow writes, for two subjects with sessions and two contrasts."""
    rng = np.random.default_rng(7)
    assert write_dataset_description(
        output_dir, version="0.1.0", source_dataset=bids_dir,
        container={"Type": "docker", "Tag": "hsf-bids/hsf-bids:0.1.0"},
    ) is None  # fmt: skip
    write_lut(lut_path(output_dir), CA_MODE)
    write_bidsignore(output_dir)
    provenance = {
        "preset": {"name": "demo", "version": "1"},
        "ca_mode": CA_MODE,
        "models": [{"file": "demo_unet_b0.onnx", "xxh3_64": "0123456789abcdef"}],
        "engine": "onnxruntime", "precision": "fp32", "device": "cpu", "seed": 0,
        "fusion": "vote", "test_time_augmentation": {"n": 0},
        "margins": [8, 8, 8], "boxes": {"left": [[1, 2], [3, 4], [5, 6]]},
    }  # fmt: skip
    for (sub, _ses), images in SOURCES.items():
        tables = []
        for relative in images:
            source = bids_dir / relative
            reference = nib.load(source)
            entities = Entities.from_filename(source)
            labels = _segmentation(reference, rng)
            uncertainty = np.where(labels > 0, rng.uniform(0, 1.7, labels.shape), 0)
            write_segmentation(
                output_dir, entities, labels, uncertainty, reference,
                sources=[bids_uri(source, bids_dir)], provenance=provenance,
            )  # fmt: skip
            icv = estimate_icv_mm3(np.diag([1.05, 0.98, 1.02, 1.0]))
            tables.append(compute_volumes(labels, uncertainty, reference.affine, CA_MODE,
                                          entities=entities, icv_mm3=icv))  # fmt: skip
        write_volumes(pd.concat(tables, ignore_index=True), volumes_path(output_dir, entities))
        # Files the schema has no rule for, which .bidsignore must cover.
        write_text("<html></html>\n", output_dir / f"sub-{sub}.html")
        write_text("<svg/>\n", output_dir / f"sub-{sub}" / "figures" / f"sub-{sub}_dseg.svg")
        write_text("crash\n", output_dir / f"sub-{sub}" / "log" / "20240101-000000" / "crash.txt")
    write_text("# methods\n", output_dir / "CITATION.md")


def test_derivatives_pass_bids_validator(ds_mini: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "hsf_bids"
    _write_derivatives(output_dir, ds_mini)

    issues, summary = _validate(output_dir)
    errors = [i for i in issues if i["severity"] == "error"]
    assert errors == [], json.dumps(errors, indent=1)
    assert sorted(summary["subjects"]) == ["01", "03", "04"]
    assert sorted(summary["sessions"]) == ["01", "02"]

    # .bidsignore hides only what the schema has no rule for.
    written = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*"))
    for path in written:
        name = path.rsplit("/", 1)[-1]
        ignored = any(fnmatch.fnmatch(name, p) or f"/{p}/" in f"/{path}/"
                      for p in BIDSIGNORE_PATTERNS)  # fmt: skip
        if name.endswith(("_dseg.nii.gz", "_dseg.json", "_dseg.tsv")) or name.startswith("data"):
            assert not ignored, path
    anat = output_dir / "sub-04" / "ses-02" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        "sub-04_ses-02_desc-subfields_volumes.json",
        "sub-04_ses-02_desc-subfields_volumes.tsv",
        "sub-04_ses-02_space-T1w_desc-subfields_dseg.json",
        "sub-04_ses-02_space-T1w_desc-subfields_dseg.nii.gz",
        "sub-04_ses-02_space-T1w_desc-subfields_uncertainty.json",
        "sub-04_ses-02_space-T1w_desc-subfields_uncertainty.nii.gz",
    ]
    volumes = pd.read_csv(output_dir / "sub-03" / "anat" / "sub-03_desc-subfields_volumes.tsv",
                          sep="\t")  # fmt: skip
    assert sorted(set(volumes["contrast"])) == ["T1w", "T2w"]
    assert len(volumes) == 2 * 2 * 6

    # The validator does check our dseg sidecars: without SpatialReference, space-T1w is an error.
    dseg = anat / "sub-04_ses-02_space-T1w_desc-subfields_dseg.nii.gz"
    sidecar = json.loads(sidecar_path(dseg).read_text())
    del sidecar["SpatialReference"]
    write_json(sidecar, sidecar_path(dseg))
    issues, _ = _validate(output_dir)
    errors = {(i["code"], i.get("subCode"), i["location"]) for i in issues
              if i["severity"] == "error"}  # fmt: skip
    assert errors == {
        ("SIDECAR_KEY_REQUIRED", "SpatialReference", "/" + dseg.relative_to(output_dir).as_posix())
    }
