"""Shipped presets and hub-file validation (hsf_bids.hub.presets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsf_bids.hub import (
    DEFAULT_LABELS,
    HubError,
    HubNotFoundError,
    UnknownPresetError,
    hub_subfolder,
    list_presets,
    load_hub,
    load_preset,
    resolve_preset,
    xxh3_64_file,
)
from hsf_bids.vocabulary import CA_MODES

HF = "https://huggingface.co/poiretclement/hsf/resolve/main/onnx/"
# The published 4.0.0 models, as in the contract table (hsf-contract.md).
BAGGING_4 = [
    ("arunet_4.0.0b0_1706633574.onnx", "535af004dc7251af"),
    ("arunet_4.0.0b1_1706699484.onnx", "ca97ac4be073149f"),
    ("arunet_4.0.0b2_1706714241.onnx", "f9de9d5392460c3a"),
    ("arunet_4.0.0b3_1706858428.onnx", "85259d3c0c8baa21"),
    ("arunet_4.0.0b4_1706874562.onnx", "cb04f34305ec33af"),
]
SINGLE_4 = ("arunet_4.0.0single_1706895706.onnx", "da825a3911d09411")
ZENODO_3 = {
    "bagging": [
        (f"https://zenodo.org/record/6470400/files/arunet_3.0.0_bag{i}.onnx?download=1", h)
        for i, h in enumerate(
            [
                "3979a886022e3646",
                "3f2265542b63edce",
                "7b514bbbaa34c20c",
                "6ed1498726f52bd2",
                "b55d075b1211989c",
            ]
        )
    ],
    "single": [
        (
            "https://zenodo.org/record/6457484/files/arunet_3.0.0_single.onnx?download=1",
            "71edec9011f7f304",
        )
    ],
    "bagging_sparse": [
        (
            "https://zenodo.org/record/6482419/files/"
            f"arunet_3.0.0_85sparse_qat_bag{i}.onnx?download=1",
            h,
        )
        for i, h in enumerate(
            [
                "6ad8c700d15e5d69",
                "af6b96bae3be1ad0",
                "ff060177f9b20e0b",
                "62d11c643863017d",
                "f1c779a6492290c2",
            ]
        )
    ],
    "single_sparse": [
        (
            "https://zenodo.org/record/6489202/files/arunet_3.0.0_85sparse_qat_single.onnx"
            "?download=1",
            "79387dac3cbcaa8e",
        )
    ],
}

EXPECTED_PRESETS = {
    "bagging_accurate",
    "bagging_fast",
    "single_accurate",
    "single_fast",
    "bagging_accurate_3.0.0",
    "bagging_fast_3.0.0",
    "single_accurate_3.0.0",
    "single_fast_3.0.0",
    "bagging_sparse_3.0.0",
    "single_sparse_3.0.0",
}


def test_list_presets_is_the_shipped_set():
    assert set(list_presets()) == EXPECTED_PRESETS
    assert list_presets() == sorted(list_presets())


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_every_shipped_preset_loads(name):
    preset = load_preset(name)
    assert preset.name == name
    assert preset.builtin and preset.source.is_file()
    assert preset.subfolder == preset.version
    assert preset.labels == DEFAULT_LABELS
    assert preset.margins.isotropic == (8, 8, 8)
    assert preset.margins.anisotropic == (16, 4, 16)
    assert preset.contrasts == ("T1w", "T2w")
    assert preset.ca_mode == "1/2/3"
    assert preset.description
    assert all(m.local_path is None and m.url.startswith("https://") for m in preset.models)
    # Sizes are only given where known: nothing is published, so none is invented.
    assert all(m.size is None for m in preset.models)
    # Accurate presets run the original plus 20 augmentations; fast ones the original only.
    if "fast" in name:
        assert not preset.test_time_augmentation and preset.n_inputs_per_model == 1
    else:
        assert preset.test_time_augmentation and preset.n_inputs_per_model == 21
    assert preset.engine == ("deepsparse" if "sparse" in name else None)


@pytest.mark.parametrize("name", ["bagging_accurate", "bagging_fast"])
def test_bagging_4_matches_contract(name):
    preset = load_preset(name)
    assert preset.version == "4.0.0"
    assert [(m.url, m.xxh3_64) for m in preset.models] == [(HF + r, h) for r, h in BAGGING_4]
    assert [m.name for m in preset.models] == [f"arunet_bag_{i}.onnx" for i in range(5)]


@pytest.mark.parametrize("name", ["single_accurate", "single_fast"])
def test_single_4_matches_contract(name):
    preset = load_preset(name)
    assert preset.version == "4.0.0"
    assert [(m.url, m.xxh3_64) for m in preset.models] == [(HF + SINGLE_4[0], SINGLE_4[1])]
    # Not HSF's arunet_bag_0.onnx: that name belongs to the first bagging model of 4.0.0.
    assert preset.models[0].name == "arunet_single.onnx"


@pytest.mark.parametrize(
    ("name", "table"),
    [
        ("bagging_accurate_3.0.0", "bagging"),
        ("bagging_fast_3.0.0", "bagging"),
        ("single_accurate_3.0.0", "single"),
        ("single_fast_3.0.0", "single"),
        ("bagging_sparse_3.0.0", "bagging_sparse"),
        ("single_sparse_3.0.0", "single_sparse"),
    ],
)
def test_zenodo_3_matches_contract(name, table):
    preset = load_preset(name)
    assert preset.version == "3.0.0"
    assert [(m.url, m.xxh3_64) for m in preset.models] == ZENODO_3[table]


def test_local_file_names_unique_per_version():
    """One (version, file name) never stands for two different files: no preset overwrites
    another's files in the models folder."""
    seen: dict[tuple[str, str], tuple[str, str, str]] = {}
    for name in list_presets():
        preset = load_preset(name)
        names = [m.name for m in preset.models]
        assert len(names) == len(set(names)), name
        for model in preset.models:
            key = (preset.subfolder, model.name)
            content = (model.url, model.xxh3_64)
            if key in seen:
                assert seen[key][:2] == content, (
                    f"{name} and {seen[key][2]} both use {key} for different files"
                )
            seen[key] = (*content, name)
    # And the same checksum is never filed under two names in one version (a wasted download).
    by_checksum = {}
    for (folder, file_name), (_, checksum, _) in seen.items():
        assert by_checksum.setdefault((folder, checksum), file_name) == file_name


