"""Stage `train_reward`: the video reward model, then continued into the patch reward model.

    data     labels/ + rollouts/ (the label stage), synthetic shapes videos (oracle labels,
             cached in reward/synthetic/), a VideoFeedback-layout set; bad labels rejected
             (reward/bad_labels.json); prompts held out for evaluation (reward/split.json)
    phase 0  optional (reward.phase0.steps > 0): the towers' video-text matching (SigLIP's sigmoid
             loss, `RewardModel.match_logits`) on the videos that show their prompt, for towers
             trained from scratch (reward/phase0/; held-out top-1 prompt retrieval and AUROC)
    phase 1  video head (+ what the tuning modes unfreeze): regression and/or Bradley-Terry
             (reward/phase1/: checkpoints, metrics, model/)
    phase 2  from phase 1's weights, the patch head joins: video loss + patch regression +
             consistency (reward/phase2/)
    eval     after each phase, on the held-out prompts: reward/eval_phase{1,2}.json + a table
    export   reward_ckpt/ (`halo_jax.reward.model_io.load_reward_model`)

The maths lives in `halo_jax.reward` (data, losses, metrics, model_io, scorer); this module
wires it to the train loop. Resumable: a phase is finished when its `done.json` records the
configured step count; otherwise it resumes from its latest checkpoint (a killed run goes on
at the right step of the right phase; raising `phaseN.steps` extends a finished phase).
Phase 2 remembers the phase-1 step count it started from and refuses to continue from
another one.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import logging
from flax import nnx

from halo_jax.config import ConfigError
from halo_jax.data import shapes
from halo_jax.models.reward import trainable_filter
from halo_jax.models.reward.matching import match_cosines
from halo_jax.parallel import distributed, mesh as mesh_lib
from halo_jax.parallel.sharding import batch_sharding
from halo_jax.reward import data as rdata
from halo_jax.reward.losses import LossWeights, make_loss_fn
from halo_jax.reward.metrics import evaluate_predictions, format_report
from halo_jax.reward.model_io import (
    create_model,
    dtype_of,
    load_reward_model,
    make_tokenizer,
    model_config,
    save_reward_model,
    tokenize,
)
from halo_jax.reward.scorer import Scorer
from halo_jax.stages.score import config_aspect_weights
from halo_jax.train.optim import make_optimizer
from halo_jax.train import state as state_lib
from halo_jax.train.checkpoint import Checkpointer
from halo_jax.train.loop import train_loop
from halo_jax.train.metrics import MetricsWriter, Progress

BATCH_NDIMS = {"frames": 5, "input_ids": 2, "text_mask": 2, "video_scores": 2, "patch_scores": 5, "has_patch": 1,
               "valid": 1, "group": 1, "video_key": 1}
NEGATIVE_NDIMS = {"negative_ids": 3, "negative_mask": 3, "negative_group": 2, "negative_valid": 2}  # phase 0's


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


MATCHING_ONLY = ("logit_scale", "logit_bias")  # used by the matching logits alone
MATCHING_PARAMS = ("vision", "text", "proj_in", "difference_embedding", "pixel_mlp", "conv_stem",
                   "text_proj", *MATCHING_ONLY)


def phase_filter(cfg, phase: int):
    """Of what `trainable_filter` selects: phase 0 trains the towers, their projections and the matching
    logits' scale and bias; phase 1 everything but the patch head and that scale and bias; phase 2 adds
    the patch head."""
    base = trainable_filter(cfg)

    def keep(path, var) -> bool:
        head = str(path[0])
        if phase == 0:
            return base(path, var) and head in MATCHING_PARAMS
        return base(path, var) and head not in MATCHING_ONLY and (phase == 2 or head != "patch_head")

    return keep


def adopt_phase_weights(model, trained, phase: int, folder: Path):
    """`model` (built from the current config) with the parameters of a finished phase's export copied in.

    The run continues with the current config, as if the phase had just run in it: a model option that
    changes no trained shape (clip_scores, match_features, tuning modes) takes effect in the next phase.
    Parameters the phase did not train keep the current model's values where their shapes differ; a
    trained parameter without a same-shaped place in the current model is a ConfigError."""
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    trained_here = phase_filter(trained.config, phase)
    keep = []
    for path, var in nnx.to_flat_state(nnx.state(trained, nnx.Param)):
        mine = ours.get(path)
        if mine is not None and mine[...].shape == var[...].shape:
            keep.append((path, var))
        elif trained_here(path, var):
            name = ".".join(map(str, path))
            raise ConfigError(f"{folder}: phase {phase} trained {name} of shape {var[...].shape}, which the model of "
                              f"the current config {'lacks' if mine is None else f'has as {mine[...].shape}'}; restore "
                              f"the reward.model settings of that run, or delete {folder} to train phase {phase} again")
    nnx.update(model, nnx.from_flat_state(keep))
    return model


def continues_from(r, phase: int) -> dict:
    """{"phaseQ_steps": steps} of the earlier phases this phase starts from (phase 0 only when it runs)."""
    return {f"phase{q}_steps": int(r[f"phase{q}"].steps) for q in range(phase) if q > 0 or int(r.phase0.steps) > 0}


def negative_attributes(section) -> tuple[str, ...]:
    """`reward.phase0.negative_attributes`, checked: attribute names of `shapes.ATTRIBUTES`, at least one."""
    names = tuple(section.negative_attributes)
    wrong = [a for a in names if a not in shapes.ATTRIBUTES]
    if wrong or not names:
        raise ConfigError(f"reward.phase0.negative_attributes={names} must name one or more of {shapes.ATTRIBUTES} "
                          f"(repeats allowed), e.g. \"--config.reward.phase0.negative_attributes=('shape','shape')\"")
    return names


def check_continuations(r, root: Path, keep: int) -> None:
    """Before anything trains: a started phase (a checkpoint in reward/phaseP/ckpt) must continue the earlier
    phases as configured now; a changed step count of one of them is a ConfigError naming the folder to delete."""
    for phase in (1, 2):
        folder = root / f"phase{phase}"
        if not (folder / "ckpt").exists():
            continue
        ckpt = Checkpointer(folder / "ckpt", keep=keep, handle_sigterm=False)
        extra = ckpt.extra()
        ckpt.close()
        for k, v in continues_from(r, phase).items():
            if extra is not None and extra.get(k) != v:
                earlier = k.removesuffix("_steps").replace("phase", "phase ")
                raise ConfigError(f"{folder} continues a {earlier} of {extra.get(k)} steps, but {earlier} now has "
                                  f"{v}; delete {folder} to train phase {phase} again from the new {earlier}")


# ----------------------------------------------------------------------------- data


def _synthetic(config, root: Path, clip: tuple, aspects: tuple, grid: tuple):
    """Render + label this process's share of the synthetic videos (cached), then read them all."""
    from halo_jax.data.stores import StoreReader

    r = config.reward
    s = r.synthetic
    folder = root / "synthetic"
    plan = {"seed": int(s.seed), "videos_per_prompt": int(s.videos_per_prompt), "max_defects": int(s.max_defects),
            "kinds": list(s.kinds), "mismatch_fraction": float(s.mismatch_fraction), "clip": list(clip),
            "grid": list(grid), "aspects": list(aspects)}
    if s.mismatch_pairs:  # only when on, so caches made before the option existed still match
        plan["mismatch_pairs"] = True
    stored = _read_json(folder / "plan.json")
    if stored is not None and stored != plan:
        raise ConfigError(f"{folder} was made with {stored}, the config now asks for {plan}; delete {folder} to "
                          "render the synthetic videos again, or restore the settings")
    if distributed.is_main_process() and stored is None:
        rdata.write_json(folder / "plan.json", plan)
    distributed.barrier("train_reward-synthetic-plan")
    share = len(distributed.process_share(range(r.synthetic_videos)))
    progress = Progress(share, "train_reward/synthetic", unit="video")
    written, failures = rdata.synthesize(
        folder, r.synthetic_videos, seed=s.seed, clip_shape=clip, grid=grid, aspects=aspects,
        videos_per_prompt=s.videos_per_prompt, max_defects=s.max_defects, kinds=tuple(s.kinds) or None,
        mismatch_fraction=float(s.mismatch_fraction), mismatch_pairs=bool(s.mismatch_pairs),
        process_index=jax.process_index(), process_count=jax.process_count(), chunk_size=s.chunk_size,
        progress=progress.update)
    if written:
        logging.info("train_reward: %d synthetic videos rendered and labelled in %s", written, folder)
    distributed.barrier("train_reward-synthetic")
    reader = StoreReader(folder, on_corrupt="skip")
    wanted = {vid for vid, _, _ in rdata.synthetic_plan(r.synthetic_videos, s.seed, s.videos_per_prompt)}
    return reader, wanted, failures


