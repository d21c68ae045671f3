"""The patch grid `(Tp, Hp, Wp)`: every mapping between pixel space, latent space and cells.

One grid is shared by the teacher labels, the reward model's patch head, the pair maps and
the Gran-DPO loss. It is defined in **pixel space** (frames x height x width); everything
else (latent elements, reward-model tokens) is assigned to the pixel cells by the rules below,
so a label on pixels and a loss on latents always refer to the same region.

Uneven division (one rule, everywhere). An axis of `n` pixels split into `g` cells gives
cell `c` the half-open range

    [floor(c * n / g), floor((c + 1) * n / g))          c = 0 .. g-1,   requires n >= g,

so every cell is non-empty and cell sizes differ by at most one (the larger cells come
last when `g` does not divide `n`; e.g. n=10, g=3 -> [0,3) [3,6) [6,10)).

Pixel index i occupies the continuous interval [i, i+1). A unit that covers a pixel span
`[lo, hi)` (a latent element, a reward-model token) belongs to the cell that contains its
**midpoint** `(lo + hi) / 2`; a midpoint exactly on a cell boundary goes to the **earlier**
cell. For an integer span this is the cell of its lower-middle pixel
`lo + (hi - lo - 1) // 2`, which is the cell that holds most of the span whenever the cells
are at least as long as the span (a tie goes to the earlier cell).

Latent space (`VAEStrides`, Wan 2.1 by default: temporal stride 4 with a causal first
frame, spatial stride 8). Latent frame 0 covers pixel frame 0 alone; latent frame k >= 1
covers pixel frames 4k-3 .. 4k; latent row i covers pixel rows 8i .. 8i+7 (columns alike).
A latent frame that straddles two temporal pixel cells therefore goes to the cell of its
lower-middle pixel frame 4k-2 (the one holding more of its frames; ties earlier). The
canonical pixel shape of a latent `(F, H, W)` is `(4(F-1)+1, 8H, 8W)`; pixel frames the VAE
drops at the end (a clip of 4k+1+r frames) are part of the last pixel cell but of no latent.

Every cell must receive at least one latent element (or token); a grid too fine for the
latent fails with an error naming the grid, the latent shape and the pixel shape.

Pooling (`pool_cells`) is a per-cell mean. A cell is a product of per-axis ranges, so the
mean over a cell is the iterated per-axis mean: an axis whose cells are equal, contiguous
blocks is pooled with reshape + mean, any other axis with a normalised one-hot matrix
(an exact segment mean that stays jit-friendly and shape-static).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Grid = tuple[int, int, int]
Shape3 = tuple[int, int, int]
_AXES = ("temporal", "height", "width")


@dataclasses.dataclass(frozen=True)
class VAEStrides:
    """How a video VAE maps pixels to latents along (frames, height, width).

    `causal_first_frame`: pixel frame 0 is encoded alone into latent frame 0 and latent
    frame k >= 1 covers pixel frames `temporal*(k-1)+1 .. temporal*k` (Wan, CogVideoX);
    otherwise latent frame k covers `temporal*k .. temporal*(k+1)-1`.
    """

    temporal: int = 4
    spatial: int = 8
    causal_first_frame: bool = True

    def __post_init__(self) -> None:
        if self.temporal < 1 or self.spatial < 1:
            raise ValueError(f"VAEStrides: strides must be >= 1, got temporal={self.temporal}, "
                             f"spatial={self.spatial}")

    def latent_shape(self, pixel_shape: Sequence[int]) -> Shape3:
        """Latent (F, H, W) the VAE produces from a pixel clip (F_px, H_px, W_px)."""
        f, h, w = _shape3(pixel_shape, "pixel_shape")
        if self.causal_first_frame:
            lf = (f - 1) // self.temporal + 1
        else:
            lf = f // self.temporal
        return (lf, h // self.spatial, w // self.spatial)

    def pixel_shape(self, latent_shape: Sequence[int]) -> Shape3:
        """Canonical pixel (F_px, H_px, W_px) that encodes to `latent_shape` with nothing dropped."""
        f, h, w = _shape3(latent_shape, "latent_shape")
        pf = self.temporal * (f - 1) + 1 if self.causal_first_frame else self.temporal * f
        return (pf, self.spatial * h, self.spatial * w)

    def pixel_spans(self, axis: int, n_latent: int) -> np.ndarray:
        """(n_latent, 2) half-open pixel spans [lo, hi) of the latent indices along `axis` (0=t)."""
        k = np.arange(n_latent)
        if axis == 0:
            s = self.temporal
            if self.causal_first_frame:
                lo = np.maximum(s * k - s + 1, 0)
                hi = s * k + 1
            else:
                lo, hi = s * k, s * (k + 1)
        else:
            s = self.spatial
            lo, hi = s * k, s * (k + 1)
        return np.stack([lo, hi], axis=1)


WAN_VAE_STRIDES = VAEStrides(temporal=4, spatial=8, causal_first_frame=True)


def _shape3(shape: Sequence[int], name: str) -> Shape3:
    t = tuple(int(x) for x in shape)
    if len(t) != 3 or any(x < 1 for x in t):
        raise ValueError(f"{name} must be 3 positive ints (frames, height, width), got {tuple(shape)}")
    return t  # type: ignore[return-value]


def as_grid(grid: Sequence[int]) -> Grid:
    """Validate a `(Tp, Hp, Wp)` grid of positive ints."""
    return _shape3(grid, "grid")


def cell_bounds(n: int, g: int) -> np.ndarray:
    """(g+1,) boundaries `b[c] = floor(c*n/g)`; cell c is `[b[c], b[c+1])`. Requires n >= g >= 1."""
    n, g = int(n), int(g)
    if g < 1:
        raise ValueError(f"grid size must be >= 1, got {g}")
    if n < g:
        raise ValueError(f"cannot split an axis of length {n} into {g} cells: every cell needs at "
                         f"least one element; use at most {n} cells on this axis")
    return (np.arange(g + 1) * n) // g


def cell_of_index(n: int, g: int) -> np.ndarray:
    """(n,) cell of every index 0..n-1 on an axis of length n split into g cells."""
    b = cell_bounds(n, g)
    return np.searchsorted(b[1:-1], np.arange(n), side="right").astype(np.int32)


def cell_index_of_positions(positions: np.ndarray | Sequence[float], length: int, g: int) -> np.ndarray:
    """Cell of continuous pixel coordinates on an axis of `length` pixels split into `g` cells.

    Pixel i is the interval [i, i+1) (its centre is i + 0.5). A position exactly on a cell
    boundary belongs to the earlier cell; positions must lie in [0, length].
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.size and (pos.min() < 0 or pos.max() > length):
        raise ValueError(f"positions must lie in [0, {length}] (the pixel axis), got range "
                         f"[{pos.min()}, {pos.max()}]")
    b = cell_bounds(length, g)
    return np.searchsorted(b[1:-1], pos, side="left").astype(np.int32)


