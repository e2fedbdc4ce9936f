"""Per-subject QC reports: real participant outputs of ds-mini, opened in headless Chromium.

The participant level runs once (fast demo hub, every subject) and writes the reports; each report
is opened in Debian's Chromium, driven through the DevTools protocol over a pipe (no extra Python
package), with every network request refused. A broken localisation made with
:func:`hsf_bids.localisation.assess` and a shifted transform must show a visible flag.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hsf_bids.reports import encode_indexed_png, methods, write_subject_report
from hsf_bids.reports.collect import collect_subject
from hsf_bids.reports.figures import head_figure, palette, side_figures

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SUBJECTS = ("01", "02", "03", "04")


# ---------------------------------------------------------------------------------------------
# Chromium through the DevTools protocol over --remote-debugging-pipe


class Chromium:
    """Headless Chromium; JSON messages end with NUL on fds 3 (to it) and 4 (from it)."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="hsf-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--no-default-browser-check", f"--user-data-dir={self.profile}",
            # Nothing may leave the machine: no name resolves, every proxy connection is refused.
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, pass_fds=(3, 4), preexec_fn=wire,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, seconds: float = 60.0) -> dict:
        deadline = time.monotonic() + seconds
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


# Every <img>: decoded (a rejected promise is an undecodable image) and its natural size.
_IMAGES_JS = """
Promise.all(Array.from(document.images).map(img => img.decode().then(
  () => ({key: img.dataset.key || img.alt, width: img.naturalWidth, height: img.naturalHeight,
          shown: img.getBoundingClientRect().width}),
  err => ({key: img.dataset.key || img.alt, width: 0, height: 0, error: String(err)}))))
"""
_VOLUMES_JS = """
Array.from(document.querySelectorAll('table.volumes')).flatMap(t =>
  Array.from(t.querySelectorAll('tbody tr')).map(tr => {
    const row = {source: t.dataset.source, side: tr.dataset.side,
                 structure: tr.dataset.structure};
    tr.querySelectorAll('td[data-column]').forEach(td => row[td.dataset.column] = td.textContent);
    return row;
  }))
"""
_FLAGS_JS = """
Array.from(document.querySelectorAll('.flag.error')).map(el => {
  const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
  return {text: el.textContent, visible: r.width > 0 && r.height > 0 &&
          s.visibility !== 'hidden' && s.display !== 'none', colour: s.backgroundColor};
})
"""