def gather_examples(config, workdir: str, root: Path) -> tuple[list, dict, rdata.BadLabels]:
    """Every labelled example of the configured sources, the frame readers, and the rejected labels."""
    from halo_jax.data.label_store import read_labels
    from halo_jax.data.stores import StoreReader

    r = config.reward
    aspects, grid = tuple(config.aspects), tuple(int(g) for g in config.grid)
    clip = (int(r.video.frames), int(r.video.height), int(r.video.width))
    if r.on_bad_label not in rdata.ON_BAD_LABEL:
        raise ConfigError(f"reward.on_bad_label={r.on_bad_label!r}; choose one of {rdata.ON_BAD_LABEL}")
    bad = rdata.BadLabels()
    examples: list = []
    readers: dict = {}
    labels_dir, rollouts_dir = Path(workdir) / "labels", Path(workdir) / "rollouts"
    try:
        if r.use_labels and labels_dir.is_dir():
            if not (rollouts_dir / "store.json").exists():
                raise ConfigError(f"labels in {labels_dir} but no rollout store at {rollouts_dir}: the frames are "
                                  "missing; run the generate stage or set reward.use_labels=False")
            reader = StoreReader(rollouts_dir, on_corrupt="skip")
            readers["labels"] = reader
            examples += rdata.examples_from_labels(read_labels(labels_dir), reader, aspects, grid, bad, r.on_bad_label)
        if r.synthetic_videos > 0:
            reader, wanted, failures = _synthetic(config, root, clip, aspects, grid)
            for vid, reason in failures:  # teacher failures, not bad labels: never fatal
                bad.add(vid, "synthetic", reason)
            readers["synthetic"] = reader
            examples += [e for e in rdata.examples_from_synthetic(reader, aspects, grid, bad, r.on_bad_label)
                         if rdata.planned_video_id(e.video_id) in wanted]
        if r.videofeedback_path:
            from halo_jax.data.videofeedback import VideoFeedbackSource, load_videofeedback, prepare_videofeedback

            kw = dict(frames=clip[0], height=clip[1], width=clip[2], data_dir=root / "videofeedback")
            if distributed.is_main_process():
                prepare_videofeedback(r.videofeedback_path, **kw)
            distributed.barrier("train_reward-videofeedback")
            source = VideoFeedbackSource(load_videofeedback(r.videofeedback_path, **kw), aspects)
            readers["videofeedback"] = source
            examples += source.examples(bad, r.on_bad_label)
    except rdata.BadLabelError as e:
        raise ConfigError(str(e)) from None
    if not examples:
        raise ConfigError(f"train_reward has no labelled videos: no usable labels in {labels_dir}, "
                          "reward.synthetic_videos=0 and no reward.videofeedback_path; run the label stage or "
                          "configure a source")
    return examples, readers, bad


