"""Input selection with pybids: contrasts, pairing for late fusion, labels and filter files."""

from __future__ import annotations

import json

import pytest

from hsf_bids.bids import collect_jobs, load_bids_filters
from hsf_bids.cli.run import build_config


def names(jobs):
    return [(job.image.name, job.secondary.name if job.secondary else None) for job in jobs]


def test_both_contrasts_pair_each_session(ds_mini):
    jobs, problems = collect_jobs(ds_mini)
    assert names(jobs) == [
        ("sub-01_T1w", None),
        ("sub-02_T2w", None),
        ("sub-03_T1w", "sub-03_T2w"),
        ("sub-04_ses-01_T1w", None),
        ("sub-04_ses-02_T1w", None),
    ]
    assert problems == []


@pytest.mark.parametrize(
    ("contrast", "expected"),
    [
        ("T1w", ["sub-01_T1w", "sub-03_T1w", "sub-04_ses-01_T1w", "sub-04_ses-02_T1w"]),
        ("T2w", ["sub-02_T2w", "sub-03_T2w"]),
    ],
)
def test_one_contrast(ds_mini, contrast, expected):
    jobs, problems = collect_jobs(ds_mini, contrast=contrast)
    assert [name for name, partner in names(jobs)] == expected
    assert all(partner is None for _, partner in names(jobs))
    assert len(problems) == (2 if contrast == "T2w" else 1)  # subjects without that contrast


def test_labels_with_or_without_prefix_and_sessions(ds_mini):
    jobs, _ = collect_jobs(ds_mini, participant_labels=["sub-04"], session_labels=["02"])
    assert names(jobs) == [("sub-04_ses-02_T1w", None)]
    jobs, _ = collect_jobs(ds_mini, participant_labels=["04"], session_labels=["ses-01"])
    assert names(jobs) == [("sub-04_ses-01_T1w", None)]


def test_bids_filter_file(ds_mini, tmp_path):
    path = tmp_path / "filter.json"
    path.write_text(json.dumps({"t1w": {"session": "02"}}))
    jobs, _ = collect_jobs(ds_mini, participant_labels=["04"], bids_filters=load_bids_filters(path))
    assert names(jobs) == [("sub-04_ses-02_T1w", None)]


def test_plugin_file_and_resources(ds_mini, tmp_path):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 3\n  memory_gb: 6\n")
    config = build_config([str(ds_mini), str(tmp_path / "out"), "participant",
                           "--use-plugin", str(plugin), "--nprocs", "4", "--omp-nthreads", "2",
                           "--mem", "6G"])  # fmt: skip
    assert (config.plugin, config.plugin_args) == ("MultiProc", {"n_procs": 3, "memory_gb": 6})
    assert (config.nprocs, config.omp_nthreads, config.mem_gb) == (4, 2, 6.0)
    config = build_config([str(ds_mini), str(tmp_path / "out"), "participant", "--nprocs", "4",
                           "--omp-nthreads", "2", "--mem-gb", "8"])  # fmt: skip
    assert config.plugin == "MultiProc"
    assert config.plugin_args == {"n_procs": 4, "raise_insufficient": False, "memory_gb": 8.0}
    config = build_config([str(ds_mini), str(tmp_path / "out"), "participant", "--nprocs", "2"])
    assert (config.plugin, config.omp_nthreads) == ("Linear", 2)


def test_batch_size_defaults_to_the_device(ds_mini, tmp_path):
    base = [str(ds_mini), str(tmp_path / "out"), "participant"]
    assert build_config(base).batch_size == 1
    assert build_config([*base, "--device", "cuda"]).batch_size == 4
    assert build_config([*base, "--device", "cuda", "--batch-size", "2"]).batch_size == 2
    assert build_config([*base, "--batch-size", "3"]).batch_size == 3
