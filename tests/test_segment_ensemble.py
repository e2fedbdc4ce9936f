"""segment_crop on real MNI 2009c sym crops with the three demo models (real ONNX networks)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest

from hsf_bids.engines import load_network
from hsf_bids.segment import (
    EnsembleSettings,
    InputCropError,
    ModelOutputError,
    sample_augmentations,
    segment_crop,
)

# Boxes from shared/models/demo/REPORT.md section 2 (RAS voxel slices of MNI 2009c sym res-1).
BOXES = {
    "left": (slice(52, 92), slice(82, 135), slice(39, 94)),
    "right": (slice(100, 140), slice(82, 135), slice(39, 94)),
}
TEMPLATE = "tpl-MNI152NLin2009cSym"
THREADS = 2
NO_TTA = EnsembleSettings(test_time_augmentation=False)


@pytest.fixture(scope="module")
def networks(demo_models):
    return [
        load_network(p, engine="onnxruntime", device="cpu", precision="fp32", threads=THREADS)
        for p in demo_models
    ]


@pytest.fixture(scope="module")
def mni(templateflow_home: Path) -> dict[str, np.ndarray]:
    folder = templateflow_home / TEMPLATE
    images = {}
    for contrast in ("T1w", "T2w"):
        img = nib.load(folder / f"{TEMPLATE}_res-1_{contrast}.nii.gz")
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        images[contrast] = np.asarray(img.dataobj, dtype=np.float32)
    return images


@pytest.fixture(scope="module")
def crops(mni) -> dict[tuple[str, str], np.ndarray]:
    return {(c, side): mni[c][box] for c in mni for side, box in BOXES.items()}


# ---------------------------------------------------------------------------------------------
# An independent, straightforward implementation of HSF's formulas (TTA off).


def _reference_probs(crop: np.ndarray, demo_models: list[Path]) -> list[np.ndarray]:
    """Each model's softmax probabilities on ``crop``, the plain way."""
    x = crop.astype(np.float64)
    x = ((x - x.mean()) / x.std(ddof=1)).astype(np.float32)
    pads = []
    for n in x.shape:
        total = (-n) % 8
        pads.append(((total + 1) // 2, total // 2))
    x = np.pad(x, pads)
    out = []
    for path in demo_models:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        probs = session.run(None, {name: x[None, None]})[0][0]
        out.append(
            probs[
                :,
                pads[0][0] : probs.shape[1] - pads[0][1],
                pads[1][0] : probs.shape[2] - pads[1][1],
                pads[2][0] : probs.shape[3] - pads[2][1],
            ]
        )
    return out


def _reference_merge(p: np.ndarray, ca_mode: str) -> np.ndarray:
    if ca_mode == "1/2/3":
        return p
    if ca_mode == "123":
        return np.stack([p[0], p[1], p[2] + p[3] + p[4], p[5]])
    if ca_mode == "":
        return np.stack([p[0], p[1] + p[2] + p[3] + p[4] + p[5]])
    raise AssertionError(ca_mode)


def _reference_vote(probs: list[np.ndarray], ca_mode: str) -> np.ndarray:
    merged = [_reference_merge(p, ca_mode) for p in probs]
    n = merged[0].shape[0]
    argmaxes = [m.argmax(0) for m in merged]
    counts = np.stack([sum((a == c).astype(int) for a in argmaxes) for c in range(n)])
    return counts.argmax(0)  # first maximum: ties to the lower label


@pytest.fixture(scope="module")
def reference(crops, demo_models) -> dict[tuple[str, str], list[np.ndarray]]:
    keys = [("T1w", "left"), ("T1w", "right"), ("T2w", "left")]
    return {key: _reference_probs(crops[key], demo_models) for key in keys}


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "ca_mode"), [("left", "1/2/3"), ("left", "123"), ("left", ""), ("right", "1/2/3")]
)
def test_vote_without_tta_equals_the_independent_implementation(
    crops, networks, reference, side, ca_mode
):
    crop = crops[("T1w", side)]
    result = segment_crop(
        [(crop, (1.0, 1.0, 1.0))],
        networks,
        EnsembleSettings(ca_mode=ca_mode, test_time_augmentation=False),
    )
    probs = reference[("T1w", side)]
    expected = _reference_vote(probs, ca_mode)
    assert result.labels.dtype == np.uint8 and result.labels.shape == crop.shape
    np.testing.assert_array_equal(result.labels, expected)
    assert result.n_predictions == 3
    mean = np.mean([_reference_merge(p, ca_mode).astype(np.float64) for p in probs], axis=0)
    entropy = np.clip(-(mean * np.log(mean + 1e-5)).sum(0), 0, None)
    assert result.uncertainty.dtype == np.float32
    np.testing.assert_allclose(result.uncertainty, entropy, atol=1e-5)
    assert result.probabilities is None
    assert len(result.label_names) == {"1/2/3": 6, "123": 4, "": 2}[ca_mode]
    assert result.ca_mode == ca_mode and result.fusion == "vote"


