"""PNG charts drawn with PIL (the project does not depend on matplotlib): line charts for
training curves and stacked histograms for score distributions. Written atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from halo_jax.io import atomic_path

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
MARGIN = (64, 36, 16, 44)  # left, top, right, bottom of the plot area


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 x 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _save(image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


class _Axes:
    """Maps data coordinates into the plot rectangle of one panel and draws frame, ticks and labels."""

    def __init__(self, draw, box: tuple[int, int, int, int], xlim: Sequence[float], ylim: Sequence[float]):
        self.draw, self.box = draw, box
        self.xt, self.yt = nice_ticks(*xlim), nice_ticks(*ylim)
        self.x0, self.x1 = self.xt[0], self.xt[-1]
        self.y0, self.y1 = self.yt[0], self.yt[-1]

    def px(self, x, y) -> tuple[float, float]:
        l, t, r, b = self.box
        return (l + (x - self.x0) / (self.x1 - self.x0) * (r - l), b - (y - self.y0) / (self.y1 - self.y0) * (b - t))

    def frame(self, title: str, xlabel: str, ylabel: str, font) -> None:
        l, t, r, b = self.box
        d = self.draw
        for y in self.yt:
            _, py = self.px(self.x0, y)
            d.line([(l, py), (r, py)], fill=(230, 230, 230))
            d.text((l - 6, py), _fmt(y), fill=(60, 60, 60), font=font, anchor="rm")
        for x in self.xt:
            px, _ = self.px(x, self.y0)
            d.line([(px, b), (px, b + 4)], fill=(60, 60, 60))
            d.text((px, b + 6), _fmt(x), fill=(60, 60, 60), font=font, anchor="ma")
        d.rectangle([l, t, r, b], outline=(60, 60, 60))
        d.text(((l + r) / 2, t - 8), title, fill=(0, 0, 0), font=font, anchor="md")
        if xlabel:
            d.text(((l + r) / 2, b + 22), xlabel, fill=(60, 60, 60), font=font, anchor="ma")
        if ylabel:
            d.text((l, t - 8), ylabel, fill=(60, 60, 60), font=font, anchor="rd")


def line_chart(path: str | os.PathLike, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
               title: str, xlabel: str = "step", ylabel: str = "", size: tuple[int, int] = (560, 320)) -> Path:
    """One line per `series[label] = (x, y)` (non-finite points dropped), with a legend."""
    from PIL import Image, ImageDraw

    font = _font()
    clean = {}
    for label, (x, y) in series.items():
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.any():
            clean[label] = (x[ok], y[ok])
    legend_h = 16 * len(clean)
    w, h = size
    img = Image.new("RGB", (w, h + legend_h), "white")
    draw = ImageDraw.Draw(img)
    l, t, r, b = MARGIN
    if clean:
        xs = np.concatenate([v[0] for v in clean.values()])
        ys = np.concatenate([v[1] for v in clean.values()])
        ax = _Axes(draw, (l, t, w - r, h - b), (xs.min(), xs.max()), (ys.min(), ys.max()))
    else:
        ax = _Axes(draw, (l, t, w - r, h - b), (0, 1), (0, 1))
        draw.text((w / 2, h / 2), "no data", fill=(120, 120, 120), font=font, anchor="mm")
    ax.frame(title, xlabel, ylabel, font)
    for k, (label, (x, y)) in enumerate(clean.items()):
        colour = PALETTE[k % len(PALETTE)]
        points = [ax.px(a, c) for a, c in zip(x, y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        else:
            px, py = points[0]
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = h + 16 * k
        draw.line([(l, ly + 7), (l + 20, ly + 7)], fill=colour, width=3)
        draw.text((l + 26, ly + 7), label, fill=(0, 0, 0), font=font, anchor="lm")
    return _save(img, path)


def histograms(path: str | os.PathLike, groups: Mapping[str, Sequence[float]], *, title: str,
               value_range: tuple[float, float] = (1.0, 5.0), bins: int = 20, xlabel: str = "score",
               vline: float | None = None, width: int = 560, panel_height: int = 120) -> Path:
    """One histogram panel per group (same bins and x axis), stacked; `vline` marks e.g. the defect threshold.
    Bars show the fraction of the group's values in each bin."""
    from PIL import Image, ImageDraw

    font = _font()
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    fractions = {}
    for label, values in groups.items():
        v = np.clip(np.asarray(values, np.float64).ravel(), *value_range)
        counts, _ = np.histogram(v, bins=edges)
        fractions[label] = counts / max(v.size, 1)
    ymax = max([f.max() for f in fractions.values() if f.size] + [0.05])
    l, t, r, b = MARGIN
    n = max(len(fractions), 1)
    img = Image.new("RGB", (width, 24 + n * panel_height + b), "white")
    draw = ImageDraw.Draw(img)
    draw.text((width / 2, 14), title, fill=(0, 0, 0), font=font, anchor="mm")
    for k, (label, frac) in enumerate(fractions.items()):
        top = 24 + k * panel_height + 16
        bottom = 24 + (k + 1) * panel_height - 4
        ax = _Axes(draw, (l, top, width - r, bottom), value_range, (0.0, ymax))
        colour = PALETTE[k % len(PALETTE)]
        for i, fr in enumerate(frac):
            x0, y0 = ax.px(edges[i], fr)
            x1, y1 = ax.px(edges[i + 1], 0.0)
            if fr > 0:
                draw.rectangle([x0 + 1, y0, x1 - 1, y1], fill=colour)
        lo, tp, rt, bt = ax.box
        draw.rectangle([lo, tp, rt, bt], outline=(60, 60, 60))
        for y in (0.0, ax.y1):
            _, py = ax.px(ax.x0, y)
            draw.text((lo - 6, py), _fmt(y), fill=(60, 60, 60), font=font, anchor="rm")
        draw.text((lo + 6, tp + 4), label, fill=(0, 0, 0), font=font, anchor="la")
        if vline is not None:
            vx, _ = ax.px(vline, 0.0)
            draw.line([(vx, tp), (vx, bt)], fill=(200, 0, 0), width=1)
        if k == len(fractions) - 1:
            for x in ax.xt:
                px, _ = ax.px(x, 0.0)
                draw.text((px, bt + 6), _fmt(x), fill=(60, 60, 60), font=font, anchor="ma")
            draw.text(((lo + rt) / 2, bt + 22), xlabel, fill=(60, 60, 60), font=font, anchor="ma")
    return _save(img, path)