# ----------------------------------------------------------------------------- phases


def evaluate(model, tokenizer, text_max_length: int, held: rdata.RewardData, config) -> dict:
    """Held-out report (`reward.metrics.evaluate_predictions`) of `model` (this process's devices)."""
    if len(held) == 0:
        return {"aspects": {}, "mean": {}, "counts": {"videos": 0}, "note": "no held-out prompts"}
    scorer = Scorer(model, tokenizer, text_max_length, config.reward.eval_batch_size)
    import numpy as np

    vp, pp = [], []
    for s in range(0, len(held), scorer.batch_size):
        idx = range(s, min(s + scorer.batch_size, len(held)))
        out = scorer.score_batch(np.stack([held.frames(i) for i in idx]), [held.examples[i].prompt for i in idx])
        vp.append(out["video"])
        pp.append(out["patch"])
    ex = held.examples
    patch_true = np.stack([e.patch_scores if e.patch_scores is not None else np.zeros_like(pp[0][0]) for e in ex])
    aspects = tuple(config.aspects)
    video_pred = np.concatenate(vp)
    report = evaluate_predictions(
        aspects, video_pred, np.stack([e.video_scores for e in ex]),
        np.array([held.prompt_ids[e.prompt] for e in ex]), np.concatenate(pp), patch_true,
        np.array([e.patch_scores is not None for e in ex]), float(config.defect_threshold),
        weights=config_aspect_weights(config, aspects))
    if "text_alignment" in aspects:
        ta = aspects.index("text_alignment")
        reading = text_reading(scorer, held, video_pred[:, ta], ta, np.concatenate(pp)[:, ta],
                               float(config.defect_threshold))
        if reading is not None:
            report["text_reading"] = reading
    return report


