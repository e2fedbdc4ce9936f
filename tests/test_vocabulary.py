"""hsf_bids.vocabulary: each concept defined once, in one order."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from hsf_bids import vocabulary as V

PACKAGE = Path(V.__file__).resolve().parent


def _module_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
    return names


def test_no_other_module_defines_a_name_of_the_vocabulary():
    """Two definitions of one concept drift apart (SIDES once had two orders)."""
    defined = set(V.__all__) | {"DEFAULT_PRESET", "_SIDES", "UnknownCaModeError"}
    clashes = {
        path.relative_to(PACKAGE).as_posix(): sorted(_module_level_names(path) & defined)
        for path in PACKAGE.rglob("*.py")
        if path.name != "vocabulary.py"
    }
    clashes = {k: v for k, v in clashes.items() if v and not (k == "hub/presets.py" and
               v == ["DEFAULT_PRESET"])}  # fmt: skip
    assert clashes == {}


def test_sides_keep_the_order_that_seeds_the_augmentations():
    from hsf_bids.stages import side_seed

    assert V.SIDES == ("right", "left")  # reordering would change every result
    first = side_seed(7, "right").integers(1 << 30)
    assert first == np.random.default_rng(np.random.SeedSequence([7, 0])).integers(1 << 30)
    assert V.SIDES_BY_INDEX == ("left", "right")


@pytest.mark.parametrize("ca_mode", V.CA_MODES)
def test_structures_cover_every_model_channel_once(ca_mode):
    groups = V.channel_groups(ca_mode)
    channels = sorted(c for group in groups for c in group)
    assert channels == list(range(V.N_MODEL_CLASSES))
    assert len(V.label_names(ca_mode)) == len(groups)
    assert [s.label for s in V.structures(ca_mode)] == list(range(1, len(groups)))


def test_one_error_for_an_unknown_ca_mode_everywhere():
    from hsf_bids.segment import merge_ca

    with pytest.raises(V.CaModeError, match="'1/3'"):
        V.structures("1/3")
    with pytest.raises(V.CaModeError, match="'1/3'"):
        merge_ca(np.zeros((6, 1, 1, 1)), "1/3")
