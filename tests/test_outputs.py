"""Outputs: labels and look-up tables, derivative names, atomic writers, shared files, volumes."""

from __future__ import annotations

import colorsys
import gzip
import json
import math
import multiprocessing
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from hsf_bids.outputs.derivatives import (
    BIDSIGNORE_PATTERNS,
    Entities,
    EntitiesError,
    ForeignDerivativesError,
    GridError,
    OutputWriteError,
    bids_uri,
    dataset_description,
    detect_container,
    dseg_path,
    image_on_grid,
    lut_path,
    sidecar_path,
    uncertainty_path,
    volumes_path,
    write_bidsignore,
    write_dataset_description,
    write_json,
    write_nifti,
    write_segmentation,
)
from hsf_bids.outputs.lut import LutConflictError, lookup_table, write_lut
from hsf_bids.outputs.volumes import (
    COLUMNS,
    TEMPLATE_BRAIN_MM3,
    LabelsError,
    compute_volumes,
    estimate_icv_mm3,
    template_brain_volume_mm3,
    voxel_volume_mm3,
    write_volumes,
)
from hsf_bids.vocabulary import (
    CA_MODES,
    CaModeError,
    bilateral_index,
    side_of_index,
    structures,
)

EXPECTED_STRUCTURES = {
    "1/2/3": ["DG", "CA1", "CA2", "CA3", "SUB"],
    "1/23": ["DG", "CA1", "CA23", "SUB"],
    "123": ["DG", "CA", "SUB"],
    "": ["HC"],
}
CONTAINER = {"Type": "docker", "Tag": "hsf-bids/hsf-bids:test"}


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Labels and look-up tables


@pytest.mark.parametrize("ca_mode", CA_MODES)
def test_structures_follow_ca_mode(ca_mode: str) -> None:
    structs = structures(ca_mode)
    assert [s.abbreviation for s in structs] == EXPECTED_STRUCTURES[ca_mode]
    assert [s.label for s in structs] == list(range(1, len(structs) + 1))
    # Merged channels partition the five foreground model channels.
    channels = [c for s in structs for c in s.channels]
    assert sorted(channels) == [1, 2, 3, 4, 5]


def test_unknown_ca_mode_is_named() -> None:
    with pytest.raises(CaModeError, match=r"'1/2'.*'1/2/3'"):
        structures("1/2")


def test_bilateral_index_rule() -> None:
    assert bilateral_index("left", 1) == 1
    assert bilateral_index("right", 1) == 11
    assert bilateral_index("right", 0) == 0
    one_side = np.array([[0, 1], [3, 5]], dtype=np.int16)
    right = bilateral_index("right", one_side)
    assert right.dtype == np.int16
    assert right.tolist() == [[0, 11], [13, 15]]
    assert bilateral_index("left", one_side).tolist() == one_side.tolist()
    assert side_of_index(14) == ("right", 4)
    assert side_of_index(4) == ("left", 4)
    with pytest.raises(ValueError, match="side"):
        bilateral_index("L", 1)
    with pytest.raises(ValueError, match="label"):
        bilateral_index("left", 10)


def _hue(colour: str) -> float:
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hsv(r, g, b)[0]


@pytest.mark.parametrize("ca_mode", CA_MODES)
def test_lookup_table(ca_mode: str) -> None:
    table = lookup_table(ca_mode)
    abbreviations = EXPECTED_STRUCTURES[ca_mode]
    n = len(abbreviations)
    assert list(table.columns) == ["index", "name", "abbreviation", "color"]
    assert table["index"].tolist() == [*range(1, n + 1), *range(11, n + 11)]
    assert table["abbreviation"].tolist() == [f"L-{a}" for a in abbreviations] + [
        f"R-{a}" for a in abbreviations
    ]
    assert all(name.startswith("left ") for name in table["name"][:n])
    assert all(name.startswith("right ") for name in table["name"][n:])
    if ca_mode == "1/2/3":
        assert table["name"].iloc[0] == "left dentate gyrus"
    colours = table["color"].tolist()
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    assert len(set(colours)) == len(colours)
    for left, right in zip(colours[:n], colours[n:], strict=True):
        # Same hue family, right a darker shade.
        assert abs(_hue(left) - _hue(right)) < 0.02
        assert sum(int(right[i : i + 2], 16) for i in (1, 3, 5)) < sum(
            int(left[i : i + 2], 16) for i in (1, 3, 5)
        )


