"""The patch-score heat map baked over a video: a translucent colour per grid cell, per frame.

Cell (t, h, w) of a (Tp, Hp, Wp) grid covers frames [bt[t], bt[t+1]), rows [bh[h], bh[h+1])
and columns [bw[w], bw[w+1]) (`align.patches.cell_bounds`, the project-wide rule), so the
overlay changes with the video's temporal cells. Colour: score 1 red -> 3 yellow -> 5 green
(`score_colour`); output pixel = (1 - alpha) * frame + alpha * colour, with 1-pixel dark
lines on the cell borders. Frames are resized to a display size first (nearest when
enlarging, so small videos stay crisp).
"""

from __future__ import annotations

import numpy as np

from halo_jax.align.patches import cell_bounds

# Colour stops of the score scale: (score, RGB).
STOPS = ((1.0, (215, 48, 39)), (3.0, (254, 224, 80)), (5.0, (26, 152, 80)))


def score_colour(score) -> np.ndarray:
    """RGB float (..., 3) of scores in [1, 5] (clipped), linear between the STOPS."""
    s = np.clip(np.asarray(score, np.float64), STOPS[0][0], STOPS[-1][0])
    xs = [p for p, _ in STOPS]
    return np.stack([np.interp(s, xs, [c[k] for _, c in STOPS]) for k in range(3)], axis=-1)


def display_size(height: int, width: int, long_side: int = 192) -> tuple[int, int]:
    """(H, W) with the longer side `long_side` (integer multiples when enlarging, to keep pixels square)."""
    longest = max(height, width)
    if longest <= long_side:
        k = max(long_side // longest, 1)
        return height * k, width * k
    return max(round(height * long_side / longest), 1), max(round(width * long_side / longest), 1)


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (F, H, W, 3) -> (F, *size, 3): nearest when enlarging, bilinear when shrinking."""
    from PIL import Image

    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    if (h, w) == tuple(size):
        return frames
    method = Image.NEAREST if size[0] >= h and size[1] >= w else Image.BILINEAR
    return np.stack([np.asarray(Image.fromarray(f).resize((size[1], size[0]), method)) for f in frames])


def cell_maps(cells: np.ndarray, frames: int, height: int, width: int) -> np.ndarray:
    """(Tp, Hp, Wp) cell values -> (frames, height, width): every pixel takes its cell's value."""
    cells = np.asarray(cells)
    if cells.ndim != 3:
        raise ValueError(f"cell scores must be (Tp, Hp, Wp), got shape {cells.shape}")
    index = []
    for n, g in zip((frames, height, width), cells.shape):
        b = cell_bounds(n, g)
        index.append(np.searchsorted(b, np.arange(n), side="right") - 1)
    return cells[np.ix_(*index)]


def heat_overlay(frames: np.ndarray, cells: np.ndarray, *, alpha: float = 0.45, long_side: int = 192) -> np.ndarray:
    """uint8 (F, H, W, 3) video + (Tp, Hp, Wp) scores -> uint8 (F, H', W', 3) with the heat map baked in."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must lie in [0, 1], got {alpha}")
    f = frames.shape[0]
    size = display_size(*frames.shape[1:3], long_side=long_side)
    big = resize_frames(frames, size).astype(np.float64)
    cells = np.asarray(cells, np.float64)
    values = cell_maps(cells, f, *size)
    out = (1.0 - alpha) * big + alpha * score_colour(values)
    # Borders: a pixel whose right or lower neighbour lies in another cell.
    hb = np.zeros(size[0], bool)
    wb = np.zeros(size[1], bool)
    hb[cell_bounds(size[0], cells.shape[1])[1:-1]] = True
    wb[cell_bounds(size[1], cells.shape[2])[1:-1]] = True
    border = hb[:, None] | wb[None, :]
    out[:, border] *= 0.35
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
