"""Stage `evaluate`: base vs aligned Wan models on held-out prompts with the same seeds -> `evaluate/`.

    for each model (config.evaluate.models: name -> diffusers Wan folder; base first):
        for each unit (prompt p, sample k), seed = sample_seed(seed, p, k)  (as `generate`):
            video -> evaluate/{model}/videos/{video_id}.mp4 (or .gif)
            judges (the oracle on shapes-world prompts; the reward model if given; the VLM teacher,
                    e.g. GPT-4o, with evaluate.vlm_judge: a video it gives up on is asked again on a re-run)
                  -> evaluate/{model}/records/{video_id}.json   (written atomically, after the video)
    evaluate/scores.jsonl   every record, merged (one line per video)
    evaluate/metrics.json   per judge, model and aspect: mean video score, patch defect rate,
                            win rate vs the base, each with a paired bootstrap 95% CI (eval/metrics.py)
    evaluate/table.txt      the printed table
    evaluate/report/        index.html + GIFs with the heat map + PNG plots (eval/report.py)
    evaluate/vbench/{model}/{prompt}-{k}.mp4   with `evaluate.vbench` (eval/vbench.py)

Every model sees the same initial noise for a unit, so per-unit scores are paired. Resumable:
a video whose record exists, matches the current settings (model folder, video size, sampler,
prompt, seed) and holds every requested judge is not generated again. Models of one
architecture share one compiled sampler (only the weights change). Multi-host: each process
generates its share of the units on its own devices (`generate.sampling_mesh`: weights
replicated unless `config.mesh` fixes fsdp/tensor sizes, so a unit's video is the same on any
number of processes and devices); process 0 merges, computes the metrics and writes the report.

Prompts: `evaluate.prompts` / `prompts_file` / `shapes_split` (default "heldout"), the first
`num_prompts`, or with `prompt_selection = "spread"` that many evenly spaced over the list.

Default models (empty `evaluate.models`): "base" = `config.model.path` or WORKDIR/base_ckpt,
plus WORKDIR/dpo_ckpt when a train_dpo stage exported it, named "diffusion_dpo" when its
`halo_dpo.json` records `loss.patch_weight == 0`, else "gran_dpo". A path may contain
"{workdir}", replaced by the run's workdir. `evaluate.groups` (name -> models) adds pooled rows:
per unit, the mean of the members' values (one recipe trained with several seeds).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path

import numpy as np
from absl import logging
from flax import nnx

from halo_jax.config import ConfigError
from halo_jax.data import shapes
from halo_jax.data.stores import RolloutRecord
from halo_jax.data.video_io import write_gif, write_mp4
from halo_jax.eval import metrics as metrics_lib
from halo_jax.eval.metrics import compute_metrics, format_table
from halo_jax.io import atomic_write_text
from halo_jax.models.wan.pipeline import Generator, load_pipeline
from halo_jax.parallel import distributed
from halo_jax.stages.generate import model_path, resolve_prompts, sample_seed, sampling_mesh
from halo_jax.train.metrics import Progress

ORACLE, REWARD, VLM = "oracle", "reward_model", "openai_vlm"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------- what to evaluate


def resolve_models(config, workdir: str) -> dict[str, Path]:
    """name -> folder, the base first (module docstring); every folder must be a diffusers Wan folder."""
    e = config.evaluate
    base = e.base
    if e.models:
        models = {str(k): Path(str(v).replace("{workdir}", str(workdir))) for k, v in dict(e.models).items()}
        if base not in models:
            raise ConfigError(f"evaluate.base={base!r} is not one of evaluate.models {sorted(models)}; name the base "
                              "model there or set evaluate.base")
    else:
        models = {base: model_path(config, workdir)}
        aligned = Path(workdir) / "dpo_ckpt"
        if (aligned / "model_index.json").exists():
            models[aligned_name(aligned)] = aligned
    for name, path in models.items():
        if not _NAME.match(name):
            raise ConfigError(f"evaluate model name {name!r} must be letters, digits, '_', '-' or '.' (it names a "
                              "folder)")
        if not (path / "model_index.json").exists():
            raise ConfigError(f"evaluate model {name!r}: {path} is not a diffusers Wan folder (no model_index.json); "
                              "point evaluate.models at a base_ckpt/ or dpo_ckpt/ folder")
    return {base: models[base], **{k: models[k] for k in sorted(models) if k != base}}


def check_groups(section, models: dict[str, Path]) -> None:
    """`evaluate.groups` (name -> member models, pooled in the metrics), checked before any video is made."""
    try:
        metrics_lib.check_groups(dict(section.groups), list(models), section.base)
    except ValueError as e:
        raise ConfigError(f"evaluate.groups: {e}") from None


def aligned_name(folder: Path) -> str:
    """"diffusion_dpo" or "gran_dpo" from a train_dpo export's halo_dpo.json (patch_weight 0 or not)."""
    try:
        info = json.loads((folder / "halo_dpo.json").read_text())
        return "diffusion_dpo" if float(info["loss"]["patch_weight"]) == 0.0 else "gran_dpo"
    except (OSError, KeyError, TypeError, ValueError):
        return "aligned"


