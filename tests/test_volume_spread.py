"""Volumes with error bars: each structure's spread over the ensemble's predictions (issue 18).

One seeded participant run of ds-mini sub-04 ses-01 with the demo hub (3 models x 21 inputs per
side) is shared by the module; the spread is then recomputed here from each model's individual
predictions, built step by step from the public pieces of the HSF contract (augmentation, z-score,
padding, the network, ``ca_mode`` merging, the inverse augmentation), one model at a time.
"""

from __future__ import annotations

import html as html_text
import json
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import finish, hsf_bids, require

from hsf_bids import stages
from hsf_bids.bids import validate_dataset
from hsf_bids.cli.run import main
from hsf_bids.engines import load_network
from hsf_bids.group.tables import add_flags, wide_table
from hsf_bids.image import load_anat, to_ras
from hsf_bids.localisation import Box, crop
from hsf_bids.outputs.volumes import spread
from hsf_bids.reports.collect import outside_range
from hsf_bids.reports.render import write_subject_report
from hsf_bids.segment import (
    HSF_TTA,
    EnsembleSettings,
    merge_ca,
    pad_to_multiple,
    sample_augmentations,
    segment_crop,
    unpad,
    zscore,
)
from hsf_bids.settings import ModelSpec, SegmentationSettings
from hsf_bids.vocabulary import SIDES, structures

SEED = 7
SOURCE = "sub-04_ses-01_T1w"
HEAD = Path("sub-04/ses-01/anat") / f"{SOURCE}.nii.gz"
ANAT = Path("sub-04/ses-01/anat")
SPREAD = ["volume_sd_mm3", "volume_p05_mm3", "volume_p95_mm3"]
CA_MODE, N_AUG = "1/2/3", 20  # the demo hub's

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def started(ds_mini, demo_hub, templateflow_home, tmp_path_factory) -> dict:
    """The seeded participant run, started (the recomputation overlaps its segmentation)."""
    root = tmp_path_factory.mktemp("spread")
    out, work = root / "out", root / "work"
    proc = hsf_bids(
        ds_mini, out, "participant", "--participant-label", "04", "--session-label", "01",
        "--hub", demo_hub, "--engine", "openvino", "--precision", "fp32", "--nprocs", "1",
        "--seed", str(SEED), "-w", work,
    )  # fmt: skip
    yield {"proc": proc, "out": out, "work": work}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def run(started, recomputed, demo_models) -> dict:
    """The finished run: output and work folders and what it wrote for the image."""
    proc, out = started["proc"], started["out"]
    log = finish(proc)
    assert proc.returncode == 0, log
    table = pd.read_csv(out / ANAT / "sub-04_ses-01_desc-subfields_volumes.tsv", sep="\t")
    dseg = out / ANAT / "sub-04_ses-01_space-T1w_desc-subfields_dseg.json"
    sidecar = json.loads(dseg.read_text())
    # The recomputation used the run's settings and boxes.
    provenance = sidecar["Provenance"]
    assert provenance["Seed"] == SEED and provenance["TestTimeAugmentation"]
    assert (provenance["CaMode"], provenance["NumAugmentations"]) == (CA_MODE, N_AUG)
    assert [m["File"] for m in provenance["Models"]] == [p.name for p in demo_models]
    assert {(m["Engine"], m["Precision"]) for m in provenance["Models"]} == {("openvino", "fp32")}
    assert provenance["Localisation"]["boxes"] == recomputed["boxes"]
    return {**started, "table": table, "sidecar": sidecar}


def _row(table: pd.DataFrame, side: str, structure: str) -> pd.Series:
    rows = table[(table["side"] == side) & (table["structure"] == structure)]
    assert len(rows) == 1
    return rows.iloc[0]