def text_reading(scorer, held: rdata.RewardData, text_alignment, aspect: int, patch_text_alignment=None,
                 threshold: float = 3.0) -> dict | None:
    """Does the model read the prompt? Each held-out video labelled against an altered prompt is scored again
    with the prompt it was rendered from: {"accuracy": share whose text alignment is higher for the rendered
    prompt (ties count half; chance 0.5), "videos": n}, and for shapes-world prompts "by_attribute": {colour /
    shape / motion: that share among the videos whose prompt had that attribute changed}; None without such
    videos. `text_alignment` (N,) are the held-out videos' scores with their labelled prompts.

    With their cells' scores `patch_text_alignment` (N, Tp, Hp, Wp), also "cells": the same shares over the cells
    of those videos labelled below `threshold` against the altered prompt ("accuracy", "cells", "by_attribute")."""
    import numpy as np

    from halo_jax.data.shapes import ATTRIBUTES, changed_attribute

    altered = [i for i, e in enumerate(held.examples) if not e.prompt_is_rendered]
    if not altered:
        return None
    shown = scorer.score([held.frames(i) for i in altered], [held.examples[i].rendered_prompt for i in altered])
    changed = np.array([str(changed_attribute(held.examples[i].rendered_prompt, held.examples[i].prompt))
                        for i in altered])

    def shares(mine, theirs, attribute, count_name: str, count: int) -> dict:
        """{"accuracy", count_name: count, "by_attribute" (when any is known)} of mine > theirs, ties half."""
        hits = (mine > theirs) + 0.5 * (mine == theirs)
        out = {"accuracy": float(np.mean(hits)), count_name: count}
        by_attribute = {a: float(np.mean(hits[attribute == a])) for a in ATTRIBUTES if np.any(attribute == a)}
        return {**out, "by_attribute": by_attribute} if by_attribute else out

    report = shares(shown["video"][:, aspect], np.asarray(text_alignment)[altered], changed, "videos", len(altered))
    labels = [held.examples[i].patch_scores for i in altered]
    if patch_text_alignment is not None and all(y is not None for y in labels):
        low = np.stack(labels)[:, aspect] < threshold  # (n, Tp, Hp, Wp)
        if low.any():
            report["cells"] = shares(shown["patch"][:, aspect][low], np.asarray(patch_text_alignment)[altered][low],
                                     np.broadcast_to(changed[:, None, None, None], low.shape)[low], "cells",
                                     int(low.sum()))
    return report


