#!/usr/bin/env python3
"""Compare two hsf_bids output folders: are they the same derivatives?

    python tools/compare_outputs.py BEFORE AFTER [--participant-label 03 ...]

For checking that a change of code did not change results (a refactoring, a new dependency, a
container against a native run). Images (``.nii``, ``.nii.gz``) must have the same header and the
same voxels, decompressed (gzip's own header may differ); JSON files the same content; text files
(tables, reports, methods) the same text. In JSON and text, run ids (``20261129-202403_<uuid>``) and
times are masked: they differ between any two runs. Each run's ``log/`` folder is skipped. With
``--participant-label``, only those subjects' files are compared (a run of one subject against a
run of the whole dataset). Exit code 0 when the folders agree, 1 when they differ (each difference
is printed), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RUN_ID = re.compile(r"\d{8}-\d{6}_[0-9a-f-]{36}")
TIME = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?( ?UTC|Z|[+-]\d{2}:?\d{2})?")


def mask(text: str) -> str:
    """``text`` with run ids and times replaced by placeholders."""
    return TIME.sub("<time>", RUN_ID.sub("<run-id>", text))


def derivative_files(root: Path, subjects: Sequence[str] = ()) -> set[str]:
    """Relative paths of the files under ``root``, without the runs' ``log/`` folders; only
    those of ``subjects`` (labels without ``sub-``) when given."""
    out = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or "/log/" in f"/{rel}":
            continue
        if subjects and rel.split("/")[0] not in {f"sub-{s}" for s in subjects}:
            continue
        out.add(rel)
    return out


def _json_differences(a: Any, b: Any, where: str) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                yield f"{where}.{key}: only in the first"
            elif key not in a:
                yield f"{where}.{key}: only in the second"
            else:
                yield from _json_differences(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _json_differences(x, y, f"{where}[{i}]")
    elif isinstance(a, str) and isinstance(b, str):
        if mask(a) != mask(b):
            yield f"{where}: {a!r} != {b!r}"
    elif a != b or type(a) is not type(b):
        yield f"{where}: {a!r} != {b!r}"


def _image_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def file_differences(first: Path, second: Path) -> list[str]:
    """What differs between two files of the same name (empty when they agree)."""
    name = first.name
    if name.endswith((".nii", ".nii.gz")):
        return [] if _image_bytes(first) == _image_bytes(second) else ["voxels or header differ"]
    if name.endswith(".json"):
        try:
            a, b = json.loads(first.read_text()), json.loads(second.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return [f"not JSON: {exc}"]
        return list(_json_differences(a, b, ""))
    try:
        a_text, b_text = first.read_text(), second.read_text()
    except UnicodeDecodeError:
        return [] if first.read_bytes() == second.read_bytes() else ["bytes differ"]
    a_lines, b_lines = mask(a_text).splitlines(), mask(b_text).splitlines()
    if a_lines == b_lines:
        return []
    for number, (x, y) in enumerate(zip(a_lines, b_lines, strict=False), 1):
        if x != y:
            return [f"line {number}: {x[:160]!r} != {y[:160]!r}"]
    return [f"{len(a_lines)} lines != {len(b_lines)} lines"]


def compare(first: Path, second: Path, subjects: Sequence[str] = ()) -> list[str]:
    """Every difference between the derivatives in ``first`` and ``second``, one line each."""
    subjects = [s.removeprefix("sub-") for s in subjects]
    a, b = derivative_files(first, subjects), derivative_files(second, subjects)
    problems = [f"{rel}: only in {first}" for rel in sorted(a - b)]
    problems += [f"{rel}: only in {second}" for rel in sorted(b - a)]
    for rel in sorted(a & b):
        problems += [f"{rel}: {d}" for d in file_differences(first / rel, second / rel)]
    if not a and not b:
        problems.append("no derivative files in either folder")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--participant-label", nargs="+", default=[], metavar="LABEL")
    args = parser.parse_args(argv)
    for folder in (args.first, args.second):
        if not folder.is_dir():
            print(f"{folder}: not a folder", file=sys.stderr)
            return 2
    problems = compare(args.first, args.second, args.participant_label)
    for line in problems:
        print(line)
    count = len(derivative_files(args.first, args.participant_label))
    verdict = f"{len(problems)} differences" if problems else "the same"
    print(f"{count} files compared: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
