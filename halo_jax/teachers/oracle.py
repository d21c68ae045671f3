r"""The oracle: the exact judge of the moving-shapes world (`halo_jax.data.shapes`).

It labels a video (uint8 frames (F, H, W, 3)) and its prompt with per-video and per-cell
scores in [1, 5] (5 = perfect) for `visual_quality`, `temporal_consistency` and
`text_alignment`, on a `(Tp, Hp, Wp)` grid, without knowing the seed that made the video.

1. Observation. Each channel value v is rounded to its nearest palette level l(v) in
   {0, 128, 255}, at distance d(v) = |v - l(v)|. A pixel's level code names a palette colour
   or none. Its palette distance is D = max_c d(v_c) when the code is a palette colour, else
   D = 255. Its observed label is L_O = that palette colour if D <= tau (`tolerance`, 40),
   else -1 (an off-palette pixel).

2. The ideal (the best video the prompt allows). Every prompted object is fitted over what
   the world allows: size r (`shapes.size_choices`), velocity v (`shapes.motion_velocities`
   of the prompted direction) and any integer start (x0, y0), by minimising the capped
   mismatch between its exact masks S_t and an observed mask M_t:

       C = sum_t min(|M_t \ S_t| + |S_t & B_t \ M_t|, 0.5 ref)

   where B_t = [L_O = the prompted background] (only background is evidence that the object
   is absent: off-palette pixels, e.g. a blotch over the object, and other colours are not
   counted) and ref = the 75th percentile of the non-zero |M_t|; the cap keeps frames where a
   defect hid the object from dragging the fit. Search: the reliable frames have
   0.8 ref <= |M_t| <= 1.25 ref (if none does, those with |M_t| >= ref); for every (r, v) the start is the rounded median over them
   of (centroid(M_t) - v t - the sprite's own centroid offset); the best of these seeds a
   descent over the neighbours (r, x0, y0 each in -1, 0, +1 together; v +-1 with x0, y0 kept
   or moved to keep the mid-clip centre), until C = 0 or no neighbour is better.
   Stage 1 fits M_t = [L_O = the object's colour] (or, if that colour has fewer than
   0.5 pi r_min^2 pixels in the whole video, the "other" pixels: clean, not background, of a
   colour the prompt does not name). If any "other" pixels exist, stage 2 refits every object
   with M_t = its colour | the other pixels nearest to its stage-1 centre in frame t (within
   2 * the largest extent + 2 px): a partly or wholly wrongly coloured object keeps its place.
   The ideal video I is the exact render of the fitted objects on the prompted background,
   with labels L_I. An exact render of the prompt has C = 0 and I = the video.

3. Per-pixel errors, each in [0, 1] (delta = `noise_floor` 16, full = `error_full` 48,
   ramp(x) = clip((x - delta) / (full - delta), 0, 1)):

   visual       e_V = ramp(D)  (off-palette colour: stray colour, blotches, noise, smears)
   temporal     for each transition t-1 -> t, with dO = max_c |O_t - O_{t-1}|,
                dI = max_c |I_t - I_{t-1}|:  s = ramp(|dO - dI|) (a change the ideal does not
                have, or none where it has one: flicker, vanishing, jumps, freezing, drift).
                It is charged to whichever of the two frames deviates more from the ideal
                (res_t = max_c |O_t - I_t|; ties to t): e_T(t) = max of the charges frame t
                receives.
   text         mis = [L_O >= 0 and L_O != L_I]  (clean palette colour where the ideal has
                another: wrong colour, shape, place or direction, vanished or extra objects,
                wrong background)
                rel = [L_I != background] or [L_O >= 0 and L_O != background]  (object pixels
                of either video: the union of the IoU)

   Every error needs the video to differ from the ideal at that pixel (for e_T: in the frame
   it is charged to), so a local corruption only moves the scores of the cells it touches.

4. Scores. For a cell with N pixels and F_c frames (the whole video for `video_scores`):

   score(x, scale)      = 1 + 4 exp(-x / scale)      (5 at x = 0, 3 at x = scale ln 2, -> 1)
   visual_quality       = score(sum(e_V) / N, `visual_scale`)                 (0.10)
   temporal_consistency = score(sum(e_T) / N, `temporal_scale`)               (0.05)
   text_alignment       = score(sum(mis) / max(sum(rel), floor), `text_scale`)   (0.25)
                          floor = `text_floor` (0.25) * pi r_min^2 * F_c   (r_min: smallest size)

   sum(mis) / sum(rel) is ~ 1 - IoU of the objects in the cell (the floor keeps a cell that an
   object barely touches from scoring its few pixels as a whole object). The smooth map keeps
   small defects visible (slope -4 / scale at 0) and large ones graded rather than clipped.

Cells: an axis of n pixels in g cells gives cell c the range [floor(c n / g), floor((c+1) n / g))
(`halo_jax.align.patches.cell_bounds`, the project-wide rule).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from halo_jax.align.patches import cell_bounds
from halo_jax.data import shapes

ASPECTS: tuple[str, ...] = ("visual_quality", "temporal_consistency", "text_alignment")
ORACLE_VERSION = "oracle-v1"

# ----------------------------------------------------------------------------- palette lookup

_VALUES = np.arange(256)
_LEVELS = np.array(shapes.LEVELS)
_LEVEL_OF = np.argmin(np.abs(_VALUES[:, None] - _LEVELS[None, :]), axis=1).astype(np.uint8)
_LEVEL_DIST = np.min(np.abs(_VALUES[:, None] - _LEVELS[None, :]), axis=1).astype(np.uint8)
_CODE_TO_PALETTE = np.full(27, -1, np.int8)
for _i, _rgb in enumerate(shapes.PALETTE):
    _code = [shapes.LEVELS.index(int(c)) for c in _rgb]
    _CODE_TO_PALETTE[_code[0] * 9 + _code[1] * 3 + _code[2]] = _i


def _max3(a: np.ndarray) -> np.ndarray:
    """max over the last axis of size 3 (much faster than a.max(-1) in numpy)."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def observe(frames: np.ndarray, tolerance: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(L_O int8 (F, H, W): palette index or -1, D uint8 (F, H, W): palette distance; 255 = not a palette colour)."""
    lv = _LEVEL_OF[frames]
    code = lv[..., 0] * np.uint8(9) + lv[..., 1] * np.uint8(3) + lv[..., 2]
    pal = _CODE_TO_PALETTE[code]
    dist = _max3(_LEVEL_DIST[frames])
    dist = np.where(pal >= 0, dist, np.uint8(255))
    labels = np.where(dist <= tolerance, pal, np.int8(-1))
    return labels, dist


