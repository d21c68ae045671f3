"""Stage `train_dpo`: Gran-DPO (or Diffusion-DPO, `dpo.loss.patch_weight = 0`) on `pairs/` -> `dpo_ckpt/`.

The pairs are WORKDIR/pairs, or `dpo.pairs_dir` (stage `compare` trains several runs on one store).

    base pipeline (config.model.path or WORKDIR/base_ckpt)
      -> LoRA adapters on the DiT (`dpo.mode = "lora"`; reference = adapters off)
         or the whole DiT trainable (`"full"`; reference = a frozen copy)
      -> `align.dpo_step.DPOStep` (one jitted, sharded step; shared t and noise for w and l)
         driven by `train.loop.train_loop` over `pairs/` batches (grain, checkpointable)
      -> `dpo/ckpt` (orbax: state + data-iterator state; resumes; SIGTERM saves and exits 143)
      -> `dpo/metrics.jsonl` + TensorBoard every `log.every_steps` steps
      -> `dpo_ckpt/`: the base folder with the aligned DiT (LoRA merged) in place of its
         transformer (VAE, text encoder, tokenizer, scheduler copied unchanged), a diffusers
         folder that `generate` loads with `--config.model.path=WORKDIR/dpo_ckpt`.

Optimiser: AdamW, linear warmup then cosine decay to 10%, global-norm clipping, with
`dpo.grad_accum` micro-batches per step. After `dpo.max_skipped` non-finite steps the run
stops with `NonFiniteError` (`check_skipped`). The pair store is checked before the model
loads: w and l latents of one shape on which the grid fits (names both when not).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
from absl import logging
from flax import nnx

from halo_jax.align.dpo_step import DPOStep, check_skipped, make_dpo_step
from halo_jax.config import ConfigError
from halo_jax.data.pipeline import make_global_iterator
from halo_jax.data.stores import StoreReader, read_schema
from halo_jax.diffusion import FlowMatching
from halo_jax.io import atomic_dir
from halo_jax.models.lora import LoRAConfig, apply_lora, merge_lora
from halo_jax.models.wan.transformer_params import export_transformer, load_transformer
from halo_jax.parallel import distributed, mesh as mesh_lib
from halo_jax.stages.generate import model_path
from halo_jax.stages.pairs import STORE_NAME, check_pair_shapes, loss_config
from halo_jax.train.optim import make_optimizer
from halo_jax.train.checkpoint import Checkpointer
from halo_jax.train.loop import train_loop
from halo_jax.train.metrics import MetricsWriter

BATCH_KEYS = ("latents_w", "latents_l", "text_embeds", "s", "a", "video_reward_gap", "patch_reward_gap")


def check_pair_store(store: Path, config) -> StoreReader:
    """Open `pairs/` and check its latents and grid against the loss config (first record + schema)."""
    if not (store / "store.json").exists():
        raise ConfigError(f"{store} is not a pair store; run the pairs stage first")
    reader = StoreReader(store, on_corrupt=config.dpo.on_corrupt)
    if len(reader) == 0:
        raise ConfigError(f"{store} holds no pairs; lower pairs.margin_video or score more samples per prompt")
    loss = loss_config(config)
    schema = read_schema(store)
    sw, sl = schema["latents_w"].shape, schema["latents_l"].shape
    grid = schema["s"].shape
    if None not in grid and tuple(grid) != tuple(loss.grid):
        raise ValueError(f"{store}: the pairs' patch maps have grid {tuple(grid)} but config.grid is "
                         f"{tuple(loss.grid)}; re-run the pairs stage with this grid")
    if None not in sw and None not in sl:
        check_pair_shapes(f"pair store {store}", "latents_w", "latents_l", sw, sl, loss)
    first = reader[0]
    if first is None:
        raise ValueError(f"{store}: the first pair record is unreadable; see the report above")
    check_pair_shapes(f"pair {first['pair_id']!r} in {store}", first["winner_id"], first["loser_id"],
                      first["latents_w"].shape, first["latents_l"].shape, loss)
    if first["s"].shape != tuple(loss.grid):
        raise ValueError(f"pair {first['pair_id']!r}: patch map s has grid {first['s'].shape} but config.grid is "
                         f"{tuple(loss.grid)}; re-run the pairs stage with this grid")
    return reader


def _batch_of(record: dict) -> dict:
    out = {k: record[k] for k in BATCH_KEYS}
    out["video_reward_gap"] = np.float32(out["video_reward_gap"])
    return out


def check_batch_size(global_batch: int, step: DPOStep) -> None:
    """`dpo.batch_size` must split over the batch devices x micro-batches, and over the processes."""
    if global_batch % (step.batch_shards * step.grad_accum) or global_batch % jax.process_count():
        raise ConfigError(f"dpo.batch_size={global_batch} must split over the mesh's ('data', 'fsdp') = "
                          f"{step.batch_shards} devices, dpo.grad_accum={step.grad_accum} micro-batches and "
                          f"{jax.process_count()} processes; use a multiple of "
                          f"{step.batch_shards * step.grad_accum * jax.process_count()}")


def pair_batches(reader: StoreReader, global_batch: int, seed: int, step: DPOStep):
    """Endless shuffled batches of pair records for `step`: this process's rows of every global batch
    (the batches do not depend on the process count)."""
    check_batch_size(global_batch, step)
    return make_global_iterator(reader, global_batch=global_batch, seed=seed, transform=_batch_of,
                                rows=distributed.process_local_rows(global_batch, step.batch_sharding))


def export_pipeline(base: Path, folder: Path, transformer: nnx.Module) -> Path:
    """`base` (a diffusers Wan folder) with its transformer replaced by `transformer`: every other
    component is copied byte for byte (what `save_pipeline(pipe, folder, transformer=...)` writes,
    without loading the VAE and text encoder)."""
    top = base.resolve()
    shutil.copytree(base, folder, ignore=lambda d, names: ["transformer"] if Path(d).resolve() == top else [])
    export_transformer(transformer, folder / "transformer")
    return folder


def run(config, workdir: str) -> Path:
    cfg = config.dpo
    root = Path(workdir)
    out, folder = root / "dpo_ckpt", root / "dpo"
    if (out / "model_index.json").exists():
        logging.info("train_dpo: %s already exists; nothing to do (delete it to train again)", out)
        return out
    reader = check_pair_store(Path(cfg.pairs_dir) if cfg.pairs_dir else root / STORE_NAME, config)
    if cfg.mode not in ("lora", "full"):
        raise ConfigError(f"dpo.mode must be 'lora' or 'full', got {cfg.mode!r}")

    mesh = mesh_lib.make_mesh(config.mesh)
    rules = config.sharding.rules
    base = model_path(config, workdir)
    if not (base / "transformer").is_dir() or not (base / "model_index.json").exists():
        raise ConfigError(f"{base} is not a diffusers Wan folder (no transformer/ or model_index.json); set "
                          f"--config.model.path to one")
    # Only the DiT is needed: pairs/ carries the text embeddings, and the VAE and text encoder
    # are copied unchanged into the export.
    model = load_transformer(base / "transformer", mesh=mesh, rules=rules, **dict(config.model.options))
    if cfg.mode == "lora":
        model = apply_lora(model, LoRAConfig.from_config(cfg.lora), key=config.seed)
    diffusion = FlowMatching(num_train_timesteps=int(cfg.loss.num_train_timesteps), shift=float(cfg.diffusion.shift),
                             timestep_sampling=cfg.diffusion.timestep_sampling)
    step = make_dpo_step(model, diffusion, loss_config(config), make_optimizer(cfg), mesh, mode=cfg.mode,
                         grad_accum=int(cfg.grad_accum), rules=rules)
    data = pair_batches(reader, int(cfg.batch_size), config.seed, step)

    ckpt = Checkpointer(folder / "ckpt", keep=config.checkpoint.keep, every_steps=config.checkpoint.every_steps)
    if ckpt.latest_step() is not None:
        from halo_jax.train.checkpoint import abstract_like

        state, extra = ckpt.restore(abstract_like(jax.eval_shape(step.init_fn(config.seed)), step.shardings))
        data.set_state(extra["data"])
        logging.info("train_dpo: resumed at step %d", int(state["step"]))
    else:
        state = step.init_state(config.seed)
    max_skipped = int(cfg.max_skipped)

    def step_fn(state, batch):
        state, metrics = step(state, batch)
        check_skipped(metrics, max_skipped)
        return state, metrics

    writer = MetricsWriter(folder)
    with jax.set_mesh(mesh):
        state = train_loop(state, step_fn, data, num_steps=int(cfg.steps), checkpointer=ckpt, writer=writer,
                           log_every=config.log.every_steps, desc="train_dpo",
                           show_progress=config.log.progress,
                           to_device=lambda b: distributed.global_batch(b, step.batch_sharding))
    ckpt.close()
    writer.close()

    params = distributed.to_host(state["params"])
    frozen = distributed.to_host(step.frozen)
    aligned = nnx.merge(step.graphdef, params, frozen)
    if cfg.mode == "lora":
        aligned = merge_lora(aligned)
    if distributed.is_main_process():
        with atomic_dir(out) as tmp:
            export_pipeline(base, tmp, aligned)
            (tmp / "halo_dpo.json").write_text(json.dumps({
                "steps": int(cfg.steps), "mode": cfg.mode, "base": str(base),
                "loss": cfg.loss.to_dict(), "grid": list(config.grid),
                "skipped": int(jax.device_get(state["skipped"]))}, indent=2, default=list))
        logging.info("train_dpo: aligned model written to %s", out)
    distributed.barrier("train_dpo-export")
    return out