def test_demo_models_find_subfields_in_both_crops(crops, networks):
    for side in ("left", "right"):
        result = segment_crop([(crops[("T1w", side)], (1.0, 1.0, 1.0))], networks, NO_TTA)
        counts = np.bincount(result.labels.ravel(), minlength=6)
        # DG, CA1 and SUB are each hundreds of voxels (the report's volumes: ~1400/1100/450).
        for label, name in ((1, "DG"), (2, "CA1"), (5, "SUB")):
            assert counts[label] > 200, f"{side}: only {counts[label]} {name} voxels"
        assert counts[3] == 0  # the demo models never predict CA2
        # The hippocampus is in the middle of its box, not on the border.
        hippocampus = np.argwhere(result.labels > 0)
        assert np.all(hippocampus.min(0) >= 4)
        assert np.all(hippocampus.max(0) <= np.array(result.labels.shape) - 5)
        # Uncertainty is high on the subfield borders, not in the background.
        assert (
            result.uncertainty[result.labels > 0].mean()
            > 5 * result.uncertainty[result.labels == 0].mean()
        )


def test_multispectral_late_fusion_joins_one_vote(crops, networks, reference):
    inputs = [(crops[("T1w", "left")], (1.0, 1.0, 1.0)), (crops[("T2w", "left")], (1, 1, 1))]
    result = segment_crop(inputs, networks, NO_TTA)
    assert result.n_predictions == 6
    expected = _reference_vote(reference[("T1w", "left")] + reference[("T2w", "left")], "1/2/3")
    np.testing.assert_array_equal(result.labels, expected)
    with pytest.raises(InputCropError, match="differs from input 0"):
        segment_crop([inputs[0], (crops[("T2w", "left")][:-1], (1, 1, 1))], networks)


def test_tta_is_deterministic_whatever_the_batch_size(crops, networks):
    crop = crops[("T1w", "left")]
    inputs = [(crop, (1.0, 1.0, 1.0))]
    model = networks[:1]
    # Batch sizes 1 and 3 (4 copies: a full and a partial batch) must agree byte for byte.
    runs = [
        segment_crop(inputs, model, EnsembleSettings(num_augmentations=3, batch_size=b), seed=11)
        for b in (1, 3)
    ]
    for other in runs[1:]:
        assert other.labels.tobytes() == runs[0].labels.tobytes()
        assert other.uncertainty.tobytes() == runs[0].uncertainty.tobytes()
    assert runs[0].n_predictions == 4
    # A different seed draws different augmentations, hence a different uncertainty map.
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(12)
    a = sample_augmentations(rng_a, 3, crop.shape, (1, 1, 1))
    b = sample_augmentations(rng_b, 3, crop.shape, (1, 1, 1))
    assert [(x.kind, x.flip, x.scales) for x in a] != [(x.kind, x.flip, x.scales) for x in b]
    two_per_batch = EnsembleSettings(num_augmentations=3, batch_size=2)
    other_seed = segment_crop(inputs, model, two_per_batch, seed=12)
    assert other_seed.uncertainty.tobytes() != runs[0].uncertainty.tobytes()
    # TTA maps predictions back where they belong: the labels agree with the plain run.
    plain = segment_crop(inputs, model, NO_TTA)
    for run in (runs[0], other_seed):
        a_mask, b_mask = run.labels > 0, plain.labels > 0
        dice = 2 * (a_mask & b_mask).sum() / (a_mask.sum() + b_mask.sum())
        assert dice > 0.85
        same = (run.labels == plain.labels)[a_mask | b_mask].mean()
        assert same > 0.7


def test_mean_fusion_is_the_argmax_of_the_vote_s_mean_probability(crops, networks):
    inputs = [(crops[("T1w", "right")], (1.0, 1.0, 1.0))]
    two = networks[:2]
    kwargs = {"num_augmentations": 2, "batch_size": 2}
    options = {"seed": 5, "return_probabilities": True}
    vote = segment_crop(inputs, two, EnsembleSettings(fusion="vote", **kwargs), **options)
    mean = segment_crop(inputs, two, EnsembleSettings(fusion="mean", **kwargs), **options)
    assert vote.n_predictions == mean.n_predictions == 6
    # Both fusions map every prediction back on its own (each one's volumes are recorded), so
    # they share the mean probability, the uncertainty and the per-prediction counts.
    np.testing.assert_array_equal(mean.probabilities, vote.probabilities)
    np.testing.assert_array_equal(mean.uncertainty, vote.uncertainty)
    np.testing.assert_array_equal(mean.prediction_counts, vote.prediction_counts)
    np.testing.assert_allclose(mean.probabilities.sum(0), 1.0, atol=1e-4)
    clear = np.sort(vote.probabilities, axis=0)
    clear = clear[-1] - clear[-2] > 1e-3
    np.testing.assert_array_equal(mean.labels[clear], vote.probabilities.argmax(0)[clear])


def test_bad_inputs_and_models_are_clear_errors(crops, networks):
    crop = crops[("T1w", "left")]

    class FiveChannels:
        """A real model whose output lost a channel: breaks the contract."""

        def __init__(self, inner):
            self.inner, self.path = inner, inner.path
            self.engine, self.precision, self.device = "onnxruntime", "fp32", "cpu"

        def run(self, batch):
            return self.inner.run(batch)[:, :5]

    with pytest.raises(ModelOutputError, match="demo_unet_b0.onnx"):
        segment_crop([(crop, (1, 1, 1))], [FiveChannels(networks[0])], NO_TTA)
    with pytest.raises(InputCropError, match="every voxel equals"):
        segment_crop([(np.zeros((16, 16, 16)), (1, 1, 1))], networks[:1])
    with pytest.raises(InputCropError, match="spacing"):
        segment_crop([(crop, (1, 0, 1))], networks[:1])
    with pytest.raises(ValueError, match="ca_mode"):
        EnsembleSettings(ca_mode="1/3")
    with pytest.raises(ValueError, match="fusion"):
        EnsembleSettings(fusion="max")
