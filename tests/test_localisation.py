"""Locating the hippocampi on the real ds-mini heads: registration, boxes, crops, QC."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hsf_bids import localisation as L
from hsf_bids.image import from_ras, load_anat, new_image, to_ras
from hsf_bids.localisation import qc as Q
from hsf_bids.localisation import registration as R
from hsf_bids.segment import coregister as C
from hsf_bids.templates import (
    HIPPOCAMPUS_LABELS,
    atlas_path,
    load_atlas,
    load_template,
    template_path,
)
from hsf_bids.vocabulary import SIDES

HEADS = {
    "sub-01_T1w": ("sub-01/anat/sub-01_T1w.nii.gz", "T1w"),
    "sub-02_T2w": ("sub-02/anat/sub-02_T2w.nii.gz", "T2w"),
    "sub-03_T1w": ("sub-03/anat/sub-03_T1w.nii.gz", "T1w"),
    "sub-03_T2w": ("sub-03/anat/sub-03_T2w.nii.gz", "T2w"),
    "sub-04_ses-01_T1w": ("sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz", "T1w"),
    "sub-04_ses-02_T1w": ("sub-04/ses-02/anat/sub-04_ses-02_T1w.nii.gz", "T1w"),
}
# CoBrALab subfield codes (CA1, subiculum, CA4/DG, CA2/CA3, strata) per side.
REFERENCE_CODES = {"left": [7, 8, 9, 10, 11], "right": [88, 89, 90, 91, 92]}


@pytest.fixture(scope="module")
def heads(ds_mini: Path, templateflow_home: Path) -> dict[str, tuple]:
    """Every ds-mini head in RAS+, with its orientation and localisation (one run each)."""
    out = {}
    for key, (rel, contrast) in HEADS.items():
        img = load_anat(ds_mini / rel)
        ras, ornt = to_ras(img)
        loc = L.locate(ras, contrast, seed=0)
        assert not loc.warnings, (key, loc.warnings)  # no head of ds-mini has a QC note
        out[key] = (img, ras, ornt, loc)
    return out


def _box_centre_world(loc: L.Localisation, side: str) -> np.ndarray:
    b = loc.boxes[side]
    centre = (np.asarray(b.label_start) + np.asarray(b.label_stop) - 1) / 2.0
    return loc.affine[:3, :3] @ centre + loc.affine[:3, 3]


# ---------------------------------------------------------------------------------- templates


def test_templates_come_from_templateflow_home(templateflow_home: Path) -> None:
    from templateflow import api  # imported after the fixture exported the home

    for contrast in ("T1w", "T2w"):
        path = template_path(contrast)
        assert path.parent.parent == templateflow_home
        got = api.get("MNI152NLin2009cSym", resolution=1, suffix=contrast, desc=None,
                      extension=".nii.gz")  # fmt: skip
        assert Path(got) == path
    assert atlas_path().parent.parent == templateflow_home
    t1 = load_template("T1w")
    assert t1.get_data_dtype() == np.float32 and t1.shape == (193, 229, 193)
    raw = nib.load(template_path("T1w"))
    assert raw.get_data_dtype() == np.int16
    # The 0.05 scale factor is applied: values are the scaled ones, not the stored integers.
    assert float(t1.dataobj.max()) == pytest.approx(float(raw.get_fdata().max()), rel=1e-5)
    assert float(t1.dataobj.max()) < 0.1 * float(np.asarray(raw.dataobj.get_unscaled()).max())
    atlas = np.asarray(load_atlas().dataobj)
    for label in HIPPOCAMPUS_LABELS.values():
        assert (atlas == label).sum() > 3000
    with pytest.raises(ValueError, match="unknown contrast"):
        template_path("FLAIR")


# ---------------------------------------------------------------------------------- all heads


@pytest.mark.parametrize("key", list(HEADS))
def test_every_head_has_both_hippocampi_inside_their_boxes(heads, key: str) -> None:
    img, ras, _, loc = heads[key]
    assert loc.localisation_ok, loc.failed_checks
    assert loc.warnings == []
    assert list(loc.boxes) == ["right", "left"]
    zooms = np.linalg.norm(ras.affine[:3, :3], axis=0)
    for side, box in loc.boxes.items():
        assert box.label_inside_box, (side, box)
        assert box.fraction_outside == 0.0 and not box.clipped
        assert all(0 <= a < b <= s for a, b, s in zip(box.start, box.stop, ras.shape, strict=True))
        # A hippocampus is roughly 20-50 mm along each axis; the box adds the margins.
        extent = (np.asarray(box.label_stop) - np.asarray(box.label_start)) * zooms
        assert np.all(extent > 12) and np.all(extent < 60), extent
        start, mask = loc.masks[side]
        assert mask.sum() == box.label_voxels
        assert loc.qc[f"{side}_correlation"] > Q.MIN_LOCAL_CORRELATION
    # Right is right: larger x in RAS+ world.
    assert _box_centre_world(loc, "right")[0] > _box_centre_world(loc, "left")[0] + 30
    assert Q.DETERMINANT_RANGE[0] < loc.qc["determinant"] < Q.DETERMINANT_RANGE[1]
    report = loc.to_dict()
    assert report["boxes"]["left"]["shape"] == list(loc.boxes["left"].shape)
    assert np.asarray(report["template_to_subject"]).shape == (4, 4)


@pytest.mark.parametrize("session", ["ses-01", "ses-02"])
def test_reference_subfields_lie_in_the_boxes(heads, shared_dir: Path, session: str) -> None:
    _, ras, _, loc = heads[f"sub-04_{session}_T1w"]
    ref = nib.load(shared_dir / "data/reference" / f"sub-04_{session}_desc-cobralab_dseg.nii.gz")
    ref_ras, _ = to_ras(ref)
    np.testing.assert_allclose(ref_ras.affine, ras.affine, atol=1e-4)
    labels = np.asarray(ref_ras.dataobj)
    for side, codes in REFERENCE_CODES.items():
        voxels = np.isin(labels, codes)
        inside = voxels[loc.boxes[side].slices].sum() / voxels.sum()
        assert inside >= 0.99, (side, inside)
        # The other side's box must not be the one holding them.
        assert voxels[loc.boxes["left" if side == "right" else "right"].slices].sum() == 0


def test_two_grids_of_one_head_give_the_same_place(heads) -> None:
    a = heads["sub-04_ses-01_T1w"][3]
    b = heads["sub-04_ses-02_T1w"][3]
    for side in SIDES:
        assert np.linalg.norm(_box_centre_world(a, side) - _box_centre_world(b, side)) < 3.0
    assert a.qc["determinant"] == pytest.approx(b.qc["determinant"], rel=0.03)


def test_same_seed_gives_identical_results(heads) -> None:
    _, ras, _, first = heads["sub-04_ses-02_T1w"]
    again = L.locate(ras, "T1w", seed=0)
    np.testing.assert_array_equal(again.template_to_subject, first.template_to_subject)
    assert again.boxes == first.boxes


def test_thin_slab_t2w_is_usable_with_another_seed(heads) -> None:
    """sub-03 T2w (1 x 1 x 2 mm, 120 mm slab) is the fragile head: with seed 2 the fast route
    stops in a poor optimum (local correlation about 0.35); locate must retry and end usable."""
    _, ras, _, _ = heads["sub-03_T2w"]
    loc = L.locate(ras, "T2w", seed=2)
    assert loc.localisation_ok, loc.failed_checks
    assert min(loc.qc["right_correlation"], loc.qc["left_correlation"]) > L.RETRY_CORRELATION
    assert loc.qc["retried"] == 1.0 and loc.schedule == L.FINE_SCHEDULE
    assert loc.to_dict()["schedule"]["levels_mm"] == [8.0, 4.0, 2.0]
    assert all(box.label_inside_box for box in loc.boxes.values())


def test_explicit_margin(heads) -> None:
    _, ras, _, loc = heads["sub-04_ses-01_T1w"]
    wide = L.assess(ras, "T1w", loc.template_to_subject, margin=(16, 4, 16))
    for side in SIDES:
        a, b = loc.boxes[side], wide.boxes[side]
        assert a.margin == (8, 8, 8) and b.margin == (16, 4, 16)
        assert b.label_start == a.label_start and b.label_stop == a.label_stop
        assert np.array_equal(np.asarray(b.shape) - np.asarray(a.shape), [16, -8, 16])
    with pytest.raises(ValueError, match="margin"):
        L.assess(ras, "T1w", loc.template_to_subject, margin=(8, 8))
    with pytest.raises(ValueError, match="margin"):
        L.assess(ras, "T1w", loc.template_to_subject, margin=(8, -1, 8))


def test_auto_margin() -> None:
    assert L.auto_margin([1, 1, 1]) == (8, 8, 8)
    assert L.auto_margin([0.9, 1.0, 1.2]) == (8, 8, 8)
    assert L.auto_margin([0.4, 2.0, 0.4]) == (16, 4, 16)  # HSF's coronal thick-slice T2
    assert L.auto_margin([1.0, 1.0, 2.0]) == (16, 16, 4)  # axial thick slices
    with pytest.raises(ValueError):
        L.auto_margin([1.0, 0.0, 1.0])


def test_thick_slice_head_gets_the_thick_slice_margin(heads) -> None:
    loc = heads["sub-03_T2w"][3]  # 1 x 1 x 2 mm axial
    assert loc.boxes["left"].margin == (16, 16, 4)


def test_locate_refuses_non_ras_input(heads) -> None:
    img = heads["sub-02_T2w"][0]  # stored LAS
    with pytest.raises(ValueError, match="RAS"):
        L.locate(img, "T2w")


# ---------------------------------------------------------------------------------- crops


def _stored_variants(img: nib.Nifti1Image) -> dict[str, nib.Nifti1Image]:
    """One head stored RAS, LAS, LPS and with an oblique affine (same voxels, no resampling)."""
    data = np.asarray(img.dataobj)
    affine = img.affine
    n = np.asarray(data.shape) - 1
    flip_x = np.diag([-1.0, 1, 1, 1])
    flip_x[0, 3] = n[0]
    flip_xy = np.diag([-1.0, -1, 1, 1])
    flip_xy[:2, 3] = n[:2]
    t = np.deg2rad(12)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return {
        "RAS": new_image(data, affine),
        "LAS": new_image(data[::-1].copy(), affine @ flip_x),
        "LPS": new_image(data[::-1, ::-1].copy(), affine @ flip_xy),
        "oblique": new_image(data[::-1].copy(), tilt @ affine @ flip_x),
    }


def test_crop_then_paste_back_is_exact_in_every_storage(heads) -> None:
    img = heads["sub-04_ses-01_T1w"][0]  # stored RAS
    loc = heads["sub-04_ses-01_T1w"][3]
    for name, variant in _stored_variants(img).items():
        ras, ornt = to_ras(variant)
        assert ras.shape == loc.shape
        if name == "oblique":
            # Another place in the world: take boxes for this grid through its own affine.
            tilt = variant.affine @ np.linalg.inv(_stored_variants(img)["LAS"].affine)
            boxes = L.assess(ras, "T1w", tilt @ loc.template_to_subject).boxes
            for side in SIDES:
                assert boxes[side].start == loc.boxes[side].start, name
        else:
            boxes = loc.boxes
        data = np.asarray(ras.dataobj)
        native = np.asarray(variant.dataobj)
        assembled = np.zeros(ras.shape, dtype=data.dtype)
        for box in boxes.values():
            piece = L.crop(data, box)
            assert piece.shape == box.shape
            L.paste_back(piece, box, ras.shape, out=assembled)
            alone = from_ras(L.paste_back(piece, box, ras.shape), ornt)
            assert alone.shape == native.shape
            inside = from_ras(L.paste_back(np.ones(box.shape, bool), box, ras.shape), ornt)
            # Exactly the original voxels inside the box, at their original places.
            np.testing.assert_array_equal(alone[inside], native[inside], err_msg=name)
            assert not alone[~inside].any()
            assert inside.sum() == np.prod(box.shape)
        back = from_ras(assembled, ornt)
        covered = back != 0
        np.testing.assert_array_equal(back[covered], native[covered], err_msg=name)


def test_paste_back_carries_channels_and_checks_shapes(heads) -> None:
    loc = heads["sub-04_ses-01_T1w"][3]
    box = loc.boxes["left"]
    probs = np.random.default_rng(0).random((*box.shape, 6)).astype(np.float32)
    full = L.paste_back(probs, box, loc.shape)
    assert full.shape == (*loc.shape, 6)
    np.testing.assert_array_equal(L.crop(full, box), probs)
    with pytest.raises(ValueError, match="does not match"):
        L.paste_back(probs[1:], box, loc.shape)


def test_make_box_edges() -> None:
    mask = np.ones((4, 5, 6), bool)
    inside = L.make_box("left", (10, 10, 10), mask, (40, 40, 40), (0, 0, 0))
    assert inside.start == (10, 10, 10) and inside.stop == (14, 15, 16)  # last voxel kept
    edge = L.make_box("left", (2, 30, 10), mask, (40, 40, 40), (8, 8, 8))
    assert edge.start == (0, 22, 2) and edge.stop == (13, 40, 23)  # [min - 8, max + 8)
    assert edge.clipped_voxels == (6, 2, 0) and edge.label_voxels_outside == 0
    out = L.make_box("right", (-2, 10, 10), mask, (40, 40, 40), (8, 8, 8))
    assert out.label_voxels_outside == 2 * 5 * 6
    assert out.fraction_outside == pytest.approx(0.5)
    assert not out.label_inside_box
    with pytest.raises(L.LocalisationError, match="entirely outside"):
        L.make_box("right", (-20, 10, 10), mask, (40, 40, 40), (8, 8, 8))


# ---------------------------------------------------------------------------------- QC


def test_qc_flags_a_shifted_registration(heads) -> None:
    _, ras, _, loc = heads["sub-04_ses-01_T1w"]
    shift = np.eye(4)
    shift[:3, 3] = [0.0, 12.0, 0.0]  # 12 mm forward: the box would miss the hippocampus tail
    bad = L.assess(ras, "T1w", shift @ loc.template_to_subject)
    assert not bad.localisation_ok
    assert any("disagree" in c.meaning for c in bad.failed_checks), bad.failed_checks
    assert bad.qc["left_correlation"] < loc.qc["left_correlation"] - 0.2


def test_checks_are_judged_once_as_data(heads) -> None:
    """Every check of a good head passed; the list survives JSON; the fast schedule is kept."""
    import json

    loc = heads["sub-04_ses-01_T1w"][3]
    names = [c.name for c in loc.checks]
    assert names == [
        "determinant", "scaling", "brain_correlation", "right_correlation",
        "right_field_of_view", "left_correlation", "left_field_of_view", "sides",
    ]  # fmt: skip
    assert all(c.passed for c in loc.checks) and loc.localisation_ok
    record = json.loads(json.dumps(loc.to_dict()))
    assert record["localisation_ok"] is True and "qc_ok" not in record
    again = [L.QcCheck.from_dict(c) for c in record["checks"]]
    assert again == loc.checks
    assert record["schedule"] == L.FAST_SCHEDULE.to_dict() and loc.qc["retried"] == 0.0
    brain = loc.checks[2]
    assert brain.value == pytest.approx(loc.qc["brain_correlation"])
    assert brain.limit == f">= {Q.MIN_BRAIN_CORRELATION}"


def test_a_left_right_swap_fails_the_sides_check(heads) -> None:
    _, ras, _, loc = heads["sub-04_ses-01_T1w"]
    centre = ras.affine[:3, :3] @ (np.asarray(ras.shape) - 1) / 2 + ras.affine[:3, 3]
    mirror = np.eye(4)
    mirror[0, 0], mirror[0, 3] = -1.0, 2 * centre[0]  # x -> -x about the head's centre
    swapped = L.assess(ras, "T1w", mirror @ loc.template_to_subject)
    failed = {c.name: c for c in swapped.failed_checks}
    assert "sides" in failed and "determinant" in failed, swapped.failed_checks
    assert failed["sides"].meaning == "the right hippocampus was found left of the left one"


def test_qc_flags_an_implausible_scale(heads) -> None:
    _, ras, _, loc = heads["sub-04_ses-01_T1w"]
    squash = np.diag([1.0, 1.0, 0.5, 1.0])
    bad = L.assess(ras, "T1w", loc.template_to_subject @ squash)
    assert {c.name for c in bad.failed_checks} & {"scaling", "determinant"}, bad.failed_checks
    assert any("scal" in c.meaning or "size" in c.meaning for c in bad.failed_checks)


def test_head_cut_through_the_hippocampi_is_flagged(heads, caplog) -> None:
    """A field of view ending mid-hippocampus: registered anyway, warned, failing its checks."""
    _, ras, _, loc = heads["sub-04_ses-01_T1w"]
    box = loc.boxes["left"]
    cut = (box.label_start[2] + box.label_stop[2]) // 2  # drop everything below mid-height
    data = np.asarray(ras.dataobj)[:, :, cut:]
    affine = ras.affine.copy()
    affine[:3, 3] += affine[:3, 2] * cut
    partial = new_image(np.ascontiguousarray(data), affine)
    with caplog.at_level(logging.WARNING, logger="hsf_bids.localisation"):
        res = L.locate(partial, "T1w")
    logged = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("hsf_bids.localisation") and r.levelno == logging.WARNING
    ]
    assert any("outside the field of view" in message for message in logged), logged
    assert logged == res.warnings  # the kept attempt's notes, each logged once
    assert not res.localisation_ok
    assert {c.name for c in res.failed_checks} >= {"right_field_of_view", "left_field_of_view"}
    for side in SIDES:
        b = res.boxes[side]
        assert 0.2 < b.fraction_outside < 0.8, (side, b.fraction_outside)
        assert b.start[2] == 0 and b.clipped
        assert f"{b.fraction_outside:.1%}" in " ".join(res.warnings)


# ---------------------------------------------------------------------------------- multispectral


def test_t2w_registers_onto_the_t1w_of_the_same_head(heads) -> None:
    _, t1, _, loc_t1 = heads["sub-03_T1w"]
    _, t2, _, loc_t2 = heads["sub-03_T2w"]
    moving_to_fixed = C.register_to(t2, t1, seed=0)
    lin = moving_to_fixed[:3, :3]
    np.testing.assert_allclose(lin @ lin.T, np.eye(3), atol=1e-4)  # rigid by default
    # Two independent routes to the hippocampi agree: T2w boxes mapped onto the T1w.
    for side in SIDES:
        via_t2 = moving_to_fixed[:3, :3] @ _box_centre_world(loc_t2, side) + moving_to_fixed[:3, 3]
        assert np.linalg.norm(via_t2 - _box_centre_world(loc_t1, side)) < 5.0, side
    resampled = C.resample_to(t2, t1, moving_to_fixed)
    assert resampled.shape == t1.shape
    np.testing.assert_allclose(resampled.affine, t1.affine)
    # Better agreement with the T1w than the headers alone give (joint-histogram MI).
    t1d = np.asarray(t1.dataobj, float)
    header_only = np.asarray(C.resample_to(t2, t1).dataobj)
    assert _mutual_information(t1d, np.asarray(resampled.dataobj)) > 1.5 * _mutual_information(
        t1d, header_only
    )


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    keep = (a > 0) & (b > 0)
    hist, _, _ = np.histogram2d(a[keep], b[keep], bins=32)
    p = hist / hist.sum()
    outer = p.sum(axis=1, keepdims=True) @ p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def test_box_survives_a_json_round_trip():
    import json

    box = L.make_box("left", (3, 4, 5), np.ones((6, 7, 8), bool), (20, 30, 40), (8, 8, 8))
    again = L.Box.from_dict(json.loads(json.dumps(box.to_dict())))
    assert again == box
    assert again.slices == box.slices and again.clipped_voxels == box.clipped_voxels


# ---------------------------------------------------------------------------------- ANTs access


def test_registration_runs_without_importing_the_ants_package(ds_mini, templateflow_home) -> None:
    """A fresh process localises a head through antspyx's compiled library only (``import
    ants`` costs seconds of start-up); ``import ants`` still works afterwards, on that library."""
    import subprocess
    import sys

    head = ds_mini / HEADS["sub-02_T2w"][0]
    code = f"""