def interval_chart(path: str | os.PathLike, rows: Mapping[str, tuple[float, float, float]], *, title: str,
                   xlabel: str = "", percent: bool = False, width: int = 560, row_height: int = 28) -> Path:
    """One horizontal bar per `rows[label] = (mean, lo, hi)` with its CI as a whisker."""
    from PIL import Image, ImageDraw

    font = _font()
    scale = 100.0 if percent else 1.0
    vals = {k: tuple(scale * float(x) for x in v) for k, v in rows.items()}
    lo = min([0.0] + [v[1] for v in vals.values()])
    hi = max([1e-9] + [v[2] for v in vals.values()])
    label_w = 8 + max([len(k) for k in vals] + [4]) * 7
    l, t, r, b = label_w, 36, 24, 44
    h = t + b + row_height * max(len(vals), 1)
    img = Image.new("RGB", (width, h), "white")
    draw = ImageDraw.Draw(img)
    ax = _Axes(draw, (l, t, width - r, h - b), (lo, hi), (0.0, 1.0))
    ax.yt = []  # no y grid: rows are categories
    ax.frame(title, xlabel, "", font)
    for k, (label, (m, a, c)) in enumerate(vals.items()):
        colour = PALETTE[k % len(PALETTE)]
        yc = t + row_height * (k + 0.5)
        x0, _ = ax.px(min(0.0, m), 0)
        x1, _ = ax.px(max(0.0, m), 0)
        draw.rectangle([x0, yc - row_height * 0.3, x1, yc + row_height * 0.3], fill=colour)
        xa, _ = ax.px(a, 0)
        xc, _ = ax.px(c, 0)
        draw.line([(xa, yc), (xc, yc)], fill=(0, 0, 0), width=2)
        draw.line([(xa, yc - 5), (xa, yc + 5)], fill=(0, 0, 0), width=2)
        draw.line([(xc, yc - 5), (xc, yc + 5)], fill=(0, 0, 0), width=2)
        draw.text((l - 6, yc), label, fill=(0, 0, 0), font=font, anchor="rm")
    return _save(img, path)
