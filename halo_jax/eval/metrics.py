"""Per-video evaluation records -> metrics per judge, model and aspect, and the printed table.

A record (one line of `evaluate/scores.jsonl`) is one video of one model:

    {"model", "video_id", "prompt", "prompt_index", "sample_index", "seed", "video",
     "judges": {judge: {"aspects": [...], "grid": [Tp, Hp, Wp],
                        "video_scores": {aspect: float}, "patch_scores": {aspect: (Tp, Hp, Wp) lists}}}}

For each judge (the oracle, the reward model) and model, over the units (prompt index,
sample index) every model has:

    video_score[a]  mean video score of aspect a; "overall": of the mean over aspects
    defect_rate[a]  fraction of cells with score < threshold; "overall": cells whose mean
                    over aspects is < threshold (DESIGN section 4)
    win_rate[a]     (aligned models) P(model's score > base's on the same unit), ties 1/2;
                    "overall" compares the mean over aspects

each with a paired bootstrap 95% CI (`stats.py`). A group of models (e.g. one recipe trained
with several seeds) gets the same metrics from the per-unit mean of its members' values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from halo_jax.eval.stats import Estimate, bootstrap_indices, bootstrap_mean, defect_fraction, win_indicator

OVERALL = "overall"
SHORT = {"visual_quality": "VQ", "temporal_consistency": "TC", "text_alignment": "TA"}


def unit_of(record: dict) -> tuple[int, int]:
    return int(record["prompt_index"]), int(record["sample_index"])


def judge_arrays(records: Sequence[dict], judge: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(aspects, video scores (n, A), cell scores (n, A, Tp, Hp, Wp)) of one judge over `records`."""
    aspects = list(records[0]["judges"][judge]["aspects"])
    video, patch = [], []
    for r in records:
        j = r["judges"].get(judge)
        if j is None or list(j["aspects"]) != aspects:
            raise ValueError(f"video {r['model']}/{r['video_id']} has no {judge!r} scores over aspects {aspects}; "
                             "delete its record under evaluate/ so the stage judges it again")
        video.append([j["video_scores"][a] for a in aspects])
        patch.append([j["patch_scores"][a] for a in aspects])
    return aspects, np.asarray(video, np.float64), np.asarray(patch, np.float64)


def paired_records(records: Sequence[dict], models: Sequence[str]) -> tuple[list[tuple[int, int]], dict[str, list]]:
    """The units of the first model and, per model, its records in that unit order (all must be present)."""
    by_model: dict[str, dict[tuple[int, int], dict]] = {m: {} for m in models}
    for r in records:
        if r["model"] in by_model:
            by_model[r["model"]][unit_of(r)] = r
    units = sorted(by_model[models[0]])
    if not units:
        raise ValueError(f"no evaluation records for model {models[0]!r}")
    for m in models:
        missing = [u for u in units if u not in by_model[m]]
        if missing:
            raise ValueError(f"model {m!r} has no video for (prompt, sample) {missing[:5]} that {models[0]!r} has; "
                             "re-run the evaluate stage to finish it")
    return units, {m: [by_model[m][u] for u in units] for m in models}


def unit_values(video: np.ndarray, patch: np.ndarray, base_video: np.ndarray | None, aspects: Sequence[str],
                threshold: float) -> dict[str, dict[str, np.ndarray]]:
    """Per-unit values of one model: {"video_score" | "defect_rate" | "win_rate" (when `base_video` is given):
    {aspect | OVERALL: (n,)}} from video scores (n, A) and cell scores (n, A, *grid) (module docstring)."""
    values = {"video_score": {a: video[:, i] for i, a in enumerate(aspects)},
              "defect_rate": {a: defect_fraction(patch[:, i], threshold) for i, a in enumerate(aspects)}}
    values["video_score"][OVERALL] = video.mean(axis=1)
    values["defect_rate"][OVERALL] = defect_fraction(patch.mean(axis=1), threshold)
    if base_video is not None:
        values["win_rate"] = {a: win_indicator(video[:, i], base_video[:, i]) for i, a in enumerate(aspects)}
        values["win_rate"][OVERALL] = win_indicator(video.mean(axis=1), base_video.mean(axis=1))
    return values


def check_groups(groups: Mapping[str, Sequence[str]], models: Sequence[str], base: str) -> None:
    """ValueError unless every group has members, all evaluated models other than `base`, and no group is
    named like a model."""
    for g, members in groups.items():
        if g in models or not members or any(m not in models or m == base for m in members):
            raise ValueError(f"group {g!r}: members {list(members)} must be evaluated models other than the base "
                             f"{base!r}, and the group's name must not be a model's (models: {list(models)})")


