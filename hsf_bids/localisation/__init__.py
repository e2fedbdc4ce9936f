"""Localisation of both hippocampi in a head image (contract steps 1-3 and 7).

* :mod:`~hsf_bids.localisation.registration`: affine registration with ANTs (the compiled
  library, ITK's thread state, ``.mat`` files, registration grids, the fast and fine schedules);
* :mod:`~hsf_bids.localisation.boxes`: box geometry, label warping, crop and paste back;
* :mod:`~hsf_bids.localisation.qc`: the QC measurements and the checks judged on them, once;
* :mod:`~hsf_bids.localisation.localise`: :func:`locate`, the orchestration (register, assess,
  retry on the fine schedule).

A second contrast is brought onto the first one's grid by :mod:`hsf_bids.segment.coregister`,
next to the fusion it serves.
"""

from hsf_bids.localisation.boxes import (
    DEFAULT_MARGIN,
    THICK_SLICE_MARGIN,
    Box,
    auto_margin,
    crop,
    make_box,
    paste_back,
    warp_label,
)
from hsf_bids.localisation.localise import RETRY_CORRELATION, Localisation, assess, locate
from hsf_bids.localisation.qc import QcCheck
from hsf_bids.localisation.registration import (
    FAST_SCHEDULE,
    FINE_SCHEDULE,
    LocalisationError,
    Schedule,
    register_template,
)

__all__ = [
    "DEFAULT_MARGIN",
    "FAST_SCHEDULE",
    "FINE_SCHEDULE",
    "RETRY_CORRELATION",
    "THICK_SLICE_MARGIN",
    "Box",
    "Localisation",
    "LocalisationError",
    "QcCheck",
    "Schedule",
    "assess",
    "auto_margin",
    "crop",
    "locate",
    "make_box",
    "paste_back",
    "register_template",
    "warp_label",
]