def pixel_box(cell: Sequence[int], grid: Sequence[int], pixel_shape: Sequence[int]
              ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Half-open pixel ranges ((f0, f1), (y0, y1), (x0, x1)) that cell (t, h, w) covers."""
    grid = as_grid(grid)
    pixel_shape = _shape3(pixel_shape, "pixel_shape")
    out = []
    for ax, (c, g, n) in enumerate(zip(cell, grid, pixel_shape)):
        if not 0 <= int(c) < g:
            raise ValueError(f"cell index {tuple(cell)} out of range for grid {grid} "
                             f"({_AXES[ax]} axis)")
        b = cell_bounds(n, g)
        out.append((int(b[c]), int(b[c + 1])))
    return tuple(out)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class CellMap:
    """Per-axis cell ids of a `(F, H, W)` array of units (latent elements, tokens, pixels).

    `ids[axis][i]` is the grid cell of unit i along that axis. Hashable (tuples), so it can
    be a static argument of a jitted function. Built by `pixel_cell_map`, `latent_cell_map`
    or `from_midpoints`, which check that every cell holds at least one unit.
    """

    grid: Grid
    shape: Shape3
    ids: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @classmethod
    def from_midpoints(cls, midpoints: Sequence[np.ndarray], pixel_shape: Sequence[int],
                       grid: Sequence[int], what: str = "units") -> "CellMap":
        """Units whose pixel-span midpoints along each axis are `midpoints[axis]`."""
        grid = as_grid(grid)
        pixel_shape = _shape3(pixel_shape, "pixel_shape")
        for ax in range(3):
            if pixel_shape[ax] < grid[ax]:
                raise ValueError(f"grid {grid} does not fit pixel shape {pixel_shape}: the "
                                 f"{_AXES[ax]} axis has {pixel_shape[ax]} pixels for {grid[ax]} cells")
        ids = tuple(tuple(int(c) for c in cell_index_of_positions(m, n, g))
                    for m, n, g in zip(midpoints, pixel_shape, grid))
        shape = tuple(len(i) for i in ids)
        for ax in range(3):
            counts = np.bincount(np.asarray(ids[ax], dtype=np.int64), minlength=grid[ax])
            empty = np.flatnonzero(counts == 0)
            if empty.size:
                raise ValueError(
                    f"grid {grid} does not fit {what} of shape {shape} (pixel shape {pixel_shape}): "
                    f"{_AXES[ax]} cell(s) {empty.tolist()} hold no {what[:-1] if what.endswith('s') else what}; "
                    f"use a coarser grid on that axis (the {_AXES[ax]} axis has {shape[ax]} {what})")
        return cls(grid=grid, shape=shape, ids=ids)  # type: ignore[arg-type]

    def axis_ids(self, axis: int) -> np.ndarray:
        return np.asarray(self.ids[axis], dtype=np.int32)

    def counts(self, axis: int) -> np.ndarray:
        """(g,) number of units of each cell along `axis`."""
        return np.bincount(self.axis_ids(axis), minlength=self.grid[axis])

    def is_even(self, axis: int) -> bool:
        """True when the cells along `axis` are equal contiguous blocks (reshape + mean works)."""
        n, g = self.shape[axis], self.grid[axis]
        return n % g == 0 and self.ids[axis] == tuple(i // (n // g) for i in range(n))

    def one_hot(self, axis: int, normalize: bool = True) -> np.ndarray:
        """(n, g) float32 membership along `axis`; columns sum to 1 when `normalize`."""
        m = np.eye(self.grid[axis], dtype=np.float64)[self.axis_ids(axis)]
        if normalize:
            m = m / self.counts(axis)[None, :]
        return m.astype(np.float32)

    def membership(self, normalize: bool = True) -> np.ndarray:
        """(F*H*W, Tp*Hp*Wp) membership of the flattened units (row-major), e.g. for token pooling.

        With `normalize` each column sums to 1, so `x_flat @ M` is the per-cell mean.
        """
        m = np.einsum("ia,jb,kc->ijkabc", *(self.one_hot(ax, normalize) for ax in range(3)))
        return m.reshape(int(np.prod(self.shape)), int(np.prod(self.grid)))

    def cell_ids(self) -> np.ndarray:
        """(F, H, W) flat cell index `(t*Hp + h)*Wp + w` of every unit."""
        t, h, w = (self.axis_ids(ax) for ax in range(3))
        _, gh, gw = self.grid
        return (t[:, None, None] * gh + h[None, :, None]) * gw + w[None, None, :]


def pixel_cell_map(pixel_shape: Sequence[int], grid: Sequence[int]) -> CellMap:
    """Cells of every pixel of a `(F_px, H_px, W_px)` clip (the grid's own definition)."""
    pixel_shape = _shape3(pixel_shape, "pixel_shape")
    mids = [np.arange(n) + 0.5 for n in pixel_shape]
    return CellMap.from_midpoints(mids, pixel_shape, grid, what="pixels")


def latent_cell_map(latent_shape: Sequence[int], grid: Sequence[int],
                    strides: VAEStrides = WAN_VAE_STRIDES,
                    pixel_shape: Sequence[int] | None = None) -> CellMap:
    """Cells of every latent element, derived from the pixel-space cells (module docstring).

    `pixel_shape` defaults to `strides.pixel_shape(latent_shape)`; when given it must encode
    to `latent_shape` under `strides`.
    """
    latent_shape = _shape3(latent_shape, "latent_shape")
    if pixel_shape is None:
        pixel_shape = strides.pixel_shape(latent_shape)
    pixel_shape = _shape3(pixel_shape, "pixel_shape")
    if strides.latent_shape(pixel_shape) != latent_shape:
        raise ValueError(f"pixel shape {pixel_shape} encodes to latent shape "
                         f"{strides.latent_shape(pixel_shape)} under {strides}, not {latent_shape}")
    mids = [strides.pixel_spans(ax, n).mean(axis=1) for ax, n in enumerate(latent_shape)]
    return CellMap.from_midpoints(mids, pixel_shape, grid, what="latent elements")


def token_cell_map(token_shape: Sequence[int], pixel_shape: Sequence[int],
                   grid: Sequence[int]) -> CellMap:
    """Cells of a `(T, Ht, Wt)` token grid that tiles the clip evenly along each axis.

    Token j of n along an axis of L pixels covers [j*L/n, (j+1)*L/n) and goes to the cell
    of its midpoint (a reward model that samples frames passes its own midpoints to
    `CellMap.from_midpoints`: frame index + 0.5).
    """
    token_shape = _shape3(token_shape, "token_shape")
    pixel_shape = _shape3(pixel_shape, "pixel_shape")
    mids = [(np.arange(n) + 0.5) * (length / n) for n, length in zip(token_shape, pixel_shape)]
    return CellMap.from_midpoints(mids, pixel_shape, grid, what="tokens")


def _check_values(values: jax.Array, cells: CellMap) -> None:
    if values.ndim < 4 or tuple(values.shape[-3:]) != cells.shape:
        raise ValueError(f"values of shape {tuple(values.shape)} do not match the cell map: expected "
                         f"(B, ..., {', '.join(map(str, cells.shape))}) for grid {cells.grid}")


def pool_cells(values: jax.Array, grid: Sequence[int] | CellMap, reduce: str = "mean") -> jax.Array:
    """Per-cell mean (or max, `reduce="max"`): `(B, ..., F, H, W) -> (B, ..., Tp, Hp, Wp)`.

    `grid` is a `(Tp, Hp, Wp)` tuple (the cells of the values' own `(F, H, W)` axes, i.e.
    pixel space: `pixel_cell_map`) or a `CellMap` (e.g. `latent_cell_map` for latents).
    Cells are products of per-axis blocks, so both reduce one axis at a time. Even axes use
    reshape + mean / max; uneven ones a normalised one-hot contraction (HIGHEST precision, so
    TPU matmuls do not round to bf16) for the mean, a masked max per cell for the max.
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    values = jnp.asarray(values)
    if values.ndim < 4:
        raise ValueError(f"pool_cells expects (B, ..., F, H, W), got shape {tuple(values.shape)}")
    cells = grid if isinstance(grid, CellMap) else pixel_cell_map(values.shape[-3:], grid)
    _check_values(values, cells)
    x = values
    lead = x.ndim - 3
    for ax in range(3):
        dim = lead + ax
        g = cells.grid[ax]
        if cells.is_even(ax):
            n = cells.shape[ax]
            blocks = x.reshape(x.shape[:dim] + (g, n // g) + x.shape[dim + 1:])
            x = blocks.max(axis=dim + 1) if reduce == "max" else blocks.mean(axis=dim + 1)
        elif reduce == "max":
            ids = cells.axis_ids(ax)
            shape = [1] * x.ndim
            shape[dim] = len(ids)
            x = jnp.stack([jnp.max(jnp.where(jnp.asarray(ids == c).reshape(shape), x, -jnp.inf), axis=dim)
                           for c in range(g)], axis=dim)
        else:
            m = jnp.asarray(cells.one_hot(ax), dtype=jnp.promote_types(x.dtype, jnp.float32))
            x = jnp.moveaxis(jnp.tensordot(x, m, axes=((dim,), (0,)),
                                           precision=jax.lax.Precision.HIGHEST), -1, dim)
    return x


def expand_cells(cell_values: jax.Array, cells: CellMap) -> jax.Array:
    """Inverse broadcast: `(B, ..., Tp, Hp, Wp) -> (B, ..., F, H, W)`, each unit gets its cell's value."""
    cell_values = jnp.asarray(cell_values)
    if tuple(cell_values.shape[-3:]) != cells.grid:
        raise ValueError(f"cell values of shape {tuple(cell_values.shape)} do not end in grid {cells.grid}")
    x = cell_values
    lead = x.ndim - 3
    for ax in range(3):
        x = jnp.take(x, jnp.asarray(cells.axis_ids(ax)), axis=lead + ax)
    return x
