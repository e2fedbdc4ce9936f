"""The container images, checked without a container engine.

The Dockerfile passes hadolint and agrees with the app (version, paths, presets); the Apptainer
recipe parses; the build-context filter sends what the build copies; the build-time template
fetch verifies checksums against a real HTTP server; :mod:`hsf_bids.runtime` keeps libraries out
of ``$HOME``. Finally the app runs exactly as the image runs it: installed from the source tree in a
fresh virtual environment at the image's path, models and templates at the image's paths, the
image's environment and user, the root file system read-only with a private ``/tmp``, and no
network (a new mount and network namespace): it must give the derivatives of a normal run and
write nothing outside its output, work and temporary folders.

The image itself, built with a container engine and run, is tested in test_container_image.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import require

import hsf_bids
from hsf_bids.hub import MODELS_DIR_ENV, list_presets, load_preset
from hsf_bids.runtime import CACHE_VARIABLES, RuntimeEnvironmentError, prepare_runtime

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
FETCH_TEMPLATES = REPO / "docker" / "fetch_templates.py"
TEMPLATE_DIR = "tpl-MNI152NLin2009cSym"
# Docker's PATH before the image's ENV PATH=...:$PATH (that of the python base images).
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    path = str(exe) if exe.is_file() else shutil.which(name)
    require(path is not None, f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


# ---------------------------------------------------------------------------------------------
# The Dockerfile, read as its instructions


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.args("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                out[key] = value
        return out


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            stages.append(Stage(parts[-1] if "AS" in map(str.upper, parts) else "", parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
    return global_args, stages


def _stage(stages: list[Stage], name: str) -> Stage:
    found = [s for s in stages if s.name == name]
    assert found, f"no stage {name!r} in {DOCKERFILE}"
    return found[0]


def image_environment() -> dict[str, str]:
    """The environment the default image runs hsf-bids with (its ENV lines, expanded)."""
    global_args, stages = dockerfile()
    env = {"PATH": BASE_PATH}
    for stage in (_stage(stages, "runtime"), stages[-1]):
        for key, value in stage.env().items():
            value = re.sub(r"\$\{?PATH\}?", env["PATH"], value)
            env[key] = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m[1], ""), value)
    return env


def image_user() -> int:
    """The numeric user the final image runs as."""
    _, stages = dockerfile()
    users = stages[-1].args("USER")
    assert users, "the final stage sets no USER"
    return int(users[-1].split(":")[0])


def test_hadolint_reports_nothing_at_warning_level_or_above():
    hadolint = _tool("hadolint")
    result = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert serious == [], serious
    assert result.returncode == 0, result.stderr
    print("hadolint info/style:", [f"{f['code']} line {f['line']}" for f in findings])


def test_dockerfile_agrees_with_the_app():
    global_args, stages = dockerfile()
    assert global_args["VERSION"] == hsf_bids.__version__
    assert (
        global_args["PYTHON_IMAGE"].startswith("python:3.")
        and "slim" in global_args["PYTHON_IMAGE"]
    )
    names = [s.name for s in stages]
    assert names[-1] == "cpu" and "gpu" in names  # cpu is the default target
    runtime = _stage(stages, "runtime")
    assert runtime.args("ENTRYPOINT") == ['["hsf-bids"]']
    labels = " ".join(runtime.args("LABEL"))
    for key in ("version", "source", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    uid = re.search(r"--uid (\d+)", " ".join(runtime.args("RUN")))
    for final in ("cpu", "gpu"):
        user = _stage(stages, final).args("USER")[-1]
        assert user.split(":")[0] == uid[1] != "0", "runs as the non-root user created"
    assert any("onnxruntime-gpu" in r for r in _stage(stages, "build-gpu").args("RUN"))

    # Models and templates are fetched into the very folders the runtime image points the app at.
    env, assets = image_environment(), _stage(stages, "assets")
    assert assets.env()[MODELS_DIR_ENV] == env[MODELS_DIR_ENV]
    assert assets.env()["TEMPLATEFLOW_HOME"] == env["TEMPLATEFLOW_HOME"]
    assets_dir = os.path.commonpath([env[MODELS_DIR_ENV], env["TEMPLATEFLOW_HOME"]])
    assert f"--from=assets {assets_dir} {assets_dir}" in runtime.args("COPY")
    fetch = " ".join(assets.args("RUN"))
    fetched = set(re.findall(r"hsf-bids-models fetch --preset (\S+)", fetch))
    assert "fetch_templates.py" in fetch
    files = {(load_preset(p).subfolder, m.name) for p in fetched for m in load_preset(p).models}
    for name in list_presets():  # every 4.0.0 preset (bagging_* and single_*) runs offline
        preset = load_preset(name)
        if preset.version == "4.0.0":
            assert {(preset.subfolder, m.name) for m in preset.models} <= files, name
    assert {"bagging_accurate", "single_accurate"} <= fetched

    # What the build stage copies exists.
    for args in _stage(stages, "build").args("COPY"):
        for source in shlex.split(args)[:-1]:
            assert (REPO / source).exists(), source


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
    return re.compile(out)


def docker_ignores(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_build_copies_and_nothing_else():
    patterns = _dockerignore_patterns()
    _, stages = dockerfile()
    copied = []
    for stage in stages:
        for args in stage.args("COPY"):
            if not args.startswith("--from"):
                copied += shlex.split(args)[:-1]
    for source in copied:
        root = REPO / source
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            rel = path.relative_to(REPO).as_posix()
            if "__pycache__" not in rel and ".egg-info" not in rel:
                assert not docker_ignores(rel, patterns), rel
    outside = [
        ".venv/pyvenv.cfg",
        ".git/HEAD",
        "tests/conftest.py",
        "out/x.nii.gz",
        "hsf_bids/__pycache__/config.cpython-311.pyc",
        "hsf_bids.egg-info/PKG-INFO",
    ]
    for rel in outside:
        assert docker_ignores(rel, patterns), rel


def test_singularity_recipe_parses_and_runs_the_app():
    _tool("spython")
    from spython.main.parse.parsers import SingularityParser
    from spython.main.parse.writers import DockerWriter

    recipe_file = REPO / "Singularity.def"
    parser = SingularityParser(str(recipe_file))
    (recipe,) = parser.recipe.values()
    assert recipe.fromHeader == f"hsf-bids/hsf_bids:{hsf_bids.__version__}"
    header = recipe_file.read_text()
    assert re.search(r"^Bootstrap:\s*docker(-daemon)?\s*$", header, re.MULTILINE)
    assert re.search(r'exec hsf-bids "\$@"', recipe.cmd)
    assert any(
        "hsf-bids --version" in line for line in recipe.install
    )  # %test, as spython keeps it
    assert "FROM hsf-bids/hsf_bids:" in DockerWriter(parser.recipe).convert()

    # The podman route the recipe documents: the same recipe from a saved Docker archive.
    commands = re.findall(r"^#\s+(sed .*?Singularity\.def)", header, re.MULTILINE | re.DOTALL)
    assert commands, "the recipe documents its docker-archive variant"
    archive = re.sub(r"\\\n#\s*", "", commands[0])
    variant = subprocess.run(
        ["bash", "-c", archive], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert variant.returncode == 0, variant.stderr
    # spython parses only docker bootstraps: the header is checked as text, the rest is the same.
    assert re.search(r"^Bootstrap: docker-archive$", variant.stdout, re.MULTILINE)
    assert re.search(rf"^From: hsf_bids-{hsf_bids.__version__}\.tar$", variant.stdout, re.MULTILINE)
    strip = re.compile(r"^(Bootstrap|From):.*$", re.MULTILINE)
    assert strip.sub("", variant.stdout) == strip.sub("", header)


# ---------------------------------------------------------------------------------------------
# Build-time template fetch against a real server


@pytest.fixture
def template_server(shared_dir, tmp_path):
    """Serves a copy of the shared TemplateFlow files like TemplateFlow's S3 bucket: with ETags,
    multipart for the T1w (8 MiB parts). Yields (base URL, served folder, lying ETags dict)."""
    www = tmp_path / "s3"
    shutil.copytree(shared_dir / "data" / "templateflow", www)
    lies: dict[str, str] = {}

    def etag(path: Path) -> str:
        if path.name in lies:
            return lies[path.name]
        data = path.read_bytes()
        if path.name.endswith("_T1w.nii.gz"):
            parts = [
                hashlib.md5(data[i : i + 8 * 2**20]).digest()
                for i in range(0, len(data), 8 * 2**20)
            ]
            return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"
        return hashlib.md5(data).hexdigest()

    class S3Like(SimpleHTTPRequestHandler):
        def end_headers(self):
            path = Path(self.translate_path(self.path))
            if path.is_file():
                self.send_header("ETag", f'"{etag(path)}"')
            super().end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(S3Like, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, lies
    httpd.shutdown()
    httpd.server_close()


def _fetch_templates(home: Path, url: str, *extra: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    env.pop("TEMPLATEFLOW_HOME", None)
    return subprocess.run(
        [
            sys.executable,
            str(FETCH_TEMPLATES),
            "--home",
            str(home),
            "--s3-root",
            url,
            *map(str, extra),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_fetch_templates_downloads_verifies_and_keeps_only_real_files(template_server, tmp_path):
    url, www, _ = template_server
    home = tmp_path / "templateflow"
    result = _fetch_templates(home, url)
    assert result.returncode == 0, result.stderr
    served = sorted(p for p in (www / TEMPLATE_DIR).iterdir() if p.suffix in (".gz", ".tsv"))
    assert len(served) == 4
    for path in served:
        assert (home / TEMPLATE_DIR / path.name).read_bytes() == path.read_bytes()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"{digest}  {path.name}" in result.stdout.splitlines()
    assert [p.name for p in home.iterdir()] == [TEMPLATE_DIR]  # the rest of the skeleton is gone
    assert not [p for p in home.rglob("*") if p.is_file() and p.stat().st_size == 0]


def test_fetch_templates_fails_on_a_checksum_mismatch(template_server, tmp_path):
    url, www, lies = template_server
    atlas = f"{TEMPLATE_DIR}_res-1_atlas-CerebrA_dseg.nii.gz"
    lies[atlas] = "0123456789abcdef0123456789abcdef"
    result = _fetch_templates(tmp_path / "lied", url)
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and atlas in result.stderr
    assert "Traceback" not in result.stderr

    lies.clear()
    pins = tmp_path / "pins.sha256"
    pins.write_text(f"{'0' * 64}  {TEMPLATE_DIR}_res-1_T2w.nii.gz\n")
    result = _fetch_templates(tmp_path / "pinned", url, "--checksums", pins)
    assert result.returncode == 1
    assert "pinned" in result.stderr and "_res-1_T2w.nii.gz" in result.stderr


def test_fetch_templates_from_a_local_home_checks_content_and_pins(templateflow_home, tmp_path):
    """For builds that reach no TemplateFlow: the files come from the build context."""
    home = tmp_path / "copied"
    result = _fetch_templates(home, "http://127.0.0.1:9", "--from", templateflow_home)
    assert result.returncode == 0, result.stderr
    for path in (templateflow_home / TEMPLATE_DIR).iterdir():  # the files and the MNI notice
        assert (home / TEMPLATE_DIR / path.name).read_bytes() == path.read_bytes()
        if path.name.endswith((".nii.gz", ".tsv")):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert f"{digest}  {path.name}" in result.stdout.splitlines()

    pins = tmp_path / "pins.sha256"
    pins.write_text(f"{'0' * 64}  {TEMPLATE_DIR}_res-1_atlas-CerebrA_dseg.nii.gz\n")
    result = _fetch_templates(tmp_path / "pinned", "http://127.0.0.1:9", "--from",
                              templateflow_home, "--checksums", pins)  # fmt: skip
    assert result.returncode == 1 and "pinned" in result.stderr

    broken = tmp_path / "broken" / TEMPLATE_DIR
    shutil.copytree(templateflow_home / TEMPLATE_DIR, broken)
    (broken / f"{TEMPLATE_DIR}_res-1_T2w.nii.gz").write_bytes(b"not gzip")
    result = _fetch_templates(tmp_path / "bad", "http://127.0.0.1:9", "--from", broken.parent)
    assert result.returncode == 1 and "not a readable NIfTI image" in result.stderr


# ---------------------------------------------------------------------------------------------
# Run-time environment


def _clean_env(**extra: str) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TEMPLATEFLOW_HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(extra)
    return env


PROBE = """
import json, os, sys, tempfile
from hsf_bids.runtime import prepare_runtime
info = prepare_runtime(sys.argv[1])
import matplotlib, onnxruntime as ort, openvino as ov
ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
ov.Core().compile_model(sys.argv[2], "CPU")
print(json.dumps({"set": info.set_variables, "scratch": str(info.scratch),
                  "mpl": matplotlib.get_cachedir(), "tmp": tempfile.gettempdir()}))
