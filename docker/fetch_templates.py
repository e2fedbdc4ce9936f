"""Fetch the TemplateFlow files hsf_bids uses into a TemplateFlow home, and verify them.

Run at image build time (``python docker/fetch_templates.py --home /opt/hsf_bids/templateflow``).
The files are those :mod:`hsf_bids.templates` reads: ``tpl-MNI152NLin2009cSym`` res-1 T1w and
T2w, the CerebrA atlas (``atlas-CerebrA_dseg``) and its label table (which TemplateFlow spells
``atlas-CerebA_dseg.tsv``). They are downloaded with the TemplateFlow client, then verified:

- each file's MD5 equals the checksum its server reports (the S3 ``ETag``, plain or multipart),
  and, with ``--checksums FILE`` (``sha256sum`` format), the SHA-256 pinned there;
- the images load, the templates share the atlas grid, the atlas holds both hippocampus labels;
- :mod:`hsf_bids.templates` finds every file in the home without downloading anything.

With ``--from DIR`` (a TemplateFlow home, for builds that cannot reach TemplateFlow) the files
are copied from there instead, with the template folder's licence notices (``COPYING*``,
``LICENSE*``); there is no server checksum then, only the content checks and the pins of
``--checksums`` (such copies may be re-encoded: their SHA-256 is not TemplateFlow's).

The SHA-256 of every file is printed in ``sha256sum`` format, ready to pin. The rest of
TemplateFlow's skeleton (other templates, zero-byte placeholders) is removed: the home holds only
verified files.

Exit status: 0 verified; 1 a checksum mismatch or an invalid file; 74 a download failed.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from hsf_bids.errors import EX_FAILURE, EX_IOERR

TEMPLATE = "MNI152NLin2009cSym"
S3_ROOT = "https://templateflow.s3.amazonaws.com"
# File name -> TemplateFlow query (the queries of hsf_bids.templates, plus the atlas table).
FILES: dict[str, dict[str, object]] = {
    f"tpl-{TEMPLATE}_res-1_T1w.nii.gz": {
        "resolution": 1, "suffix": "T1w", "desc": None, "extension": ".nii.gz",
    },
    f"tpl-{TEMPLATE}_res-1_T2w.nii.gz": {
        "resolution": 1, "suffix": "T2w", "desc": None, "extension": ".nii.gz",
    },
    f"tpl-{TEMPLATE}_res-1_atlas-CerebrA_dseg.nii.gz": {
        "resolution": 1, "atlas": "CerebrA", "suffix": "dseg", "extension": ".nii.gz",
    },
    f"tpl-{TEMPLATE}_atlas-CerebA_dseg.tsv": {
        "atlas": "CerebA", "suffix": "dseg", "extension": ".tsv",
    },
}  # fmt: skip
HIPPOCAMPUS_LABELS = (48, 99)
MIB = 1024 * 1024


class VerificationError(ValueError):
    """A fetched file does not match its checksum or is not what hsf_bids expects."""


class FetchError(RuntimeError):
    """TemplateFlow or its server could not deliver a file."""


def _digest(path: Path, algorithm: str, part_size: int | None = None) -> str:
    """Hex digest of ``path``; with ``part_size``, S3's multipart ETag (``md5(md5s)-N``)."""
    if part_size is None:
        h = hashlib.new(algorithm)
        with path.open("rb") as fh:
            while chunk := fh.read(MIB):
                h.update(chunk)
        return h.hexdigest()
    parts = []
    with path.open("rb") as fh:
        while chunk := fh.read(part_size):
            parts.append(hashlib.md5(chunk).digest())
    return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"


def matches_etag(path: Path, etag: str) -> bool:
    """Whether ``path`` has the S3 ``etag``: a plain MD5, or a multipart one (``<md5>-<parts>``).

    The part size of a multipart upload is not recorded; every whole number of MiB that gives the
    recorded number of parts (5 MiB is S3's minimum) is tried.
    """
    etag = etag.strip().strip('"').removeprefix("W/").strip('"').lower()
    if "-" not in etag:
        return _digest(path, "md5") == etag
    parts = int(etag.rsplit("-", 1)[1])
    size = path.stat().st_size
    for mib in range(5, 5 * 1024 + 1):
        if math.ceil(size / (mib * MIB)) == parts and _digest(path, "md5", mib * MIB) == etag:
            return True
        if mib * MIB * (parts - 1) >= size:
            break
    return False


