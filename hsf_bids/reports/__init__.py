"""Per-subject QC reports: figures of the localisation, segmentation and uncertainty, the
volumes with their QC flags, provenance and a methods paragraph, as one self-contained HTML file
per subject (``<output_dir>/sub-XX.html``), and the run's ``CITATION.md``.

Reports read only what the participant level wrote (and the input images, as background); they
never recompute a segmentation.
"""

from hsf_bids.reports.boilerplate import Methods, Reference, methods
from hsf_bids.reports.collect import Flag, OutputsError, SubjectOutputs, collect_subject
from hsf_bids.reports.figures import Figure, FigureError
from hsf_bids.reports.png import PngError, encode_indexed_png
from hsf_bids.reports.render import (
    CITATION_NAME,
    ReportError,
    render_subject,
    report_path,
    write_citation,
    write_reports,
    write_subject_report,
)

__all__ = [
    "CITATION_NAME",
    "Figure",
    "FigureError",
    "Flag",
    "Methods",
    "OutputsError",
    "PngError",
    "Reference",
    "ReportError",
    "SubjectOutputs",
    "collect_subject",
    "encode_indexed_png",
    "methods",
    "render_subject",
    "report_path",
    "write_citation",
    "write_reports",
    "write_subject_report",
]