"""


def test_prepare_runtime_keeps_libraries_out_of_home(tmp_path, demo_hub):
    home, tmp, work = tmp_path / "home", tmp_path / "tmp", tmp_path / "work"
    for folder in (home, tmp, work):
        folder.mkdir()
    model = demo_hub.parent / "demo_unet_b0.onnx"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(work), str(model)],
        capture_output=True,
        text=True,
        env=_clean_env(HOME=str(home), TMPDIR=str(tmp)),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    scratch = Path(info["scratch"])
    assert scratch.parent == tmp
    assert Path(info["mpl"]).is_relative_to(scratch)
    assert {k: Path(v).parent for k, v in info["set"].items() if k in CACHE_VARIABLES} == {
        k: scratch for k in CACHE_VARIABLES
    }
    assert info["set"]["ORT_DISABLE_TELEMETRY"] == "1"
    assert list(home.iterdir()) == []  # no ~/.cache, ~/.config, ~/intel
    assert list(tmp.iterdir()) == []  # the private folder is removed at exit; no ORT .ses file
    assert list(work.iterdir()) == []


def test_prepare_runtime_respects_the_user_and_falls_back_to_the_work_dir(tmp_path):
    mine = tmp_path / "mpl"
    env = {"MPLCONFIGDIR": str(mine), "ORT_DISABLE_TELEMETRY": "0", "TMPDIR": str(tmp_path)}
    info = prepare_runtime(tmp_path / "work", env, cleanup=False)
    assert env["MPLCONFIGDIR"] == str(mine) and env["ORT_DISABLE_TELEMETRY"] == "0"
    assert "MPLCONFIGDIR" not in info.set_variables and info.scratch.parent == tmp_path
    assert Path(env["DENO_DIR"]).is_dir()

    # A temporary folder that cannot be written (here: below a regular file) moves to the work dir.
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {"TMPDIR": str(blocker / "tmp")}
    info = prepare_runtime(tmp_path / "work", env, cleanup=False)
    assert info.scratch.parent == tmp_path / "work" / "tmp" == info.temp_dir
    assert env["TMPDIR"] == str(info.scratch / "tmp")

    with pytest.raises(RuntimeEnvironmentError, match=r"no writable temporary folder.*file/tmp.*"):
        prepare_runtime(blocker / "work", {"TMPDIR": str(blocker / "tmp")}, cleanup=False)


# ---------------------------------------------------------------------------------------------
# The app run as the image runs it


def _reachable_by_others(path: Path) -> bool:
    real = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in (real, *real.parents))


def _base_python() -> tuple[str, bool]:
    """An interpreter of this Python version for the fresh venv, and whether the image's
    non-root user can run it (a pyenv build under /root cannot)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        Path(sys._base_executable),
        *[Path(p) for p in (shutil.which(f"python{version}"),) if p],
        Path(f"/usr/local/bin/python{version}"),
        Path(f"/usr/bin/python{version}"),
    ]
    for exe in candidates:
        if exe.is_file() and _reachable_by_others(exe):
            probe = subprocess.run([str(exe), "-c", "import venv, ensurepip"], capture_output=True)
            if probe.returncode == 0:
                return str(exe), True
    return sys._base_executable, False