def test_write_lut_refuses_another_ca_mode(tmp_path: Path) -> None:
    path = write_lut(tmp_path / "desc-subfields_dseg.tsv", "1/23")
    back = pd.read_csv(path, sep="\t")
    assert back["index"].tolist() == [1, 2, 3, 4, 11, 12, 13, 14]
    assert back["abbreviation"].tolist()[2] == "L-CA23"
    write_lut(path, "1/23")  # same content: fine (parallel runs do this)
    with pytest.raises(LutConflictError, match=r"desc-subfields_dseg\.tsv.*'123'"):
        write_lut(path, "123")
    assert pd.read_csv(path, sep="\t")["index"].tolist() == back["index"].tolist()
    write_lut(path, "123", overwrite=True)
    assert pd.read_csv(path, sep="\t")["index"].tolist() == [1, 2, 3, 11, 12, 13]


# ---------------------------------------------------------------------------------------------
# Entities and names


@pytest.mark.parametrize(
    ("source", "folder", "dseg"),
    [
        ("sub-01_T1w.nii.gz", "sub-01/anat", "sub-01_space-T1w_desc-subfields_dseg.nii.gz"),
        (
            "sub-04_ses-02_T1w.nii.gz",
            "sub-04/ses-02/anat",
            "sub-04_ses-02_space-T1w_desc-subfields_dseg.nii.gz",
        ),
        (
            "sub-03_ses-pre_acq-hipp_ce-gad_rec-norm_run-02_T2w.nii",
            "sub-03/ses-pre/anat",
            "sub-03_ses-pre_acq-hipp_ce-gad_rec-norm_run-02_space-T2w_desc-subfields_dseg.nii.gz",
        ),
        (
            "sub-05_acq-mprage_run-1_echo-2_part-mag_chunk-3_T1w.nii.gz",
            "sub-05/anat",
            "sub-05_acq-mprage_run-1_echo-2_part-mag_space-T1w_chunk-3_desc-subfields_dseg.nii.gz",
        ),
    ],
)
def test_derivative_names(source: str, folder: str, dseg: str, tmp_path: Path) -> None:
    entities = Entities.from_filename(Path("/data") / source)
    path = dseg_path(tmp_path, entities)
    assert path == tmp_path / folder / dseg
    assert uncertainty_path(tmp_path, entities).name == dseg.replace("_dseg", "_uncertainty")
    assert sidecar_path(path).name == dseg.replace(".nii.gz", ".json")
    session = f"_ses-{entities.ses}" if entities.ses else ""
    assert volumes_path(tmp_path, entities) == (
        tmp_path / folder / f"sub-{entities.sub}{session}_desc-subfields_volumes.tsv"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("sub-01_acq-0.8mm_T2w.nii.gz", r"sub-01_acq-0\.8mm_T2w\.nii\.gz: acq='0\.8mm'"),
        ("sub-01_inv-1_T1w.nii.gz", r"sub-01_inv-1_T1w\.nii\.gz: entity 'inv'"),
        ("ses-01_T1w.nii.gz", r"ses-01_T1w\.nii\.gz: no subject"),
        ("sub-01_run-a_T1w.nii.gz", r"run='a' is not a BIDS index"),
        ("sub-01_T1w_extra.nii.gz", r"'T1w' is not a key-label pair"),
    ],
)
def test_bad_source_names_are_explained(name: str, message: str) -> None:
    with pytest.raises(EntitiesError, match=message):
        Entities.from_filename(name)


def test_entities_from_pybids_match_file_names(ds_mini: Path) -> None:
    from bids import BIDSLayout

    layout = BIDSLayout(ds_mini, validate=False)
    files = layout.get(suffix=["T1w", "T2w"], extension=".nii.gz")
    assert len(files) == 6
    for f in files:
        assert Entities.from_pybids(f.get_entities()) == Entities.from_filename(f.path)
    padded = Entities.from_pybids({"subject": "01", "run": 1, "suffix": "T1w", "datatype": "anat"})
    assert padded.run == "1"
    with pytest.raises(EntitiesError, match="'inv'"):
        Entities.from_pybids({"subject": "01", "inv": 1, "suffix": "T1w"})


