"""The moving-shapes world: a prompt grammar, an exact renderer and a fixed prompt split.

Grammar (lower case, whitespace-insensitive, an optional final period)::

    <prompt>     := <object> [ "and" <object> ] "on" <article> <background> "background"
    <object>     := <article> <colour> <shape> <motion>
    <motion>     := "moving" <direction> | "standing still"
    <article>    := "a" | "an"
    <colour>     := red | green | blue | yellow | magenta | cyan | orange
    <shape>      := circle | square | triangle
    <direction>  := left | right | up | down
    <background> := black | white | gray        ("grey" is read as gray)

At most two objects, and they have different colours (so every object is identified by its
colour). Example: "a blue square moving up and a yellow triangle standing still on a white
background". `parse_prompt` turns a prompt into a frozen `Scene`; `Scene.prompt` is the
canonical text (correct articles, single spaces).

Palette. Every colour's channels lie on the levels {0, 128, 255} (`PALETTE`), so a pixel's
colour is recognised exactly by rounding each channel to its nearest level (the oracle uses
this; any colour with a channel farther than a tolerance from every level is an artefact).

Geometry. Pixel (row i, column j) has its centre at (x, y) = (j + 0.5, i + 0.5). An object of
size `r` (an integer, pixels) centred at (cx, cy) covers the pixels whose centres (u, w)
relative to the centre (y pointing down) satisfy

    circle   u^2 + w^2 <= r^2
    square   max(|u|, |w|) <= a,        a = r * sqrt(pi) / 2        (same area as the circle)
    triangle w <= R / 2 and sqrt(3)|u| - w <= R,   R = r * sqrt(4 pi / (3 sqrt 3))
             (equilateral, apex up, centroid at the centre, same area as the circle)

Masks are exact (no anti-aliasing), so a render is a palette-index map and the oracle can
reproduce it pixel for pixel.

Parameters the seed chooses (`sample_params`), for a clip of F frames of H x W:

    size    r  uniform integer in [round(0.09 m), round(0.15 m)],  m = min(H, W)  (6..10 at 64)
    speed   v  uniform in the multiples of 0.5 px/frame within [0.25 L, 0.5 L] / (F - 1),
               L = W for left/right, H for up/down (1, 1.5 or 2 px/frame at 17 x 64 x 64);
               0 for "standing still"
    start   (x0, y0) uniform integers such that the whole trajectory stays inside the frame

and the centre at frame t is (x0 + vx t, y0 + vy t) (vx, vy = v times the unit direction,
"up" is -y). Centres therefore lie on the half-pixel lattice. Two objects are resampled
(same generator) until their bounding circles are at least 1 px apart in every frame, so
objects never overlap. The generator is `numpy.random.default_rng([seed, crc32(prompt)])`
over the canonical prompt: rendering is deterministic from (prompt, seed).

Split (`train_prompts`, `heldout_prompts`): a (colour, shape, motion) triple with
colour index i, shape index j, motion index k is held out iff (i + 2 j + 3 k) % 7 == 0
(15 of the 105 triples; every colour-shape, colour-motion and shape-motion pair still occurs
in training). A prompt is held out iff one of its objects is a held-out triple. Both lists
are fixed: all one-object prompts of their kind, plus two-object prompts drawn with a fixed
generator.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------- vocabulary

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "orange": (255, 128, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLOUR_ALIASES = {"grey": "gray"}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MOTIONS: tuple[str, ...] = DIRECTIONS + ("still",)
MAX_OBJECTS = 2

# Palette: index -> name / RGB. Backgrounds first, then object colours.
PALETTE_NAMES: tuple[str, ...] = tuple(BACKGROUNDS) + tuple(OBJECT_COLOURS)
PALETTE: np.ndarray = np.array([{**BACKGROUNDS, **OBJECT_COLOURS}[n] for n in PALETTE_NAMES], np.uint8)
PALETTE_INDEX: dict[str, int] = {n: i for i, n in enumerate(PALETTE_NAMES)}
LEVELS: tuple[int, int, int] = (0, 128, 255)

UNIT_DIRECTION: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),
}

SIZE_RANGE = (0.09, 0.15)     # object size r as a fraction of min(H, W)
TRAVEL_RANGE = (0.25, 0.5)    # distance travelled over the clip, as a fraction of the axis length
SPEED_STEP = 0.5              # speeds are multiples of this (px / frame)
_MAX_PLACEMENT_TRIES = 500

GRAMMAR = (
    "the moving-shapes grammar:\n"
    "  <prompt>     := <object> [and <object>] on a <background> background\n"
    "  <object>     := a|an <colour> <shape> (moving <direction> | standing still)\n"
    f"  <colour>     := {' | '.join(OBJECT_COLOURS)}\n"
    f"  <shape>      := {' | '.join(SHAPES)}\n"
    f"  <direction>  := {' | '.join(DIRECTIONS)}\n"
    f"  <background> := {' | '.join(BACKGROUNDS)}\n"
    f"  at most {MAX_OBJECTS} objects, with different colours\n"
    "  e.g. 'a red circle moving right on a black background', 'a blue square moving up and "
    "a yellow triangle standing still on a white background'"
)


class PromptError(ValueError):
    """A prompt outside the moving-shapes grammar; the message says what is wrong and lists the grammar."""


class RenderError(ValueError):
    """A scene that cannot be rendered at the requested size (objects do not fit)."""


# ----------------------------------------------------------------------------- scenes


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object of a scene: `colour` in OBJECT_COLOURS, `shape` in SHAPES, `motion` in MOTIONS."""

    colour: str
    shape: str
    motion: str

    def __post_init__(self) -> None:
        if self.colour not in OBJECT_COLOURS:
            raise PromptError(f"unknown object colour {self.colour!r}; {GRAMMAR}")
        if self.shape not in SHAPES:
            raise PromptError(f"unknown shape {self.shape!r}; {GRAMMAR}")
        if self.motion not in MOTIONS:
            raise PromptError(f"unknown motion {self.motion!r}; {GRAMMAR}")

    @property
    def text(self) -> str:
        motion = "standing still" if self.motion == "still" else f"moving {self.motion}"
        return f"{_article(self.colour)} {self.colour} {self.shape} {motion}"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A parsed prompt: 1..MAX_OBJECTS objects of distinct colours on a background."""

    objects: tuple[SceneObject, ...]
    background: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise PromptError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}; {GRAMMAR}")
        if self.background not in BACKGROUNDS:
            raise PromptError(f"unknown background {self.background!r}; {GRAMMAR}")
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            raise PromptError(f"objects must have different colours, got {colours}; {GRAMMAR}")

    @property
    def prompt(self) -> str:
        objects = " and ".join(o.text for o in self.objects)
        return f"{objects} on {_article(self.background)} {self.background} background"


def parse_prompt(text: str) -> Scene:
    """Parse a prompt of the grammar (module docstring) into a Scene; PromptError otherwise."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}; {GRAMMAR}")
    words = text.strip().lower().rstrip(".").split()

    def fail(why: str) -> PromptError:
        return PromptError(f"cannot parse prompt {text!r}: {why}; {GRAMMAR}")

    if len(words) < 4 or words[-1] != "background" or words[-4] != "on" or words[-3] not in ("a", "an"):
        raise fail("it must end with 'on a <background> background'")
    background = COLOUR_ALIASES.get(words[-2], words[-2])
    if background not in BACKGROUNDS:
        raise fail(f"unknown background {words[-2]!r}")
    chunks: list[list[str]] = [[]]
    for w in words[:-4]:
        if w == "and":
            chunks.append([])
        else:
            chunks[-1].append(w)
    if len(chunks) > MAX_OBJECTS:
        raise fail(f"{len(chunks)} objects, at most {MAX_OBJECTS} are allowed")
    objects = []
    for chunk in chunks:
        if len(chunk) != 5 or chunk[0] not in ("a", "an"):
            raise fail(f"object {' '.join(chunk)!r} is not '<a|an> <colour> <shape> moving <direction>' "
                       "or '<a|an> <colour> <shape> standing still'")
        _, colour, shape, verb, where = chunk
        colour = COLOUR_ALIASES.get(colour, colour)
        if colour not in OBJECT_COLOURS:
            raise fail(f"unknown object colour {colour!r}")
        if shape not in SHAPES:
            raise fail(f"unknown shape {shape!r}")
        if verb == "standing" and where == "still":
            motion = "still"
        elif verb == "moving" and where in DIRECTIONS:
            motion = where
        else:
            raise fail(f"unknown motion {verb + ' ' + where!r}")
        objects.append(SceneObject(colour, shape, motion))
    try:
        return Scene(tuple(objects), background)
    except PromptError as e:
        raise fail(str(e).split(";")[0]) from None