def _localisation(started: dict, timeout: float = 600) -> dict:
    """The run's localisation, as soon as it is written (atomically)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(started["work"].rglob(f"localise/{stages.LOCALISATION_JSON}"))
        if found:
            return json.loads(found[0].read_text())
        if started["proc"].poll() is not None:
            pytest.fail("the run ended before localising:\n" + finish(started["proc"]))
        time.sleep(0.5)
    pytest.fail(f"no localisation after {timeout} s")


@pytest.fixture(scope="module")
def recomputed(started, ds_mini, demo_models) -> dict:
    """Each prediction's label counts, recomputed one model at a time while the run segments:
    side -> int array ``[models, 1 + copies, labels]``; also the boxes, each side's crop and
    the loaded networks."""
    boxes = _localisation(started)["boxes"]
    # As the run (--nprocs 1: one thread per network).
    networks = [
        load_network(p, engine="openvino", precision="fp32", threads=1) for p in demo_models
    ]
    ras, _ = to_ras(load_anat(ds_mini / HEAD))
    spacing = tuple(float(z) for z in ras.header.get_zooms()[:3])
    data = np.asarray(ras.dataobj)
    counts, crops = {}, {}
    n_labels = len(structures(CA_MODE)) + 1
    for side in SIDES:
        crops[side] = (crop(data, Box.from_dict(boxes[side])), spacing)
        image = crops[side][0]
        # The run draws the side's augmentations from this stream before any model runs.
        augmentations = [None, *sample_augmentations(
            stages.side_seed(SEED, side), N_AUG, image.shape, spacing, HSF_TTA
        )]  # fmt: skip
        per_model = np.zeros((len(networks), len(augmentations), n_labels), dtype=np.int64)
        for number, network in enumerate(networks):
            for copy, aug in enumerate(augmentations):
                seen = image if aug is None else aug.apply(image)
                batch, pads = pad_to_multiple(zscore(seen)[None, None])
                probs = network.run(np.ascontiguousarray(batch, dtype=np.float32))
                merged = merge_ca(unpad(np.asarray(probs), pads), CA_MODE)[0]
                back = merged if aug is None else aug.invert(merged)
                per_model[number, copy] = np.bincount(back.argmax(0).ravel(), minlength=n_labels)
        counts[side] = per_model
    return {"counts": counts, "crops": crops, "networks": networks, "ca_mode": CA_MODE,
            "boxes": boxes}  # fmt: skip


def _volumes(counts: np.ndarray, ca_mode: str) -> dict[str, np.ndarray]:
    """Each structure's (and HC's) volume per prediction; ds-mini's voxels are 1 mm3."""
    flat = counts.reshape(-1, counts.shape[-1]).astype(float)
    out = {s.abbreviation: flat[:, s.label] for s in structures(ca_mode)}
    out["HC"] = flat[:, 1:].sum(axis=1)
    return out


def test_spread_columns_equal_the_recomputation_from_each_prediction(run, recomputed, ds_mini):
    table, ca_mode = run["table"], recomputed["ca_mode"]
    assert nib.load(ds_mini / HEAD).header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    for side in SIDES:
        volumes = _volumes(recomputed["counts"][side], ca_mode)
        for structure, values in volumes.items():
            row = _row(table, side, structure)
            assert row["n_predictions"] == values.size == 63
            expected = [np.std(values, ddof=1), *np.percentile(values, [5, 95])]
            assert [row[c] for c in SPREAD] == [round(float(v), 4) for v in expected], (
                side, structure
            )  # fmt: skip
            assert row["volume_sd_mm3"] > 0 or values.max() == 0
    # Each model's own mean and SD over its 21 predictions, in the segmentation's sidecar.
    models = run["sidecar"]["EnsembleVolumes"]["Models"]
    assert [m["NumPredictions"] for m in models] == [21, 21, 21]
    for number, model in enumerate(models):
        for side in SIDES:
            own = _volumes(recomputed["counts"][side][number], ca_mode)
            assert model["MeanVolume"][side] == {k: round(v.mean(), 4) for k, v in own.items()}
            assert model["SDVolume"][side] == {
                k: round(v.std(ddof=1), 4) for k, v in own.items()
            }  # fmt: skip


def test_the_recomputation_is_the_library_s_own_prediction(recomputed):
    """Copy 0 of each model is what segment_crop gives for that model alone without
    augmentation; and the run's record is the same whatever the fusion."""
    crops, networks, ca_mode = recomputed["crops"], recomputed["networks"], recomputed["ca_mode"]
    for side in SIDES[:1]:
        for number, network in enumerate(networks):
            alone = segment_crop(
                [crops[side]], [network], EnsembleSettings(ca_mode, test_time_augmentation=False)
            )
            labels = np.bincount(alone.labels.ravel(), minlength=len(alone.label_names))
            np.testing.assert_array_equal(labels, recomputed["counts"][side][number, 0])
            np.testing.assert_array_equal(alone.prediction_counts[0, 0, 0], labels)
    settings = {"ca_mode": ca_mode, "num_augmentations": 2}
    vote, mean = (
        segment_crop([crops["left"]], networks[:2], EnsembleSettings(fusion=f, **settings),
                     seed=stages.side_seed(SEED, "left"))
        for f in ("vote", "mean")
    )  # fmt: skip
    assert vote.prediction_counts.shape == (1, 3, 2, len(vote.label_names))
    np.testing.assert_array_equal(vote.prediction_counts, mean.prediction_counts)
    np.testing.assert_array_equal(
        vote.prediction_counts[0, :, :], recomputed["counts"]["left"][:2, :3].transpose(1, 0, 2)
    )