def load_pins(path: Path | None) -> dict[str, str]:
    """``sha256sum``-format pins (``<sha256>  <file name>``); comments and blank lines skipped."""
    if path is None:
        return {}
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) != 64 or not name:
            raise VerificationError(f"{path}:{number}: expected '<sha256>  <file name>': {line!r}")
        pins[Path(name).name] = digest.lower()
    return pins


def fetch(home: Path, s3_root: str, timeout: float) -> dict[str, Path]:
    """Download every file of :data:`FILES` with the TemplateFlow client; their local paths."""
    from templateflow.client import TemplateFlowClient

    client = TemplateFlowClient(root=home, s3_root=s3_root, autoupdate=False, timeout=timeout)
    client.cache.ensure()  # unpacks the skeleton (no network)
    # The client indexes its whole home with pybids (seconds per thousand files): keep one template.
    _remove_other_templates(home)
    paths = {}
    for name, query in FILES.items():
        try:
            # TemplateFlow's skeleton ships small files (tables) with content and downloads only
            # empty ones: empty them all, so every file comes from the server and its checksum.
            for listed in client.ls(TEMPLATE, **query):
                Path(listed).write_bytes(b"")
            got = client.get(TEMPLATE, **query)
        except Exception as exc:  # requests and TemplateFlow raise many kinds
            raise FetchError(
                f"{name}: TemplateFlow could not fetch it from {s3_root}: {exc}"
            ) from exc
        got = got if isinstance(got, list) else [got]
        if len(got) != 1 or Path(got[0]).name != name:
            raise FetchError(f"{name}: TemplateFlow returned {got!r} for {query}")
        path = Path(got[0])
        if not path.is_file() or path.stat().st_size == 0:
            raise FetchError(f"{path}: empty after download from {s3_root}")
        paths[name] = path
    return paths