def evaluate_matching(model, tokenizer, text_max_length: int, held: rdata.RewardData, config) -> dict:
    """Phase 0's held-out report, from the cosines of `RewardModel.match_video` and `match_text` (the logits
    are an increasing function of them, so rankings and AUROC are the logits'): top-1 retrieval of each
    held-out video's own prompt among the held-out prompts, the AUROC of own-prompt cosines against the
    others, and `attributes`: for each held-out shapes video that shows its prompt and each attribute of
    `shapes.ATTRIBUTES`, whether its own prompt beats the prompt with that attribute of one object changed
    (`shapes.altered_prompt`, drawn with `config.seed`): {attribute: accuracy (ties half, chance 0.5),
    "videos": n}. Retrieval mixes the three attributes; `attributes` separates them."""
    import numpy as np

    from halo_jax.reward.metrics import auroc

    prompts = sorted({e.prompt for e in held.examples})
    if not prompts:
        return {"counts": {"videos": 0, "prompts": 0}, "note": "no held-out prompts"}
    rng = np.random.default_rng(int(config.seed))
    contrasts = {}  # held-out row -> [own prompt, one altered prompt per attribute]
    for i, e in enumerate(held.examples):
        changed = rdata.attribute_contrasts(e.prompt, rng) if e.prompt_is_rendered else []
        if changed:  # none for a prompt outside the shapes world (a real label set)
            contrasts[i] = [e.prompt, *changed]
    altered = {p for group in contrasts.values() for p in group[1:]}
    tokens = {**tokenize(tokenizer, sorted(altered), text_max_length), **{p: held.tokens[p] for p in prompts}}
    size = int(config.reward.eval_batch_size)
    videos, texts = match_embeddings(model, held, tokens, size)

    cosines = pairwise_cosines(videos, np.stack([texts[p] for p in prompts]), size)
    own = np.array([prompts.index(e.prompt) for e in held.examples])
    is_own = np.arange(len(prompts))[None, :] == own[:, None]
    report = {"retrieval_top1": float(np.mean(np.argmax(cosines, axis=1) == own)), "chance": 1.0 / len(prompts),
              "match_auroc": float(auroc(cosines.ravel(), is_own.ravel())),
              "counts": {"videos": len(held), "prompts": len(prompts)}}
    if contrasts:
        mine = np.array([pairwise_cosines(videos[i:i + 1], np.stack([texts[p] for p in group]), size)[0]
                         for i, group in contrasts.items()])
        wins = (mine[:, :1] > mine[:, 1:]) + 0.5 * (mine[:, :1] == mine[:, 1:])
        report["attributes"] = {**{a: float(w) for a, w in zip(shapes.ATTRIBUTES, wins.mean(axis=0))},
                                "videos": len(contrasts)}
    return report


def match_embeddings(model, held: rdata.RewardData, tokens: dict, size: int):
    """Matching vectors of all of `held`'s videos, (N, M, D), and of the prompts of `tokens` ({prompt: (ids,
    mask)}), {prompt: (P, D)} (`models/reward/matching.py`): jitted, in batches of `size` (the last one padded:
    one compile each)."""
    import numpy as np

    def batched(fn, n: int):
        out = []
        for s in range(0, n, size):
            idx = [min(i, n - 1) for i in range(s, s + size)]
            out.append(np.asarray(fn(idx))[:min(size, n - s)])
        return np.concatenate(out)

    video_fn = nnx.jit(lambda m, frames: m.match_video(frames))
    text_fn = nnx.jit(lambda m, ids, mask: m.match_text(ids, mask))
    prompts = sorted(tokens)
    videos = batched(lambda idx: video_fn(model, np.stack([held.frames(i) for i in idx])), len(held))
    texts = batched(lambda idx: text_fn(model, np.stack([tokens[prompts[i]][0] for i in idx]),
                                        np.stack([tokens[prompts[i]][1] for i in idx])), len(prompts))
    return videos, dict(zip(prompts, texts))


