"""Shared fixtures: the one place that locates ``../shared``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def require(condition: bool, reason: str) -> None:
    """Skip a test whose tool or data is missing; under CI=true that is a failure: CI installs
    everything the tests need, so a missing piece there is a broken set-up, not a reason to skip."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _shared_candidates() -> list[Path]:
    env = os.environ.get("HSF_BIDS_SHARED")
    return [Path(env)] if env else [REPO.parent / "shared"]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared material (``$HSF_BIDS_SHARED``, else ``../shared``).

    Absent: a failure under CI=true, a skip elsewhere.
    """
    for path in _shared_candidates():
        if (path / "README.md").is_file():
            return path
    require(False, f"shared material not found at {_shared_candidates()[0]} (set HSF_BIDS_SHARED)")


@pytest.fixture(scope="session")
def demo_hub(shared_dir: Path) -> Path:
    """The demo models' hub YAML (three small U-Nets in the HSF contract)."""
    return shared_dir / "models" / "demo" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_models(demo_hub: Path) -> list[Path]:
    """The demo hub's three ONNX files, in the order its YAML lists them."""
    import yaml

    hub = yaml.safe_load(demo_hub.read_text())
    paths = [demo_hub.parent / name for name in hub["models"]]
    assert len(paths) == 3 and all(p.is_file() for p in paths), paths
    return paths


@pytest.fixture(scope="session")
def ds_mini(shared_dir: Path) -> Path:
    """The small BIDS dataset of real heads."""
    return shared_dir / "data" / "bids" / "ds-mini"


@pytest.fixture(scope="session")
def templateflow_home(shared_dir: Path) -> Path:
    """A ready TemplateFlow home; exported so TemplateFlow downloads nothing.

    TemplateFlow reads ``TEMPLATEFLOW_HOME`` once, when ``templateflow`` is first imported; if
    something imported it earlier in this session, its cache is pointed at the home here too.
    """
    import sys

    home = shared_dir / "data" / "templateflow"
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
    conf = sys.modules.get("templateflow.conf")
    if conf is not None and Path(conf._cache.config.root) != home:
        conf._cache.config.root = home
        conf._cache.precached = True
        conf._cache.__dict__.pop("layout", None)  # the pybids layout of the old home
    return home


@pytest.fixture(scope="session")
def fast_hub(demo_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models without test-time augmentation (as HSF's ``*_fast`` presets): a hub file
    whose ``file://`` URLs point at the shared models, which are used in place."""
    import yaml

    hub = yaml.safe_load(demo_hub.read_text())
    for name, entry in hub["models"].items():
        entry["url"] = (demo_hub.parent / name).as_uri()
    hub["segmentation"]["test_time_augmentation"] = False
    path = tmp_path_factory.mktemp("hub") / "demo_fast.yaml"
    path.write_text(yaml.safe_dump(hub))
    return path


def hsf_bids(*args: str | Path, **kwargs) -> subprocess.Popen:
    """Start ``python -m hsf_bids`` (the console script's code) in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "hsf_bids", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def compare_outputs_tool():  # noqa: ANN201 - a module
    """``tools/compare_outputs.py`` (a script, not part of the package), loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_outputs", REPO / "tools" / "compare_outputs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


@pytest.fixture(scope="session")
def parallel_run(ds_mini, fast_hub, templateflow_home, tmp_path_factory):
    """Four participant jobs started at once into one output folder (default work folder)."""
    root = tmp_path_factory.mktemp("parallel")
    procs = [
        hsf_bids(ds_mini, root / "out", "participant", "--participant-label", label,
                 "--hub", fast_hub, "--nprocs", "1")
        for label in ("01", "02", "03", "04")
    ]  # fmt: skip
    logs = [finish(p) for p in procs]
    return root / "out", [p.returncode for p in procs], logs