def copy_local(home: Path, source: Path) -> dict[str, Path]:
    """Copy every file of :data:`FILES`, and the licence notices, from the home ``source``."""
    src_dir, dest_dir = source / f"tpl-{TEMPLATE}", home / f"tpl-{TEMPLATE}"
    missing = [name for name in FILES if not (src_dir / name).is_file()]
    if missing:
        raise FetchError(f"{src_dir}: missing {', '.join(missing)}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in FILES:
        paths[name] = Path(shutil.copyfile(src_dir / name, dest_dir / name))
    # The MNI template's terms allow redistribution with its notice: it travels with the files.
    for notice in [*src_dir.glob("COPYING*"), *src_dir.glob("LICENSE*")]:
        shutil.copyfile(notice, dest_dir / notice.name)
    return paths


def verify_pins(paths: dict[str, Path], pins: dict[str, str]) -> dict[str, str]:
    """Check each file against its pin, if any; returns the SHA-256 of each."""
    sha256 = {name: _digest(path, "sha256") for name, path in paths.items()}
    for name, digest in sha256.items():
        if name in pins and pins[name] != digest:
            raise VerificationError(
                f"{paths[name]}: checksum mismatch: SHA-256 {digest}, pinned {pins[name]}"
            )
    unknown = set(pins) - set(paths)
    if unknown:
        raise VerificationError(f"pinned files that are not fetched: {sorted(unknown)}")
    return sha256


def server_etag(s3_root: str, home: Path, path: Path, timeout: float) -> str:
    """The ETag the server reports for ``path`` (a HEAD request on its TemplateFlow URL)."""
    import requests

    url = f"{s3_root}/{quote(path.relative_to(home).as_posix())}"
    try:
        response = requests.head(url, timeout=timeout, allow_redirects=True)
    except requests.RequestException as exc:
        raise FetchError(f"{url}: no checksum from the server: {exc}") from exc
    etag = response.headers.get("ETag", "")
    if response.status_code != 200 or not etag:
        raise FetchError(f"{url}: no checksum from the server (HTTP {response.status_code})")
    return etag


def verify_checksums(
    paths: dict[str, Path], home: Path, s3_root: str, pins: dict[str, str], timeout: float
) -> dict[str, str]:
    """Check each file against its server ETag, then its pin; returns the SHA-256 of each."""
    for path in paths.values():
        etag = server_etag(s3_root, home, path, timeout)
        if not matches_etag(path, etag):
            raise VerificationError(
                f"{path}: checksum mismatch: its MD5 is {_digest(path, 'md5')}, the server "
                f"reports ETag {etag}"
            )
    return verify_pins(paths, pins)


def verify_content(paths: dict[str, Path]) -> None:
    """The images load on one grid, the atlas holds both hippocampi, the table lists them."""
    import nibabel as nib
    import numpy as np

    images = {}
    for name, path in paths.items():
        if name.endswith(".nii.gz"):
            try:
                images[name] = nib.load(path)
                np.asarray(images[name].dataobj)  # decompresses the whole file
            except Exception as exc:
                raise VerificationError(f"{path}: not a readable NIfTI image: {exc}") from exc
    atlas_name = f"tpl-{TEMPLATE}_res-1_atlas-CerebrA_dseg.nii.gz"
    atlas = images[atlas_name]
    for name, img in images.items():
        if img.shape[:3] != atlas.shape[:3] or not np.allclose(img.affine, atlas.affine):
            raise VerificationError(f"{paths[name]}: not on the grid of {atlas_name}")
    labels = set(np.unique(np.asarray(atlas.dataobj)).astype(int).tolist())
    missing = [label for label in HIPPOCAMPUS_LABELS if label not in labels]
    if missing:
        raise VerificationError(f"{paths[atlas_name]}: hippocampus labels {missing} missing")
    table = paths[f"tpl-{TEMPLATE}_atlas-CerebA_dseg.tsv"].read_text().splitlines()
    if len(table) < 2 or "\t" not in table[0]:
        raise VerificationError(f"{paths[f'tpl-{TEMPLATE}_atlas-CerebA_dseg.tsv']}: not a table")


def verify_app_finds_them(home: Path, paths: dict[str, Path]) -> None:
    """:mod:`hsf_bids.templates` resolves to these very files, with no download."""
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    from hsf_bids import templates

    found = {
        templates.template_path("T1w"),
        templates.template_path("T2w"),
        templates.atlas_path(),
    }
    expected = {p.resolve() for n, p in paths.items() if n.endswith(".nii.gz")}
    if {p.resolve() for p in found} != expected:
        raise VerificationError(f"hsf_bids.templates reads {sorted(found)}, not {sorted(expected)}")


def _remove_other_templates(home: Path) -> int:
    removed = 0
    for path in sorted(home.iterdir()):
        if path.is_dir() and path.name.startswith("tpl-") and path.name != f"tpl-{TEMPLATE}":
            removed += sum(1 for p in path.rglob("*") if not p.is_dir())
            shutil.rmtree(path)
    return removed


def prune(home: Path) -> int:
    """Remove other templates and the skeleton's zero-byte placeholders; the count removed."""
    removed = _remove_other_templates(home)
    for path in sorted(home.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and not path.is_symlink() and path.stat().st_size == 0:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home",
        type=Path,
        default=os.environ.get("TEMPLATEFLOW_HOME"),
        required="TEMPLATEFLOW_HOME" not in os.environ,
        help="the TemplateFlow home to fill (default: $TEMPLATEFLOW_HOME)",
    )
    parser.add_argument("--s3-root", default=S3_ROOT, help=f"download server (default {S3_ROOT})")
    parser.add_argument("--checksums", type=Path, help="SHA-256 pins, sha256sum format")
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="copy the files from this TemplateFlow home instead of downloading them",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout (s)")
    args = parser.parse_args(argv)
    home = Path(args.home).absolute()
    s3_root = args.s3_root.rstrip("/")
    try:
        pins = load_pins(args.checksums)
        if args.source is not None:
            paths = copy_local(home, args.source.absolute())
            sha256 = verify_pins(paths, pins)
        else:
            paths = fetch(home, s3_root, args.timeout)
            sha256 = verify_checksums(paths, home, s3_root, pins, args.timeout)
        verify_content(paths)
        removed = prune(home)
        verify_app_finds_them(home, paths)
    except VerificationError as exc:
        print(f"fetch_templates: error: {exc}", file=sys.stderr)
        return EX_FAILURE
    except (FetchError, OSError) as exc:
        print(f"fetch_templates: error: {exc}", file=sys.stderr)
        return EX_IOERR
    for name, digest in sha256.items():
        print(f"{digest}  {name}")
    print(
        f"fetch_templates: {len(paths)} files verified in {home} "
        f"({removed} empty skeleton placeholders removed)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
