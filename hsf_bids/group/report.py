"""The group HTML report: one self-contained page (inline SVG and CSS, no scripts, no network)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from hsf_bids import __version__
from hsf_bids.group.tables import FLAG_COLUMNS, WIDE_SPREAD
from hsf_bids.outputs.read import dseg_sidecars, read_sidecar, source_name

_WIDTH, _HEIGHT, _PAD = 260, 220, 36
_SIDE_X = {"left": 0.3, "right": 0.7}
_PROVENANCE_KEYS = (
    "Software", "Preset", "Models", "Engine", "CaMode", "Fusion", "TestTimeAugmentation", "Seed",
)  # fmt: skip


def _label(row: pd.Series) -> str:
    parts = [row["participant_id"]]
    for key in ("session_id", "acq", "run"):
        if pd.notna(row.get(key)):
            parts.append(str(row[key]) if key == "session_id" else f"{key}-{row[key]}")
    return " ".join(parts)


def strip_plot(rows: pd.DataFrame, structure: str) -> str:
    """An SVG of one structure's volumes, left and right side by side: each image a point that
    links to its subject's report (``sub-XX.html``), with a bar over the 5-95 % range of the
    ensemble's predictions where the table has it; flagged points in red."""
    low, high = (
        rows[c] if c in rows else pd.Series(np.nan, index=rows.index)
        for c in ("volume_p05_mm3", "volume_p95_mm3")
    )
    # Volumes are never negative: an axis from 0 shows sizes and failures in proportion.
    top = pd.concat([rows["volume_mm3"], high]).max() if len(rows) else 0.0
    lo, hi = 0.0, max(float(top) if top == top else 0.0, 1.0)
    span = hi - lo

    def y(v: float) -> float:
        return _HEIGHT - _PAD - (v - lo) / span * (_HEIGHT - 2 * _PAD)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        f'width="{_WIDTH}" height="{_HEIGHT}" role="img" '
        f'aria-label="{html.escape(structure)} volumes">',
        f'<text x="{_WIDTH / 2}" y="16" text-anchor="middle" class="title">'
        f"{html.escape(structure)} (mm³)</text>",
    ]
    for tick in np.linspace(lo, hi, 4):
        out.append(
            f'<line x1="{_PAD}" x2="{_WIDTH - 8}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'class="grid"/>'
            f'<text x="{_PAD - 4}" y="{y(tick) + 4:.1f}" text-anchor="end" class="tick">'
            f"{tick:.0f}</text>"
        )
    for side, x in _SIDE_X.items():
        out.append(
            f'<text x="{x * _WIDTH:.0f}" y="{_HEIGHT - 8}" text-anchor="middle" class="tick">'
            f"{side}</text>"
        )
    rng = np.random.default_rng(0)  # fixed jitter: the page is the same every run
    for index, row in rows.iterrows():
        cx = _SIDE_X[row["side"]] * _WIDTH + rng.uniform(-18, 18)
        flagged = bool(row[list(FLAG_COLUMNS)].any())
        text = f"{_label(row)} {row['side']} {structure}: {row['volume_mm3']:.0f} mm³"
        if pd.notna(low[index]) and pd.notna(high[index]):
            text += f" (5-95 %: {low[index]:.0f}-{high[index]:.0f})"
            out.append(
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(low[index]):.1f}" '
                f'y2="{y(high[index]):.1f}" class="range"/>'
            )
        title = html.escape(text)
        href = html.escape(f"{row['participant_id']}.html")
        out.append(
            f'<a href="{href}"><circle cx="{cx:.1f}" cy="{y(row["volume_mm3"]):.1f}" r="4.5" '
            f'class="{"flagged" if flagged else "point"}"><title>{title}</title></circle></a>'
        )
    out.append("</svg>")
    return "".join(out)


def volume_columns(wide: pd.DataFrame) -> list[tuple[str, str | None, str | None]]:
    """The wide table's volume columns (and ``icv_mm3``) as the report shows them: each with
    the names of its 5th and 95th percentile columns, or None where it has none."""
    spread = tuple(f"_{s}_mm3" for s in WIDE_SPREAD.values())
    shown = []
    for column in wide.columns:
        if not column.endswith("_mm3") or column.endswith(spread):
            continue
        low, high = (column.replace("_mm3", f"_{s}_mm3") for s in ("p05", "p95"))
        ranged = low in wide.columns and high in wide.columns
        shown.append((column, low if ranged else None, high if ranged else None))
    return shown


def provenance(output_dir: Path, files: Sequence[str]) -> list[dict[str, Any]]:
    """The distinct settings (software, preset, models, engine) found in the segmentations'
    sidecars, each with the images that used them (several entries mean a mixed group)."""
    found: dict[str, dict[str, Any]] = {}
    for sidecar in dseg_sidecars(output_dir):
        prov = read_sidecar(sidecar).get("Provenance", {})
        key_fields = {k: prov.get(k) for k in _PROVENANCE_KEYS}
        key = json.dumps(key_fields, sort_keys=True)
        entry = found.setdefault(key, {**key_fields, "images": []})
        entry["images"].append(source_name(sidecar))
    return list(found.values())


def render_group_report(
    long: pd.DataFrame,
    wide: pd.DataFrame,
    status: pd.DataFrame,
    output_dir: Path,
) -> str:
    """The group report as HTML text."""
    structures = list(dict.fromkeys(long["structure"]))
    plots = [(s, strip_plot(long[long["structure"] == s], s)) for s in structures]
    flagged = wide[wide["n_flags"] > 0]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("hsf_bids", "data/group"),
        autoescape=jinja2.select_autoescape(["html"]),
        keep_trailing_newline=True,
    )
    return env.get_template("report.html").render(
        version=__version__,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        n_images=len(wide),
        n_subjects=wide["participant_id"].nunique(),
        plots=plots,
        flagged=[(_label(r), r["participant_id"], r["flags"]) for _, r in flagged.iterrows()],
        failures=status[status["status"] != "ok"].to_dict("records"),
        provenance=provenance(output_dir, long["volumes_file"].unique()),
        columns=volume_columns(wide),
        rows=wide.to_dict("records"),
        label=_label,
    )
