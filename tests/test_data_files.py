"""The files users copy from data/ work with the app as their comments say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hsf_bids.bids import collect_jobs, load_bids_filters
from hsf_bids.cli.run import build_config
from hsf_bids.hub import ensure_models, load_hub, xxh3_64_file

DATA = Path(__file__).resolve().parents[1] / "data"


def test_every_file_in_data_is_listed_in_its_readme():
    readme = (DATA / "README.md").read_text()
    files = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file())
    assert files, "data/ is empty"
    for name in files:
        if name != "README.md":
            assert f"`{name}`" in readme, f"data/{name} is not described in data/README.md"


def test_the_hub_example_loads_and_works_once_its_models_are_filled_in(tmp_path, demo_models):
    example = load_hub(DATA / "hub" / "lab_models.yaml")
    assert example.ca_mode == "1/2/3"
    assert [m.name for m in example.models] == ["lab_unet_fold0.onnx", "lab_unet_fold1.onnx"]
    assert example.test_time_augmentation and example.test_time_num_aug == 10

    # What a user does: copy it beside their models and put in the files' checksums.
    hub = yaml.safe_load((DATA / "hub" / "lab_models.yaml").read_text())
    for (name, entry), model in zip(hub["models"].items(), demo_models, strict=False):
        shutil.copy(model, tmp_path / name)
        entry["xxh3_64"] = xxh3_64_file(tmp_path / name)
    (tmp_path / "lab_models.yaml").write_text(yaml.safe_dump(hub))
    preset = load_hub(tmp_path / "lab_models.yaml")
    paths = ensure_models(preset, tmp_path / "models", offline=True)
    assert paths == [tmp_path / "lab_unet_fold0.onnx", tmp_path / "lab_unet_fold1.onnx"]


def _dataset(root: Path, ds_mini: Path, names: list[str]) -> Path:
    """A one-subject BIDS dataset whose images (links to a ds-mini head) carry ``names``."""
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "filters", "BIDSVersion": "1.9.0"})
    )
    head = ds_mini / "sub-03" / "anat"
    for name in names:
        contrast = name.split("_")[-1]
        (anat / f"{name}.nii.gz").symlink_to(head / f"sub-03_{contrast}.nii.gz")
    return root


def _selected(jobs) -> list[tuple[str, str | None]]:
    return [(j.image.path.name, j.secondary.path.name if j.secondary else None) for j in jobs]


def test_the_hippocampal_t2w_filter_picks_the_mprage_and_the_hippocampal_t2w(tmp_path, ds_mini):
    root = _dataset(tmp_path, ds_mini, [
        "sub-01_acq-mprage_T1w", "sub-01_acq-fast_T1w",
        "sub-01_acq-hippocampus_T2w", "sub-01_acq-wholebrain_T2w",
    ])  # fmt: skip
    filters = load_bids_filters(DATA / "bids_filters" / "hippocampal_t2w.json")
    jobs, problems = collect_jobs(root, bids_filters=filters)
    assert _selected(jobs) == [
        ("sub-01_acq-mprage_T1w.nii.gz", "sub-01_acq-hippocampus_T2w.nii.gz")
    ]
    assert problems == []


def test_the_raw_only_filter_skips_reconstructed_variants(tmp_path, ds_mini):
    root = _dataset(tmp_path, ds_mini, ["sub-01_T1w", "sub-01_rec-norm_T1w", "sub-01_T2w"])
    filters = load_bids_filters(DATA / "bids_filters" / "raw_only.json")
    jobs, _ = collect_jobs(root, bids_filters=filters)
    assert _selected(jobs) == [("sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz")]
    everything, _ = collect_jobs(root)
    assert len(everything) > len(jobs)


@pytest.mark.parametrize(
    ("name", "plugin", "args"),
    [
        ("multiproc.yml", "MultiProc", dict(n_procs=4, memory_gb=28, raise_insufficient=False)),
        ("linear.yml", "Linear", {}),
    ],
)
def test_the_plugin_files_configure_nipype(tmp_path, ds_mini, name, plugin, args):
    config = build_config([
        str(ds_mini), str(tmp_path / "out"), "participant",
        "--use-plugin", str(DATA / "nipype" / name),
    ])  # fmt: skip
    assert config.plugin == plugin
    assert config.plugin_args == args