def select_prompts(section) -> list[str]:
    """The prompts, as `generate.resolve_prompts`; with `prompt_selection = "spread"`, `num_prompts` of them evenly
    spaced over the whole list (held-out shapes prompts are ordered by colour and shape: the first N are alike)."""
    if section.prompt_selection not in ("first", "spread"):
        raise ConfigError(f"evaluate.prompt_selection must be 'first' or 'spread', got {section.prompt_selection!r}")
    n = int(section.num_prompts)
    if section.prompt_selection == "first" or n <= 0:
        return list(resolve_prompts(section))
    everything = section.copy_and_resolve_references()
    everything.num_prompts = 0
    prompts = resolve_prompts(everything)
    if n >= len(prompts):
        return list(prompts)
    return [prompts[i] for i in np.round(np.linspace(0, len(prompts) - 1, n)).astype(int)]


def judge_names(section, prompts: list[str]) -> list[str]:
    """The judges to run: the oracle (teacher "oracle", or "auto" with only shapes-world prompts), the reward model,
    the OpenAI-compatible VLM teacher of `config.label.openai` (GPT-4o) with `evaluate.vlm_judge`."""
    if section.teacher not in ("auto", "oracle", "none"):
        raise ConfigError(f"evaluate.teacher must be 'auto', 'oracle' or 'none', got {section.teacher!r}")
    judges = []
    if section.teacher != "none":
        bad = []
        for p in prompts:
            try:
                shapes.parse_prompt(p)
            except shapes.PromptError:
                bad.append(p)
        if not bad:
            judges.append(ORACLE)
        elif section.teacher == "oracle":
            raise ConfigError(f"evaluate.teacher='oracle' judges moving-shapes prompts only; {bad[0]!r} is not one "
                              "(use evaluate.teacher='auto' or 'none', or a reward model)")
    if section.reward_model:
        judges.append(REWARD)
    if section.vlm_judge:
        judges.append(VLM)
    return judges


def settings_key(path: Path, config) -> str:
    """A hash of everything a video depends on besides its prompt and seed."""
    v, s = config.video, config.sampler
    info = {"path": str(path.resolve()), "video": [int(v.frames), int(v.height), int(v.width)],
            "steps": int(s.num_steps), "guidance": float(s.guidance_scale), "negative": s.negative_prompt,
            "options": {k: str(x) for k, x in dict(config.model.options).items()}}
    return hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=None))


# ----------------------------------------------------------------------------- judges


