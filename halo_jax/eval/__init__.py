"""Evaluation: paired bootstrap statistics, per-model metrics, the HTML report and the VBench export.

    stats.py    bootstrap confidence intervals over (prompt, seed) units, win indicators
    metrics.py  per-video records -> metrics per judge, model and aspect; the printed table
    overlay.py  the patch-score heat map baked over a video's frames
    plots.py    PNG line charts and histograms drawn with PIL (no matplotlib needed)
    report.py   the static, self-contained HTML report
    vbench.py   videos written under VBench's `{prompt}-{index}.mp4` naming
"""