def test_unknown_preset_lists_choices():
    with pytest.raises(UnknownPresetError, match="bagging_accurate"):
        load_preset("bagging_turbo")


def test_resolve_preset_default_and_hub(demo_hub):
    assert resolve_preset().name == "bagging_accurate"
    assert resolve_preset("single_fast").name == "single_fast"
    assert resolve_preset(None, demo_hub).source == demo_hub
    with pytest.raises(HubError, match="not both"):
        resolve_preset("single_fast", demo_hub)


def test_demo_hub_resolves_next_to_yaml(demo_hub):
    hub = load_hub(demo_hub)
    assert not hub.builtin and hub.version is None
    assert hub.name == "demo"
    assert hub.ca_mode == "1/2/3" and hub.test_time_augmentation and hub.test_time_num_aug == 20
    assert [m.name for m in hub.models] == [f"demo_unet_b{i}.onnx" for i in range(3)]
    for model in hub.models:
        assert model.local_path == demo_hub.parent / model.name
        assert xxh3_64_file(model.local_path) == model.xxh3_64
    # Without a version, the hub gets its own models subfolder named from the file.
    assert hub.subfolder == hub_subfolder(demo_hub)
    assert hub.subfolder.startswith("hub-demo-") and len(hub.subfolder) == len("hub-demo-") + 8


def _hub_yaml(models: str, extra: str = "", ca_mode: str = '"1/2/3"') -> str:
    return (
        f"ca_mode: {ca_mode}\n{extra}models:\n{models}"
        "segmentation:\n  test_time_augmentation: false\n  test_time_num_aug: 0\n"
    )


def _model(name: str, url: str = "https://example.org/m.onnx", xxh: str = "0123456789abcdef"):
    return f'  "{name}":\n    url: "{url}"\n    xxh3_64: "{xxh}"\n'


