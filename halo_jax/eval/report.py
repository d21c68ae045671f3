"""The static, self-contained HTML report of an evaluation: `evaluate/report/index.html`.

Everything it shows lies under `evaluate/` and is referenced by relative paths (no network,
no JavaScript):

    report/index.html
    report/media/{model}/{video_id}.gif        the video, resized for display
    report/media/{model}/{video_id}_heat.gif   the same with the heat-map judge's patch scores
                                               (mean over aspects) baked over it (eval/overlay.py)
    report/plots/*.png                         score distributions, defect rates and win rates with
                                               their CIs, DPO training curves (eval/plots.py)

Sections: settings; for `report_prompts` prompts, one row per prompt with the base and each
aligned model side by side for the same seed (clean | heat map); the metrics tables of every
judge; the plots.
"""

from __future__ import annotations

import datetime
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from halo_jax.eval import plots
from halo_jax.eval.metrics import OVERALL, paired_records
from halo_jax.eval.overlay import STOPS, display_size, heat_overlay, resize_frames, score_colour
from halo_jax.io import atomic_write_text

TRAIN_LOSS_KEYS = ("loss", "loss_video", "loss_patch")
TRAIN_ACC_KEYS = ("acc_video", "acc_patch")

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { margin-bottom: 4px; } .muted { color: #666; font-size: 90%; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; } th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.row { display: flex; gap: 18px; flex-wrap: wrap; margin-bottom: 18px; align-items: flex-start; }
figure { margin: 0; } figure img { image-rendering: pixelated; display: inline-block; margin-right: 4px; }
figcaption { font-size: 85%; color: #333; max-width: 420px; }
.prompt { font-weight: 600; margin: 12px 0 6px; }
.legend { display: inline-block; width: 220px; height: 12px; vertical-align: middle; border: 1px solid #999; }
.plots img { margin: 0 12px 12px 0; border: 1px solid #ddd; }
"""


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _read_frames(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from halo_jax.data.video_io import read_gif, read_mp4

    return read_mp4(path, size=size) if path.suffix == ".mp4" else read_gif(path)


def _overall_cells(record: dict, judge: str) -> np.ndarray:
    j = record["judges"][judge]
    return np.mean([np.asarray(j["patch_scores"][a], np.float64) for a in j["aspects"]], axis=0)


def _overall_video(record: dict, judge: str) -> float:
    j = record["judges"][judge]
    return float(np.mean([j["video_scores"][a] for a in j["aspects"]]))


def _ci_cell(e: dict, percent: bool) -> str:
    f = (lambda x: f"{100 * x:.1f}%") if percent else (lambda x: f"{x:.3f}")
    return f"{f(e['mean'])} <span class='muted'>[{f(e['lo'])}, {f(e['hi'])}]</span>"


def metrics_tables(metrics: dict, base: str) -> str:
    """HTML tables per judge: video score, patch defect rate, win rate vs the base (with 95% CIs)."""
    parts = []
    for judge, j in metrics.get("judges", {}).items():
        cols = [OVERALL, *j["aspects"]]
        parts.append(f"<h3>Judge: {html.escape(judge)}</h3>")
        for key, title, percent in (("video_score", "Mean video score (1-5, higher is better)", False),
                                    ("defect_rate", f"Patch defect rate (cells with score &lt; "
                                                    f"{metrics['defect_threshold']:g}; lower is better)", True),
                                    ("win_rate", f"Win rate vs {html.escape(base)} (same prompt and seed; ties "
                                                 "count half)", True)):
            rows = [(m, e[key]) for m, e in j["models"].items() if key in e]
            if not rows:
                continue
            head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", *cols])
            body = "".join("<tr><td>" + html.escape(m) + "</td>" + "".join(f"<td>{_ci_cell(d[c], percent)}</td>"
                                                                         for c in cols) + "</tr>" for m, d in rows)
            parts.append(f"<p>{title}</p><table><tr>{head}</tr>{body}</table>")
    return "\n".join(parts) or "<p>No judge ran: videos only.</p>"


def _video_figure(report_dir: Path, eval_dir: Path, record: dict, heat_judge: str | None, threshold: float,
                  size: tuple[int, int] | None, fps: float) -> str:
    from halo_jax.data.video_io import write_gif

    frames = _read_frames(eval_dir / record["video"], size)
    shown = display_size(*frames.shape[1:3])
    media = report_dir / "media" / record["model"]
    clean = write_gif(media / f"{record['video_id']}.gif", resize_frames(frames, shown), fps=fps)
    imgs = [f"<img src='{_rel(clean, report_dir)}' width='{shown[1]}' height='{shown[0]}' alt='video'>"]
    caption = [f"<b>{html.escape(record['model'])}</b> seed {record['seed']}"]
    if heat_judge:
        cells = _overall_cells(record, heat_judge)
        heat = write_gif(media / f"{record['video_id']}_heat.gif", heat_overlay(frames, cells), fps=fps)
        imgs.append(f"<img src='{_rel(heat, report_dir)}' width='{shown[1]}' height='{shown[0]}' "
                    f"alt='patch scores'>")
        caption.append(f"score {_overall_video(record, heat_judge):.2f}, "
                       f"{int((cells < threshold).sum())}/{cells.size} defect cells")
    caption.append(f"<a href='{_rel(eval_dir / record['video'], report_dir)}'>video file</a>")
    return f"<figure>{''.join(imgs)}<figcaption>{' · '.join(caption)}</figcaption></figure>"


def _plots(report_dir: Path, records: Sequence[dict], metrics: dict, models: Sequence[str], base: str,
           train_metrics: Mapping[str, Path], threshold: float) -> list[tuple[str, Path]]:
    from halo_jax.train.metrics import read_metrics

    out = []
    pdir = report_dir / "plots"
    _, paired = paired_records(records, [base] + [m for m in models if m != base])
    for judge, j in metrics.get("judges", {}).items():
        vids = {m: [_overall_video(r, judge) for r in paired[m]] for m in paired}
        cells = {m: np.concatenate([_overall_cells(r, judge).ravel() for r in paired[m]]) for m in paired}
        out.append((f"{judge}: video scores", plots.histograms(
            pdir / f"{judge}_video_scores.png", vids, title=f"{judge}: video score (mean over aspects) per model")))
        out.append((f"{judge}: patch scores", plots.histograms(
            pdir / f"{judge}_patch_scores.png", cells, vline=threshold,
            title=f"{judge}: cell scores per model (red line: defect threshold {threshold:g})")))
        rates = {m: tuple(e["defect_rate"][OVERALL][k] for k in ("mean", "lo", "hi")) for m, e in j["models"].items()}
        out.append((f"{judge}: defect rate", plots.interval_chart(
            pdir / f"{judge}_defect_rate.png", rates, percent=True, xlabel="% of cells",
            title=f"{judge}: patch defect rate with 95% CI")))
        wins = {m: tuple(e["win_rate"][OVERALL][k] for k in ("mean", "lo", "hi"))
                for m, e in j["models"].items() if "win_rate" in e}
        if wins:
            out.append((f"{judge}: win rate", plots.interval_chart(
                pdir / f"{judge}_win_rate.png", wins, percent=True, xlabel="%",
                title=f"{judge}: win rate vs {base} with 95% CI (50% = no change)")))
    logs = {m: read_metrics(p) for m, p in train_metrics.items() if Path(p).is_file()}
    for keys, name, title in ((TRAIN_LOSS_KEYS, "train_loss", "DPO loss terms"),
                              (TRAIN_ACC_KEYS, "train_accuracy", "implicit accuracy")):
        series = {}
        for m, recs in logs.items():
            for k in keys:
                pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
                if pts:
                    series[f"{m} {k}"] = tuple(zip(*pts))
        if series:
            out.append((title, plots.line_chart(pdir / f"{name}.png", series, title=title)))
    return out


def write_report(eval_dir: str | os.PathLike, records: Sequence[dict], metrics: dict, *, models: Sequence[str],
                 base: str, heat_judge: str | None, report_prompts: int = 4, report_sample: int = 0,
                 train_metrics: Mapping[str, str | os.PathLike] | None = None, threshold: float = 3.0,
                 fps: float = 8.0, title: str = "HALO evaluation") -> Path:
    """Write `eval_dir/report/` (module docstring) from the stage's records and metrics; returns index.html."""
    eval_dir = Path(eval_dir)
    report_dir = eval_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    order = [base] + [m for m in models if m != base]
    _, paired = paired_records(records, order)
    video = metrics.get("video") or {}
    size = (int(video["height"]), int(video["width"])) if "height" in video else None

    shown: dict[int, int] = {}
    for r in paired[base]:
        p, k = int(r["prompt_index"]), int(r["sample_index"])
        if p not in shown and len(shown) < report_prompts:
            shown[p] = k
        if p in shown and k == report_sample:
            shown[p] = k
    rows = []
    for p, k in shown.items():
        recs = [next(r for r in paired[m] if int(r["prompt_index"]) == p and int(r["sample_index"]) == k)
                for m in order]
        figs = "".join(_video_figure(report_dir, eval_dir, r, heat_judge, threshold, size, fps) for r in recs)
        rows.append(f"<div class='prompt'>“{html.escape(recs[0]['prompt'])}”</div><div class='row'>{figs}</div>")

    figures = _plots(report_dir, records, metrics, order, base,
                     {m: Path(p) for m, p in (train_metrics or {}).items()}, threshold)
    plot_html = "".join(f"<img src='{_rel(path, report_dir)}' alt='{html.escape(name)}'>" for name, path in figures)
    stops = ", ".join(f"rgb{tuple(int(c) for c in score_colour(s))} {100 * (s - 1) / 4:.0f}%" for s, _ in STOPS)
    legend = (f"<span>1</span> <span class='legend' style='background: linear-gradient(to right, {stops})'></span> "
              f"<span>5</span>")
    settings = html.escape(
        f"{len(metrics.get('prompts', []))} prompts x {metrics.get('samples_per_prompt', '?')} seeds; "
        f"video {video.get('frames', '?')} x {video.get('height', '?')} x {video.get('width', '?')}; "
        f"sampler {metrics.get('sampler', {}).get('num_steps', '?')} steps, guidance "
        f"{metrics.get('sampler', {}).get('guidance_scale', '?')}; bootstrap "
        f"{metrics.get('bootstrap', {}).get('resamples', '?')} resamples over (prompt, seed) units")
    model_list = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(str(metrics.get('models', {}).get(m, '')))}</li>"
                         for m in order)
    heat_note = (f"Right of each video: the {html.escape(heat_judge)}'s patch scores (mean over aspects) as a "
                 f"translucent colour per cell, {legend}; a cell below {threshold:g} is a defect."
                 if heat_judge else "No patch scores (no judge ran).")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="muted">{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · {settings}</p>
<ul>{model_list}</ul>
<h2>Videos: same prompt and seed for every model</h2>
<p>{heat_note}</p>
{''.join(rows)}
<h2>Metrics</h2>
<p class="muted">Means over (prompt, seed) units with percentile-bootstrap 95% confidence intervals.</p>
{metrics_tables(metrics, base)}
<h2>Plots</h2>
<div class="plots">{plot_html or '<p>No plots.</p>'}</div>
</body></html>
"""
    index = report_dir / "index.html"
    atomic_write_text(index, page)
    return index