def test_the_vote_lies_in_the_range_or_the_report_says_why(run, ds_mini, tmp_path):
    table = run["table"]
    report = html_text.unescape((run["out"] / "sub-04.html").read_text())
    predicted = table[table["volume_p95_mm3"] > 0]
    assert len(predicted) >= 8  # every structure but CA2, on both sides
    outside = {}
    for row in predicted.itertuples():
        inside = row.volume_p05_mm3 <= row.volume_mm3 <= row.volume_p95_mm3
        note = f"{row.side} {row.structure}: the vote's volume ({row.volume_mm3:g} mm3) is "
        assert (note in report) != inside, (row.side, row.structure)
        if not inside:
            outside[(row.side, row.structure)] = note
    # The note is written for any row outside its range: move one volume out and rerender.
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    path = out / ANAT / "sub-04_ses-01_desc-subfields_volumes.tsv"
    edited = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    dg = (edited["side"] == "left") & (edited["structure"] == "DG")
    low = float(edited.loc[dg, "volume_p05_mm3"].item())
    edited.loc[dg, "volume_mm3"] = f"{low - 100:.1f}"
    edited.to_csv(path, sep="\t", index=False)
    write_subject_report(out, "04", bids_dir=ds_mini)
    html = html_text.unescape((out / "sub-04.html").read_text())
    assert f"left DG: the vote's volume ({low - 100:g} mm3) is below the ensemble's 5-95 %" in html
    assert "keeps only the voxels most predictions agree on" in html
    assert 'class="outside"' in html
    # And above the range: the plurality, not the majority, explains it.
    rows = [{"side": "right", "structure": "CA3", "volume_mm3": "300", "volume_p05_mm3": "150",
             "volume_p95_mm3": "290", "n_predictions": "63"}]  # fmt: skip
    flag = outside_range(rows)[("right", "CA3")]
    assert flag.level == "info" and "above the ensemble's 5-95 % range (150-290 mm3" in flag.text
    assert "without a majority" in flag.text


def test_a_single_prediction_has_no_spread(run, demo_models, ds_mini, tmp_path):
    """One model without augmentation: n_predictions 1 and n/a (not 0) for the spread."""
    settings = SegmentationSettings(
        models=(ModelSpec(str(demo_models[0]), "unused", "onnxruntime/fp32/cpu"),),
        ensemble=EnsembleSettings(test_time_augmentation=False),
        seed=SEED, threads=1, provenance={"Models": [{"File": demo_models[0].name}]},
    )  # fmt: skip
    loc = next(run["work"].rglob("localise/localisation.json"))
    head = ds_mini / HEAD
    outputs = {}
    for side in SIDES:
        (tmp_path / side).mkdir()
        outputs[side] = stages.segment_side([head], loc, side, tmp_path / side, settings)
    (tmp_path / "paste").mkdir()
    dseg, unc = stages.paste_back_sides(
        head, loc, {s: o[0] for s, o in outputs.items()}, {s: o[1] for s, o in outputs.items()},
        tmp_path / "paste",
    )  # fmt: skip
    written, part = stages.write_derivatives(
        dseg, unc, loc, source_file=head, sources=["bids:raw:" + HEAD.as_posix()],
        output_dir=tmp_path / "out", contrast="T1w", settings=settings, out_dir=tmp_path,
        predictions={s: o[2] for s, o in outputs.items()},
    )  # fmt: skip
    text = pd.read_csv(part, sep="\t", dtype=str, keep_default_na=False)
    assert (text["n_predictions"] == "1").all()
    for column in SPREAD:
        assert (text[column] == "n/a").all(), column
    table = pd.read_csv(part, sep="\t", na_values=["n/a"], keep_default_na=False)
    assert table[SPREAD].isna().all().all() and (table["volume_mm3"] > 0).any()
    sidecar = json.loads(written["dseg_json"].read_text())
    (model,) = sidecar["EnsembleVolumes"]["Models"]
    assert model["NumPredictions"] == 1 and model["SDVolume"]["left"]["HC"] is None
    hc = table[table["structure"] == "HC"].set_index("side")["volume_mm3"]
    assert model["MeanVolume"]["left"]["HC"] == hc["left"]
    assert spread(np.array([5.0])) == {**dict.fromkeys(SPREAD), "n_predictions": 1}
    require(shutil.which("Rscript") is not None, "Rscript is not installed")
    names, (kind, missing) = _r_read(part, "volume_p95_mm3")
    assert "volume_p95_mm3" in names and kind == "logical" and missing == str(len(table))


def _r_read(path: Path, column: str) -> tuple[list[str], list[str]]:
    script = (f'x <- read.delim("{path}", na.strings="n/a"); cat(names(x), sep="\\n"); '
              'cat("--\\n"); '
              f'cat(class(x${column}), sum(is.na(x${column})), sep="\\n")')  # fmt: skip
    proc = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=True)
    names, _, rest = proc.stdout.partition("--\n")
    return names.split(), rest.split()