class Judges:
    """The oracle and/or the reward model over a batch of videos -> {judge: entry} per video."""

    def __init__(self, config, names: list[str], batch_size: int, mesh=None):
        self.names = names
        self.mesh = mesh if mesh is not None else sampling_mesh(config)  # the reward model's devices
        self.ids: dict[str, dict] = {}
        if ORACLE in names:
            from halo_jax.teachers.oracle import ORACLE_VERSION, OracleTeacher

            self.oracle = OracleTeacher(aspects=tuple(config.aspects), grid=tuple(config.grid))
            self.ids[ORACLE] = {"version": ORACLE_VERSION, "aspects": list(config.aspects), "grid": list(config.grid)}
        if REWARD in names:
            path = Path(config.evaluate.reward_model)
            if not (path / "config.json").exists():
                raise ConfigError(f"evaluate.reward_model {path} is not a reward-model export (no config.json); "
                                  "pass the reward_ckpt/ folder train_reward wrote, or '' to skip")
            self.reward_path, self.rules, self.batch_size = path, config.sharding.rules, batch_size
            self.scorer = None  # loaded on first use: a resumed run with nothing to judge never loads it
            self.ids[REWARD] = {"path": str(path.resolve())}
        if VLM in names:
            from halo_jax.stages.label import vlm_teacher

            if "label" not in config:
                raise ConfigError("evaluate.vlm_judge needs config.label (halo_jax.config.label_config()): its "
                                  "`openai` section names the model, endpoint and API-key variable")
            self.vlm = vlm_teacher(config)
            self.vlm_concurrency = max(1, int(config.label.concurrency))
            self.ids[VLM] = {"model": self.vlm.model, "prompt_version": self.vlm.prompt_version,
                             "base_url": self.vlm.config.base_url, "aspects": list(config.aspects),
                             "grid": list(config.grid)}

    def _load_reward(self) -> None:
        from halo_jax.reward.model_io import load_reward_model
        from halo_jax.reward.scorer import Scorer

        local = self.mesh
        loaded = load_reward_model(self.reward_path, local, self.rules)
        self.clip = loaded.info.get("info", {}).get("clip")
        self.scorer = Scorer(loaded.model, loaded.tokenizer, loaded.text_max_length, self.batch_size, mesh=local,
                             rules=self.rules)
        cfg = loaded.model.config
        self.reward_aspects, self.reward_grid = list(cfg.aspects), list(cfg.grid)

    async def _vlm_labels(self, frames: np.ndarray, prompts: list[str], video_ids: list[str]) -> list:
        """The VLM teacher's records (or the exception it gave up with), `vlm_concurrency` requests in flight."""
        gate = asyncio.Semaphore(self.vlm_concurrency)

        async def one(fr, prompt, vid):
            async with gate:
                return await self.vlm.alabel(fr, prompt, vid)

        try:
            return await asyncio.gather(*(one(f, p, v) for f, p, v in zip(frames, prompts, video_ids)),
                                        return_exceptions=True)
        finally:
            await self.vlm.aclose()

    def judge(self, frames: np.ndarray, prompts: list[str], video_ids: list[str] | None = None) -> list[dict]:
        """{judge: entry} per video. A video the VLM teacher gives up on gets no VLM entry (logged): its record
        stays incomplete, so a re-run of the stage asks again for that video only."""
        out = [{} for _ in prompts]
        if ORACLE in self.names:
            for o, fr, p in zip(out, frames, prompts):
                label = self.oracle.label(fr, p, "eval")
                o[ORACLE] = {"id": self.ids[ORACLE], "aspects": label["aspects"], "grid": label["grid"],
                             "video_scores": label["video_scores"], "patch_scores": label["patch_scores"]}
        if REWARD in self.names:
            from halo_jax.reward.data import fit_clip

            if self.scorer is None:
                self._load_reward()
            clips = [fit_clip(f, self.clip) if self.clip else f for f in frames]
            res = self.scorer.score(clips, prompts)
            for o, v, pt in zip(out, res["video"], res["patch"]):
                o[REWARD] = {"id": self.ids[REWARD], "aspects": self.reward_aspects, "grid": self.reward_grid,
                             "video_scores": {a: round(float(x), 4) for a, x in zip(self.reward_aspects, v)},
                             "patch_scores": {a: np.round(pt[i].astype(np.float64), 4).tolist()
                                              for i, a in enumerate(self.reward_aspects)}}
        if VLM in self.names:
            from halo_jax.teachers.base import LabelFailure

            ids = video_ids or [f"video-{i}" for i in range(len(prompts))]
            for o, label, vid in zip(out, asyncio.run(self._vlm_labels(frames, prompts, ids)), ids):
                if isinstance(label, LabelFailure):
                    logging.warning("evaluate: the VLM judge gave up on %s (%s): %s", vid, label.kind, label.reason)
                    continue
                if isinstance(label, BaseException):
                    raise label
                o[VLM] = {"id": self.ids[VLM], "aspects": label["aspects"], "grid": label["grid"],
                          "video_scores": label["video_scores"], "patch_scores": label["patch_scores"],
                          "usage": label.get("usage", {})}
        return out

    def complete(self, record: dict) -> bool:
        return all(record.get("judges", {}).get(n, {}).get("id") == self.ids[n] for n in self.names)


# ----------------------------------------------------------------------------- sampling