def as_scene(scene_or_prompt: Scene | str) -> Scene:
    """A Scene from a Scene or a prompt string."""
    return scene_or_prompt if isinstance(scene_or_prompt, Scene) else parse_prompt(scene_or_prompt)


# ----------------------------------------------------------------------------- geometry

_SQUARE_HALF = math.sqrt(math.pi) / 2
_TRIANGLE_CIRCUMRADIUS = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))


def shape_extent(shape: str, r: float) -> tuple[float, float, float]:
    """(half width, extent above the centre, extent below the centre) of a shape of size r."""
    if shape == "circle":
        return (r, r, r)
    if shape == "square":
        a = r * _SQUARE_HALF
        return (a, a, a)
    if shape == "triangle":
        big = r * _TRIANGLE_CIRCUMRADIUS
        return (big * math.sqrt(3) / 2, big, big / 2)
    raise PromptError(f"unknown shape {shape!r}; {GRAMMAR}")


def _inside(shape: str, r: float, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + w * w <= r * r
    if shape == "square":
        a = r * _SQUARE_HALF
        return np.maximum(np.abs(u), np.abs(w)) <= a
    big = r * _TRIANGLE_CIRCUMRADIUS
    return (w <= big / 2) & (math.sqrt(3) * np.abs(u) - w <= big)


@dataclasses.dataclass(frozen=True)
class Sprite:
    """Exact masks of one (shape, size) for the 4 half-pixel phases of its centre.

    `masks[py, px]` (2, 2, S, S): mask for a centre at (X + px/2, Y + py/2), X, Y integers;
    mask pixel (i, j) is frame pixel (Y - half + i, X - half + j). `centroid[py, px]` is the
    mask's pixel-centre centroid minus the true centre (dx, dy); `area[py, px]` its pixel count.
    """

    masks: np.ndarray
    half: int
    centroid: np.ndarray
    area: np.ndarray


@functools.lru_cache(maxsize=None)
def sprite(shape: str, r: int) -> Sprite:
    """The cached exact masks of a shape of size r (see Sprite)."""
    half = int(math.ceil(max(shape_extent(shape, r)))) + 1
    d = np.arange(-half, half + 1, dtype=np.float64)
    masks = np.zeros((2, 2, 2 * half + 1, 2 * half + 1), bool)
    centroid = np.zeros((2, 2, 2))
    area = np.zeros((2, 2), np.int64)
    for py in range(2):
        for px in range(2):
            u = (d + 0.5 - px / 2)[None, :]
            w = (d + 0.5 - py / 2)[:, None]
            m = _inside(shape, r, u, w)
            masks[py, px] = m
            area[py, px] = m.sum()
            ww, uu = np.broadcast_arrays(w, u)
            centroid[py, px] = (uu[m].mean(), ww[m].mean())
    masks.setflags(write=False)
    centroid.setflags(write=False)
    area.setflags(write=False)
    return Sprite(masks, half, centroid, area)


# ----------------------------------------------------------------------------- parameters


def size_choices(height: int, width: int) -> tuple[int, ...]:
    """Object sizes r the world allows at this resolution (SIZE_RANGE of min(H, W), integers)."""
    m = min(height, width)
    lo, hi = max(1, round(SIZE_RANGE[0] * m)), max(1, round(SIZE_RANGE[1] * m))
    return tuple(range(lo, hi + 1))


def speed_choices(length: int, frames: int) -> tuple[float, ...]:
    """Speeds (px / frame, multiples of SPEED_STEP) travelling TRAVEL_RANGE of `length` over the clip."""
    steps = max(frames - 1, 1)
    lo, hi = TRAVEL_RANGE[0] * length / steps, TRAVEL_RANGE[1] * length / steps
    ks = range(math.ceil(lo / SPEED_STEP), math.floor(hi / SPEED_STEP) + 1)
    speeds = tuple(k * SPEED_STEP for k in ks if k > 0)
    return speeds or (max(1, math.ceil(lo / SPEED_STEP)) * SPEED_STEP,)


def motion_velocities(motion: str, frames: int, height: int, width: int) -> tuple[tuple[float, float], ...]:
    """The (vx, vy) velocities a motion allows at this clip size ((0, 0) for 'still')."""
    ux, uy = UNIT_DIRECTION[motion]
    if ux == 0 and uy == 0:
        return ((0.0, 0.0),)
    length = width if ux else height
    return tuple((ux * v, uy * v) for v in speed_choices(length, frames))


@dataclasses.dataclass(frozen=True)
class ObjectParams:
    """One object's trajectory: centre (x0 + vx t, y0 + vy t) at frame t; x0, y0 integers, v in 0.5 steps."""

    colour: str
    shape: str
    size: int
    x0: int
    y0: int
    vx: float
    vy: float

    def centres(self, frames: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(frames, dtype=np.float64)
        return self.x0 + self.vx * t, self.y0 + self.vy * t


def start_range(extent: tuple[float, float, float], v: float, frames: int, length: int,
                axis: int) -> tuple[int, int]:
    """Integer start coordinates keeping a trajectory of velocity v inside [0, length] on one axis."""
    lo_ext, hi_ext = (extent[0], extent[0]) if axis == 0 else (extent[1], extent[2])
    travel = v * (frames - 1)
    return math.ceil(lo_ext - min(0.0, travel)), math.floor(length - hi_ext - max(0.0, travel))


def _bounding_radius(shape: str, r: int) -> float:
    return {"circle": 1.0, "square": _SQUARE_HALF * math.sqrt(2), "triangle": _TRIANGLE_CIRCUMRADIUS}[shape] * r


def sample_params(scene_or_prompt: Scene | str, seed: int, frames: int = 17, height: int = 64,
                  width: int = 64) -> tuple[ObjectParams, ...]:
    """The trajectories a seed chooses for a scene (ranges in the module docstring)."""
    scene = as_scene(scene_or_prompt)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if frames < 1 or height < 1 or width < 1:
        raise RenderError(f"frames, height and width must be positive, got {(frames, height, width)}")
    rng = np.random.default_rng([int(seed), zlib.crc32(scene.prompt.encode())])
    sizes = size_choices(height, width)
    for _ in range(_MAX_PLACEMENT_TRIES):
        params = []
        for obj in scene.objects:
            r = int(rng.choice(sizes))
            vels = motion_velocities(obj.motion, frames, height, width)
            vx, vy = vels[int(rng.integers(len(vels)))]
            ext = shape_extent(obj.shape, r)
            xs = start_range(ext, vx, frames, width, 0)
            ys = start_range(ext, vy, frames, height, 1)
            if xs[0] > xs[1] or ys[0] > ys[1]:
                raise RenderError(f"{obj.text!r} of size {r} moving {(vx, vy)} px/frame does not fit in "
                                  f"{frames} frames of {height}x{width}; use larger frames")
            x0 = int(rng.integers(xs[0], xs[1] + 1))
            y0 = int(rng.integers(ys[0], ys[1] + 1))
            params.append(ObjectParams(obj.colour, obj.shape, r, x0, y0, vx, vy))
        if _separated(params, frames):
            return tuple(params)
    raise RenderError(f"could not place the objects of {scene.prompt!r} without overlap in "
                      f"{frames} frames of {height}x{width} after {_MAX_PLACEMENT_TRIES} tries; use larger frames")


def _separated(params: Sequence[ObjectParams], frames: int) -> bool:
    for i in range(len(params)):
        for j in range(i + 1, len(params)):
            (xi, yi), (xj, yj) = params[i].centres(frames), params[j].centres(frames)
            gap = (_bounding_radius(params[i].shape, params[i].size)
                   + _bounding_radius(params[j].shape, params[j].size) + 1)
            if np.min(np.hypot(xi - xj, yi - yj)) < gap:
                return False
    return True


# ----------------------------------------------------------------------------- rendering


def paint(labels: np.ndarray, p: ObjectParams) -> None:
    """Paint one object's exact mask (palette index of its colour) into labels (F, H, W), in place, clipped."""
    f, h, w = labels.shape
    spr = sprite(p.shape, p.size)
    s = spr.masks.shape[-1]
    idx = PALETTE_INDEX[p.colour]
    cx, cy = p.centres(f)
    for t in range(f):
        fx, fy = math.floor(cx[t]), math.floor(cy[t])
        m = spr.masks[int(2 * (cy[t] - fy)), int(2 * (cx[t] - fx))]
        top, left = fy - spr.half, fx - spr.half
        r0, r1 = max(top, 0), min(top + s, h)
        c0, c1 = max(left, 0), min(left + s, w)
        if r0 >= r1 or c0 >= c1:
            continue
        sub = m[r0 - top:r1 - top, c0 - left:c1 - left]
        labels[t, r0:r1, c0:c1][sub] = idx


def render_labels(background: str, params: Sequence[ObjectParams], frames: int, height: int,
                  width: int) -> np.ndarray:
    """Palette-index video (F, H, W) int8: the background, then the objects in order (later on top)."""
    labels = np.full((frames, height, width), PALETTE_INDEX[background], np.int8)
    for p in params:
        paint(labels, p)
    return labels


_PALETTE_U32 = np.concatenate([PALETTE, np.zeros((len(PALETTE), 1), np.uint8)], 1).view(np.uint32).ravel()


def to_rgb(labels: np.ndarray) -> np.ndarray:
    """Palette indices (...) -> uint8 RGB (..., 3)."""
    rgba = _PALETTE_U32[labels].view(np.uint8).reshape(labels.shape + (4,))
    return np.ascontiguousarray(rgba[..., :3])


def render(scene_or_prompt: Scene | str, seed: int, frames: int = 17, height: int = 64,
           width: int = 64) -> np.ndarray:
    """The exact video of a prompt for a seed: uint8 (frames, height, width, 3), deterministic."""
    scene = as_scene(scene_or_prompt)
    params = sample_params(scene, seed, frames, height, width)
    return to_rgb(render_labels(scene.background, params, frames, height, width))


# ----------------------------------------------------------------------------- prompt split

_TWO_OBJECT_TRAIN = 300
_TWO_OBJECT_HELDOUT = 60
_SPLIT_SEED = 20250210


def is_heldout_triple(colour: str, shape: str, motion: str) -> bool:
    """Whether a (colour, shape, motion) triple is held out of training: (i + 2j + 3k) % 7 == 0."""
    i, j, k = list(OBJECT_COLOURS).index(colour), SHAPES.index(shape), MOTIONS.index(motion)
    return (i + 2 * j + 3 * k) % 7 == 0


def _all_objects() -> list[SceneObject]:
    return [SceneObject(c, s, m) for c in OBJECT_COLOURS for s in SHAPES for m in MOTIONS]


@functools.lru_cache(maxsize=None)
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    objs = _all_objects()
    held = [o for o in objs if is_heldout_triple(*o.triple)]
    seen = [o for o in objs if not is_heldout_triple(*o.triple)]
    train = [Scene((o,), b).prompt for o in seen for b in BACKGROUNDS]
    heldout = [Scene((o,), b).prompt for o in held for b in BACKGROUNDS]
    rng = np.random.default_rng(_SPLIT_SEED)
    bgs = list(BACKGROUNDS)

    def draw_pairs(first: list[SceneObject], second: list[SceneObject], n: int, out: list[str]) -> None:
        taken = set(out)
        while n > 0:
            a, b = first[rng.integers(len(first))], second[rng.integers(len(second))]
            if a.colour == b.colour:
                continue
            order = (a, b) if rng.integers(2) == 0 else (b, a)
            p = Scene(order, bgs[rng.integers(len(bgs))]).prompt
            if p not in taken:
                taken.add(p)
                out.append(p)
                n -= 1

    draw_pairs(seen, seen, _TWO_OBJECT_TRAIN, train)
    draw_pairs(held, objs, _TWO_OBJECT_HELDOUT, heldout)
    return tuple(train), tuple(heldout)


ATTRIBUTES = ("colour", "shape", "motion")  # what `altered_prompt` may change


def altered_prompt(scene_or_prompt: Scene | str, rng: np.random.Generator, attribute: str | None = None) -> str:
    """The prompt with one attribute of one object changed to another valid value (drawn from `rng`): its
    colour (to one no other object has), its shape or its motion; `attribute` (one of ATTRIBUTES) fixes
    which, else it is drawn too. A video of the original prompt judged against this one is misaligned in
    exactly that attribute."""
    scene = as_scene(scene_or_prompt)
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    taken = {o.colour for o in scene.objects}
    choices = {"colour": [c for c in OBJECT_COLOURS if c not in taken],
               "shape": [x for x in SHAPES if x != obj.shape],
               "motion": [m for m in MOTIONS if m != obj.motion]}
    if attribute is None:
        attribute = ATTRIBUTES[int(rng.integers(3))]
    elif attribute not in ATTRIBUTES:
        raise ValueError(f"attribute {attribute!r} is not one of {ATTRIBUTES}")
    value = choices[attribute][int(rng.integers(len(choices[attribute])))]
    changed = dataclasses.replace(obj, **{attribute: value})
    objects = scene.objects[:i] + (changed,) + scene.objects[i + 1:]
    return Scene(objects, scene.background).prompt


def changed_attribute(prompt: str, other: str) -> str | None:
    """The attribute (one of ATTRIBUTES) in which `other` differs from `prompt` when they differ in exactly one
    attribute of one object, as `altered_prompt` makes them; None otherwise or outside the grammar."""
    try:
        a, b = as_scene(prompt), as_scene(other)
    except ValueError:
        return None
    if a.background != b.background or len(a.objects) != len(b.objects):
        return None
    changed = [attr for x, y in zip(a.objects, b.objects) for attr in ATTRIBUTES
               if getattr(x, attr) != getattr(y, attr)]
    return changed[0] if len(changed) == 1 else None


def train_prompts() -> tuple[str, ...]:
    """The fixed training prompts: no object in them is a held-out triple."""
    return _split()[0]


def heldout_prompts() -> tuple[str, ...]:
    """The fixed held-out prompts: each has at least one held-out (colour, shape, motion) triple."""
    return _split()[1]


def sample_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """n prompts drawn uniformly (with replacement) from a split ('train' or 'heldout'), deterministic."""
    pool = {"train": train_prompts, "heldout": heldout_prompts}.get(split)
    if pool is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    prompts = pool()
    rng = np.random.default_rng([int(seed), 7])
    return [prompts[i] for i in rng.integers(len(prompts), size=int(n))]