# ----------------------------------------------------------------------------- the fit


class _MaskFit:
    """Capped mismatch C between one object's observed colour mask and candidate trajectories."""

    def __init__(self, mask: np.ndarray, known: np.ndarray, shape: str, sizes: Sequence[int], cap: float):
        f, h, w = mask.shape
        self.f, self.h, self.w = f, h, w
        self.shape, self.cap = shape, cap
        self.max_half = max(shapes.sprite(shape, r).half for r in sizes)
        self.pad = p = 2 * self.max_half + 2
        self.mp = np.zeros((f, h + 2 * p, w + 2 * p), bool)
        self.mp[:, p:p + h, p:p + w] = mask
        self.kp = np.zeros((f, h + 2 * p, w + 2 * p), bool)
        self.kp[:, p:p + h, p:p + w] = known | mask
        self.n = mask.sum(axis=(1, 2))
        self.t = np.arange(f)
        self.cache: dict[tuple, float] = {}

    def cost(self, r: int, x0: int, y0: int, vx: float, vy: float) -> float:
        key = (r, x0, y0, vx, vy)
        if key in self.cache:
            return self.cache[key]
        spr = shapes.sprite(self.shape, r)
        cx, cy = x0 + vx * self.t, y0 + vy * self.t
        mh = self.max_half
        if cx.min() < -mh or cy.min() < -mh or cx.max() > self.w + mh or cy.max() > self.h + mh:
            self.cache[key] = math.inf
            return math.inf
        fx, fy = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
        masks = spr.masks[((cy - fy) * 2).astype(np.int64), ((cx - fx) * 2).astype(np.int64)]
        size = masks.shape[-1]
        rows = (fy - spr.half + self.pad)[:, None] + np.arange(size)
        cols = (fx - spr.half + self.pad)[:, None] + np.arange(size)
        index = (self.t[:, None, None], rows[:, :, None], cols[:, None, :])
        inter = (masks & self.mp[index]).sum(axis=(1, 2))
        seen = (masks & self.kp[index]).sum(axis=(1, 2))
        c = float(np.minimum(self.n + seen - 2 * inter, self.cap).sum())
        self.cache[key] = c
        return c