def test_group_tables_and_r_and_the_validator(run, ds_mini, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    assert main([str(ds_mini), str(out), "group", "--participant-label", "04"]) == 0
    capsys.readouterr()
    long = pd.read_csv(out / "group_volumes_long.tsv", sep="\t")
    wide = pd.read_csv(out / "group_volumes_wide.tsv", sep="\t")
    table = run["table"]
    for row in table.itertuples():
        match = long[(long["side"] == row.side) & (long["structure"] == row.structure)]
        assert [match[c].item() for c in [*SPREAD, "n_predictions"]] == [
            getattr(row, c) for c in [*SPREAD, "n_predictions"]
        ]
        stem = f"{row.side}_{row.structure}"
        assert [wide[f"{stem}_{s}_mm3"].item() for s in ("sd", "p05", "p95")] == [
            getattr(row, c) for c in SPREAD
        ]
    assert wide["n_predictions"].item() == 63
    hc = long[long["structure"] == "HC"]
    np.testing.assert_allclose(
        hc["relative_spread"], (hc["volume_sd_mm3"] / hc["volume_mm3"]).round(4)
    )
    assert not long["flag_spread"].any()  # one image: no group to be far from
    dictionary = json.loads((out / "group_volumes_wide.json").read_text())
    assert dictionary["left_HC_p95_mm3"]["Description"].startswith("Ensemble 95th percentile")
    assert (
        "not a confidence interval"
        in json.loads((out / ANAT / "sub-04_ses-01_desc-subfields_volumes.json").read_text())[
            "volume_sd_mm3"
        ]["Description"]
    )
    report = (out / "group_report.html").read_text()
    left_hc = _row(table, "left", "HC")
    assert f"{left_hc.volume_p05_mm3:.0f}–{left_hc.volume_p95_mm3:.0f}" in report
    assert report.count('class="range"/>') == len(table)  # one bar per point
    require(shutil.which("Rscript") is not None, "Rscript is not installed")
    for path in (out / ANAT / "sub-04_ses-01_desc-subfields_volumes.tsv",
                 out / "group_volumes_long.tsv", out / "group_volumes_wide.tsv"):  # fmt: skip
        names, (kind, missing) = _r_read(
            path, "volume_sd_mm3" if "wide" not in path.name else "left_HC_sd_mm3"
        )
        assert names == path.read_text().splitlines()[0].split("\t")
        assert kind == "numeric" and missing == "0"
    errors, _ = validate_dataset(out)
    assert errors == [], errors


def test_the_group_flags_an_image_whose_hippocampus_spread_is_far_above_the_group():
    rows = []
    for i in range(1, 10):
        sd = 900.0 if i == 9 else 100.0 + 5 * i  # sub-09: the models disagree
        for side in SIDES:
            for structure, volume in (("DG", 1000.0), ("HC", 3000.0 + 10 * i)):
                rows.append({
                    "participant_id": f"sub-{i:02d}", "session_id": pd.NA, "acq": pd.NA,
                    "ce": pd.NA, "rec": pd.NA, "run": pd.NA, "contrast": "T1w",
                    "source": f"sub-{i:02d}_T1w", "side": side, "structure": structure,
                    "label": pd.NA, "n_voxels": int(volume), "volume_mm3": volume,
                    "volume_sd_mm3": sd if structure == "HC" else 50.0 + i,
                    "volume_p05_mm3": volume - sd, "volume_p95_mm3": volume + sd,
                    "n_predictions": 63, "mean_uncertainty": 0.2, "icv_mm3": 1.4e6,
                    "localisation_ok": True, "volumes_file": "x",
                })  # fmt: skip
    long = add_flags(pd.DataFrame(rows))
    flagged = long[long["flag_spread"]]
    assert sorted(zip(flagged["participant_id"], flagged["side"], strict=True)) == [
        ("sub-09", "left"), ("sub-09", "right")
    ]  # fmt: skip
    assert (flagged["structure"] == "HC").all() and (flagged["spread_z"] > 3.5).all()
    wide = wide_table(long).set_index("participant_id")
    assert sorted(wide.loc["sub-09", "flags"].split("; ")) == [
        "left HC ensemble spread high", "right HC ensemble spread high"
    ]  # fmt: skip
    assert wide.loc["sub-01", "n_flags"] == 0
    assert wide.loc["sub-09", "left_HC_sd_mm3"] == 900.0
    # Tables of an older version, without the spread: no flag, n/a columns.
    old = add_flags(pd.DataFrame(rows).drop(columns=[*SPREAD, "n_predictions"]))
    assert not old["flag_spread"].any() and old["spread_z"].isna().all()
