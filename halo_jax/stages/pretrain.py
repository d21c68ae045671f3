"""Stage `pretrain`: flow-matching pretraining of a tiny Wan model on the moving-shapes world.

Phases, in order; each is resumable and leaves `pretrain/<phase>/done.json` when finished:

    text     the world's word tokenizer and a randomly initialised umT5 (kept frozen, unless
             `dit.train_text_encoder` trains it with the DiT)
    vae      the Wan VAE trained on rendered videos (train/objectives.vae_loss), over a curriculum of
             (clip length, steps, batch, foreground weight) stages, each warm-started from the last
    latents  per-channel mean/std of the VAE's posterior means (the checkpoint's
             latents_mean/std) and a store of normalised latents of rendered training videos
    dit      the Wan DiT trained by flow matching on those latents, with the text embedding of
             every prompt computed once (train/objectives.denoising_loss), or with `dit.train_text_encoder`
             the umT5 trained with it (objectives.text_denoising_loss; written to dit/text_encoder);
             done.json keeps its loss with and without the prompt at fixed noise levels
             (objectives.prompt_reliance)
    export   the whole pipeline as a diffusers-format folder in `base_ckpt/`

Training data come through the grain pipeline (`data/pipeline.py`): rendered videos are a
random-access source indexed by (prompt, seed), latents a record store.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from halo_jax.config import ConfigError
from halo_jax.data import shapes
from halo_jax.data.pipeline import make_global_iterator
from halo_jax.data.stores import Field, Schema, StoreReader, StoreWriter
from halo_jax.diffusion import FlowMatching, SamplerConfig
from halo_jax.io import atomic_write_text
from halo_jax.models.text import UMT5Config, UMT5Encoder, build_word_tokenizer, encode_prompts, load_tokenizer, \
    load_umt5, text_embeddings
from halo_jax.models.text.umt5_params import export_umt5
from halo_jax.models.wan.pipeline import WanPipeline, save_pipeline
from halo_jax.models.wan.transformer import WanTransformer3D, WanTransformerConfig
from halo_jax.models.wan.transformer_params import export_transformer, load_transformer
from halo_jax.models.wan.vae import WanVAE, WanVAEConfig
from halo_jax.models.wan.vae_params import export_vae, load_vae
from halo_jax.parallel import distributed, mesh as mesh_lib
from halo_jax.parallel.sharding import batch_sharding, create_sharded
from halo_jax.train import state as state_lib
from halo_jax.train.checkpoint import Checkpointer
from halo_jax.train.loop import train_loop
from halo_jax.train.metrics import MetricsWriter, Progress
from halo_jax.train.optim import make_optimizer
from halo_jax.train.objectives import denoising_loss, prompt_reliance, text_denoising_loss, vae_loss

PHASES = ("text", "vae", "latents", "dit", "export")


class RenderedVideos:
    """Random-access source of rendered videos: item i is prompt `i % P` rendered with seed `i // P`.

    With `clip_frames`, item i is a window of that many frames starting at frame
    `(7919 i) mod (frames - clip_frames + 1)`: the VAE is causal and local in time, so it
    learns the same weights from short clips at a fraction of the cost.
    """

    def __init__(self, prompts: list[str], num_seeds: int, frames: int, height: int, width: int, seed_offset: int = 0,
                 clip_frames: int | None = None):
        self.prompts, self.num_seeds = list(prompts), num_seeds
        self.size = (frames, height, width)
        self.seed_offset = seed_offset
        self.clip_frames = clip_frames

    def __len__(self) -> int:
        return len(self.prompts) * self.num_seeds

    def __getitem__(self, i: int) -> dict:
        p, s = i % len(self.prompts), i // len(self.prompts) + self.seed_offset
        frames = shapes.render(self.prompts[p], s, *self.size)
        if self.clip_frames:
            start = (7919 * i) % (self.size[0] - self.clip_frames + 1)
            frames = frames[start:start + self.clip_frames]
        video = np.transpose(frames.astype(np.float32) / 127.5 - 1.0, (3, 0, 1, 2))
        return {"video": video, "prompt_index": np.int32(p), "seed": np.int32(s)}


class TextAndDiT(nnx.Module):
    """The umT5 text encoder and the DiT as one model, trained together (`dit.train_text_encoder`)."""

    def __init__(self, text: nnx.Module, dit: nnx.Module):
        self.text, self.dit = text, dit


def _embed(text_encoder, ids, mask, null_ids, null_mask) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings of the prompts (P, L, D), zero past each prompt; the empty prompt's (L, D))."""
    table = np.asarray(text_embeddings(text_encoder, ids, mask)[0])
    return table, np.asarray(text_embeddings(text_encoder, null_ids, null_mask)[0][0])


