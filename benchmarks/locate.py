"""Time the localisation stage on every head of a BIDS dataset; print a Markdown table.

Per head: load + validate, reorient to RAS+, register the template (2 mm route), boxes + QC
(warp the hippocampus labels, similarity), crop both sides; then a second run with the same
seed, checked to give byte-identical transforms and identical boxes.

    .venv/bin/python benchmarks/locate.py [--bids ../shared/data/bids/ds-mini] [--seed 0]

``TEMPLATEFLOW_HOME`` defaults to ``<shared>/data/templateflow`` next to the dataset's shared
folder when unset. The one-off template load (per process) is reported on its own line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _default_shared() -> Path:
    env = os.environ.get("HSF_BIDS_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def _heads(bids: Path) -> list[tuple[Path, str]]:
    found = []
    for path in sorted(bids.glob("sub-*/**/anat/*.nii*")):
        for contrast in ("T1w", "T2w"):
            if path.name.split(".")[0].endswith(f"_{contrast}"):
                found.append((path, contrast))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", type=Path, default=_default_shared() / "data/bids/ds-mini")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="ANTs threads (default 1)")
    parser.add_argument("--no-repeat", action="store_true", help="skip the same-seed rerun")
    args = parser.parse_args(argv)
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(args.bids.resolve().parents[1] / "templateflow"))
    sys.path.insert(0, str(REPO))
    from hsf_bids import localisation as L
    from hsf_bids.image import load_anat, to_ras
    from hsf_bids.localisation import qc as Q
    from hsf_bids.localisation import registration as R
    from hsf_bids.templates import load_atlas, load_template

    heads = _heads(args.bids)
    if not heads:
        parser.error(f"no T1w/T2w images under {args.bids}")
    t0 = time.perf_counter()
    for contrast in sorted({c for _, c in heads}):
        load_template(contrast)
        R.template_grid(contrast, 2.0)
    load_atlas()
    Q._template_points(2.0)
    warm = time.perf_counter() - t0

    rows = []
    for path, contrast in heads:
        times = {}
        t = time.perf_counter()
        img = load_anat(path)
        times["load"] = time.perf_counter() - t
        t = time.perf_counter()
        ras, _ = to_ras(img)
        times["reorient"] = time.perf_counter() - t
        t = time.perf_counter()
        tx = L.register_template(ras, contrast, seed=args.seed, threads=args.threads)
        times["register"] = time.perf_counter() - t
        t = time.perf_counter()
        loc = L.assess(ras, contrast, tx)
        times["boxes+QC"] = time.perf_counter() - t
        t = time.perf_counter()
        data = np.asarray(ras.dataobj)
        crops = [L.crop(data, box) for box in loc.boxes.values()]
        times["crop"] = time.perf_counter() - t
        total = sum(times.values())
        same = "-"
        if not args.no_repeat:
            tx2 = L.register_template(ras, contrast, seed=args.seed, threads=args.threads)
            loc2 = L.assess(ras, contrast, tx2)
            same = "yes" if np.array_equal(tx, tx2) and loc2.boxes == loc.boxes else "NO"
        shapes = " / ".join("x".join(str(s) for s in c.shape) for c in crops)
        rows.append((path.name, "x".join(map(str, img.shape)), times, total, shapes, loc, same))

    stages = ["load", "reorient", "register", "boxes+QC", "crop"]
    print(f"Template + atlas load and 2 mm grids (once per process): {warm:.2f} s\n")
    print("| image | grid | " + " | ".join(f"{s} (s)" for s in stages)
          + " | total (s) | crops R / L | QC | same seed, same result |")  # fmt: skip
    print("|" + "---|" * (len(stages) + 6))
    for name, grid, times, total, shapes, loc, same in rows:
        qc = "ok" if loc.localisation_ok else "FAILED"
        cells = " | ".join(f"{times[s]:.2f}" for s in stages)
        print(f"| {name} | {grid} | {cells} | {total:.2f} | {shapes} | {qc} | {same} |")
    totals = [r[3] for r in rows]
    print(f"\nmean {np.mean(totals):.2f} s, max {np.max(totals):.2f} s per head "
          f"(ANTs threads: {os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS')})")  # fmt: skip
    return 0 if all(r[6] in ("yes", "-") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