def pairwise_cosines(videos, texts, size: int):
    """`matching.match_cosines` of videos (N, M, D) and prompts (K, P, D) as numpy (N, K), in batches of `size`
    videos."""
    import numpy as np

    return np.concatenate([np.asarray(match_cosines(videos[s:s + size], texts)) for s in range(0, len(videos), size)])


def format_matching(report: dict, title: str) -> str:
    """One line of phase 0's held-out report (`evaluate_matching`)."""
    line = (f"{title}: own prompt top-1 among {report['counts']['prompts']} prompts {report['retrieval_top1']:.3f} "
            f"(chance {report['chance']:.3f}), matching AUROC {report['match_auroc']:.3f}")
    attributes = report.get("attributes")
    if attributes:
        each = ", ".join(f"{a} {attributes[a]:.3f}" for a in shapes.ATTRIBUTES)
        line += f"; own prompt above one with another {each} (chance 0.5, {attributes['videos']} videos)"
    return line


def run_phase(phase: int, model, config, root: Path, train: rdata.RewardData, held: rdata.RewardData,
              tokenizer, text_max_length: int, mesh) -> tuple:
    """Train (or resume, or skip) one phase; returns (model, eval report)."""
    r = config.reward
    section = r[f"phase{phase}"]
    folder = root / f"phase{phase}"
    origin = continues_from(r, phase)
    done = _read_json(folder / "done.json")
    if done is not None and done["steps"] == section.steps and all(done.get(k) == v for k, v in origin.items()):
        logging.info("train_reward: phase %d already trained (%d steps); loading %s", phase, section.steps,
                     folder / "model")
        loaded = load_reward_model(folder / "model", mesh, config.sharding.rules)
        return adopt_phase_weights(model, loaded.model, phase, folder), _read_json(root / f"eval_phase{phase}.json")

    g = int(r.group_size)
    if section.batch_size % g or (section.batch_size // g) % jax.process_count():
        raise ConfigError(f"reward.phase{phase}.batch_size={section.batch_size} must be a multiple of "
                          f"reward.group_size={g} times the {jax.process_count()} processes")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if section.batch_size % shards:
        raise ConfigError(f"reward.phase{phase}.batch_size={section.batch_size} must be divisible by the "
                          f"{shards} batch shards of the mesh (data x fsdp)")
    weights = LossWeights.from_mapping(dict(r.losses))
    graphdef, params, frozen = state_lib.split_model(model, phase_filter(model.config, phase))
    tx = make_optimizer(section)
    shardings = state_lib.train_state_shardings(params, tx, mesh, config.sharding.rules)
    ndims = {**BATCH_NDIMS, **(NEGATIVE_NDIMS if train.negatives is not None else {})}
    batch_shardings = {k: batch_sharding(mesh, nd) for k, nd in ndims.items()}
    step_fn = state_lib.make_train_step(graphdef, frozen, make_loss_fn(weights, phase), tx, shardings,
                                        batch_shardings)
    ckpt = Checkpointer(folder / "ckpt", keep=config.checkpoint.keep, every_steps=config.checkpoint.every_steps)
    state, extra = state_lib.restore_or_init(
        ckpt, lambda p: state_lib.init_train_state(p, tx, config.seed + phase), shardings,
        state_lib.pure(params))
    rows = distributed.process_local_rows(section.batch_size, batch_shardings["valid"])  # videos; whole groups
    data = make_data(train, g, section.batch_size // g, slice(rows.start // g, rows.stop // g), config.seed + phase,
                     twins=phase > 0 and weights.twin > 0)
    if extra:
        data.set_state(extra["data"])
        logging.info("train_reward: phase %d resumed at step %d", phase, int(jax.device_get(state["step"])))
    writer = MetricsWriter(folder)
    with jax.set_mesh(mesh):
        state = train_loop(state, step_fn, data, num_steps=section.steps, checkpointer=ckpt, writer=writer,
                           log_every=config.log.every_steps, desc=f"train_reward/phase{phase}",
                           to_device=lambda b: distributed.global_batch(b, batch_shardings),
                           extra={"phase": phase, **origin}, show_progress=config.log.progress)
    ckpt.close()
    writer.close()
    nnx.replace_by_pure_dict(params, distributed.to_host(state["params"]))
    nnx.update(model, params)
    # Process 0 alone saves and evaluates: the untrained variables (still global arrays) to the host too.
    nnx.update(model, distributed.to_host(nnx.state(model)))

    report = None
    if distributed.is_main_process():
        save_reward_model(model, folder / "model", tokenizer, text_max_length,
                          {"phase": phase, "steps": int(section.steps), "clip": list(train.clip_shape)})
        title = f"train_reward phase {phase}: held-out evaluation ({section.steps} steps)"
        if phase == 0:
            report = evaluate_matching(model, tokenizer, text_max_length, held, config)
            if report["counts"]["videos"]:
                print(format_matching(report, title))
        else:
            report = evaluate(model, tokenizer, text_max_length, held, config)
            if report["counts"]["videos"]:
                print(format_report(report, title))
        report["phase"], report["steps"] = phase, int(section.steps)
        rdata.write_json(root / f"eval_phase{phase}.json", report)
        rdata.write_json(folder / "done.json", {"steps": int(section.steps), **origin})
    distributed.barrier(f"train_reward-phase{phase}")
    return model, report or _read_json(root / f"eval_phase{phase}.json")


def warn_without_twins(weights: LossWeights, train: rdata.RewardData) -> bool:
    """Warn (and return True) when `weights.twin` > 0 but no training video has two records: L_tw would be 0."""
    if weights.twin <= 0 or len(train.video_keys) < len(train):
        return False
    logging.warning("train_reward: reward.losses.twin=%g but no training video has a second record (a mismatched "
                    "video kept again under the prompt it shows), so the twin loss is 0: set "
                    "reward.synthetic.mismatch_pairs=True with reward.synthetic.mismatch_fraction > 0, or "
                    "reward.losses.twin=0", weights.twin)
    return True


def make_data(train: rdata.RewardData, group_size: int, global_groups: int, rows: slice, seed: int,
              twins: bool = False):
    """The endless, checkpointable iterator of this process's flat batches of prompt groups (`twins`:
    `rdata.prompt_groups`): its `rows` (in groups) of every global batch of `global_groups` groups, which do
    not depend on the process count."""
    from halo_jax.data.pipeline import make_global_iterator

    return make_global_iterator(rdata.GroupedSource(train, group_size, twins), global_batch=global_groups, seed=seed,
                                rows=rows, batch_fn=rdata.concat_groups, prefetch=2)


# ----------------------------------------------------------------------------- the stage


def run(config, workdir: str) -> Path:
    r = config.reward
    root = Path(workdir) / "reward"
    out = Path(workdir) / "reward_ckpt"
    aspects, grid = tuple(config.aspects), tuple(int(g) for g in config.grid)
    clip = (int(r.video.frames), int(r.video.height), int(r.video.width))
    mesh = mesh_lib.make_mesh(config.mesh)
    config_aspect_weights(config, aspects)  # the held-out report's overall reward: fail before training
    weights = LossWeights.from_mapping(dict(r.losses))
    if weights.bound_margin > 0 and not r.model.clip_scores:
        raise ConfigError(f"reward.losses.bound_margin={weights.bound_margin} needs a model that clips its scores: "
                          "set reward.model.clip_scores=True (or the margin to 0)")
    if weights.word > 0 and (r.siglip_path or int(r.model.text.num_hidden_layers)):
        raise ConfigError(f"reward.losses.word={weights.word} needs a random text tower of depth 0 (each token its "
                          "word and position alone): set reward.model.text.num_hidden_layers=0 (and no "
                          "reward.siglip_path) or reward.losses.word=0")
    contrasts = negative_attributes(r.phase0) if r.phase0.hard_negatives else None
    check_continuations(r, root, config.checkpoint.keep)

    examples, readers, bad = gather_examples(config, workdir, root)
    for line in bad.summary_lines():
        print(f"train_reward: {line}")
    train_ex, held_ex = rdata.split_by_prompt(examples, r.heldout_fraction, config.seed)
    if distributed.is_main_process():
        rdata.write_json(root / "bad_labels.json", bad.to_json())
        rdata.write_json(root / "split.json", {
            "train_videos": len(train_ex), "heldout_videos": len(held_ex),
            "train_prompts": len({e.prompt for e in train_ex}),
            "heldout_prompts": sorted({e.prompt for e in held_ex}),
            "by_source": {s: sum(e.source == s for e in examples) for s in readers}})
    logging.info("train_reward: %d training and %d held-out videos; %d labels rejected", len(train_ex), len(held_ex),
                 len(bad))

    prompts = sorted({e.prompt for e in examples})
    max_length = int(r.text_max_length)
    if distributed.is_main_process():
        make_tokenizer(r.siglip_path, root / "tokenizer", prompts, max_length or 64)
    distributed.barrier("train_reward-tokenizer")
    tokenizer = make_tokenizer(r.siglip_path, root / "tokenizer", prompts, max_length or 64)
    cfg = model_config(r.model, aspects, grid, siglip_path=r.siglip_path, tokenizer=tokenizer,
                       text_max_length=max_length or None)
    max_length = max_length or cfg.text.max_position_embeddings
    if max_length > cfg.text.max_position_embeddings:
        raise ConfigError(f"reward.text_max_length={max_length} exceeds the text tower's "
                          f"{cfg.text.max_position_embeddings} positions")
    tokens = tokenize(tokenizer, prompts, max_length)
    train = rdata.RewardData(train_ex, readers, clip, tokens, len(aspects), grid)
    held = rdata.RewardData(held_ex, readers, clip, tokens, len(aspects), grid)
    warn_without_twins(weights, train)

    model = create_model(cfg, mesh, config.sharding.rules, seed=config.seed, siglip_path=r.siglip_path,
                         dtype=dtype_of(r.dtype))
    reports = {}
    if r.phase0.steps > 0:
        def shown(e: rdata.Example) -> bool:
            return e.prompt_is_rendered

        matching = train.subset(shown)
        if r.phase0.hard_negatives:
            negatives = rdata.hard_negatives(matching.examples, config.seed, contrasts)
            matching = matching.with_negatives(negatives, tokenize(tokenizer, [p for n in negatives for p in n],
                                                                   max_length))
        model, reports[0] = run_phase(0, model, config, root, matching, held.subset(shown), tokenizer, max_length,
                                      mesh)
    model, reports[1] = run_phase(1, model, config, root, train, held, tokenizer, max_length, mesh)
    if r.phase2.steps > 0:
        model, reports[2] = run_phase(2, model, config, root, train, held, tokenizer, max_length, mesh)
    else:
        logging.warning("train_reward: reward.phase2.steps=0: the patch head is untrained; patch rewards are "
                        "meaningless")

    headline = ("mean", "overall", "retrieval_top1", "match_auroc")  # phases 1/2: mean, overall; 0: retrieval
    info = {"phases": {f"phase{p}": int(r[f"phase{p}"].steps) for p in reports},
            "eval": {f"phase{p}": {k: v for k, v in (rep or {}).items() if k in headline}
                     for p, rep in reports.items()},
            "train_videos": len(train_ex), "heldout_videos": len(held_ex), "rejected_labels": len(bad),
            "clip": list(clip)}
    existing = _read_json(out / "config.json") if out.exists() else None
    if distributed.is_main_process() and (existing is None or existing.get("info", {}).get("phases") != info["phases"]):
        save_reward_model(model, out, tokenizer, max_length, info)
        logging.info("train_reward: reward model exported to %s", out)
    distributed.barrier("train_reward-export")
    return out