def _done(folder: Path) -> bool:
    return (folder / "done.json").exists()


def _mark_done(folder: Path, info: dict) -> None:
    if distributed.is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "done.json", json.dumps(info, indent=2))
    distributed.barrier(f"pretrain-{folder.name}")


def _train(model: nnx.Module, loss_fn, data, batch_shardings, section, steps: int, folder: Path, config,
           desc: str) -> nnx.Module:
    """Run the shared loop on `model` (params trained in place); resumes from `folder/ckpt`."""
    mesh = mesh_lib.make_mesh(config.mesh)
    graphdef, params, frozen = state_lib.split_model(model)
    tx = make_optimizer(section, steps)
    shardings = state_lib.train_state_shardings(params, tx, mesh, config.sharding.rules)
    step_fn = state_lib.make_train_step(graphdef, frozen, loss_fn, tx, shardings, batch_shardings)
    ckpt = Checkpointer(folder / "ckpt", keep=config.checkpoint.keep, every_steps=config.checkpoint.every_steps)
    state, extra = state_lib.restore_or_init(
        ckpt, lambda p: state_lib.init_train_state(p, tx, config.seed), shardings,
        state_lib.pure(params))
    if extra:
        data.set_state(extra["data"])
        logging.info("%s: resumed at step %d", desc, int(state["step"]))
    writer = MetricsWriter(folder)
    with jax.set_mesh(mesh):
        state = train_loop(state, step_fn, data, num_steps=steps, checkpointer=ckpt, writer=writer,
                           log_every=config.log.every_steps, desc=desc,
                           to_device=lambda b: distributed.global_batch(b, batch_shardings))
    ckpt.close()
    writer.close()
    nnx.replace_by_pure_dict(params, jax.device_get(state["params"]))
    nnx.update(model, params)
    return model


