"""BIDS Derivatives outputs: file names and writers, the label look-up table, volumes tables.

``lut`` owns the labels (one bilateral index rule), ``derivatives`` the names, sidecars and the
shared top-level files, ``volumes`` the per-session volumes table, ``read`` finds the written files
again for the reports and group tables (by subject, session and entities, from the names
``derivatives`` gives). Plain functions over arrays and nibabel images; nothing here registers
images or runs models.
"""

from hsf_bids.outputs.derivatives import (
    DerivativesError,
    Entities,
    EntitiesError,
    ForeignDerivativesError,
    GridError,
    OutputWriteError,
    UnsafeOutputError,
    bids_uri,
    dseg_path,
    lut_path,
    read_output_text,
    uncertainty_path,
    volumes_path,
    write_bidsignore,
    write_dataset_description,
    write_segmentation,
)
from hsf_bids.outputs.lut import LutConflictError, lookup_table, write_lut
from hsf_bids.outputs.volumes import (
    LabelsError,
    compute_volumes,
    estimate_icv_mm3,
    write_volumes,
)

__all__ = [
    "DerivativesError",
    "Entities",
    "EntitiesError",
    "ForeignDerivativesError",
    "GridError",
    "LabelsError",
    "LutConflictError",
    "OutputWriteError",
    "UnsafeOutputError",
    "bids_uri",
    "compute_volumes",
    "dseg_path",
    "estimate_icv_mm3",
    "lookup_table",
    "lut_path",
    "read_output_text",
    "uncertainty_path",
    "volumes_path",
    "write_bidsignore",
    "write_dataset_description",
    "write_lut",
    "write_segmentation",
    "write_volumes",
]