def fit_object(mask: np.ndarray, known: np.ndarray, obj: shapes.SceneObject) -> shapes.ObjectParams:
    """The trajectory the prompt allows that best explains one object's mask (F, H, W) (docstring step 2).

    `known` marks the pixels that are evidence against the object where it is absent (the
    background); mismatches elsewhere (other colours, off-palette pixels) are not counted.
    """
    f, h, w = mask.shape
    sizes = shapes.size_choices(h, w)
    vels = shapes.motion_velocities(obj.motion, f, h, w)
    n = mask.sum(axis=(1, 2))
    if n.sum() < 0.5 * math.pi * sizes[0] ** 2:
        r, (vx, vy) = sizes[len(sizes) // 2], vels[len(vels) // 2]
        return shapes.ObjectParams(obj.colour, obj.shape, r, round(w / 2 - vx * (f - 1) / 2),
                                   round(h / 2 - vy * (f - 1) / 2), vx, vy)
    ref = float(np.percentile(n[n > 0], 75))
    reliable = (n >= 0.8 * ref) & (n <= 1.25 * ref)
    if not reliable.any():  # counts jump across the window (a defect hid the object in most frames):
        reliable = n >= ref  # defects hide objects more often than they grow them

    t = np.arange(f)[reliable]
    nr = n[reliable]
    mx = (mask[reliable].sum(axis=1) @ (np.arange(w) + 0.5)) / nr
    my = (mask[reliable].sum(axis=2) @ (np.arange(h) + 0.5)) / nr
    fit = _MaskFit(mask, known, obj.shape, sizes, cap=0.5 * ref)

    def start(ri: int, vi: int) -> tuple[int, int]:
        spr = shapes.sprite(obj.shape, sizes[ri])
        vx, vy = vels[vi]
        px = ((vx * t - np.floor(vx * t)) * 2).astype(np.int64)
        py = ((vy * t - np.floor(vy * t)) * 2).astype(np.int64)
        off = spr.centroid[py, px]
        return (int(np.round(np.median(mx - vx * t - off[:, 0]))),
                int(np.round(np.median(my - vy * t - off[:, 1]))))

    def cost(state: tuple[int, int, int, int]) -> float:
        ri, vi, x0, y0 = state
        return fit.cost(sizes[ri], x0, y0, *vels[vi])

    states = [(ri, vi, *start(ri, vi)) for ri in range(len(sizes)) for vi in range(len(vels))]
    best = min(states, key=cost)
    best_cost = cost(best)
    mid = (f - 1) / 2
    for _ in range(100):
        if best_cost == 0:
            break
        ri, vi, x0, y0 = best
        cand = [(ri + dr, vi, x0 + dx, y0 + dy) for dr in (-1, 0, 1) for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                if dr or dx or dy]
        for d in (-1, 1):
            if 0 <= vi + d < len(vels):
                dvx, dvy = vels[vi + d][0] - vels[vi][0], vels[vi + d][1] - vels[vi][1]
                cand += [(ri, vi + d, x0, y0),
                         (ri, vi + d, x0 - math.floor(dvx * mid), y0 - math.floor(dvy * mid)),
                         (ri, vi + d, x0 - math.ceil(dvx * mid), y0 - math.ceil(dvy * mid))]
        cand = [c for c in cand if 0 <= c[0] < len(sizes) and 0 <= c[1] < len(vels)]
        nxt = min(cand, key=cost)
        if cost(nxt) >= best_cost:
            break
        best, best_cost = nxt, cost(nxt)
    ri, vi, x0, y0 = best
    return shapes.ObjectParams(obj.colour, obj.shape, sizes[ri], x0, y0, *vels[vi])


def _nearest_object(pixels: np.ndarray, params: Sequence[shapes.ObjectParams], reach: float) -> list[np.ndarray]:
    """Split a pixel mask (F, H, W) among objects: each pixel to the nearest centre in its frame, within reach."""
    f, h, w = pixels.shape
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    d2 = []
    for p in params:
        cx, cy = p.centres(f)
        d2.append((xs[None, None, :] - cx[:, None, None]) ** 2 + (ys[None, :, None] - cy[:, None, None]) ** 2)
    d2 = np.stack(d2)
    nearest = np.argmin(d2, axis=0)
    close = np.min(d2, axis=0) <= reach ** 2
    return [pixels & close & (nearest == k) for k in range(len(params))]


def fit_scene(labels: np.ndarray, scene: shapes.Scene) -> tuple[shapes.ObjectParams, ...]:
    """Fit every prompted object to the observed palette labels (F, H, W) (docstring step 2)."""
    f, h, w = labels.shape
    background = labels == shapes.PALETTE_INDEX[scene.background]
    prompted = [shapes.PALETTE_INDEX[o.colour] for o in scene.objects]
    sizes = shapes.size_choices(h, w)
    # Clean pixels of colours the prompt does not name: a wrongly coloured (part of an) object.
    other = (labels >= 0) & ~background & ~np.isin(labels, prompted)
    masks = [labels == idx for idx in prompted]
    # An object whose colour is (nearly) absent is first sought among the other colours.
    first = [m if m.sum() >= 0.5 * math.pi * sizes[0] ** 2 else other for m in masks]
    params = [fit_object(m, background, o) for m, o in zip(first, scene.objects)]
    if other.any():
        reach = 2 * max(max(shapes.shape_extent(o.shape, sizes[-1])) for o in scene.objects) + 2
        near = _nearest_object(other, params, reach)
        params = [fit_object(m | n, background, o) for m, n, o in zip(masks, near, scene.objects)]
    return tuple(params)


# ----------------------------------------------------------------------------- the judge


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The oracle's full result: scores per aspect (video: float, cells: (Tp, Hp, Wp)), the fit and error maps."""

    video_scores: dict[str, float]
    patch_scores: dict[str, np.ndarray]
    params: tuple[shapes.ObjectParams, ...]
    ideal: np.ndarray
    errors: dict[str, np.ndarray]


class OracleTeacher:
    """The exact judge of the moving-shapes world (formulas in the module docstring).

    `label(frames, prompt, video_id)` returns the label record of DESIGN section 4.
    """

    name = "oracle"
    model = "exact"
    prompt_version = ORACLE_VERSION

    def __init__(self, aspects: Sequence[str] = ASPECTS, grid: Sequence[int] = (2, 2, 2), *,
                 tolerance: int = 40, noise_floor: float = 16.0, error_full: float = 48.0,
                 visual_scale: float = 0.10, temporal_scale: float = 0.05, text_scale: float = 0.25,
                 text_floor: float = 0.25):
        unknown = [a for a in aspects if a not in ASPECTS]
        if unknown or not aspects:
            raise ValueError(f"unknown or no aspects {list(aspects)}; the oracle judges a non-empty subset "
                             f"of {list(ASPECTS)}")
        grid = tuple(int(g) for g in grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"grid must be 3 positive ints (Tp, Hp, Wp), got {grid}")
        if not 0 <= noise_floor < error_full:
            raise ValueError(f"need 0 <= noise_floor < error_full, got {noise_floor}, {error_full}")
        if min(visual_scale, temporal_scale, text_scale) <= 0 or text_floor < 0:
            raise ValueError("visual_scale, temporal_scale, text_scale must be > 0 and text_floor >= 0")
        self.aspects = tuple(aspects)
        self.grid = grid
        self.tolerance = int(tolerance)
        self.noise_floor, self.error_full = float(noise_floor), float(error_full)
        self.visual_scale, self.temporal_scale, self.text_scale = visual_scale, temporal_scale, text_scale
        self.text_floor = text_floor

    def _ramp(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.noise_floor) / (self.error_full - self.noise_floor), 0.0, 1.0).astype(np.float32)

    def judge(self, frames: np.ndarray, prompt: str | shapes.Scene) -> Judgement:
        """Fit the ideal video and score every cell and the whole video."""
        frames = _check_frames(frames)
        scene = shapes.as_scene(prompt)
        f, h, w, _ = frames.shape
        bounds = [cell_bounds(n, g) for n, g in zip((f, h, w), self.grid)]

        obs_labels, dist = observe(frames, self.tolerance)
        params = fit_scene(obs_labels, scene)
        ideal_labels = shapes.render_labels(scene.background, params, f, h, w)
        ideal = shapes.to_rgb(ideal_labels)

        e_visual = self._ramp(dist.astype(np.float32))

        o = frames.astype(np.int16)
        i = ideal.astype(np.int16)
        e_temporal = np.zeros((f, h, w), np.float32)
        if f > 1:
            d_obs = _max3(np.abs(np.diff(o, axis=0)))
            d_ideal = _max3(np.abs(np.diff(i, axis=0)))
            spurious = self._ramp(np.abs(d_obs - d_ideal).astype(np.float32))
            res = _max3(np.abs(o - i))
            later = res[1:] >= res[:-1]
            np.maximum(e_temporal[1:], np.where(later, spurious, 0), out=e_temporal[1:])
            np.maximum(e_temporal[:-1], np.where(later, 0, spurious), out=e_temporal[:-1])

        bg = shapes.PALETTE_INDEX[scene.background]
        clean = obs_labels >= 0
        mis = (clean & (obs_labels != ideal_labels)).astype(np.float32)
        rel = ((ideal_labels != bg) | (clean & (obs_labels != bg))).astype(np.float32)

        sizes = [np.diff(b) for b in bounds]
        n_cell = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
        r_min = shapes.size_choices(h, w)[0]
        floor_cell = self.text_floor * math.pi * r_min ** 2 * sizes[0][:, None, None]
        floor_video = self.text_floor * math.pi * r_min ** 2 * f

        def cells(x: np.ndarray) -> np.ndarray:
            for axis, b in enumerate(bounds):
                x = np.add.reduceat(x, b[:-1], axis=axis)
            return x.astype(np.float64)

        def score(err: np.ndarray | float, scale: float) -> np.ndarray:
            return 1.0 + 4.0 * np.exp(-np.asarray(err, np.float64) / scale)

        patch = {
            "visual_quality": score(cells(e_visual) / n_cell, self.visual_scale),
            "temporal_consistency": score(cells(e_temporal) / n_cell, self.temporal_scale),
            "text_alignment": score(cells(mis) / np.maximum(cells(rel), floor_cell), self.text_scale),
        }
        total = f * h * w
        video = {
            "visual_quality": float(score(e_visual.sum(dtype=np.float64) / total, self.visual_scale)),
            "temporal_consistency": float(score(e_temporal.sum(dtype=np.float64) / total, self.temporal_scale)),
            "text_alignment": float(score(mis.sum(dtype=np.float64) / max(rel.sum(dtype=np.float64), floor_video),
                                          self.text_scale)),
        }
        errors = {"visual_quality": e_visual, "temporal_consistency": e_temporal, "text_alignment": mis}
        return Judgement({a: video[a] for a in self.aspects}, {a: patch[a] for a in self.aspects},
                         params, ideal, {a: errors[a] for a in self.aspects})

    def label(self, frames: np.ndarray, prompt: str, video_id: str) -> dict:
        """The label record of DESIGN section 4 (scores rounded to 4 decimals; usage all zero)."""
        j = self.judge(frames, prompt)
        return {
            "video_id": str(video_id),
            "prompt": prompt if isinstance(prompt, str) else prompt.prompt,
            "teacher": {"name": self.name, "model": self.model, "prompt_version": self.prompt_version},
            "aspects": list(self.aspects),
            "grid": list(self.grid),
            "video_scores": {a: round(j.video_scores[a], 4) for a in self.aspects},
            "patch_scores": {a: np.round(j.patch_scores[a], 4).tolist() for a in self.aspects},
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0},
        }


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise ValueError(f"frames must be (F, H, W, 3) RGB, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 in [0, 255], got {frames.dtype}; convert with "
                         "np.clip(np.round(x), 0, 255).astype(np.uint8) (x in [0, 255])")
    return frames