def _check_batch(global_batch: int, mesh) -> None:
    """A global batch must split over the mesh's ('data', 'fsdp') devices and the processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards or global_batch % jax.process_count():
        raise ConfigError(f"batch size {global_batch} does not split over the {shards} ('data', 'fsdp') devices of "
                          f"the mesh and {jax.process_count()} processes; use a multiple of {shards}")


def run(config, workdir: str) -> Path:
    cfg = config.pretrain
    out = Path(workdir) / "pretrain"
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = config.sharding.rules
    frames, height, width = cfg.video.frames, cfg.video.height, cfg.video.width
    prompts = shapes.train_prompts()[: cfg.num_prompts or None]
    all_prompts = shapes.train_prompts() + shapes.heldout_prompts()

    # -- text: tokenizer + frozen random umT5
    text_dir = out / "text"
    if not _done(text_dir):
        if distributed.is_main_process():
            build_word_tokenizer(all_prompts, text_dir / "tokenizer", model_max_length=cfg.text.max_length)
            tok = load_tokenizer(text_dir / "tokenizer")
            tcfg = UMT5Config(vocab_size=len(tok), **cfg.text.model)
            export_umt5(UMT5Encoder(tcfg, rngs=nnx.Rngs(config.seed)), text_dir / "text_encoder")
        _mark_done(text_dir, {"vocab": "shapes world", "max_length": cfg.text.max_length})
    tokenizer = load_tokenizer(text_dir / "tokenizer")
    text_encoder = load_umt5(text_dir / "text_encoder", mesh=mesh, rules=rules)

    # -- vae: a curriculum of clip lengths, each stage warm-started from the previous one
    vae_dir = out / "vae"
    for entry in cfg.vae.curriculum:
        if len(entry) != 4:
            raise ConfigError(f"pretrain.vae.curriculum entry {tuple(entry)} must be (clip frames, steps, batch size, "
                              "foreground weight), e.g. (9, 300, 6, 0.0)")
    if not _done(vae_dir):
        vae = None
        for k, (clip, steps, batch, foreground_weight) in enumerate(cfg.vae.curriculum):
            sub = vae_dir / f"stage{k}_clip{clip}"
            if _done(sub):
                vae = load_vae(sub / "model", mesh=mesh)
                continue
            if vae is None:
                vcfg = WanVAEConfig(**cfg.vae.model, latents_mean=(0.0,) * cfg.vae.model.z_dim,
                                    latents_std=(1.0,) * cfg.vae.model.z_dim)
                vae = create_sharded(lambda: WanVAE(vcfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
            source = RenderedVideos(prompts, cfg.vae.num_seeds, frames, height, width, clip_frames=clip)
            _check_batch(batch, mesh)
            data = make_global_iterator(source, global_batch=batch, seed=config.seed + 100 * k + clip,
                                        rows=distributed.process_local_rows(batch, batch_sharding(mesh, 5)),
                                        transform=lambda r: {"video": r["video"]})
            loss = functools.partial(vae_loss, kl_weight=cfg.vae.kl_weight, foreground_weight=foreground_weight,
                                     posterior_noise=cfg.vae.posterior_noise,
                                     background_weight=cfg.vae.background_weight,
                                     background_share=cfg.vae.background_share)
            vae = _train(vae, loss, data, {"video": batch_sharding(mesh, 5)}, cfg.vae, steps, sub, config,
                         f"pretrain/vae/{sub.name}")
            if distributed.is_main_process():
                export_vae(vae, sub / "model")
            _mark_done(sub, {"clip_frames": clip, "steps": steps, "batch_size": batch,
                             "foreground_weight": foreground_weight})
        if distributed.is_main_process():
            export_vae(vae, vae_dir / "model")
        _mark_done(vae_dir, {"curriculum": [list(c) for c in cfg.vae.curriculum]})

    # -- latents: statistics, then a store of normalised latents
    lat_dir = out / "latents"
    store_dir = lat_dir / "store"
    if not _done(lat_dir):
        vae = load_vae(vae_dir / "model")
        vgraph, vstate = nnx.split(vae)
        encode = jax.jit(lambda s, x: nnx.merge(vgraph, s).encode(x))
        stats_src = RenderedVideos(prompts, 1, frames, height, width, seed_offset=10_000)
        rng = np.random.default_rng(config.seed)
        picks = rng.choice(len(stats_src), size=min(cfg.latents.stats_videos, len(stats_src)), replace=False)
        means = []
        for i in range(0, len(picks), cfg.latents.batch_size):
            batch = np.stack([stats_src[int(j)]["video"] for j in picks[i:i + cfg.latents.batch_size]])
            means.append(np.asarray(encode(vstate, batch)))
        z = np.concatenate(means)  # (N, C, f, h, w)
        mean = z.mean(axis=(0, 2, 3, 4))
        std = z.std(axis=(0, 2, 3, 4)) + 1e-6
        vae.config = dataclasses.replace(vae.config, latents_mean=tuple(map(float, mean)), latents_std=tuple(map(float, std)))
        if distributed.is_main_process():
            export_vae(vae, lat_dir / "vae")
        distributed.barrier("pretrain-latent-stats")
        vae = load_vae(lat_dir / "vae")
        vgraph, vstate = nnx.split(vae)
        encode_norm = jax.jit(lambda s, x: (lambda m: m.normalize_latents(m.encode(x)))(nnx.merge(vgraph, s)))
        shape = vae.config.latent_size(frames, height, width)
        schema = Schema("shapes_latents", "id", (
            Field("id", "str"), Field("prompt_index", "int"), Field("seed", "int"),
            Field.array("latents", np.float32, (vae.config.z_dim, *shape))))
        source = RenderedVideos(prompts, cfg.latents.num_seeds, frames, height, width, seed_offset=1)
        mine = distributed.process_share(range(len(source)))
        with StoreWriter(store_dir, schema, chunk_size=cfg.latents.chunk_size) as writer:
            todo = [i for i in mine if f"{i:08d}" not in writer.done_ids()]
            progress = Progress(len(mine), "pretrain/latents", start=len(mine) - len(todo), unit="video")
            for start in range(0, len(todo), cfg.latents.batch_size):
                items = [source[i] for i in todo[start:start + cfg.latents.batch_size]]
                lat = np.asarray(encode_norm(vstate, np.stack([it["video"] for it in items])))
                for i, item, z in zip(todo[start:], items, lat):
                    writer.write({"id": f"{i:08d}", "prompt_index": int(item["prompt_index"]),
                                  "seed": int(item["seed"]), "latents": z})
                progress.update(len(items))
        _mark_done(lat_dir, {"latents_mean": list(map(float, mean)), "latents_std": list(map(float, std)),
                             "videos": len(source)})
    vae = load_vae(lat_dir / "vae")

    # -- dit
    dit_dir = out / "dit"
    joint = cfg.dit.train_text_encoder
    null_ids, null_mask = encode_prompts(tokenizer, [""], max_length=cfg.text.max_length)
    ids, mask = encode_prompts(tokenizer, prompts, max_length=cfg.text.max_length)
    if not _done(dit_dir):
        dcfg = WanTransformerConfig(**cfg.dit.model, in_channels=vae.config.z_dim, out_channels=vae.config.z_dim,
                                    text_dim=text_encoder.config.d_model)
        dit = create_sharded(lambda: WanTransformer3D(dcfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
        reader = StoreReader(store_dir, on_corrupt="skip")
        _check_batch(cfg.dit.batch_size, mesh)
        diffusion = FlowMatching(shift=cfg.dit.shift, timestep_sampling=cfg.dit.timestep_sampling)
        shardings = {"latents": batch_sharding(mesh, 5)}
        if joint:  # the prompts' token ids go in; the loss embeds them with the encoder being trained
            model = TextAndDiT(text_encoder, dit)
            shardings.update(ids=batch_sharding(mesh, 2), mask=batch_sharding(mesh, 2))
            loss = functools.partial(text_denoising_loss, diffusion=diffusion, null_ids=jnp.asarray(null_ids),
                                     null_mask=jnp.asarray(null_mask), text_dropout=cfg.dit.text_dropout)
            transform = lambda r: {"latents": r["latents"], "ids": ids[r["prompt_index"]],  # noqa: E731
                                   "mask": mask[r["prompt_index"]]}
        else:  # every prompt embedded once by the frozen encoder
            table, null_text = _embed(text_encoder, ids, mask, null_ids, null_mask)
            model, shardings["text"] = dit, batch_sharding(mesh, 3)
            loss = functools.partial(denoising_loss, diffusion=diffusion, null_text=jnp.asarray(null_text),
                                     text_dropout=cfg.dit.text_dropout)
            transform = lambda r: {"latents": r["latents"], "text": table[r["prompt_index"]]}  # noqa: E731
        data = make_global_iterator(reader, global_batch=cfg.dit.batch_size, seed=config.seed,
                                    rows=distributed.process_local_rows(cfg.dit.batch_size, batch_sharding(mesh, 5)),
                                    transform=transform)
        _train(model, loss, data, shardings, cfg.dit, cfg.dit.steps, dit_dir, config, "pretrain/dit")
        if distributed.is_main_process():
            export_transformer(dit, dit_dir / "model")
            if joint:
                export_umt5(text_encoder, dit_dir / "text_encoder")
        if joint:  # `text_encoder` was trained in place: embed the prompts as the exported pipeline will
            table, null_text = _embed(text_encoder, ids, mask, null_ids, null_mask)
        picks = np.linspace(0, len(reader) - 1, min(cfg.dit.batch_size, len(reader))).astype(int)
        records = [reader[int(i)] for i in picks]
        with jax.set_mesh(mesh):
            reliance = prompt_reliance(dit, np.stack([r["latents"] for r in records]),
                                       jnp.asarray(table[[int(r["prompt_index"]) for r in records]]),
                                       jnp.asarray(null_text), jax.random.key(config.seed), diffusion=diffusion)
        logging.info("pretrain/dit: loss with the prompt / the empty prompt: %s", ", ".join(
            f"{k} {v['prompt']:.3f} / {v['empty']:.3f}" for k, v in reliance.items()))
        _mark_done(dit_dir, {"steps": cfg.dit.steps, "train_text_encoder": joint, "prompt_reliance": reliance})
    elif json.loads((dit_dir / "done.json").read_text()).get("train_text_encoder", False):
        # the finished phase, not the config, decides which encoder the exported DiT is paired with
        text_encoder = load_umt5(dit_dir / "text_encoder", mesh=mesh, rules=rules)

    # -- export the pipeline
    base = Path(workdir) / "base_ckpt"
    if distributed.is_main_process() and not (base / "model_index.json").exists():
        pipe = WanPipeline(transformer=load_transformer(dit_dir / "model"), vae=vae, text_encoder=text_encoder,
                           tokenizer=tokenizer, max_text_length=cfg.text.max_length,
                           scheduler_config=SamplerConfig(name=cfg.sampler.name, shift=cfg.sampler.shift)
                           .to_diffusers_config())
        save_pipeline(pipe, base)
        logging.info("pretrain: base model written to %s", base)
    distributed.barrier("pretrain-export")
    return base