import sys
from hsf_bids.image import load_anat, to_ras
from hsf_bids.localisation import locate
ras, _ = to_ras(load_anat({str(head)!r}))
loc = locate(ras, "T2w", seed=0)
assert loc.boxes["left"].label_voxels > 0 and loc.boxes["right"].label_voxels > 0
print("ants imported:", "ants" in sys.modules)
lib = sys.modules["ants.lib"]
import numpy as np
import ants
import ants.internal
image = ants.from_numpy(np.ones((4, 5, 6), np.float32))
print("reused:", ants.internal.lib is lib, image.shape == (4, 5, 6))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "ants imported: False" in done.stdout
    assert "reused: True True" in done.stdout


def test_transform_file_reads_as_ants_does(heads, tmp_path: Path) -> None:
    """The ``.mat`` reader (scipy) gives the same map as ANTs' own reader on a real result."""
    import ants

    _, ras, _, _ = heads["sub-04_ses-01_T1w"]
    subject = R.world_grid(np.asarray(ras.dataobj), np.asarray(ras.affine), 4.0)
    template = R.template_grid("T1w", 4.0)
    lib = R._ants_library()
    f = R._write_grid(*subject, str(tmp_path / "fixed.nii"))
    m = R._write_grid(*template, str(tmp_path / "moving.nii"))
    args = ["--dimensionality", "3", "--float", "1", "--output", str(tmp_path / "reg_"),
            "--initial-moving-transform", f"[{f},{m},1]", "--transform", "Affine[0.25]",
            "--metric", f"MI[{f},{m},1,32,Regular,0.2]", "--convergence", "[20,1e-6,10]",
            "--shrink-factors", "2", "--smoothing-sigmas", "1vox",
            "--random-seed", "1"]  # fmt: skip
    assert lib.antsRegistration(args) == 0
    path = str(tmp_path / "reg_0GenericAffine.mat")
    ours = R._read_ants_affine(path)
    tx = ants.read_transform(path)
    # ANTs' own route: subject (fixed) points through its transform, LPS in and out.
    points = np.array([[30.0, -20.0, -10.0], [-28.0, -22.0, -14.0], [0.0, 0.0, 0.0]])
    for ras_point in points:
        lps = ras_point * [-1, -1, 1]
        expected = np.asarray(tx.apply_to_point(tuple(lps))) * [-1, -1, 1]
        np.testing.assert_allclose(ours[:3, :3] @ ras_point + ours[:3, 3], expected, atol=1e-4)
    assert not np.allclose(ours, np.eye(4), atol=1e-3)  # a real, non-trivial registration