def open_report(path: Path) -> dict:
    """Load ``path`` in a fresh headless Chromium with the network refused; what happened."""
    browser = Chromium()
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
            session=session,
        )
        browser.send("Page.navigate", {"url": path.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")

        def evaluate(expression: str):
            result = browser.send(
                "Runtime.evaluate",
                {"expression": expression, "awaitPromise": True, "returnByValue": True},
                session=session,
            )
            assert "exceptionDetails" not in result, result
            return result["result"]["value"]

        found = {
            "images": evaluate(_IMAGES_JS),
            "volumes": evaluate(_VOLUMES_JS),
            "flags": evaluate(_FLAGS_JS),
            "status": evaluate("document.getElementById('status').textContent"),
            "text": evaluate("document.body.innerText"),
        }
        events = browser.events
    finally:
        browser.close()
    found["requests"] = [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    found["failed"] = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
    found["errors"] = [
        e["params"]
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
        or (
            e.get("method") == "Runtime.consoleAPICalled"
            and e["params"]["type"] in ("error", "assert")
        )
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    return found


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def participant_out(parallel_run):
    """The participant output of every ds-mini subject with the fast demo hub, reports included
    (shared with the other end-to-end tests; read-only here: tests that change it copy it)."""
    out, codes, logs = parallel_run
    assert codes == [0, 0, 0, 0], "\n".join(logs)
    return out


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def _volumes(out: Path, subject: str) -> list[dict[str, str]]:
    rows = []
    for path in sorted((out / f"sub-{subject}").glob("**/*_desc-subfields_volumes.tsv")):
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        rows += table.to_dict(orient="records")
    return rows


# ---------------------------------------------------------------------------------------------
# Reports of a real run


@pytest.mark.slow
def test_every_subject_gets_a_small_report_and_the_run_a_citation(participant_out):
    for subject in SUBJECTS:
        report = participant_out / f"sub-{subject}.html"
        assert report.is_file()
        size = report.stat().st_size
        assert 100_000 < size < 4_000_000, (report, size)
    citation = (participant_out / "CITATION.md").read_text()
    for needle in ("Poiret", "Avants", "Ciric", "Fonov", "076884af18c3bdbc", "seed 42"):
        assert needle in citation


@pytest.mark.slow
def test_reports_open_offline_in_chromium_with_every_image_and_the_volumes(
    participant_out, chromium
):
    for subject in SUBJECTS:
        report = participant_out / f"sub-{subject}.html"
        found = open_report(report)
        assert found["errors"] == [], (report, found["errors"])
        assert found["failed"] == [], (report, found["failed"])
        schemes = {url.split(":", 1)[0] for url in found["requests"]}
        assert schemes <= {"file", "data"}, (report, found["requests"])
        images = found["images"]
        # Head view + coronal, sagittal/axial and uncertainty per side, per image.
        n_images = len(collect_subject(participant_out, subject).images)
        assert len(images) == 7 * n_images, (report, [i["key"] for i in images])
        for image in images:
            assert image["width"] > 0 and image["height"] > 0 and image["shown"] > 0, image
        expected = _volumes(participant_out, subject)
        shown = found["volumes"]
        assert len(shown) == len(expected) > 0
        by_key = {(r["source"], r["side"], r["structure"]): r for r in shown}
        for row in expected:
            page = by_key[(row["source"], row["side"], row["structure"])]
            for column in ("label", "n_voxels", "volume_mm3", "mean_uncertainty"):
                assert page[column] == row[column], (report, row, page)
            assert page["localisation_ok"] == row["localisation_ok"]


@pytest.mark.slow
def test_outputs_with_reports_pass_the_bids_validator(participant_out):
    from hsf_bids.bids import validate_dataset

    errors, _ = validate_dataset(participant_out)
    assert errors == [], errors


def _shifted_copy(participant_out: Path, tmp_path: Path, shift_mm: float) -> tuple[Path, Path]:
    """A copy of sub-04's outputs whose ses-01 sidecar holds the localisation of a template
    shifted by ``shift_mm`` to the right (boxes, QC values, flags all recomputed by assess)."""
    from hsf_bids.image import load_anat, to_ras
    from hsf_bids.localisation import assess
    from hsf_bids.reports.collect import resolve_source

    out = tmp_path / "out"
    out.mkdir()
    for name in ("dataset_description.json", "desc-subfields_dseg.tsv"):
        shutil.copy(participant_out / name, out / name)
    shutil.copytree(participant_out / "sub-04", out / "sub-04")
    sidecar_file = next(out.glob("sub-04/ses-01/anat/*_desc-subfields_dseg.json"))
    sidecar = json.loads(sidecar_file.read_text())
    loc = sidecar["Provenance"]["Localisation"]
    source = resolve_source(sidecar["Sources"][0], out)
    ras, _ = to_ras(load_anat(source))
    moved = np.asarray(loc["template_to_subject"], dtype=float)
    moved[0, 3] += shift_mm
    broken = assess(ras, "T1w", moved).to_dict()  # its notes, if any, go to "warnings"
    keys = ("boxes", "qc", "checks", "localisation_ok", "warnings", "template_to_subject")
    loc.update({key: broken[key] for key in keys})
    sidecar_file.write_text(json.dumps(sidecar, indent=2))
    return out, sidecar_file


@pytest.mark.slow
def test_a_broken_localisation_is_flagged_visibly(participant_out, chromium, tmp_path):
    before = open_report(participant_out / "sub-04.html")
    assert not any("doubtful localisation" in f["text"] for f in before["flags"])
    out, sidecar = _shifted_copy(participant_out, tmp_path, shift_mm=25.0)
    assert json.loads(sidecar.read_text())["Provenance"]["Localisation"]["localisation_ok"] is False
    report = write_subject_report(out, "04")
    found = open_report(report)
    assert found["errors"] == [] and found["failed"] == []
    assert found["status"] == "DO NOT TRUST WITHOUT A LOOK"
    flags = [f for f in found["flags"] if f["visible"]]
    assert any("doubtful localisation" in f["text"] for f in flags), flags
    # The segmentation written by the run now lies outside the moved boxes: said in words too.
    assert any("outside the recorded" in f["text"] for f in flags), flags
    assert all(image["width"] > 0 for image in found["images"])


@pytest.mark.slow
def test_reports_only_writes_the_reports_again_without_running(participant_out, tmp_path):
    from hsf_bids import errors as ex
    from hsf_bids.cli.participant import run_participant
    from hsf_bids.config import RunConfig

    out = tmp_path / "out"
    shutil.copytree(participant_out, out)
    for subject in SUBJECTS:
        (out / f"sub-{subject}.html").unlink()
    (out / "CITATION.md").unlink()
    config = RunConfig(
        bids_dir=Path("/nonexistent"), output_dir=out, analysis_level="participant",
        work_dir=tmp_path / "work", reports_only=True,
    )  # fmt: skip
    started = time.perf_counter()
    assert run_participant(config) == ex.EX_OK
    elapsed = time.perf_counter() - started
    for subject in SUBJECTS:
        assert (out / f"sub-{subject}.html").is_file()
    assert (out / "CITATION.md").is_file()
    assert not (tmp_path / "work").exists()
    print(f"--reports-only, 4 subjects: {elapsed:.1f} s")
    # Inputs moved away: the reports still come, without figures, saying why.
    text = (out / "sub-01.html").read_text()
    assert "figures omitted" in text
    assert run_participant(replace(config, participant_labels=("99",))) == ex.EX_NOINPUT


@pytest.mark.slow
def test_reports_only_from_the_command_line(participant_out, ds_mini, tmp_path, capsys):
    from hsf_bids.cli.run import main

    out = tmp_path / "out"
    shutil.copytree(participant_out, out)
    (out / "sub-02.html").unlink()
    before = (out / "sub-02" / "anat").stat().st_mtime_ns
    code = main([str(ds_mini), str(out), "participant", "--participant-label", "02",
                 "--reports-only", "-w", str(tmp_path / "work")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (out / "sub-02.html").is_file()
    assert (out / "sub-02" / "anat").stat().st_mtime_ns == before
    assert not list((tmp_path / "work").glob("*"))


@pytest.mark.slow
def test_a_failed_subject_report_shows_the_crash(participant_out, chromium, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(participant_out, out)
    anat = out / "sub-01" / "anat"
    for path in anat.glob("sub-01_space-T1w_desc-subfields_*"):
        path.unlink()
    log = next((out / "sub-01" / "log").iterdir())
    (log / "crash-20260101-000000-hsf-segment_right-abc.txt").write_text(
        "Node: hsf_bids_wf.sub_01_wf.sub_01_T1w_wf.segment_right\n"
        "Working directory: /work/sub_01_T1w_wf/segment_right\n\n"
        "Node inputs:\n\nside = right\n\n"
        "Traceback (most recent call last):\n"
        '  File "stages.py", line 120, in segment_side\n'
        "RuntimeError: the engine ran out of memory\n"
    )
    report = write_subject_report(out, "01", expected=["sub-01_T1w"])
    found = open_report(report)
    assert found["errors"] == [] and found["failed"] == []
    assert found["status"] == "FAILED"
    assert "RuntimeError: the engine ran out of memory" in found["text"]
    assert "segment_right" in found["text"]
    assert "no outputs" in found["text"]


# ---------------------------------------------------------------------------------------------
# Pieces


def _decode_indexed_png(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Enough of a PNG reader for 8-bit palette images with filter 0 (what the encoder writes)."""
    pos, chunks = 8, {}
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8 : pos + 8 + length]
        crc = int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big")
        assert crc == zlib.crc32(kind + data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    width = int.from_bytes(chunks[b"IHDR"][0:4], "big")
    height = int.from_bytes(chunks[b"IHDR"][4:8], "big")
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert not raw[:, 0].any()
    return raw[:, 1:], np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)


def test_indexed_png_round_trips():
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 7, size=(13, 29))
    colours = rng.integers(0, 256, size=(7, 3))
    pixels, plte = _decode_indexed_png(encode_indexed_png(indices, colours))
    assert np.array_equal(pixels, indices) and np.array_equal(plte, colours)
    from hsf_bids.reports import PngError

    with pytest.raises(PngError, match="outside the palette"):
        encode_indexed_png(indices, colours[:3])


@pytest.mark.slow
def test_figures_are_fast_and_draw_the_lut_colours(participant_out):
    from hsf_bids.image import load_anat, to_ras
    from hsf_bids.reports.collect import read_lut
    from hsf_bids.reports.render import _boxes, _ras

    image = collect_subject(participant_out, "04").images[0]
    ras, _ = to_ras(load_anat(image.source_paths[0]))
    anat = np.asarray(ras.dataobj, dtype=np.float32)
    labels, _ = _ras(image.dseg, np.int16)
    unc, _ = _ras(image.uncertainty, np.float32)
    lut = read_lut(participant_out)
    pal = palette(dict(zip(lut["index"], lut["color"], strict=True)))
    zooms = ras.header.get_zooms()[:3]
    boxes = _boxes(image.localisation)
    started = time.perf_counter()
    figures = [head_figure(anat, labels, zooms, boxes, pal)]
    for side in ("right", "left"):
        figures += side_figures(anat, labels, unc, zooms, side, boxes[side], pal)
    per_figure = (time.perf_counter() - started) / len(figures)
    assert per_figure < 1.0, per_figure
    present = {int(v) for v in np.unique(labels) if v}
    pixels, plte = _decode_indexed_png(figures[1].png)  # right coronal contours
    drawn = {tuple(plte[i]) for i in np.unique(pixels)}
    colours = dict(zip(lut["index"], lut["color"], strict=True))
    right = [i for i in present if i > 10]
    assert right
    for index in right:
        rgb = tuple(int(colours[index][k : k + 2], 16) for k in (1, 3, 5))
        assert rgb in drawn, (index, colours[index])


def test_methods_name_every_model_checksum_and_the_engine():
    provenance = {
        "Software": {"Name": "hsf_bids", "Version": "9.9"},
        "Preset": {"Name": "bagging_accurate", "ModelVersion": "4.0.0"},
        "Models": [{"File": f"arunet_bag_{i}.onnx", "XXH3_64": f"{i:016x}"} for i in range(5)],
        "CaMode": "1/2/3", "Fusion": "mean", "TestTimeAugmentation": True,
        "NumAugmentations": 20, "Engine": {"Name": "onnxruntime", "Precision": "fp32",
                                           "Device": "cpu"},
        "Seed": 7, "Localisation": {"resolution": 2.0},
    }  # fmt: skip
    text = methods(provenance, contrasts=["T1w"], versions={"ONNX Runtime": "1.2.3"})
    body = " ".join(text.paragraphs)
    for i in range(5):
        assert f"{i:016x}" in body
    assert "hsf_bids 9.9" in body and "4.0.0" in body and "20 augmented copies" in body
    assert "ONNX Runtime 1.2.3" in body and "mean class probability" in body
    keys = {ref.url for ref in text.references}
    assert "https://doi.org/10.3389/fninf.2023.1130845" in keys
    assert "https://onnxruntime.ai" in keys
    assert not any("openvino" in url for url in keys)


def test_methods_say_which_registration_schedule_ran():
    """The levels come from the schedule the sidecar recorded: the fine retry is named."""
    from hsf_bids.localisation import FAST_SCHEDULE, FINE_SCHEDULE

    def paragraph(localisation):
        provenance = {"Seed": 3, "Localisation": localisation}
        return methods(provenance, versions={}).paragraphs[0]

    fast = paragraph({"resolution": 2.0, "schedule": FAST_SCHEDULE.to_dict()})
    assert "12/8/4 mm levels, single-threaded" in fast and "finer" not in fast
    assert paragraph({"resolution": 2.0}) == fast  # sidecars that record no schedule
    fine = paragraph({"resolution": 2.0, "schedule": FINE_SCHEDULE.to_dict()})
    assert "8/4/2 mm levels: a finer schedule" in fine
    assert "first registration (12/8/4 mm levels)" in fine


def test_methods_write_the_augmentation_ranges_that_ran():
    from hsf_bids.segment.augment import HSF_TTA, TTASettings

    provenance = {"Seed": 3, "TestTimeAugmentation": True, "NumAugmentations": 4}
    text = methods(provenance, versions={}).paragraphs[1]
    assert "scaling 0.8-1.2, rotation up to 15 degrees" in text
    assert f"flip with probability {HSF_TTA.flip_probability:g}" in text
    other = TTASettings(scales=(0.9, 1.1), degrees=10.0)
    text = methods(provenance, versions={}, tta_settings=other).paragraphs[1]
    assert "scaling 0.9-1.1, rotation up to 10 degrees" in text