def _namespace_prefix() -> list[str]:
    """``unshare`` for a private mount namespace (root, or a user namespace mapping root)."""
    unshare = shutil.which("unshare")
    require(unshare is not None and sys.platform == "linux", "unshare (util-linux) is needed")
    prefix = [str(unshare), "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")
    probe = subprocess.run([*prefix, "--net", "true"], capture_output=True, text=True)
    require(probe.returncode == 0, f"cannot create mount/network namespaces: {probe.stderr}")
    return prefix


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below ``root``: type, size, modification time, mode (symlinks not followed)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            entries[os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode),
                st.st_size,
                st.st_mtime_ns,
                st.st_mode,
            )
    return entries


def _write_hub(demo_hub: Path, folder: Path) -> Path:
    """The demo models without augmentation, in ``folder`` next to copies of the model files."""
    folder.mkdir(parents=True)
    hub = yaml.safe_load(demo_hub.read_text())
    for name in hub["models"]:
        shutil.copy2(demo_hub.parent / name, folder / name)
        hub["models"][name]["url"] = name
    hub["segmentation"]["test_time_augmentation"] = False
    path = folder / "demo_fast.yaml"
    path.write_text(yaml.safe_dump(hub))
    return path


def _constraints(path: Path) -> Path:
    """This environment's versions, so the fresh venv runs the same engines bit for bit."""
    pins = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in metadata.distributions()
        if d.metadata["Name"] and d.metadata["Name"].lower().replace("-", "_") != "hsf_bids"
    )
    path.write_text("\n".join(pins) + "\n")
    return path


