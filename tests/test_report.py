"""The HTML report and its parts on a hand-made evaluation of the moving-shapes world (no sampling):
base videos carry a blotch in one cell, the "aligned" ones are exact renders; the oracle judges.

Opens the report in headless Chromium when `chromium` / `chromium-browser` / `google-chrome` is
on PATH (screenshot written, every image loaded); without it, checks that the HTML parses and
every file it references exists under the report folder.
"""

import html.parser
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from halo_jax.data import defects, shapes
from halo_jax.data.video_io import read_gif, write_mp4
from halo_jax.eval import overlay, plots
from halo_jax.eval.metrics import compute_metrics
from halo_jax.eval.report import write_report
from halo_jax.teachers.oracle import OracleTeacher

PROMPTS = list(shapes.heldout_prompts()[:2])
SIZE = (9, 32, 32)
GRID = (2, 2, 2)
MODELS = ["base", "gran_dpo"]


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.refs.append((tag, a[key]))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "evaluate"
    oracle = OracleTeacher(grid=GRID)
    records = []
    for name in MODELS:
        for p, prompt in enumerate(PROMPTS):
            for k in range(2):
                frames = shapes.render(prompt, seed=10 * p + k, frames=SIZE[0], height=SIZE[1], width=SIZE[2])
                if name == "base":
                    frames = defects.inject(frames, prompt, "blotch", [(0, 0, 0)], GRID, seed=k)
                vid = f"p{p:06d}-s{k:03d}"
                rel = f"{name}/videos/{vid}.mp4"
                write_mp4(out / rel, frames)
                label = oracle.label(frames, prompt, vid)
                records.append({"model": name, "video_id": vid, "prompt": prompt, "prompt_index": p, "sample_index": k,
                                "seed": 10 * p + k, "video": rel,
                                "judges": {"oracle": {k2: label[k2] for k2 in
                                                      ("aspects", "grid", "video_scores", "patch_scores")}}})
    metrics = compute_metrics(records, MODELS, "base", threshold=3.0, resamples=100)
    metrics.update(models={m: f"/models/{m}" for m in MODELS}, prompts=PROMPTS, samples_per_prompt=2,
                   video=dict(zip(("frames", "height", "width"), SIZE)), sampler={"num_steps": 3, "guidance_scale": 5})
    log = out.parent / "dpo" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "loss": 0.7 - 0.02 * s, "loss_video": 0.69, "loss_patch": 0.5,
                                       "acc_video": 0.5 + 0.02 * s, "acc_patch": 0.6}) + "\n" for s in range(10)))
    index = write_report(out, records, metrics, models=MODELS, base="base", heat_judge="oracle", report_prompts=2,
                         train_metrics={"gran_dpo": log}, threshold=3.0)
    return index, records, metrics


def test_report_references_exist_and_are_relative(report):
    index, _, metrics = report
    parser = _Refs()
    parser.feed(index.read_text(encoding="utf-8"))
    parser.close()
    imgs = [r for t, r in parser.refs if t == "img"]
    assert len(imgs) == 2 * 2 * len(MODELS) + 6  # (clean + heat) x prompts x models + 4 score plots + 2 curves
    for _, ref in parser.refs:
        assert "://" not in ref and not ref.startswith("/"), ref
        assert (index.parent / ref).resolve().is_file(), ref
    text = index.read_text(encoding="utf-8")
    assert "Patch defect rate" in text and "Win rate vs base" in text and PROMPTS[0] in text
    # The blotched base loses to the exact renders on every unit; its cell (0, 0, 0) is a defect.
    assert metrics["judges"]["oracle"]["models"]["gran_dpo"]["win_rate"]["overall"]["mean"] == 1.0
    base_rate = metrics["judges"]["oracle"]["models"]["base"]["defect_rate"]["visual_quality"]["mean"]
    assert base_rate >= 1 / 8


def test_heat_gif_colours_the_defect_cell(report):
    index, records, _ = report
    rec = next(r for r in records if r["model"] == "base" and r["video_id"] == "p000000-s000")
    cells = np.asarray(rec["judges"]["oracle"]["patch_scores"]["visual_quality"])
    assert cells[0, 0, 0] < 3.0 and cells[1, 1, 1] > 4.5
    heat = read_gif(index.parent / "media" / "base" / "p000000-s000_heat.gif")
    clean = read_gif(index.parent / "media" / "base" / "p000000-s000.gif")
    assert heat.shape == clean.shape == (SIZE[0], 192, 192, 3)
    assert not np.array_equal(heat, clean)


def test_overlay_colour_per_cell_and_frames():
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    cells = np.array([[[1.0, 5.0], [5.0, 5.0]], [[5.0, 5.0], [5.0, 3.0]]])
    out = overlay.heat_overlay(frames, cells, alpha=0.5, long_side=16)
    assert out.shape == (4, 16, 16, 3)
    red, green, yellow = (np.round(0.5 * overlay.score_colour(s)) for s in (1.0, 5.0, 3.0))
    np.testing.assert_array_equal(out[0, 2, 2], red)       # frame 0 (temporal cell 0), top-left cell
    np.testing.assert_array_equal(out[0, 2, 12], green)
    np.testing.assert_array_equal(out[3, 2, 2], green)     # frame 3 lies in temporal cell 1
    np.testing.assert_array_equal(out[3, 12, 12], yellow)
    assert out[0, 8, 2].sum() < red.sum()                  # the border row between the cell rows is darkened
    np.testing.assert_array_equal(overlay.cell_maps(cells, 4, 2, 2)[:, 0, 0], [1, 1, 5, 5])


def test_plots_write_pngs(tmp_path):
    from PIL import Image

    a = plots.line_chart(tmp_path / "l.png", {"x": ([0, 1, 2], [1.0, np.nan, 0.5]), "one": ([3], [2.0])}, title="t")
    b = plots.histograms(tmp_path / "h.png", {"m": [1.0, 2.0, 5.0]}, title="h", vline=3.0)
    c = plots.interval_chart(tmp_path / "i.png", {"m": (0.4, 0.3, 0.5)}, title="i", percent=True)
    for path in (a, b, c):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert plots.nice_ticks(0.0, 0.93) == [0.0, 0.5, 1.0] and plots.nice_ticks(1.0, 5.0) == [1, 2, 3, 4, 5]


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no chromium / google-chrome on PATH (the file checks above still run)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    index, _, _ = report
    browser = _browser()
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--allow-file-access-from-files",
             "--hide-scrollbars", "--window-size=1400,2400"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", index.as_uri()], check=True, timeout=120, capture_output=True)
    assert shot.is_file() and shot.stat().st_size > 10_000
    # A copy of the page that writes the number of images that failed to load into its title.
    probe = index.parent / "_load_probe.html"
    probe.write_text(index.read_text(encoding="utf-8").replace("</body>", (
        "<script>window.addEventListener('load', () => { const bad = [...document.images].filter("
        "i => !(i.complete && i.naturalWidth > 0)); document.title = 'broken:' + bad.length; });</script></body>")),
        encoding="utf-8")
    try:
        dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], check=True,
                             timeout=120, capture_output=True, text=True).stdout
    finally:
        probe.unlink()
    assert "<title>broken:0</title>" in dom, dom[:500]