def test_bids_uri(ds_mini: Path) -> None:
    image = ds_mini / "sub-04" / "ses-01" / "anat" / "sub-04_ses-01_T1w.nii.gz"
    assert bids_uri(image, ds_mini) == "bids:raw:sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz"
    with pytest.raises(EntitiesError, match="not inside the BIDS dataset"):
        bids_uri("/elsewhere/sub-01_T1w.nii.gz", ds_mini)


# ---------------------------------------------------------------------------------------------
# Images on the source grid and atomic writers


@pytest.mark.parametrize(
    "source",
    ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T2w.nii.gz",
     "sub-04/ses-02/anat/sub-04_ses-02_T1w.nii.gz"],
)  # fmt: skip
def test_image_on_grid_keeps_the_exact_grid(source: str, ds_mini: Path, tmp_path: Path) -> None:
    reference = nib.load(ds_mini / source)
    labels = np.zeros(reference.shape, dtype=np.int64)
    labels[10:14, 20:23, 30:32] = 15
    img = image_on_grid(labels, reference, np.uint8, intent="label")
    np.testing.assert_array_equal(img.affine, reference.affine)
    path = write_nifti(img, tmp_path / "x.nii.gz")
    back = nib.load(path)
    assert back.shape == reference.shape
    assert back.get_data_dtype() == np.uint8
    for form in ("qform", "sform"):
        matrix, code = getattr(back.header, f"get_{form}")(coded=True)
        ref_matrix, ref_code = getattr(reference.header, f"get_{form}")(coded=True)
        assert code == ref_code
        if ref_code:
            np.testing.assert_allclose(matrix, ref_matrix, atol=1e-5)
    np.testing.assert_allclose(back.affine, reference.affine, atol=1e-5)
    assert np.array_equal(np.asarray(back.dataobj), labels)
    assert back.header.get_xyzt_units()[0] == "mm"
    with pytest.raises(GridError, match=r"not on the grid of .*" + Path(source).name):
        image_on_grid(labels[:-1], reference, np.uint8)