class SharedSampler:
    """A `Generator` reused across models of one architecture: same DiT/VAE structure, scheduler and
    video size -> the compiled sampling and decoding are kept and only the weights are swapped."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.gen: Generator | None = None
        self.key = None
        self.compiled = 0  # Generators built (each compiles its sampler once per batch shape)

    def for_pipeline(self, pipe) -> Generator:
        key = (nnx.graphdef(pipe.transformer), nnx.graphdef(pipe.vae),
               json.dumps(pipe.scheduler_config, sort_keys=True))
        gen = self.gen
        if gen is not None and key == self.key and hasattr(gen, "_state") and hasattr(gen, "_vae_state"):
            gen.pipe = pipe
            gen._state = nnx.state(pipe.transformer)
            gen._vae_state = nnx.state(pipe.vae)
            return gen
        self.gen, self.key = Generator(pipe, **self.kwargs), key
        self.compiled += 1
        return self.gen


# ----------------------------------------------------------------------------- the stage


def run(config, workdir: str) -> Path:
    if "evaluate" not in config or "video" not in config or "sampler" not in config:
        raise ConfigError("the evaluate stage needs config.evaluate (halo_jax.config.evaluate_config()) and the "
                          "model, video and sampler sections (generate_config(config))")
    e = config.evaluate
    out = Path(workdir) / "evaluate"
    prompts = select_prompts(e)
    models = resolve_models(config, workdir)
    check_groups(e, models)
    names = judge_names(e, prompts)
    seed = int(config.seed) if int(e.seed) < 0 else int(e.seed)
    units = [(p, k) for p in range(len(prompts)) for k in range(int(e.samples_per_prompt))]
    if not units:
        raise ConfigError("evaluate: no (prompt, sample) units; set evaluate.num_prompts and samples_per_prompt >= 1")
    if e.video_format not in ("mp4", "gif"):
        raise ConfigError(f"evaluate.video_format must be 'mp4' or 'gif', got {e.video_format!r}")
    mine = distributed.process_share(units)
    batch = max(1, min(int(e.batch_size), len(mine) or 1))  # one batch shape for the whole run
    # This process's devices, as `generate` samples: the videos (and reward scores) of a unit do not
    # depend on how many processes or local devices the run has.
    local = sampling_mesh(config)
    judges = Judges(config, names, batch, mesh=local)
    v = config.video
    sampler = SharedSampler(frames=v.frames, height=v.height, width=v.width, num_steps=config.sampler.num_steps,
                            guidance_scale=config.sampler.guidance_scale,
                            negative_prompt=config.sampler.negative_prompt)

    plan = {}
    for name, path in models.items():
        key = settings_key(path, config)
        todo = []
        for p, k in mine:
            vid = RolloutRecord.make_id(p, k)
            rec = _read_json(out / name / "records" / f"{vid}.json")
            ok = (rec is not None and rec.get("settings") == key and rec.get("prompt") == prompts[p]
                  and rec.get("seed") == sample_seed(seed, p, k) and (out / rec.get("video", "-")).is_file()
                  and judges.complete(rec))
            if not ok:
                todo.append((p, k))
        plan[name] = (path, key, todo)
    total = len(mine) * len(models)
    progress = Progress(total, "evaluate", start=total - sum(len(t) for _, _, t in plan.values()), unit="video")
    generated = 0
    for name, (path, key, todo) in plan.items():
        if not todo:
            continue
        pipe = load_pipeline(path, mesh=local, rules=config.sharding.rules, **dict(config.model.options))
        gen = sampler.for_pipeline(pipe)
        for start in range(0, len(todo), batch):
            items = todo[start:start + batch]
            padded = items + [items[0]] * (batch - len(items))  # keep one batch shape: one compile
            seeds = [sample_seed(seed, p, k) for p, k in padded]
            _, frames = gen.generate([prompts[p] for p, _ in padded], seeds)
            frames = frames[:len(items)]
            verdicts = judges.judge(frames, [prompts[p] for p, _ in items],
                                    [f"{name}/{RolloutRecord.make_id(p, k)}" for p, k in items])
            for (p, k), fr, verdict in zip(items, frames, verdicts):
                vid = RolloutRecord.make_id(p, k)
                rel = f"{name}/videos/{vid}.{e.video_format}"
                (write_mp4 if e.video_format == "mp4" else write_gif)(out / rel, fr, fps=float(e.fps))
                _write_json(out / name / "records" / f"{vid}.json", {
                    "model": name, "video_id": vid, "prompt": prompts[p], "prompt_index": p, "sample_index": k,
                    "seed": sample_seed(seed, p, k), "video": rel, "settings": key, "judges": verdict})
            generated += len(items)
            progress.update(len(items))
        del pipe
    distributed.barrier("evaluate-generate")
    if distributed.is_main_process():
        finish(config, out, models, prompts, units, names, generated)
    distributed.barrier("evaluate")
    return out


def vlm_usage(records: list[dict]) -> dict:
    """The VLM judge's summed usage (tokens, requests, USD) over the verdicts in `records`."""
    total: dict[str, float] = {}
    for r in records:
        for k, v in r["judges"].get(VLM, {}).get("usage", {}).items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    return total


