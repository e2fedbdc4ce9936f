"""HSF's test-time augmentation on one RAS crop, seeded, with an exact or numerical inverse.

Each augmented copy is, as in HSF 1.2.3 (torchio ``Compose([RandomFlip, OneOf({RandomAffine:
0.8, RandomElasticDeformation: 0.2})])``):

1. a left-right flip (axis 0 of the RAS crop) with probability 0.5, then
2. exactly one of
   - an affine transform (probability 0.8): per-axis scale U(0.8, 1.2), per-axis rotation
     U(-15, 15) degrees, translation U(-3, 3) mm, about the crop centre, in physical space
     (so anisotropic voxels are handled through the voxel spacing);
   - an elastic deformation (probability 0.2): a 4 x 4 x 4 grid of control points with
     displacements U(-4, 4) mm per axis, interpolated to the crop grid with cubic B-splines
     (the ITK/SimpleITK ``BSplineTransform`` torchio uses: one mesh cell spanning the crop's
     voxel edges, one control point beyond each side).

Images are resampled with linear interpolation; what falls outside the crop is filled with the
crop minimum (torchio's ``default_pad_value="minimum"``). An :class:`Augmentation` holds the
sampled parameters; its coordinate maps and interpolation weights are computed once (lazily)
and reused for the image and for every model's prediction.

The inverse maps a prediction on the augmented grid back onto the crop grid with *linear*
interpolation of probabilities (HSF used nearest neighbour). Affine: the exact inverse matrix.
Elastic: the inverse displacement is found by fixed-point iteration ``y <- x - d(y)``, which
converges because the displacement field is a contraction on HSF's settings (control points
within 4 mm, one mesh cell spanning a crop of 40 mm or more: each partial derivative of ``d`` is
at most 4 x 1.5 / 40 = 0.15, so each step shrinks the error at least 2-fold). Iterations stop
when the worst residual ``|y + d(y) - x|`` falls under 1e-3 voxel (reported by
:attr:`Augmentation.inversion_residual`; measured: at most 3.4e-4 voxel over 10 draws on a
40 x 53 x 55 crop, and a warp-then-invert round trip of linear ramps within 6e-4 voxel inside).
Flip: flipped back exactly. Crop voxels whose pre-image lies outside the augmented field of view
get background (channel 0 = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy import sparse

__all__ = [
    "HSF_TTA",
    "Augmentation",
    "TTASettings",
    "sample_augmentation",
    "sample_augmentations",
]

# Fixed-point inversion of the elastic field: stop under this residual (voxels) or after this
# many iterations.
_INVERSION_TOLERANCE = 1e-3
_INVERSION_MAX_ITERATIONS = 50


@dataclass(frozen=True)
class TTASettings:
    """The random ranges of test-time augmentation (defaults: HSF 1.2.3's configuration).

    ``locked_borders`` follows torchio: 0 keeps every control point's displacement, 1 zeroes the
    outer layer of the control grid, 2 the outer two layers (which with 4 control points leaves
    no deformation, so it is refused as torchio does). HSF configures 0. Unlike torchio, which
    only locks the first two axes, all three axes are locked.
    """

    flip_probability: float = 0.5
    affine_probability: float = 0.8
    elastic_probability: float = 0.2
    scales: tuple[float, float] = (0.8, 1.2)
    degrees: float = 15.0
    translation_mm: float = 3.0
    num_control_points: int = 4
    max_displacement_mm: float = 4.0
    locked_borders: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if self.affine_probability < 0 or self.elastic_probability < 0:
            raise ValueError("affine_probability and elastic_probability must be >= 0")
        if self.affine_probability + self.elastic_probability <= 0:
            raise ValueError("affine_probability + elastic_probability must be > 0")
        if not 0 < self.scales[0] <= self.scales[1]:
            raise ValueError(f"scales must be 0 < low <= high, got {self.scales}")
        if self.num_control_points < 4:
            raise ValueError(
                f"num_control_points must be >= 4 (cubic B-splines), got {self.num_control_points}"
            )
        if self.locked_borders not in (0, 1, 2):
            raise ValueError(f"locked_borders must be 0, 1 or 2, got {self.locked_borders}")
        if self.locked_borders == 2 and self.num_control_points < 5:
            raise ValueError(
                "locked_borders=2 with fewer than 5 control points is an identity transform"
            )


#: HSF 1.2.3's augmentation ranges.
HSF_TTA = TTASettings()


# --------------------------------------------------------------------------------------------
# Linear resampling as a sparse matrix: built once per coordinate map, then one sparse product
# resamples any number of channels (faster than map_coordinates channel by channel).


class _LinearSampler:
    """Trilinear interpolation of arrays on ``src_shape`` at fixed voxel coordinates."""

    def __init__(self, coords: np.ndarray, src_shape: tuple[int, int, int]) -> None:
        out_shape = coords.shape[1:]
        points = coords.reshape(3, -1)
        n_out = points.shape[1]
        src = np.asarray(src_shape)
        # Like ITK's linear interpolator, a point is inside within half a voxel of the edge
        # voxel centres; there it takes the edge value.
        inside = np.all((points >= -0.5) & (points <= (src - 0.5)[:, None]), axis=0)
        rows = np.flatnonzero(inside)
        p = np.clip(points[:, rows], 0.0, (src - 1)[:, None])
        lo = np.minimum(np.floor(p).astype(np.intp), np.maximum(src - 2, 0)[:, None])
        frac = (p - lo).astype(np.float32)
        hi = np.minimum(lo + 1, (src - 1)[:, None])
        strides = np.array([src_shape[1] * src_shape[2], src_shape[2], 1], dtype=np.intp)
        columns = []
        weights = []
        for corner in range(8):
            bits = [(corner >> (2 - axis)) & 1 for axis in range(3)]
            index = np.zeros(rows.size, dtype=np.intp)
            weight = np.ones(rows.size, dtype=np.float32)
            for axis, bit in enumerate(bits):
                index += (hi[axis] if bit else lo[axis]) * strides[axis]
                weight *= frac[axis] if bit else 1.0 - frac[axis]
            columns.append(index)
            weights.append(weight)
        indptr = np.zeros(n_out + 1, dtype=np.intp)
        indptr[1:] = np.cumsum(inside * 8)
        self.matrix = sparse.csr_matrix(
            (np.stack(weights, 1).ravel(), np.stack(columns, 1).ravel(), indptr),
            shape=(n_out, int(np.prod(src_shape))),
        )
        self.outside = ~inside
        self.out_shape = tuple(out_shape)
        self.src_shape = tuple(src_shape)

    def __call__(self, data: np.ndarray) -> np.ndarray:
        """Resample ``data[..., *src_shape]``; returns float32 ``[..., *out_shape]``; outside
        points are left at 0 (callers fill them, see :attr:`outside`)."""
        lead = data.shape[:-3]
        if data.shape[-3:] != self.src_shape:
            raise ValueError(f"array of shape {data.shape} does not end with {self.src_shape}")
        flat = np.asarray(data, dtype=np.float32).reshape(-1, int(np.prod(self.src_shape)))
        out = self.matrix @ flat.T  # (n_out, channels)
        return np.ascontiguousarray(out.T).reshape(*lead, *self.out_shape)


# --------------------------------------------------------------------------------------------
# Geometry helpers.


def _voxel_grid(shape: tuple[int, int, int]) -> np.ndarray:
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _rotation(degrees: Sequence[float]) -> np.ndarray:
    """Euler rotation (ITK's Euler3DTransform order: about y, then x, then z)."""
    ax, ay, az = np.radians(degrees)
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx @ ry


def _bspline_basis(u: np.ndarray) -> np.ndarray:
    """Uniform cubic B-spline weights of the 4 control points of one mesh cell, ``[..., 4]``."""
    u2 = u * u
    u3 = u2 * u
    return np.stack(
        [
            (1.0 - u) ** 3 / 6.0,
            (3.0 * u3 - 6.0 * u2 + 4.0) / 6.0,
            (-3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0) / 6.0,
            u3 / 6.0,
        ],
        axis=-1,
    )


def _flip_coords(coords: np.ndarray, n0: int) -> np.ndarray:
    out = coords.copy()
    out[0] = (n0 - 1) - out[0]
    return out


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Augmentation:
    """One sampled test-time augmentation of a crop of a given shape and voxel spacing.

    Attributes
    ----------
    shape : crop shape ``(x, y, z)``; ``apply`` and ``invert`` work on this grid.
    spacing : voxel size in mm along each axis of the RAS crop.
    flip : whether axis 0 (left-right) is flipped first.
    kind : ``"affine"``, ``"elastic"`` or ``"none"`` (flip only).
    scales, degrees, translation_mm : affine parameters (identity for other kinds).
    control_points : ``[n, n, n, 3]`` elastic displacements in mm (``None`` unless elastic).

    Maps: ``apply`` samples the crop at ``source(y)`` for each augmented voxel ``y``, where
    ``source = flip o A^-1`` (affine ``A: p -> c + S R (p - c) + t`` in mm about the centre
    ``c``) or ``source = flip o (y + d(y))`` (elastic, as SimpleITK resamples with a B-spline
    transform). ``invert`` samples predictions at ``source^-1(x)`` for each crop voxel ``x``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    flip: bool
    kind: str
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
    degrees: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    control_points: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("affine", "elastic", "none"):
            raise ValueError(f"unknown augmentation kind {self.kind!r}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"augmentation needs a 3-D crop shape, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"voxel spacing must be 3 positive values, got {self.spacing}")
        if self.kind == "elastic":
            cp = self.control_points
            if cp is None or cp.ndim != 4 or cp.shape[3] != 3 or min(cp.shape[:3]) < 4:
                raise ValueError("elastic augmentation needs control_points of shape [n,n,n,3]")

    # -- affine ---------------------------------------------------------------------------
    @cached_property
    def affine_voxel(self) -> np.ndarray:
        """4x4 matrix of ``A`` in voxel coordinates of the crop (identity unless affine)."""
        if self.kind != "affine":
            return np.eye(4)
        spacing = np.asarray(self.spacing, dtype=np.float64)
        centre = spacing * (np.asarray(self.shape) - 1) / 2.0
        linear = np.diag(self.scales) @ _rotation(self.degrees)
        physical = np.eye(4)
        physical[:3, :3] = linear
        physical[:3, 3] = centre - linear @ centre + np.asarray(self.translation_mm)
        to_mm = np.diag([*spacing, 1.0])
        return np.linalg.inv(to_mm) @ physical @ to_mm

    # -- elastic --------------------------------------------------------------------------
    def _displacement_at(self, points: np.ndarray) -> np.ndarray:
        """Elastic displacement in voxels at voxel coordinates ``points[3, N]``."""
        cp = self.control_points
        assert cp is not None
        spacing = np.asarray(self.spacing, dtype=np.float64)
        n_mesh = np.asarray(cp.shape[:3]) - 3
        # The mesh spans the crop's voxel edges [-0.5, n - 0.5]; u in mesh-cell units.
        u = (points + 0.5) / np.asarray(self.shape)[:, None] * n_mesh[:, None]
        cell = np.clip(np.floor(u).astype(np.intp), 0, (n_mesh - 1)[:, None])
        t = u - cell
        bx, by, bz = (_bspline_basis(t[a]) for a in range(3))
        if np.all(n_mesh == 1):
            # One BLAS product with the 64 tensor-product weights per point (einsum is ~20x slower).
            weights = bx[:, :, None, None] * by[:, None, :, None] * bz[:, None, None, :]
            disp = (weights.reshape(-1, 64) @ cp.reshape(64, 3)).T
        else:
            disp = np.zeros_like(points)
            for i in range(4):
                for j in range(4):
                    for k in range(4):
                        w = bx[:, i] * by[:, j] * bz[:, k]
                        disp += w * cp[cell[0] + i, cell[1] + j, cell[2] + k].T
        return disp / spacing[:, None]

    @cached_property
    def displacement_voxel(self) -> np.ndarray:
        """Elastic displacement ``d(y)`` in voxels on the crop grid, ``[3, x, y, z]``."""
        if self.kind != "elastic":
            return np.zeros((3, *self.shape))
        cp = self.control_points
        assert cp is not None
        if cp.shape[:3] != (4, 4, 4):
            grid = _voxel_grid(self.shape)
            return self._displacement_at(grid.reshape(3, -1)).reshape(grid.shape)
        # On the grid the tensor-product spline separates: three small contractions.
        bx, by, bz = (_bspline_basis((np.arange(n) + 0.5) / n) for n in self.shape)
        disp = np.einsum("ip,pqra->iqra", bx, cp)
        disp = np.einsum("jq,iqra->ijra", by, disp)
        disp = np.einsum("kr,ijra->aijk", bz, disp)
        return disp / np.asarray(self.spacing, dtype=np.float64).reshape(3, 1, 1, 1)

    @cached_property
    def _inverse_elastic(self) -> tuple[np.ndarray, float]:
        target = _voxel_grid(self.shape).reshape(3, -1)
        y = target - self.displacement_voxel.reshape(3, -1)
        residual = np.inf
        for _ in range(_INVERSION_MAX_ITERATIONS):
            mapped = y + self._displacement_at(y)
            error = target - mapped
            residual = float(np.abs(error).max())
            if residual < _INVERSION_TOLERANCE:
                break
            y = y + error  # y <- x - d(y)
        return y.reshape(3, *self.shape), residual

    @property
    def inversion_residual(self) -> float:
        """Worst ``|source^-1 applied then source - identity|`` on the crop grid, in voxels
        (0 for affine and flip, which are inverted exactly)."""
        if self.kind != "elastic":
            return 0.0
        return self._inverse_elastic[1]

    # -- coordinate maps ------------------------------------------------------------------
    @cached_property
    def source_coords(self) -> np.ndarray:
        """For each augmented voxel, the crop voxel coordinate it is sampled from."""
        grid = _voxel_grid(self.shape)
        if self.kind == "affine":
            inverse = np.linalg.inv(self.affine_voxel)
            coords = np.einsum("ij,j...->i...", inverse[:3, :3], grid)
            coords += inverse[:3, 3].reshape(3, 1, 1, 1)
        elif self.kind == "elastic":
            coords = grid + self.displacement_voxel
        else:
            coords = grid
        return _flip_coords(coords, self.shape[0]) if self.flip else coords

    @cached_property
    def target_coords(self) -> np.ndarray:
        """For each crop voxel, the augmented-grid coordinate that shows it."""
        grid = _voxel_grid(self.shape)
        start = _flip_coords(grid, self.shape[0]) if self.flip else grid
        if self.kind == "affine":
            coords = np.einsum("ij,j...->i...", self.affine_voxel[:3, :3], start)
            return coords + self.affine_voxel[:3, 3].reshape(3, 1, 1, 1)
        if self.kind == "elastic":
            inverse, _ = self._inverse_elastic
            # The inverse was solved at the grid points; a flipped grid point is a grid point,
            # so the flip just reorders them (spatial axis 0 is axis 1 of the [3, ...] array).
            return np.ascontiguousarray(inverse[:, ::-1]) if self.flip else inverse
        return start

    @cached_property
    def _apply_sampler(self) -> _LinearSampler:
        return _LinearSampler(self.source_coords, self.shape)

    @cached_property
    def _invert_sampler(self) -> _LinearSampler:
        return _LinearSampler(self.target_coords, self.shape)

    # -- public ---------------------------------------------------------------------------
    def _check(self, array: np.ndarray, what: str) -> None:
        if array.shape[-3:] != tuple(self.shape):
            raise ValueError(
                f"{what} of shape {array.shape} does not match the augmentation's crop shape "
                f"{self.shape}"
            )

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Augment a crop ``[x, y, z]``; returns float32 ``[x, y, z]`` on the same grid, with
        voxels mapped from outside the crop set to the crop minimum."""
        image = np.asarray(image)
        if image.ndim != 3:
            raise ValueError(f"apply expects a 3-D crop, got shape {image.shape}")
        self._check(image, "image")
        if self.kind == "none":
            out = image[::-1] if self.flip else image
            return np.ascontiguousarray(out, dtype=np.float32)
        sampler = self._apply_sampler
        out = sampler(image)
        out.reshape(-1)[sampler.outside] = np.float32(image.min())
        return out

    def invert(self, probs: np.ndarray) -> np.ndarray:
        """Map predictions ``[..., C, x, y, z]`` on the augmented grid back onto the crop grid
        (linear interpolation of probabilities); crop voxels seen from outside the augmented
        field of view get background (channel 0 = 1, others 0). Returns float32."""
        probs = np.asarray(probs)
        if probs.ndim < 4:
            raise ValueError(f"invert expects [..., C, x, y, z] probabilities, got {probs.shape}")
        self._check(probs, "prediction")
        if self.kind == "none":
            out = probs[..., ::-1, :, :] if self.flip else probs
            return np.ascontiguousarray(out, dtype=np.float32)
        sampler = self._invert_sampler
        out = sampler(probs)
        n_channels = probs.shape[-4]
        flat = out.reshape(-1, n_channels, out.shape[-3] * out.shape[-2] * out.shape[-1])
        if sampler.outside.any():
            flat[:, 1:, sampler.outside] = 0.0
            flat[:, 0, sampler.outside] = 1.0
        return out


def sample_augmentation(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: Sequence[float],
    settings: TTASettings = HSF_TTA,
) -> Augmentation:
    """Draw one augmentation for a crop of ``shape`` with voxel ``spacing`` (mm).

    Every call consumes the same amount of random numbers from ``rng`` (the flip, the choice,
    the affine and the elastic parameters are always all drawn), so the ``k``-th augmentation
    of a stream does not depend on which kinds were drawn before it.
    """
    shape3 = tuple(int(n) for n in shape)
    spacing3 = tuple(float(s) for s in spacing)
    if len(shape3) != 3 or len(spacing3) != 3:
        raise ValueError(f"shape and spacing must have 3 values, got {shape} and {spacing}")
    u_flip, u_kind = rng.random(2)
    scales = rng.uniform(settings.scales[0], settings.scales[1], 3)
    degrees = rng.uniform(-settings.degrees, settings.degrees, 3)
    translation = rng.uniform(-settings.translation_mm, settings.translation_mm, 3)
    n = settings.num_control_points
    control_points = rng.uniform(-1.0, 1.0, (n, n, n, 3)) * settings.max_displacement_mm
    for layer in range(settings.locked_borders):
        for axis in range(3):
            index = [slice(None)] * 3
            for end in (layer, n - 1 - layer):
                index[axis] = end
                control_points[tuple(index)] = 0.0

    total = settings.affine_probability + settings.elastic_probability
    kind = "affine" if u_kind * total < settings.affine_probability else "elastic"
    flip = bool(u_flip < settings.flip_probability)
    common = {"shape": shape3, "spacing": spacing3, "flip": flip}
    if kind == "affine":
        return Augmentation(
            **common,
            kind="affine",
            scales=tuple(float(v) for v in scales),
            degrees=tuple(float(v) for v in degrees),
            translation_mm=tuple(float(v) for v in translation),
        )
    return Augmentation(**common, kind="elastic", control_points=control_points)


def sample_augmentations(
    rng: np.random.Generator,
    n: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    settings: TTASettings = HSF_TTA,
) -> list[Augmentation]:
    """Draw ``n`` augmentations in order with :func:`sample_augmentation`."""
    return [sample_augmentation(rng, shape, spacing, settings) for _ in range(n)]
