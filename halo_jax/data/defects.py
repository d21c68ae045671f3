"""Local defects for moving-shapes videos, placed in chosen cells of a `(Tp, Hp, Wp)` grid.

`inject(frames, prompt, kind, cells, grid, seed)` corrupts every listed cell (its frame range
and its pixel box; cells follow the project rule [floor(c n / g), floor((c + 1) n / g)) of
`halo_jax.align.patches.cell_bounds`) and nothing outside them. Kinds, and the oracle aspects
each is meant to lower:

    blotch       an ellipse of one off-palette colour over the cell's frames    visual_quality
                 (centre in the middle half of the box, semi-axes 0.25..0.45 of the box)
    noise        additive Gaussian noise, sigma 48, clipped to [0, 255]           visual_quality
    smear        a trail of 3 ghost copies of each object, 2 px apart, behind     visual_quality
                 its motion (a seed-chosen direction for a still object), drawn
                 on background pixels only, in the ghost colour: per channel
                 b + a (o - b) with a = 0.75 if |o - b| > 128 else 0.5
                 (object o, background b: always off-palette)
    colour_swap  object pixels take another object colour absent from the      text_alignment
                 scene (one fixed mapping per cell)
    flicker      every other frame of the cell's range (seed-chosen phase),      temporal_consistency,
                 each channel v -> v + 64 if v < 128 else v - 64                  visual_quality
    vanish       object pixels become background for a run of 34-50% of the      temporal_consistency,
                 cell's frames (at least one), among the runs holding at least    text_alignment
                 half the most object pixels any run holds

Object kinds (smear, colour_swap, vanish) only act where an object is in the cell: a cell
without object pixels is left unchanged (`changed_cells` reports what really changed).
Objects are found by their exact colour, so defects are meant for exact renders
(`halo_jax.data.shapes.render`). Defect colours are off-palette: every channel of a blotch,
and every channel a flicker or a ghost changes, ends at least 52 away from the palette levels
{0, 128, 255}. All randomness comes from `numpy.random.default_rng([seed,
kind, t, h, w])`, so a defect is reproducible cell by cell.

`random_defects` draws a few defects at random cells (object kinds at cells that hold an
object): labelled training data for the reward model that needs no video model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from halo_jax.align.patches import cell_bounds
from halo_jax.data import shapes

KINDS: tuple[str, ...] = ("blotch", "noise", "smear", "colour_swap", "flicker", "vanish")
OBJECT_KINDS = frozenset({"smear", "colour_swap", "vanish"})
TARGET_ASPECTS: dict[str, tuple[str, ...]] = {
    "blotch": ("visual_quality",),
    "noise": ("visual_quality",),
    "smear": ("visual_quality",),
    "colour_swap": ("text_alignment",),
    "flicker": ("temporal_consistency", "visual_quality"),
    "vanish": ("temporal_consistency", "text_alignment"),
}
_OFF_BANDS = np.concatenate([np.arange(52, 77), np.arange(180, 204)])

Cell = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Defect:
    """One injected defect: its kind and the cells (t, h, w) it was placed in."""

    kind: str
    cells: tuple[Cell, ...]


def cell_box(cell: Sequence[int], grid: Sequence[int], shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """(frames, rows, cols) slices of a cell of `grid` in a video of shape (F, H, W)."""
    if len(cell) != 3 or any(not 0 <= c < g for c, g in zip(cell, grid)):
        raise ValueError(f"cell {tuple(cell)} is outside the grid {tuple(grid)}")
    out = []
    for c, g, n in zip(cell, grid, shape):
        b = cell_bounds(n, g)
        out.append(slice(int(b[c]), int(b[c + 1])))
    return tuple(out)  # type: ignore[return-value]


def changed_cells(before: np.ndarray, after: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """bool (Tp, Hp, Wp): the cells where any pixel of `after` differs from `before`."""
    diff = np.any(before != after, axis=-1)
    out = np.zeros(tuple(grid), bool)
    for t in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                out[t, h, w] = diff[cell_box((t, h, w), grid, diff.shape)].any()
    return out


def _object_mask(block: np.ndarray, colours: Iterable[tuple[int, int, int]]) -> np.ndarray:
    mask = np.zeros(block.shape[:-1], bool)
    for c in colours:
        mask |= np.all(block == np.asarray(c, np.uint8), axis=-1)
    return mask


def ghost_colour(obj: Sequence[int], background: Sequence[int]) -> np.ndarray:
    """The smear colour of an object over a background (always off-palette, see module docstring)."""
    o, b = np.asarray(obj, np.float64), np.asarray(background, np.float64)
    a = np.where(np.abs(o - b) > 128, 0.75, 0.5)
    return np.round(b + a * (o - b)).astype(np.uint8)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """mask (T, H, W) shifted by (dy, dx) pixels, zero-filled."""
    out = np.zeros_like(mask)
    h, w = mask.shape[1:]
    src = mask[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
    return out


def _apply(video: np.ndarray, scene: shapes.Scene, kind: str, box: tuple[slice, slice, slice],
           rng: np.random.Generator) -> None:
    ts, rs, cs = box
    block = video[ts, rs, cs]  # a view: edits land in `video`
    nt, nh, nw = block.shape[:3]
    bg = shapes.BACKGROUNDS[scene.background]
    colours = {o.colour: shapes.OBJECT_COLOURS[o.colour] for o in scene.objects}
    if kind == "blotch":
        cy, cx = rng.uniform(0.25, 0.75) * nh, rng.uniform(0.25, 0.75) * nw
        ay, ax = rng.uniform(0.25, 0.45) * nh, rng.uniform(0.25, 0.45) * nw
        yy, xx = np.mgrid[0:nh, 0:nw] + 0.5
        ellipse = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0
        block[:, ellipse] = rng.choice(_OFF_BANDS, size=3).astype(np.uint8)
    elif kind == "noise":
        noisy = block.astype(np.float64) + rng.normal(0.0, 48.0, size=block.shape)
        block[...] = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    elif kind == "flicker":
        phase = int(rng.integers(2)) if nt > 1 else 0
        sub = block[phase::2]
        sub[...] = np.where(sub < 128, sub + 64, sub - 64).astype(np.uint8)
    elif kind == "colour_swap":
        spare = [c for c in shapes.OBJECT_COLOURS if c not in colours]
        targets = rng.permutation(len(spare))
        masks = {name: _object_mask(block, [rgb]) for name, rgb in colours.items()}
        for k, name in enumerate(colours):
            block[masks[name]] = shapes.OBJECT_COLOURS[spare[targets[k]]]
    elif kind == "vanish":
        length = max(1, int(round(nt * rng.uniform(0.34, 0.5))))
        mask = _object_mask(block, colours.values())
        per_start = np.convolve(mask.sum(axis=(1, 2)), np.ones(length, np.int64), mode="valid")
        starts = np.flatnonzero(per_start >= 0.5 * per_start.max())
        start = int(starts[rng.integers(len(starts))])
        block[start:start + length][mask[start:start + length]] = bg
    elif kind == "smear":
        # Ghosts are computed on the whole frames (so trails entering the cell are drawn) and
        # written inside the cell only.
        full = video[ts]
        occupied = _object_mask(full, colours.values())
        for obj in scene.objects:
            ux, uy = shapes.UNIT_DIRECTION[obj.motion]
            if ux == 0 and uy == 0:
                ux, uy = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
            mask = _object_mask(full, [colours[obj.colour]])
            trail = np.zeros_like(mask)
            for k in (1, 2, 3):
                trail |= _shift(mask, -2 * k * uy, -2 * k * ux)
            trail &= ~occupied
            sub = trail[:, rs, cs]
            block[sub] = ghost_colour(colours[obj.colour], bg)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; use one of {list(KINDS)}")


def inject(frames: np.ndarray, prompt_or_scene: str | shapes.Scene, kind: str, cells: Iterable[Sequence[int]],
           grid: Sequence[int], seed: int) -> np.ndarray:
    """A corrupted copy of `frames` (uint8 (F, H, W, 3)): defect `kind` in each of `cells` of `grid`."""
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; use one of {list(KINDS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3:
        raise ValueError(f"grid must be (Tp, Hp, Wp), got {grid}")
    scene = shapes.as_scene(prompt_or_scene)
    out = frames.copy()
    for cell in cells:
        cell = tuple(int(c) for c in cell)
        box = cell_box(cell, grid, frames.shape[:3])
        rng = np.random.default_rng([int(seed), KINDS.index(kind), *cell])
        _apply(out, scene, kind, box, rng)
    return out


def object_cells(frames: np.ndarray, prompt_or_scene: str | shapes.Scene, grid: Sequence[int],
                 min_pixels: int = 16) -> np.ndarray:
    """bool (Tp, Hp, Wp): cells holding at least `min_pixels` object pixels (exact object colours)."""
    scene = shapes.as_scene(prompt_or_scene)
    mask = _object_mask(frames, [shapes.OBJECT_COLOURS[o.colour] for o in scene.objects])
    out = np.zeros(tuple(grid), bool)
    for idx in np.ndindex(*grid):
        out[idx] = mask[cell_box(idx, grid, mask.shape)].sum() >= min_pixels
    return out


def random_defects(frames: np.ndarray, prompt_or_scene: str | shapes.Scene, grid: Sequence[int], seed: int,
                   max_defects: int = 3, kinds: Sequence[str] = KINDS,
                   max_cells: int = 2) -> tuple[np.ndarray, tuple[Defect, ...]]:
    """Inject 0..max_defects random defects (each in 1..max_cells cells); returns (frames', defects).

    Object kinds only go to cells that hold an object; a drawn defect with no eligible cell is skipped.
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown or no defect kinds {list(kinds)}; use a subset of {list(KINDS)}")
    grid = tuple(int(g) for g in grid)
    scene = shapes.as_scene(prompt_or_scene)
    rng = np.random.default_rng([int(seed), 1234])
    all_cells = list(np.ndindex(*grid))
    holds_object = object_cells(frames, scene, grid)
    with_object = [c for c in all_cells if holds_object[c]]
    out = np.asarray(frames).copy()
    applied = []
    for _ in range(int(rng.integers(max_defects + 1))):
        kind = kinds[int(rng.integers(len(kinds)))]
        pool = with_object if kind in OBJECT_KINDS else all_cells
        if not pool:
            continue
        k = int(rng.integers(1, min(max_cells, len(pool)) + 1))
        chosen = tuple(tuple(int(x) for x in pool[i]) for i in sorted(rng.choice(len(pool), size=k, replace=False)))
        out = inject(out, scene, kind, chosen, grid, int(rng.integers(2**31)))
        applied.append(Defect(kind, chosen))
    return out, tuple(applied)
