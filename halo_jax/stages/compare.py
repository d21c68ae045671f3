"""Stage `compare`: the results table. Base vs Diffusion-DPO vs Gran-DPO on the same pairs, steps and seeds.

    for seed in compare.seeds, for (variant, patch_weight) in compare.variants:
        train_dpo on WORKDIR/pairs with config.seed = seed and dpo.loss.patch_weight = patch_weight
            -> WORKDIR/compare/{variant}_s{seed}/ (dpo/ checkpoints and metrics, dpo_ckpt/)
    evaluate: the base and every run on the held-out prompts with the same sampling seeds, each
        variant's runs pooled into one row (evaluate.groups: per (prompt, seed) unit, the mean over
        the training seeds, so its CI covers prompt and sampling variation around the seed mean)
        -> WORKDIR/evaluate/ (metrics.json, table.txt, report/)
    WORKDIR/compare/results.md: the pooled table with 95% CIs and the targets, each met or not:
        defect   gran_dpo's patch defect rate is at most half the base's
        vs_dpo   gran_dpo's defect rate is below diffusion_dpo's, with non-overlapping CIs
        score    gran_dpo's mean video score is not below diffusion_dpo's

The stages before it (generate, label, train_reward, score, pairs) make the one pair store that
every run trains on. Resumable: a run whose dpo_ckpt/ exists is skipped, an interrupted run
resumes from its checkpoint, evaluate resumes per video.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections import Counter
from pathlib import Path

import jax
from absl import logging

from halo_jax.config import ConfigError
from halo_jax.eval.metrics import OVERALL, format_estimate, table_header, table_row
from halo_jax.io import atomic_write_text
from halo_jax.parallel import distributed
from halo_jax.stages import evaluate, train_dpo
from halo_jax.stages.generate import model_path
from halo_jax.stages.pairs import STORE_NAME

GRAN, PLAIN = "gran_dpo", "diffusion_dpo"


def runs(config) -> dict[str, tuple[str, int, float]]:
    """run name -> (variant, training seed, patch weight), seeds outermost."""
    c = config.compare
    variants = {str(k): float(v) for k, v in dict(c.variants).items()}
    seeds = [int(s) for s in c.seeds]
    if not variants or not seeds:
        raise ConfigError("compare.variants (name -> dpo.loss.patch_weight) and compare.seeds must not be empty, "
                          "e.g. variants={'diffusion_dpo': 0.0, 'gran_dpo': 1.0}, seeds=(0, 1, 2)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare.seeds {seeds} repeats a seed; give distinct training seeds")
    return {f"{v}_s{s}": (v, s, w) for s in seeds for v, w in variants.items()}


def run_config(config, base: Path, pairs: Path, seed: int, patch_weight: float):
    """The train_dpo config of one run: the shared base model and pair store, its own seed and patch weight."""
    sub = config.copy_and_resolve_references()
    sub.seed = seed
    sub.dpo.loss.patch_weight = patch_weight
    sub.dpo.pairs_dir = str(pairs)
    sub.model.path = str(base)
    return sub


def run(config, workdir: str) -> Path:
    if "compare" not in config or "dpo" not in config or "evaluate" not in config:
        raise ConfigError("the compare stage needs config.compare, config.dpo (shapes_dpo_config) and "
                          "config.evaluate (evaluate_config); see configs/shapes_halo.py")
    root = Path(workdir)
    out = root / "compare"
    plan = runs(config)
    base_name = config.evaluate.base
    if base_name in plan:
        raise ConfigError(f"evaluate.base={base_name!r} is also the name of a compare run; rename the base")
    base = model_path(config, workdir)
    pairs = Path(config.dpo.pairs_dir) if config.dpo.pairs_dir else root / STORE_NAME
    folders = {}
    for i, (name, (variant, seed, weight)) in enumerate(plan.items()):
        logging.info("compare: run %d/%d %s (patch_weight %g, seed %d)", i + 1, len(plan), name, weight, seed)
        folders[name] = train_dpo.run(run_config(config, base, pairs, seed, weight), str(out / name))

    ev = config.copy_and_resolve_references()
    ev.evaluate.models = {base_name: str(base), **{n: str(f) for n, f in folders.items()}}
    ev.evaluate.groups = {v: [n for n, (vn, _, _) in plan.items() if vn == v] for v in dict(config.compare.variants)}
    eval_dir = evaluate.run(ev, workdir)
    if distributed.is_main_process():
        metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
        text = results_markdown(metrics, config, plan)
        atomic_write_text(out / "results.md", text)
        print(text)
        logging.info("compare: results in %s", out / "results.md")
    distributed.barrier("compare")
    return out


def targets(models: dict, base_name: str) -> list[tuple[str, bool, str]]:
    """(target, met, the figures) of the module docstring's targets from the metrics of each model and variant;
    empty unless both variants were run."""
    if GRAN not in models or PLAIN not in models:
        return []
    base, gran, plain = models[base_name], models[GRAN], models[PLAIN]
    bd, gd, pd = (m["defect_rate"][OVERALL] for m in (base, gran, plain))
    gs, ps = gran["video_score"][OVERALL], plain["video_score"][OVERALL]
    cut = 1.0 - gd["mean"] / bd["mean"] if bd["mean"] > 0 else 0.0
    return [
        ("Gran-DPO lowers the base's patch defect rate by at least 50%", cut >= 0.5,
         f"{100 * bd['mean']:.1f}% -> {100 * gd['mean']:.1f}% "
         + (f"({100 * cut:.0f}% lower)" if cut >= 0 else f"({-100 * cut:.0f}% higher)")),
        ("Gran-DPO's defect rate is below Diffusion-DPO's, 95% CIs not overlapping", gd["hi"] < pd["lo"],
         f"{format_estimate(gd, True)} vs {format_estimate(pd, True)}"),
        ("Gran-DPO's mean video score is not below Diffusion-DPO's", gs["mean"] >= ps["mean"],
         f"{gs['mean']:.3f} vs {ps['mean']:.3f}"),
    ]


def results_markdown(metrics: dict, config, plan: dict) -> str:
    """The results table (pooled variants, then each run) and the targets, as Markdown for the README."""
    judges = metrics.get("judges", {})
    if not judges:
        return "compare: no judge ran (see evaluate.teacher / evaluate.reward_model); no results table"
    judge = "oracle" if "oracle" in judges else next(iter(judges))
    j = judges[judge]
    aspects = j["aspects"]
    base = metrics["base"]
    variants = list(dict(config.compare.variants))
    order = [base, *variants, *plan]
    header = table_header(aspects, base)
    header.insert(1, "runs")
    runs_of = Counter(v for v, _, _ in plan.values())  # a variant's run count; a single run: 1
    rows = []
    for name in order:
        row = table_row(name, j["models"][name], aspects)
        rows.append([row[0], "-" if name == base else str(runs_of.get(name, 1)), *row[1:]])
    c = config.compare
    lines = [f"Results ({judge} judge; {metrics['units']} held-out (prompt, seed) units per model, "
             f"defect = cell score < {metrics['defect_threshold']:g}; variants pool training seeds {list(c.seeds)}, "
             f"{int(config.dpo.steps)} DPO steps each; {datetime.date.today().isoformat()}, "
             f"{platform.machine()} {os.cpu_count()} CPU threads, platform {jax.default_backend()} "
             f"x{jax.device_count()})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    checks = targets(j["models"], base)
    if checks:
        lines += ["", "| target | met | figures |", "|---|---|---|"]
        lines += [f"| {t} | {'yes' if ok else 'no'} | {fig} |" for t, ok, fig in checks]
    return "\n".join(lines) + "\n"