def test_hub_relative_and_file_urls(tmp_path):
    (tmp_path / "sub").mkdir()
    body = (
        _model("a.onnx", "a.onnx")
        + _model("b.onnx", "sub/b.onnx")
        + _model("c.onnx", "file:c.onnx")
        + _model("d.onnx", "file://sub/d.onnx")
        + _model("e.onnx", f"file://{tmp_path}/sub/e%20x.onnx")
        + _model("f.onnx", "https://example.org/f.onnx?download=1")
    )
    hub_file = tmp_path / "my hub.yaml"
    hub_file.write_text(_hub_yaml(body, extra='version: "7.1"\n'))
    hub = load_hub(hub_file)
    assert hub.version == "7.1" and hub.subfolder == "7.1"
    paths = [m.local_path for m in hub.models]
    assert paths == [
        tmp_path / "a.onnx",
        tmp_path / "sub" / "b.onnx",
        tmp_path / "c.onnx",
        tmp_path / "sub" / "d.onnx",
        tmp_path / "sub" / "e x.onnx",
        None,
    ]


def test_hub_relative_path_to_the_yaml_given_relatively(tmp_path, monkeypatch):
    (tmp_path / "hubs").mkdir()
    (tmp_path / "hubs" / "h.yaml").write_text(_hub_yaml(_model("a.onnx", "a.onnx")))
    monkeypatch.chdir(tmp_path)
    hub = load_hub(Path("hubs/h.yaml"))
    assert hub.models[0].local_path == tmp_path / "hubs" / "a.onnx"
    assert hub.source == tmp_path / "hubs" / "h.yaml"


@pytest.mark.parametrize(
    ("models", "extra", "message"),
    [
        (_model("../x.onnx"), "", "bare file name"),
        (_model("a/b.onnx"), "", "bare file name"),
        (_model("/abs/x.onnx"), "", "bare file name"),
        (_model("..\\\\x.onnx"), "", "bare file name"),
        (_model(""), "", "non-empty"),
        (_model(".hidden.onnx"), "", "bare file name"),
        (_model("model.bin"), "", "must end with '.onnx'"),
        (_model("x.onnx", "ftp://example.org/x.onnx"), "", "scheme 'ftp'"),
        (_model("x.onnx", "s3://bucket/x.onnx"), "", "scheme 's3'"),
        (_model("x.onnx", "/abs/x.onnx"), "", "absolute path"),
        (_model("x.onnx", "https:///x.onnx"), "", "no host"),
        (_model("x.onnx", xxh="0123456789ABCDEF"), "", "16 lowercase hex"),
        (_model("x.onnx", xxh="0123456789abcde"), "", "16 lowercase hex"),
        (_model("x.onnx", xxh="0123456789abcdeg"), "", "16 lowercase hex"),
        ('  x.onnx:\n    url: "x.onnx"\n', "", "missing key"),
        (
            '  x.onnx:\n    url: "x.onnx"\n    xxh3_64: "0123456789abcdef"\n    sha: 1\n',
            "",
            "unknown key",
        ),
        (
            '  x.onnx:\n    url: "x.onnx"\n    xxh3_64: "0123456789abcdef"\n    size: -3\n',
            "",
            "size",
        ),
        ("  {}\n", "", "non-empty mapping"),
        (_model("x.onnx"), 'version: "../4"\n', "version"),
        (_model("x.onnx"), "segmentaion: 1\n", "unknown key"),
        (
            _model("x.onnx"),
            "labels: {0: {name: bg, abbreviation: BG}, 2: {name: a, abbreviation: A}}\n",
            "without gaps",
        ),
        (_model("x.onnx"), "margins: {isotropic: [8, 8], anisotropic: [16, 4, 16]}\n", "margins"),
        # Used by the pipeline along any slice axis, so written as [thin, thick, thin].
        (
            _model("x.onnx"),
            "margins: {isotropic: [8, 8, 8], anisotropic: [16, 4, 12]}\n",
            r"thin, thick, thin.*\[16, 4, 16\]",
        ),
        # The pipeline's labels are HSF's six channels: another set is refused, not ignored.
        (
            _model("x.onnx"),
            "labels: {0: {name: background, abbreviation: BG}, 1: {name: hc, abbreviation: HC}}\n",
            "HSF's six output channels",
        ),
        (_model("x.onnx"), "contrasts: [T1w, FLAIR]\n", "T1w and T2w images only, not FLAIR"),
    ],
)
def test_hub_refused(tmp_path, models, extra, message):
    hub_file = tmp_path / "bad.yaml"
    hub_file.write_text(_hub_yaml(models, extra=extra))
    with pytest.raises(HubError, match=message) as info:
        load_hub(hub_file)
    assert str(hub_file) in str(info.value)