def compute_metrics(records: Sequence[dict], models: Sequence[str], base: str, *, threshold: float,
                    resamples: int = 1000, seed: int = 0, level: float = 0.95,
                    groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """`{"units", "bootstrap", "judges": {judge: {"aspects", "models": {model: {metric: {aspect: Estimate
    dict}}}}}}` (module docstring); `models` lists the base first or anywhere, `base` names it.

    `groups` (name -> member models, e.g. one training recipe's runs with different seeds) adds one
    entry per group whose per-unit value is the mean of its members' per-unit values (a unit's
    defect rate, say, averaged over the training seeds), bootstrapped over the same units.
    """
    if base not in models:
        raise ValueError(f"base model {base!r} is not among the evaluated models {list(models)}")
    groups = {str(g): list(m) for g, m in (groups or {}).items()}
    check_groups(groups, models, base)
    order = [base] + [m for m in models if m != base]
    units, paired = paired_records(records, order)
    idx = bootstrap_indices(len(units), resamples, seed)
    judges = sorted(set.intersection(*(set(r["judges"]) for m in order for r in paired[m])))
    out = {"units": len(units), "defect_threshold": float(threshold),
           "bootstrap": {"resamples": int(resamples), "seed": int(seed), "level": level, "unit": "(prompt, seed)"},
           "judges": {}}
    if groups:
        out["groups"] = groups
    for judge in judges:
        arrays = {m: judge_arrays(paired[m], judge) for m in order}
        aspects = arrays[base][0]
        for m in order:
            if arrays[m][0] != aspects:
                raise ValueError(f"judge {judge!r} scored {m!r} over aspects {arrays[m][0]} but {base!r} over "
                                 f"{aspects}; re-judge with one set of aspects")
        base_video = arrays[base][1]
        values = {m: unit_values(arrays[m][1], arrays[m][2], None if m == base else base_video, aspects, threshold)
                  for m in order}
        for g, members in groups.items():
            values[g] = {metric: {a: np.mean([values[m][metric][a] for m in members], axis=0) for a in by_aspect}
                         for metric, by_aspect in values[members[0]].items()}
        result = {m: {metric: {a: bootstrap_mean(x, idx, level).to_dict() for a, x in by_aspect.items()}
                      for metric, by_aspect in v.items()} for m, v in values.items()}
        out["judges"][judge] = {"aspects": aspects, "grid": paired[base][0]["judges"][judge].get("grid"),
                                "models": result}
    return out


def format_estimate(e: dict, percent: bool = False) -> str:
    """"mean [lo, hi]" of an Estimate dict, as a score (2 decimals) or a percentage (1 decimal)."""
    f = (lambda x: f"{100 * x:.1f}") if percent else (lambda x: f"{x:.2f}")
    return f"{f(e['mean'])} [{f(e['lo'])}, {f(e['hi'])}]" + ("%" if percent else "")


def table_header(aspects: Sequence[str], base: str) -> list[str]:
    return ["model", "score [95% CI]", *(SHORT.get(a, a[:8]) for a in aspects), "defects [95% CI]",
            f"win vs {base} [95% CI]"]


def table_row(name: str, e: dict, aspects: Sequence[str]) -> list[str]:
    """One model's row of `table_header`: overall score, per-aspect means, defect rate, win rate ("-" for the base)."""
    win = format_estimate(e["win_rate"][OVERALL], percent=True) if "win_rate" in e else "-"
    return [name, format_estimate(e["video_score"][OVERALL]), *(f"{e['video_score'][a]['mean']:.2f}" for a in aspects),
            format_estimate(e["defect_rate"][OVERALL], percent=True), win]


def format_table(metrics: dict, base: str) -> str:
    """A compact text table per judge: overall score, per-aspect means, defect rate, win rate vs base."""
    lines = []
    for judge, j in metrics["judges"].items():
        header = table_header(j["aspects"], base)
        rows = [table_row(m, e, j["aspects"]) for m, e in j["models"].items()]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines.append(f"{judge}: {metrics['units']} (prompt, seed) units per model; defect = cell score < "
                     f"{metrics['defect_threshold']:g}; scores in [1, 5]")
        for r in [header, *rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def estimate(d: dict) -> Estimate:
    return Estimate(d["mean"], d["lo"], d["hi"], d["n"])