def _copy_build_context(dest: Path) -> Path:
    """What the Dockerfile's build stage copies into /src, as it copies it."""
    _, stages = dockerfile()
    for args in _stage(stages, "build").args("COPY"):
        for source in shlex.split(args)[:-1]:
            src = REPO / source
            if src.is_dir():
                shutil.copytree(src, dest / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / source)
    return dest


PROBE_IN_IMAGE = """
import json, os, socket
paths = ["/", "/opt", os.environ["HOME"], os.environ["HSF_BIDS_MODELS_DIR"],
         os.environ["TEMPLATEFLOW_HOME"], "/opt/venv", "/opt/data/bids", "/opt/data/out", "/tmp"]
writable = {}
for p in paths:
    try:
        open(os.path.join(p, ".probe"), "w").close()
        os.unlink(os.path.join(p, ".probe"))
        writable[p] = True
    except OSError:
        writable[p] = False
try:
    socket.create_connection(("1.1.1.1", 53), timeout=3).close()
    network = True
except OSError:
    network = False
print("PROBE " + json.dumps({"writable": writable, "network": network, "uid": os.getuid()}))
"""


@pytest.fixture(scope="module")
def image_run(ds_mini, demo_hub, templateflow_home, tmp_path_factory):
    """The baseline run and the image-like run of sub-01 (T1w) and sub-02 (T2w)."""
    prefix = _namespace_prefix()
    root = tmp_path_factory.mktemp("image")
    env_image = image_environment()
    venv_dir = Path(env_image["PATH"].split(":")[0]).parent  # /opt/venv/bin first on PATH
    models, tf_home, home = (
        Path(env_image[k]) for k in (MODELS_DIR_ENV, "TEMPLATEFLOW_HOME", "HOME")
    )
    python, non_root = _base_python()
    uid = image_user() if non_root else 0
    options = [
        "participant",
        "--participant-label",
        "01",
        "02",
        "--nprocs",
        "2",
        "--omp-nthreads",
        "2",
    ]

    # The baseline: this environment, the shared TemplateFlow home.
    base_hub = _write_hub(demo_hub, root / "base_hub")
    baseline = subprocess.Popen(
        [sys.executable, "-m", "hsf_bids", str(ds_mini), str(root / "base_out"), *options,
         "--hub", str(base_hub), "-w", str(root / "base_work")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    # The image's file system, staged here and mounted at the image's paths in the namespaces.
    stage = {
        "venv": root / "venv",
        "models": root / "models",
        "templateflow": root / "templateflow",
        "home": root / "home",
        "out": root / "out",
        "work": root / "work",
        "tmp": root / "tmp",
    }
    for key in ("venv", "home", "out", "work", "tmp"):
        stage[key].mkdir()
    _write_hub(demo_hub, stage["models"] / "demo")
    shutil.copytree(templateflow_home, stage["templateflow"])
    src = _copy_build_context(root / "src")
    constraints = _constraints(root / "constraints.txt")
    for key in ("out", "work", "tmp"):
        os.chown(stage[key], uid, uid)
    stage["tmp"].chmod(0o1777)
    tops = sorted({"/" + Path(p).parts[1] for p in (venv_dir, models, tf_home, home, "/opt/data")})
    overlays = []
    for top in tops:
        require(Path(top).is_dir(), f"{top} must exist to mount the image's folders below it")
        upper, work = (
            root / "overlay" / top.strip("/") / "upper",
            root / "overlay" / top.strip("/") / "work",
        )
        upper.mkdir(parents=True)
        work.mkdir(parents=True)
        overlays.append(
            f"mount -t overlay overlay -o lowerdir={top},upperdir={upper},workdir={work} {top}"
        )
    q = shlex.quote

    install = "\n".join([
        "set -eu", overlays[tops.index("/" + venv_dir.parts[1])],
        f"mkdir -p {venv_dir}", f"mount --bind {stage['venv']} {venv_dir}",
        f"{q(python)} -m venv {venv_dir}",
        f"{venv_dir}/bin/python -m pip install --quiet --disable-pip-version-check "
        f"-c {constraints} {src}",
        f"{venv_dir}/bin/python -m pip check",
    ])  # fmt: skip
    installed = subprocess.run(
        [*prefix, "bash", "-c", install], capture_output=True, text=True, timeout=900
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    venv_size = sum(
        p.stat().st_size for p in stage["venv"].rglob("*") if p.is_file() and not p.is_symlink()
    )
    print(f"fresh venv: {venv_size / 2**20:.0f} MiB")

    binds = [  # (staged folder, image path, read-only)
        (stage["venv"], venv_dir, True), (stage["models"], models, True),
        (stage["templateflow"], tf_home, True), (stage["home"], home, True),
        (ds_mini, "/opt/data/bids", True), (stage["out"], "/opt/data/out", False),
        (stage["work"], "/opt/data/work", False),
    ]  # fmt: skip
    lines = ["set -eu", *overlays]
    for _, target, _ in binds:  # mount points made here, so the namespace writes nothing
        top = Path(target).parts[1]
        (root / "overlay" / top / "upper" / Path(target).relative_to(f"/{top}")).mkdir(
            parents=True, exist_ok=True
        )
    for source, target, _ in binds:
        lines += [f"mkdir -p {target}", f"mount --bind {q(str(source))} {target}"]
    lines += [f"mount -o remount,bind,ro {t}" for _, t, ro in binds if ro]
    lines += [f"mount -o remount,bind,ro {top}" for top in tops]
    lines += [f"mount --bind {stage['tmp']} /tmp", "mount -o remount,bind,ro /", "cd /tmp"]
    run_as = f"setpriv --reuid={uid} --regid={uid} --clear-groups" if uid else ""
    env_args = " ".join(q(f"{k}={v}") for k, v in env_image.items())
    hsf = ["hsf-bids", "/opt/data/bids", "/opt/data/out", *options,
           "--hub", f"{models}/demo/demo_fast.yaml", "-w", "/opt/data/work"]  # fmt: skip
    lines += [
        f"{run_as} env -i {env_args} python -c {q(PROBE_IN_IMAGE)}",
        f"exec {run_as} env -i {env_args} {shlex.join(hsf)}",
    ]

    watched = {k: stage[k] for k in ("venv", "models", "templateflow", "home")}
    watched.update({"src": src, "bids": ds_mini})
    watched.update({f"overlay {top}": root / "overlay" / top.strip("/") / "upper" for top in tops})
    before = {k: snapshot(v) for k, v in watched.items()}
    contained = subprocess.run(
        [*prefix, "--net", "bash", "-c", "\n".join(lines)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    after = {k: snapshot(v) for k, v in watched.items()}
    base_log, _ = baseline.communicate(timeout=600)
    return {
        "baseline": (root / "base_out", baseline.returncode, base_log, base_hub),
        "image": (stage["out"], contained.returncode, contained.stdout + contained.stderr),
        "hub": models / "demo" / "demo_fast.yaml",
        "snapshots": (before, after),
        "tmp": stage["tmp"],
        "work": stage["work"],
        "uid": uid,
        "env": env_image,
    }


def _probe(log: str) -> dict:
    lines = [ln for ln in log.splitlines() if ln.startswith("PROBE ")]
    assert lines, log
    return json.loads(lines[0][len("PROBE ") :])


@pytest.mark.slow
def test_image_run_is_offline_read_only_and_non_root(image_run):
    out, code, log = image_run["image"]
    probe = _probe(log)
    assert probe["network"] is False
    assert probe["uid"] == image_run["uid"]
    env = image_run["env"]
    expected = {p: p in ("/opt/data/out", "/tmp") for p in probe["writable"]}
    assert probe["writable"] == expected, "only the output folder and /tmp are writable"
    assert code == 0, log
    assert "finished sub-01, sub-02" in log
    for noise in ("Traceback", "Read-only file system", "Permission denied", "telemetry"):
        assert noise not in log, noise
    assert env["HSF_BIDS_MODELS_DIR"] != env["TEMPLATEFLOW_HOME"]


@pytest.mark.slow
def test_image_run_writes_only_output_work_and_temporary_folders(image_run):
    out, code, log = image_run["image"]
    assert code == 0, log
    before, after = image_run["snapshots"]
    for area in before:
        changed = sorted(set(before[area].items()) ^ set(after[area].items()))
        assert changed == [], f"{area} changed: {changed[:10]}"
    leftovers = sorted(p.name for p in image_run["tmp"].iterdir())
    assert not [n for n in leftovers if n.startswith("hsf_bids-")], leftovers  # scratch removed
    print("left in /tmp:", leftovers)
    assert any(image_run["work"].iterdir())


def _normalised(value, old: str, new: str):
    if isinstance(value, dict):
        return {k: _normalised(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalised(v, old, new) for v in value]
    return value.replace(old, new) if isinstance(value, str) else value


def _mask_run(text: str) -> str:
    text = re.sub(r"\d{8}-\d{6}_[0-9a-f-]{36}", "<run-id>", text)
    return re.sub(
        r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?( ?UTC|Z|[+-]\d{2}:?\d{2})?",
        "<time>",
        text,
    )


@pytest.mark.slow
def test_image_run_gives_the_derivatives_of_a_normal_run(image_run):
    out, code, log = image_run["image"]
    base_out, base_code, base_log, base_hub = image_run["baseline"]
    assert base_code == 0, base_log
    assert code == 0, log

    def files(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*")
                if p.is_file() and "/log/" not in p.relative_to(root).as_posix()}  # fmt: skip

    assert files(out) == files(base_out)
    assert any(name.endswith("_dseg.nii.gz") for name in files(out))
    for rel in sorted(files(out)):
        mine, theirs = out / rel, base_out / rel
        if rel.endswith(".nii.gz"):
            a, b = nib.load(mine), nib.load(theirs)
            assert a.header.binaryblock == b.header.binaryblock, rel
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), rel
        elif rel.endswith(".json"):
            got = _normalised(json.loads(mine.read_text()), str(image_run["hub"]), str(base_hub))
            want = json.loads(theirs.read_text())
            if rel == "dataset_description.json":
                container = got["GeneratedBy"][0].pop("Container")
                want["GeneratedBy"][0].pop("Container", None)
                assert container == {
                    "Type": "docker",
                    "Tag": f"hsf-bids/hsf_bids:{hsf_bids.__version__}",
                }
                got.pop("DatasetLinks"), want.pop("DatasetLinks")
            assert got == want, rel
        else:  # tables, reports: the same but for when they were written and the run's id
            got = _mask_run(mine.read_text().replace(str(image_run["hub"]), str(base_hub)))
            assert got == _mask_run(theirs.read_text()), rel
    for subject in ("sub-01", "sub-02"):
        assert list((out / subject / "log").glob("*/config.json"))