def test_failed_write_leaves_nothing_under_the_final_name(ds_mini: Path, tmp_path: Path) -> None:
    # A real truncated image: its header loads, its data fail half-way through the write.
    raw = gzip.decompress((ds_mini / "sub-01/anat/sub-01_T1w.nii.gz").read_bytes())
    truncated = tmp_path / "in" / "truncated.nii"
    truncated.parent.mkdir()
    truncated.write_bytes(raw[: len(raw) // 2])
    broken = nib.load(truncated)
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError, match=r"out/x_dseg\.nii\.gz"):
        write_nifti(broken, out / "x_dseg.nii.gz")
    assert _entries(out) == []

    # An existing file keeps its old content when its replacement fails.
    previous = write_json({"a": 1}, out / "x.json")
    with pytest.raises(OutputWriteError, match=r"x\.json: ValueError"):
        write_json({"a": float("nan")}, previous)
    with pytest.raises(OutputWriteError, match="object is not JSON serialisable"):
        write_json({"a": object()}, previous)
    assert json.loads(previous.read_text()) == {"a": 1}
    assert _entries(out) == ["x.json"]


def test_json_converts_numpy_and_paths(tmp_path: Path) -> None:
    path = write_json(
        {"seed": np.int64(7), "box": np.arange(3), "file": Path("/m/a.onnx")}, tmp_path / "p.json"
    )
    assert json.loads(path.read_text()) == {"seed": 7, "box": [0, 1, 2], "file": "/m/a.onnx"}


# ---------------------------------------------------------------------------------------------
# Shared top-level files


def test_detect_container(tmp_path: Path) -> None:
    assert detect_container({}, root=tmp_path) is None
    assert detect_container({"HSF_BIDS_CONTAINER": "docker:org/hsf-bids:1.0"}, root=tmp_path) == {
        "Type": "docker",
        "Tag": "org/hsf-bids:1.0",
    }
    assert detect_container({"APPTAINER_NAME": "hsf.sif"}, root=tmp_path) == {
        "Type": "apptainer",
        "Tag": "hsf.sif",
    }
    (tmp_path / ".dockerenv").touch()
    assert detect_container({}, root=tmp_path) == {"Type": "docker"}


def test_dataset_description(ds_mini: Path, tmp_path: Path) -> None:
    assert write_dataset_description(
        tmp_path, version="1.0.0", source_dataset=ds_mini, container=CONTAINER
    ) is None  # fmt: skip
    content = json.loads((tmp_path / "dataset_description.json").read_text())
    assert content["DatasetType"] == "derivative"
    assert content["BIDSVersion"] == "1.10.0"
    assert content["GeneratedBy"] == [
        {"Name": "hsf_bids", "Version": "1.0.0", "CodeURL": content["GeneratedBy"][0]["CodeURL"],
         "Container": CONTAINER}
    ]  # fmt: skip
    assert content["GeneratedBy"][0]["CodeURL"].startswith("https://")
    assert content["SourceDatasets"] == [{"URL": "bids:raw:"}]
    assert content["DatasetLinks"] == {"raw": ds_mini.absolute().as_uri()}
    no_container = dataset_description(version="1", source_dataset="doi:10.1/x", container={})
    assert "Container" not in no_container["GeneratedBy"][0]
    assert no_container["DatasetLinks"] == {"raw": "doi:10.1/x"}

    # Same version again: nothing to say. Another version: a message naming both.
    assert write_dataset_description(
        tmp_path, version="1.0.0", source_dataset=ds_mini, container=CONTAINER
    ) is None  # fmt: skip
    message = write_dataset_description(
        tmp_path, version="1.1.0", source_dataset=ds_mini, container=CONTAINER
    )
    assert message is not None and "1.0.0" in message and "1.1.0" in message
    assert "derived from" not in message
    moved = write_dataset_description(
        tmp_path, version="1.1.0", source_dataset=tmp_path / "other", container=CONTAINER
    )
    assert moved is not None and "derived from" in moved and str(ds_mini) in moved
    write_dataset_description(
        tmp_path, version="1.1.0", source_dataset=ds_mini, container=CONTAINER
    )
    assert (
        json.loads((tmp_path / "dataset_description.json").read_text())["GeneratedBy"][0]["Version"]
        == "1.1.0"
    )

    other = tmp_path / "fmriprep"
    foreign = {"Name": "x", "GeneratedBy": [{"Name": "fMRIPrep"}]}
    write_json(foreign, other / "dataset_description.json")
    with pytest.raises(ForeignDerivativesError, match="fMRIPrep"):
        write_dataset_description(other, version="1.0.0", source_dataset=ds_mini)


def test_bidsignore_keeps_user_lines(tmp_path: Path) -> None:
    (tmp_path / ".bidsignore").write_text("mine/\n*_volumes.tsv\n")
    path = write_bidsignore(tmp_path, extra=["extra.txt"])
    lines = path.read_text().splitlines()
    assert lines[:2] == ["mine/", "*_volumes.tsv"]
    assert lines.count("*_volumes.tsv") == 1
    assert set(BIDSIGNORE_PATTERNS) | {"extra.txt"} <= set(lines)
    before = path.read_text()
    write_bidsignore(tmp_path, extra=["extra.txt"])
    assert path.read_text() == before


def _write_shared_files(output_dir: str, source: str, barrier, rounds: int) -> None:
    """One participant process: write the shared files repeatedly, checking what it reads."""
    out = Path(output_dir)
    barrier.wait()
    for _ in range(rounds):
        write_dataset_description(out, version="1.0.0", source_dataset=source, container=CONTAINER)
        write_lut(lut_path(out), "1/2/3")
        write_bidsignore(out)
        json.loads((out / "dataset_description.json").read_text())
        assert len(pd.read_csv(lut_path(out), sep="\t")) == 10


def test_parallel_participants_share_top_level_files(ds_mini: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [
        ctx.Process(target=_write_shared_files, args=(str(tmp_path), str(ds_mini), barrier, 20))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    expected = dataset_description(version="1.0.0", source_dataset=ds_mini, container=CONTAINER)
    assert json.loads((tmp_path / "dataset_description.json").read_text()) == expected
    assert pd.read_csv(lut_path(tmp_path), sep="\t").equals(
        pd.read_csv(write_lut(tmp_path / "check.tsv", "1/2/3"), sep="\t")
    )
    assert (tmp_path / ".bidsignore").read_text().splitlines() == list(BIDSIGNORE_PATTERNS)
    # No temporary file left behind.
    assert _entries(tmp_path) == sorted(
        [".bidsignore", "check.tsv", "dataset_description.json", "desc-subfields_dseg.tsv"]
    )


# ---------------------------------------------------------------------------------------------
# Volumes


def _draw_blocks(
    reference: nib.Nifti1Image, ca_mode: str, rng: np.random.Generator, skip: tuple[str, ...] = ()
) -> tuple[np.ndarray, dict[int, int]]:
    """Bilateral label blocks on the reference grid, left ones 30 mm to the subject's left.

    Returns the labels and the voxel count of every drawn index (by construction).
    """
    labels = np.zeros(reference.shape[:3], dtype=np.int16)
    counts: dict[int, int] = {}
    centre = reference.affine @ np.r_[(np.array(labels.shape) - 1) / 2, 1]
    for side, dx in (("left", -30.0), ("right", 30.0)):
        world = centre[:3] + [dx, 0, 0]
        start = np.round(np.linalg.solve(reference.affine, np.r_[world, 1])[:3]).astype(int) - 4
        for s in structures(ca_mode):
            size = rng.integers(2, 6, size=3)
            if s.abbreviation not in skip:
                index = bilateral_index(side, s.label)
                box = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
                assert not labels[box].any()
                labels[box] = index
                counts[index] = int(np.prod(size))
            start = start + [0, size[1], 0]  # next structure along the second voxel axis
    return labels, counts


@pytest.mark.parametrize(
    ("source", "voxel_mm3"),
    [("sub-01/anat/sub-01_T1w.nii.gz", 1.75**3), ("sub-03/anat/sub-03_T2w.nii.gz", 2.0)],
)
@pytest.mark.parametrize("ca_mode", ["1/2/3", "123"])
def test_volumes_are_counts_times_voxel_volume(
    source: str, voxel_mm3: float, ca_mode: str, ds_mini: Path
) -> None:
    reference = nib.load(ds_mini / source)
    rng = np.random.default_rng(20240601)
    # Like the demo models, draw no CA2: its rows must still be there, with zero volume.
    labels, counts = _draw_blocks(reference, ca_mode, rng, skip=("CA2",))
    uncertainty = rng.uniform(0, math.log(6), size=labels.shape).astype(np.float32)
    entities = Entities.from_filename(source)
    assert voxel_volume_mm3(reference.affine) == pytest.approx(
        float(np.prod(reference.header.get_zooms()[:3])), rel=1e-5
    )

    df = compute_volumes(labels, uncertainty, reference.affine, ca_mode, entities=entities,
                         icv_mm3=1.5e6)  # fmt: skip
    assert list(df.columns) == list(COLUMNS)
    n = len(structures(ca_mode))
    assert len(df) == 2 * (n + 1)
    assert df["side"].tolist() == ["left"] * (n + 1) + ["right"] * (n + 1)
    assert set(df["participant_id"]) == {f"sub-{entities.sub}"}
    assert df["session_id"].isna().all()
    assert set(df["contrast"]) == {entities.contrast}
    assert set(df["source"]) == {Path(source).name.split(".")[0]}
    assert (df["icv_mm3"] == 1.5e6).all()
    for row in df.itertuples():
        if row.structure == "HC":
            continue
        expected = counts.get(row.label, 0)
        assert row.n_voxels == expected
        assert row.volume_mm3 == pytest.approx(expected * voxel_mm3, rel=1e-5)
        if expected:
            assert row.mean_uncertainty == pytest.approx(
                uncertainty[labels == row.label].mean(), rel=1e-5
            )
        else:
            assert math.isnan(row.mean_uncertainty)
    if ca_mode == "1/2/3":
        ca2 = df[df["structure"] == "CA2"]
        assert ca2["n_voxels"].tolist() == [0, 0] and ca2["label"].tolist() == [3, 13]
    for side in ("left", "right"):
        rows = df[df["side"] == side]
        whole = rows[rows["structure"] == "HC"].iloc[0]
        assert pd.isna(whole["label"])
        assert whole["n_voxels"] == rows["n_voxels"].iloc[:-1].sum()
        side_mask = (labels > 10) if side == "right" else (labels > 0) & (labels < 10)
        assert whole["mean_uncertainty"] == pytest.approx(uncertainty[side_mask].mean(), rel=1e-5)

    # The same labels with the voxel volume given directly.
    by_volume = compute_volumes(labels, uncertainty, voxel_mm3, ca_mode, entities=entities)
    np.testing.assert_allclose(by_volume["volume_mm3"], df["volume_mm3"], rtol=1e-5)
    assert by_volume["icv_mm3"].isna().all()


def test_whole_hippocampus_mode_has_no_duplicate_rows() -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[:2] = 1
    labels[4:] = 11
    df = compute_volumes(labels, np.zeros(labels.shape), 0.5, "", entities=Entities("01", "a"))
    assert df["structure"].tolist() == ["HC", "HC"]
    assert df["label"].tolist() == [1, 11]
    assert df["volume_mm3"].tolist() == [36.0, 36.0]
    assert df["session_id"].tolist() == ["ses-a", "ses-a"]


def test_volumes_reject_bad_input() -> None:
    entities = Entities("01", contrast="T1w")
    labels = np.zeros((4, 4, 4), dtype=np.int32)
    labels[0, 0, 0] = 5  # SUB exists in ca_mode 1/2/3, not as index 5 in ca_mode 123
    with pytest.raises(LabelsError, match=r"labels \[5\].*'123'"):
        compute_volumes(labels, np.zeros(labels.shape), 1.0, "123", entities=entities)
    with pytest.raises(LabelsError, match="integer"):
        compute_volumes(labels.astype(float), np.zeros(labels.shape), 1.0, "123", entities=entities)
    with pytest.raises(GridError, match="one grid"):
        compute_volumes(labels, np.zeros((4, 4, 3)), 1.0, "1/2/3", entities=entities)
    with pytest.raises(GridError, match="singular"):
        compute_volumes(labels, labels * 0.0, np.zeros((4, 4)), "1/2/3", entities=entities)


def test_icv_estimate(templateflow_home: Path) -> None:
    atlas = (
        templateflow_home
        / "tpl-MNI152NLin2009cSym"
        / "tpl-MNI152NLin2009cSym_res-1_atlas-CerebrA_dseg.nii.gz"
    )
    assert template_brain_volume_mm3(atlas) == TEMPLATE_BRAIN_MM3
    bigger = np.diag([1.1, 1.1, 1.1, 1.0])
    bigger[:3, 3] = [5.0, -3.0, 2.0]  # translation does not change size
    assert estimate_icv_mm3(bigger) == pytest.approx(TEMPLATE_BRAIN_MM3 * 1.331)
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert estimate_icv_mm3(rotation * 0.9) == pytest.approx(TEMPLATE_BRAIN_MM3 * 0.729)
    with pytest.raises(ValueError, match="singular"):
        estimate_icv_mm3(np.zeros((4, 4)))


def test_icv_direction_with_ants(templateflow_home: Path) -> None:
    """ANTs' forward affine (template moved onto subject) maps subject points to the template."""
    import ants

    folder = templateflow_home / "tpl-MNI152NLin2009cSym"
    template = ants.image_read(str(folder / "tpl-MNI152NLin2009cSym_res-1_T1w.nii.gz"))
    template = ants.resample_image(template, (3, 3, 3), use_voxels=False, interp_type=0)
    # The same head 10 % larger along every axis: 1.331 times the volume.
    subject = template.clone()
    subject.set_spacing((3.3, 3.3, 3.3))
    subject.set_origin(tuple(np.array(template.origin) * 1.1))
    reg = ants.registration(fixed=subject, moving=template, type_of_transform="AffineFast",
                            random_seed=1)  # fmt: skip
    try:
        parameters = np.asarray(ants.read_transform(reg["fwdtransforms"][0]).parameters)
    finally:
        for path in {*reg["fwdtransforms"], *reg["invtransforms"]}:
            Path(path).unlink(missing_ok=True)
    subject_to_template = parameters[:9].reshape(3, 3)
    icv = estimate_icv_mm3(np.linalg.inv(subject_to_template))
    assert icv == pytest.approx(TEMPLATE_BRAIN_MM3 * 1.331, rel=0.02)


def test_write_volumes_table_and_sidecar(tmp_path: Path) -> None:
    labels = np.zeros((5, 5, 5), dtype=np.uint8)
    labels[0, 0, :3] = 2
    labels[4, 4, :] = 12
    entities = Entities("02", "1", acq="hr", run="01", contrast="T2w")
    df = compute_volumes(labels, np.full(labels.shape, 0.25), 1.5, "1/23", entities=entities,
                         icv_mm3=estimate_icv_mm3(np.eye(4)))  # fmt: skip
    path = write_volumes(df, volumes_path(tmp_path, entities))
    assert path.name == "sub-02_ses-1_desc-subfields_volumes.tsv"
    assert path.read_text().splitlines()[0].split("\t") == list(COLUMNS)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert list(sidecar) == list(COLUMNS)
    assert all(sidecar[c]["Description"] for c in COLUMNS)
    assert sidecar["volume_mm3"]["Units"] == "mm^3"
    assert "CerebrA" in sidecar["icv_mm3"]["Description"]
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", c) for c in COLUMNS)

    back = pd.read_csv(path, sep="\t", na_values="n/a", dtype={"run": str})
    assert back["run"].tolist() == ["01"] * len(df)
    assert back["volume_mm3"].tolist() == df["volume_mm3"].tolist()
    assert back.loc[back["structure"] == "CA1", "volume_mm3"].tolist() == [4.5, 7.5]
    assert back["icv_mm3"].tolist() == [TEMPLATE_BRAIN_MM3] * len(df)
    assert back["ce"].isna().all()
    assert "n/a" in path.read_text()

    with pytest.raises(ValueError, match="not valid in R"):
        write_volumes(df.rename(columns={"acq": "2acq"}), tmp_path / "bad_volumes.tsv")
    with pytest.raises(ValueError, match="without a description"):
        write_volumes(df.assign(extra=1), tmp_path / "bad_volumes.tsv")
    assert not (tmp_path / "bad_volumes.tsv").exists()


def test_write_segmentation(ds_mini: Path, tmp_path: Path) -> None:
    source = ds_mini / "sub-03/anat/sub-03_T2w.nii.gz"
    reference = nib.load(source)
    labels, _ = _draw_blocks(reference, "1/2/3", np.random.default_rng(1))
    uncertainty = np.zeros(reference.shape, dtype=np.float64)
    uncertainty[labels > 0] = 0.5
    provenance = {"preset": "demo", "ca_mode": "1/2/3", "seed": np.int64(3)}
    uri = bids_uri(source, ds_mini)
    paths = write_segmentation(
        tmp_path, Entities.from_filename(source), labels, uncertainty, reference,
        sources=[uri], provenance=provenance,
    )  # fmt: skip
    assert paths["dseg"].name == "sub-03_space-T2w_desc-subfields_dseg.nii.gz"
    dseg = nib.load(paths["dseg"])
    assert np.array_equal(np.asarray(dseg.dataobj), labels)
    assert dseg.header.get_intent()[0] == "label"
    assert nib.load(paths["uncertainty"]).get_data_dtype() == np.float32
    sidecar = json.loads(paths["dseg_json"].read_text())
    assert sidecar["Sources"] == [uri]
    assert sidecar["SpatialReference"] == uri
    assert sidecar["Provenance"] == {"preset": "demo", "ca_mode": "1/2/3", "seed": 3}
    assert json.loads(paths["uncertainty_json"].read_text())["Units"] == "nat"
    with pytest.raises(GridError, match="integers"):
        write_segmentation(tmp_path, Entities("09", contrast="T2w"), uncertainty, uncertainty,
                           reference, sources=[uri], provenance={})  # fmt: skip
    assert not (tmp_path / "sub-09").exists()