def collect(out: Path, models: dict[str, Path], units: list[tuple[int, int]]) -> list[dict]:
    """Every unit's record of every model (all processes' shares), in model then unit order."""
    records = []
    for name in models:
        for p, k in units:
            path = out / name / "records" / f"{RolloutRecord.make_id(p, k)}.json"
            rec = _read_json(path)
            if rec is None:
                raise RuntimeError(f"evaluate: {path} is missing or unreadable after generation; re-run the stage")
            records.append(rec)
    return records


def finish(config, out: Path, models: dict[str, Path], prompts: list[str], units: list[tuple[int, int]],
           judge_list: list[str], generated: int) -> dict:
    """Merge the records, compute and print the metrics, write the report and the VBench export."""
    e = config.evaluate
    base = e.base
    records = collect(out, models, units)
    unjudged = [f"{r['model']}/{r['video_id']}" for r in records if not all(j in r["judges"] for j in judge_list)]
    if unjudged:
        raise RuntimeError(f"evaluate: {len(unjudged)} videos lack a judge's verdict (e.g. {unjudged[:3]}; the log "
                           "says why the teacher gave up); re-run the stage: it asks again for those videos only")
    atomic_write_text(out / "scores.jsonl",
                      "".join(json.dumps({k: v for k, v in r.items() if k != "settings"}) + "\n" for r in records))
    metrics = {"models": {n: str(p) for n, p in models.items()}, "base": base, "prompts": prompts,
               "samples_per_prompt": int(e.samples_per_prompt),
               "seed": int(config.seed) if int(e.seed) < 0 else int(e.seed),
               "video": dict(config.video), "sampler": dict(config.sampler), "judges_run": judge_list,
               **({"vlm_usage": vlm_usage(records)} if VLM in judge_list else {}),
               "generated_this_run": generated}
    if judge_list:
        metrics.update(compute_metrics(records, list(models), base, threshold=float(config.defect_threshold),
                                       resamples=int(e.bootstrap), seed=int(e.bootstrap_seed),
                                       groups={g: list(m) for g, m in dict(e.groups).items()}))
        table = format_table(metrics, base)
    else:
        table = "evaluate: no judge ran (evaluate.teacher='none' and no evaluate.reward_model): videos only"
    _write_json(out / "metrics.json", metrics)
    (out / "table.txt").write_text(table + "\n", encoding="utf-8")
    print(table)
    if e.vbench:
        from halo_jax.eval.vbench import export_videos

        vdir = Path(e.vbench_dir) if e.vbench_dir else out / "vbench"
        for name in models:
            items = [(r["prompt"], r["sample_index"], _mp4_or_frames(out, r, float(e.fps)))
                     for r in records if r["model"] == name]
            export_videos(vdir / name, items, fps=float(e.fps))
        print(f"evaluate: VBench-named videos in {vdir}/<model>/ (run VBench with --mode=custom_input)")
    if e.report:
        from halo_jax.eval.report import write_report

        train = {n: Path(str(p).replace("{workdir}", str(out.parent))) for n, p in dict(e.train_metrics).items()}
        for name, path in models.items():
            guess = path.parent / "dpo" / "metrics.jsonl"
            if name != base and name not in train and guess.exists():
                train[name] = guess
        heat = e.heatmap_judge if e.heatmap_judge != "auto" else (judge_list[0] if judge_list else "")
        if heat and heat not in judge_list:
            raise ConfigError(f"evaluate.heatmap_judge={heat!r} did not run; choose one of {judge_list} or 'auto'")
        index = write_report(out, records, metrics, models=list(models), base=base, heat_judge=heat or None,
                             report_prompts=int(e.report_prompts), report_sample=int(e.report_sample),
                             train_metrics=train, threshold=float(config.defect_threshold), fps=float(e.fps))
        print(f"evaluate: report {index}")
    return metrics


def _mp4_or_frames(out: Path, record: dict, fps: float):
    path = out / record["video"]
    if path.suffix == ".mp4":
        return path
    from halo_jax.data.video_io import read_gif

    return read_gif(path)