@pytest.mark.parametrize("ca_mode", ['"1/2/4"', '"CA"', "null", "true"])
def test_hub_unknown_ca_mode(tmp_path, ca_mode):
    hub_file = tmp_path / "bad.yaml"
    hub_file.write_text(_hub_yaml(_model("x.onnx"), ca_mode=ca_mode))
    with pytest.raises(HubError, match="unknown ca_mode") as info:
        load_hub(hub_file)
    assert str(hub_file) in str(info.value)


@pytest.mark.parametrize("ca_mode", ['"1/2/3"', '"1/23"', '"123"', "123", '""'])
def test_hub_valid_ca_modes(tmp_path, ca_mode):
    hub_file = tmp_path / "ok.yaml"
    hub_file.write_text(_hub_yaml(_model("x.onnx"), ca_mode=ca_mode))
    assert load_hub(hub_file).ca_mode in CA_MODES


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: {}\n", "missing key"),
        ('ca_mode: "1/2/3"\nmodels:\n' + _model("x.onnx"), "missing key\\(s\\) segmentation"),
        (
            'ca_mode: "1/2/3"\nmodels:\n'
            + _model("x.onnx")
            + "segmentation: {test_time_augmentation: true}\n",
            "test_time_num_aug",
        ),
        (
            'ca_mode: "1/2/3"\nmodels:\n'
            + _model("x.onnx")
            + "segmentation: {test_time_augmentation: yes please, test_time_num_aug: 2}\n",
            "true or false",
        ),
        (
            'ca_mode: "1/2/3"\nmodels:\n'
            + _model("x.onnx")
            + "segmentation: {test_time_augmentation: true, test_time_num_aug: 0}\n",
            "is 0",
        ),
        ("- a\n- b\n", "mapping"),
        ("ca_mode: [unclosed\n", "not valid YAML"),
    ],
)
def test_hub_structure_refused(tmp_path, text, message):
    hub_file = tmp_path / "bad.yaml"
    hub_file.write_text(text)
    with pytest.raises(HubError, match=message) as info:
        load_hub(hub_file)
    assert str(hub_file) in str(info.value)


def test_hub_missing_file(tmp_path):
    with pytest.raises(HubNotFoundError, match="nope.yaml"):
        load_hub(tmp_path / "nope.yaml")


def test_hub_may_not_overwrite_shipped_models(tmp_path):
    hub_file = tmp_path / "clash.yaml"
    hub_file.write_text(_hub_yaml(_model("arunet_bag_0.onnx"), extra='version: "4.0.0"\n'))
    with pytest.raises(HubError, match="would overwrite"):
        load_hub(hub_file)
    # The published file itself under its own name is fine (same content).
    hub_file.write_text(
        _hub_yaml(
            _model("arunet_bag_0.onnx", HF + BAGGING_4[0][0], BAGGING_4[0][1]),
            extra='version: "4.0.0"\n',
        )
    )
    assert load_hub(hub_file).subfolder == "4.0.0"


def test_two_hubs_with_one_stem_get_distinct_folders(tmp_path):
    paths = []
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "hub.yaml"
        path.write_text(_hub_yaml(_model("x.onnx")))
        paths.append(path)
    folders = {load_hub(p).subfolder for p in paths}
    assert len(folders) == 2


def test_hub_margins_labels_and_contrasts_reach_the_preset(tmp_path):
    """A hub's margins, contrasts and (HSF's own) labels are kept; the pipeline reads them
    (tests/test_workflow_build.py checks what it does with them)."""
    labels = "".join(
        f"  {lab.index}: {{name: {lab.name}, abbreviation: {lab.abbreviation}}}\n"
        for lab in DEFAULT_LABELS
    )
    hub_file = tmp_path / "hub.yaml"
    hub_file.write_text(
        _hub_yaml(
            _model("x.onnx"),
            extra="margins: {isotropic: [6, 7, 8], anisotropic: [12, 3, 12]}\n"
            "contrasts: [T2w]\nlabels:\n" + labels,
        )
    )
    preset = load_hub(hub_file)
    assert preset.margins.isotropic == (6, 7, 8)
    assert preset.margins.thick_slice == (12, 3)
    assert preset.contrasts == ("T2w",)
    assert preset.labels == DEFAULT_LABELS
