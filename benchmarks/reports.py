"""Time the per-subject QC report and measure its size; print a Markdown table.

The participant outputs are copied to a temporary folder first (the given folder is only read),
then every subject's report is written ``--repeat`` times; the table gives the median time per
subject (reading the outputs and the input images, drawing every figure, rendering), the time per
figure, the number of figures and the size of ``sub-XX.html``. The load average is printed with it:
numbers from a busy machine are upper bounds.

    .venv/bin/python benchmarks/reports.py /tmp/bench/ds/out [--repeat 3] [--bids-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from hsf_bids import __version__
from hsf_bids.reports import write_subject_report
from hsf_bids.reports.collect import collect_subject, find_subjects


def _copy_outputs(source: Path, dest: Path) -> Path:
    # Only what reports read; logs and old reports are left behind.
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n.endswith(".html") or n == "CITATION.md"}

    shutil.copytree(source, dest, ignore=ignore)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a participant-level output folder")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bids-dir", type=Path, help="the input dataset (default: linked)")
    args = parser.parse_args()

    load = os.getloadavg()
    print(f"hsf_bids {__version__}; {os.cpu_count()} CPUs; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} at start")  # fmt: skip
    print()
    print("| subject | images | figures | time per report (s, median) | per figure (s) | size |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out = _copy_outputs(args.output_dir, Path(tmp) / "out")
        for subject in find_subjects(out):
            outputs = collect_subject(out, subject, bids_dir=args.bids_dir)
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                path = write_subject_report(out, subject, bids_dir=args.bids_dir)
                times.append(time.perf_counter() - started)
            html = path.read_text()
            figures = html.count('src="data:image/png')
            median = statistics.median(times)
            size = path.stat().st_size
            print(f"| sub-{subject} | {len(outputs.images)} | {figures} | {median:.2f} | "
                  f"{median / max(figures, 1):.3f} | {size / 1e6:.2f} MB |")  # fmt: skip
    load = os.getloadavg()
    print()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")


if __name__ == "__main__":
    main()
