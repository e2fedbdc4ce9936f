"""Every workflow built for a fake dataset, without running anything (no ANTs, no model), and
the segmentation settings that travel through them.

Fast: the files are empty stand-ins, which Nipype only checks for existence when they are set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from hsf_bids.bids import AnatImage, SegmentationJob
from hsf_bids.config import RunConfig
from hsf_bids.hub import load_hub
from hsf_bids.interfaces import SegmentSide
from hsf_bids.outputs import Entities
from hsf_bids.segment import EnsembleSettings
from hsf_bids.settings import ModelSpec, SegmentationSettings, select_jobs
from hsf_bids.workflows.base import (
    IMAGE_INPUTS,
    IMAGE_OUTPUTS,
    init_hsf_wf,
    init_image_wf,
    init_session_wf,
)

SETTINGS = SegmentationSettings(
    models=(
        ModelSpec("/models/a.onnx", "0123456789abcdef", "onnxruntime/fp32/cpu"),
        ModelSpec("/models/b.onnx", "fedcba9876543210", "openvino/fp32/cpu"),
    ),
    ensemble=EnsembleSettings(num_augmentations=4, batch_size=2),
    seed=7,
    threads=2,
    provenance={"Software": {"Name": "hsf_bids"}, "Seed": 7},
)


def _image(root: Path, name: str) -> AnatImage:
    entities = Entities.from_filename(name)
    folder = root / f"sub-{entities.sub}" / (f"ses-{entities.ses}" if entities.ses else "") / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.touch()
    return AnatImage(path, entities)


@pytest.fixture
def dataset(tmp_path):
    bids = tmp_path / "bids"
    jobs = [
        SegmentationJob(_image(bids, "sub-01_T1w.nii.gz")),
        SegmentationJob(
            _image(bids, "sub-02_ses-1_T1w.nii.gz"), _image(bids, "sub-02_ses-1_T2w.nii.gz")
        ),
        SegmentationJob(_image(bids, "sub-02_ses-2_T2w.nii.gz")),
    ]
    config = RunConfig(
        bids_dir=bids, output_dir=tmp_path / "out", analysis_level="participant",
        work_dir=tmp_path / "work", run_id="run1",
    )  # fmt: skip
    return jobs, config


def _edges(wf) -> set[tuple[str, str, str, str]]:
    """``(source node, output, destination node, input)`` of every connection of ``wf``."""
    return {
        (src.name, out, dst.name, inp)
        for src, dst, data in wf._graph.edges(data=True)
        for out, inp in data["connect"]
    }


@pytest.mark.parametrize("multispectral", [False, True])
def test_image_wf_nodes_and_connections(multispectral):
    wf = init_image_wf(SETTINGS, "/out", multispectral=multispectral, name="img_wf")
    expected = {"inputnode", "localise", "inputs", "segment_right", "segment_left",
                "paste_back", "derivatives", "outputnode"} | ({"coregister"} if multispectral
                                                              else set())  # fmt: skip
    assert set(wf.list_node_names()) == expected
    inputnode = wf.get_node("inputnode")
    fields = set(inputnode.inputs.copyable_trait_names())
    assert fields == set(IMAGE_INPUTS) - ({"secondary_file"} if not multispectral else set())
    assert set(wf.get_node("outputnode").inputs.copyable_trait_names()) == set(IMAGE_OUTPUTS)
    edges = _edges(wf)
    for edge in [
        ("inputnode", "in_file", "localise", "in_file"),
        ("inputnode", "in_contrast", "localise", "contrast"),
        ("inputnode", "in_file", "inputs", "in1"),
        ("inputnode", "in_file", "paste_back", "in_file"),
        ("inputnode", "in_file", "derivatives", "source_file"),
        ("inputnode", "sources", "derivatives", "sources"),
        ("inputnode", "contrast", "derivatives", "contrast"),
        ("inputs", "out", "segment_right", "in_files"),
        ("inputs", "out", "segment_left", "in_files"),
        ("localise", "localisation", "segment_left", "localisation"),
        ("localise", "localisation", "paste_back", "localisation"),
        ("localise", "localisation", "derivatives", "localisation"),
        ("segment_right", "labels", "paste_back", "right_labels"),
        ("segment_left", "uncertainty", "paste_back", "left_uncertainty"),
        ("paste_back", "dseg", "derivatives", "dseg"),
        ("derivatives", "volumes_part", "outputnode", "volumes_part"),
    ]:
        assert edge in edges, edge
    if multispectral:
        assert ("inputnode", "secondary_file", "coregister", "in_file") in edges
        assert ("inputnode", "in_file", "coregister", "reference") in edges
        assert ("coregister", "out_file", "inputs", "in2") in edges
    else:
        assert wf.get_node("inputs").inputs.in2 == []
    # Every node that reads the settings gets the same whole object.
    for name in {"localise", "segment_right", "segment_left", "derivatives"} | (
        {"coregister"} if multispectral else set()
    ):
        assert wf.get_node(name).inputs.settings == SETTINGS.to_dict(), name
    assert wf.get_node("segment_left").inputs.side == "left"
    assert wf.get_node("segment_left").n_procs == 2
    assert wf.get_node("derivatives").inputs.output_dir == "/out"


def test_session_and_run_workflows(dataset):
    jobs, config = dataset
    wf = init_hsf_wf(jobs, config, SETTINGS)
    assert wf.name.startswith("hsf_bids_") and wf.base_dir == str(config.work_dir)
    sessions = {node.name for node in wf._graph.nodes()}
    assert sessions == {"sub_01_wf", "sub_02_ses_1_wf", "sub_02_ses_2_wf"}

    session_wf = init_session_wf(jobs[1:2], config, SETTINGS, name="s_wf")
    names = set(session_wf.list_node_names())
    assert {"volumes_parts", "volumes", "outputnode"} <= names
    assert "sub_02_ses_1_T1w_wf.coregister" in names
    image_wf = session_wf.get_node("sub_02_ses_1_T1w_wf")
    given = image_wf.get_node("inputnode").inputs
    assert given.in_file == str(jobs[1].image.path)
    assert given.in_contrast == "T1w"
    assert given.secondary_file == str(jobs[1].secondary.path)
    assert given.contrast == "T1w+T2w"
    assert given.sources == [
        "bids:raw:sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
        "bids:raw:sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz",
    ]
    assert ("volumes", "out_file", "outputnode", "volumes") in _edges(session_wf)
    crash_dir = str(config.subject_log_dir("02"))
    for name in names:
        node = session_wf.get_node(name)
        assert node.config["execution"]["crashdump_dir"] == crash_dir, name

    t2w_wf = init_session_wf(jobs[2:], config, SETTINGS, name="t_wf").get_node(
        "sub_02_ses_2_T2w_wf"
    )
    assert t2w_wf.get_node("inputnode").inputs.in_contrast == "T2w"
    assert "coregister" not in t2w_wf.list_node_names()


def test_settings_round_trip_as_json():
    data = SETTINGS.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert SegmentationSettings.from_dict(json.loads(json.dumps(data))) == SETTINGS
    with_margin = SegmentationSettings(**{**SETTINGS.__dict__, "margin": (3, 4, 5)})
    assert SegmentationSettings.from_dict(with_margin.to_dict()).margin == (3, 4, 5)


def test_node_hash_is_deterministic_and_follows_the_settings(tmp_path):
    def hashval(settings: SegmentationSettings, *, reverse: bool = False) -> str:
        values = settings.to_dict()
        if reverse:  # another key order: the same settings
            values = dict(reversed(values.items()))
        node = SegmentSide(side="left", settings=values, in_files=[__file__],
                           localisation=__file__)  # fmt: skip
        return node.inputs.get_hashval()[1]

    assert hashval(SETTINGS) == hashval(SETTINGS, reverse=True)
    other = SegmentationSettings(**{**SETTINGS.__dict__, "seed": 8})
    assert hashval(other) != hashval(SETTINGS)
    # A model file's checksum names its content: touching the file reruns nothing.
    model = tmp_path / "a.onnx"
    model.write_bytes(b"model")
    spec = ModelSpec(str(model), "0" * 16, "onnxruntime/fp32/cpu")
    local = SegmentationSettings(**{**SETTINGS.__dict__, "models": (spec,)})
    before = hashval(local)
    os.utime(model, (1, 1))
    assert hashval(local) == before


def test_margins_come_from_the_preset_unless_given():
    preset_margins = SegmentationSettings(
        **{**SETTINGS.__dict__, "isotropic_margin": (6, 7, 8), "thick_slice_margin": (12, 3)}
    )
    assert SETTINGS.box_margin((1.0, 1.0, 1.0)) == (8, 8, 8)
    assert SETTINGS.box_margin((0.4, 2.0, 0.4)) == (16, 4, 16)
    assert preset_margins.box_margin((1.0, 1.1, 1.0)) == (6, 7, 8)
    assert preset_margins.box_margin((0.4, 2.0, 0.4)) == (12, 3, 12)
    assert preset_margins.box_margin((0.5, 0.5, 3.0)) == (12, 12, 3)  # axial thick slices
    given = SegmentationSettings(**{**preset_margins.__dict__, "margin": (2, 2, 2)})
    assert given.box_margin((0.4, 2.0, 0.4)) == (2, 2, 2)


def test_settings_from_the_run_and_a_hub(tmp_path):
    hub = tmp_path / "hub.yaml"
    hub.write_text(
        'ca_mode: "1/23"\ncontrasts: [T1w]\n'
        "margins: {isotropic: [6, 6, 6], anisotropic: [12, 3, 12]}\n"
        'models:\n  a.onnx: {url: "a.onnx", xxh3_64: "0123456789abcdef"}\n'
        "segmentation: {test_time_augmentation: true, test_time_num_aug: 5}\n"
    )
    preset = load_hub(hub)
    run = SimpleNamespace(
        path=Path("/models/a.onnx"), xxh3_64="0123456789abcdef", choice="onnxruntime/fp32/cpu",
        provenance=lambda: {"Engine": "onnxruntime"},
    )  # fmt: skip
    plan = SimpleNamespace(runs=(run,), summary=lambda: {"Name": "onnxruntime"})
    config = RunConfig(
        bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
        work_dir=tmp_path / "work", fusion="mean", seed=3, batch_size=2, omp_nthreads=4,
    )  # fmt: skip
    settings = SegmentationSettings.from_run(config, preset, plan)
    assert settings.models == (ModelSpec("/models/a.onnx", "0123456789abcdef", run.choice),)
    assert settings.ensemble == EnsembleSettings(
        ca_mode="1/23", fusion="mean", test_time_augmentation=True, num_augmentations=5,
        batch_size=2,
    )  # fmt: skip
    assert (settings.seed, settings.threads, settings.margin) == (3, 4, None)
    assert settings.isotropic_margin == (6, 6, 6) and settings.thick_slice_margin == (12, 3)
    assert settings.contrasts == ("T1w",)
    assert settings.provenance["CaMode"] == "1/23"
    assert settings.provenance["Models"][0]["File"] == "a.onnx"
    assert settings.provenance["NumAugmentations"] == 5
    margin = RunConfig(**{**config.__dict__, "margin": (1, 2, 3), "ca_mode": "123"})
    overridden = SegmentationSettings.from_run(margin, preset, plan)
    assert overridden.margin == (1, 2, 3) and overridden.ca_mode == "123"


def test_images_of_contrasts_the_models_refuse_are_skipped(dataset):
    jobs, _ = dataset
    kept, warnings = select_jobs(jobs, ("T1w", "T2w"))
    assert kept == jobs and warnings == []
    kept, warnings = select_jobs(jobs, ("T1w",))
    assert kept == [jobs[0], SegmentationJob(jobs[1].image)]
    assert warnings == [
        "sub-02_ses-1_T2w is not segmented: the models accept T1w only; "
        "sub-02_ses-1_T1w is segmented alone",
        "sub-02_ses-2_T2w is not segmented: the models accept T1w only",
    ]
    kept, warnings = select_jobs(jobs, ("T2w",))
    assert kept == [SegmentationJob(jobs[1].secondary), jobs[2]]
    assert len(warnings) == 2 and "sub-01_T1w is not segmented" in warnings[0]


def test_a_run_whose_images_the_models_refuse_stops_before_any_work(
    capsys, ds_mini, demo_hub, tmp_path
):
    """sub-01 has a T1w only; a hub whose models accept T2w only segments nothing (exit 64),
    with a warning naming the image."""
    from hsf_bids.cli.run import main

    text = demo_hub.read_text().replace('url: "demo_', f'url: "file://{demo_hub.parent}/demo_')
    hub = tmp_path / "t2w_only.yaml"
    hub.write_text("contrasts: [T2w]\n" + text)
    code = main([str(ds_mini), str(tmp_path / "out"), "participant", "--participant-label", "01",
                 "--hub", str(hub), "--skip-bids-validation", "-w", str(tmp_path / "work"),
                 "--models-dir", str(tmp_path / "models")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 64, err
    assert "warning: sub-01_T1w is not segmented: the models accept T2w only" in err
    assert f"error: the models of {hub} accept T2w only" in err
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").rglob("localise"))
