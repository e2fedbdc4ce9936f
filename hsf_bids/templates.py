"""The MNI ICBM152 2009c symmetric template and CerebrA atlas, through TemplateFlow.

Files are looked up in ``$TEMPLATEFLOW_HOME`` (TemplateFlow's own default cache when unset). When
a file is already there it is read directly, without importing TemplateFlow (whose import can
start network access when its home is empty); only a missing file goes through the TemplateFlow
client, which downloads it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from hsf_bids.errors import EX_NOINPUT, HsfBidsError
from hsf_bids.vocabulary import CONTRASTS

__all__ = [
    "TEMPLATE",
    "HIPPOCAMPUS_LABELS",
    "TemplateError",
    "templateflow_home",
    "template_path",
    "atlas_path",
    "load_template",
    "load_atlas",
]

TEMPLATE = "MNI152NLin2009cSym"
# CerebrA codes of the hippocampi in the symmetric 2009c template.
HIPPOCAMPUS_LABELS: dict[str, int] = {"right": 48, "left": 99}


class TemplateError(HsfBidsError, RuntimeError):
    """A template file is missing and could not be fetched, or is unreadable."""

    exit_code = EX_NOINPUT


def templateflow_home() -> Path:
    """The TemplateFlow home: ``$TEMPLATEFLOW_HOME``, else TemplateFlow's default cache folder.

    Read at each call, so a changed environment variable is honoured.
    """
    env = os.environ.get("TEMPLATEFLOW_HOME")
    if env:
        return Path(env).expanduser().absolute()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("templateflow")).absolute()


def _fetch(filename: str, query: dict[str, object]) -> Path:
    """Path of ``filename`` in the TemplateFlow home; fetched through TemplateFlow if absent."""
    home = templateflow_home()
    local = home / f"tpl-{TEMPLATE}" / filename
    if local.is_file() and local.stat().st_size > 0:
        return local
    try:
        from templateflow.client import TemplateFlowClient

        got = TemplateFlowClient(root=home).get(TEMPLATE, **query)
    except Exception as exc:  # network, S3 and pybids errors all mean "not available"
        raise TemplateError(
            f"{local}: template file missing and TemplateFlow could not fetch it ({exc}); "
            "set TEMPLATEFLOW_HOME to a folder holding it"
        ) from exc
    paths = got if isinstance(got, list) else [got]
    if len(paths) != 1 or not Path(paths[0]).is_file():
        raise TemplateError(f"{local}: TemplateFlow returned {paths!r} for {query}")
    return Path(paths[0])


def template_path(contrast: str) -> Path:
    """Path of the res-1 template of ``contrast`` (``"T1w"`` or ``"T2w"``)."""
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}: expected one of {CONTRASTS}")
    return _fetch(
        f"tpl-{TEMPLATE}_res-1_{contrast}.nii.gz",
        {"resolution": 1, "suffix": contrast, "desc": None, "extension": ".nii.gz"},
    )


def atlas_path() -> Path:
    """Path of the res-1 CerebrA atlas (``atlas-CerebrA_dseg``; 48 right, 99 left hippocampus)."""
    return _fetch(
        f"tpl-{TEMPLATE}_res-1_atlas-CerebrA_dseg.nii.gz",
        {"resolution": 1, "atlas": "CerebrA", "suffix": "dseg", "extension": ".nii.gz"},
    )


@lru_cache(maxsize=6)
def _load_read_only(path: Path, dtype: type, what: str) -> nib.Nifti1Image:
    """The image at ``path`` in memory as ``dtype``, with a read-only array: cached images are
    shared by every caller. An unreadable file raises :class:`TemplateError` naming ``what``."""
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=dtype)
        data.setflags(write=False)
        out = nib.Nifti1Image(data, img.affine, header=img.header)
        out.set_data_dtype(dtype)
        out.header.set_slope_inter(None, None)  # the data are already scaled
        return out
    except Exception as exc:
        raise TemplateError(f"{path}: cannot read the {what}: {exc}") from exc


def load_template(contrast: str) -> nib.Nifti1Image:
    """The res-1 template of ``contrast`` as a float32 image (read-only array, cached in memory)."""
    # float32: nibabel applies the int16 files' 0.05 scale factor here.
    return _load_read_only(template_path(contrast), np.float32, "template")


def load_atlas() -> nib.Nifti1Image:
    """The res-1 CerebrA atlas as an int16 label image (read-only array, cached in memory)."""
    return _load_read_only(atlas_path(), np.int16, "atlas")
