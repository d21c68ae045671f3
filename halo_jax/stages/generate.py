"""Stage `generate`: K videos per prompt from a Wan model -> the rollout store `rollouts/`.

For prompt p and sample k the seed is `fold(config.generate.seed, p, k)`, so every video can be
regenerated alone. Each process generates its share of (prompt, sample) items on its own
devices; items already in the store are skipped, so a killed run resumes where it stopped.
Writes latents + uint8 frames per record (`data/stores/`, `RolloutRecord`), an mp4
preview per video, and `rollouts/prompts.json` (process 0).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax
import numpy as np
from absl import logging

from halo_jax.config import ConfigError
from halo_jax.data import shapes
from halo_jax.data.stores import RolloutRecord, StoreWriter, write_rollout
from halo_jax.io import atomic_write_text
from halo_jax.models.wan.pipeline import Generator, load_pipeline
from halo_jax.parallel import distributed, mesh as mesh_lib
from halo_jax.train.metrics import Progress


def sample_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """A 31-bit seed that depends only on (base seed, prompt index, sample index)."""
    return zlib.crc32(f"{base_seed}/{prompt_index}/{sample_index}".encode()) & 0x7FFFFFFF


def resolve_prompts(section) -> list[str]:
    """Prompts from `prompts` (a tuple), `prompts_file` (.txt one per line, or .jsonl with "prompt"), or a
    moving-shapes split (`shapes_split` = "train" | "heldout", the first `num_prompts`)."""
    if section.prompts:
        prompts = list(section.prompts)
    elif section.prompts_file:
        path = Path(section.prompts_file)
        if not path.exists():
            raise ConfigError(f"generate.prompts_file {path} does not exist")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [json.loads(line)["prompt"] for line in lines] if path.suffix == ".jsonl" else lines
    elif section.shapes_split:
        if section.shapes_split not in ("train", "heldout"):
            raise ConfigError(f"generate.shapes_split must be 'train' or 'heldout', got {section.shapes_split!r}")
        prompts = shapes.train_prompts() if section.shapes_split == "train" else shapes.heldout_prompts()
    else:
        raise ConfigError("no prompts: set generate.prompts, generate.prompts_file or generate.shapes_split")
    if section.num_prompts > 0:
        prompts = prompts[: section.num_prompts]
    return prompts


def model_path(config, workdir: str) -> Path:
    """`config.model.path`, or the `base_ckpt/` a `pretrain` stage wrote in this workdir."""
    path = Path(config.model.path) if config.model.path else Path(workdir) / "base_ckpt"
    if not path.exists():
        raise ConfigError(f"model folder {path} does not exist; set --config.model.path to a diffusers-format Wan "
                          "folder (e.g. Wan2.1-T2V-1.3B-Diffusers) or run the pretrain stage first")
    return path


def sampling_mesh(config):
    """This process's devices for sampling: the batch over 'data'; the weights sharded over 'fsdp' and
    'tensor' only where `config.mesh` gives those axes a fixed size, else replicated.

    The per-device program then does not depend on how many devices a process has, so a (prompt,
    seed) gives the same video, bit for bit, on 1 process x 8 devices and on 2 x 4 (weights sharded
    over all local devices, `fsdp = -1`, would sum in an order that changes with the device count).
    """
    local = jax.local_devices()
    fsdp, tensor = (max(int(config.mesh[a]), 1) for a in ("fsdp", "tensor"))
    if len(local) % (fsdp * tensor):
        raise ConfigError(f"sampling shards the weights over mesh.fsdp x mesh.tensor = {fsdp} x {tensor} devices, "
                          f"which do not divide this process's {len(local)} devices; set mesh.fsdp=-1 (replicated "
                          "weights) or sizes that divide the local device count")
    return mesh_lib.make_mesh({"data": -1, "fsdp": fsdp, "tensor": tensor}, devices=local)


def run(config, workdir: str, out_dir: Path | None = None, path: Path | None = None) -> Path:
    g = config.generate
    out = out_dir or Path(workdir) / "rollouts"
    prompts = resolve_prompts(g)
    # Each process samples its own items on its own devices (no cross-host collectives).
    local = sampling_mesh(config)
    pipe = load_pipeline(path or model_path(config, workdir), mesh=local, rules=config.sharding.rules,
                         **dict(config.model.options))
    v = config.video
    gen = Generator(pipe, frames=v.frames, height=v.height, width=v.width, num_steps=config.sampler.num_steps,
                    guidance_scale=config.sampler.guidance_scale, negative_prompt=config.sampler.negative_prompt)
    items = [(p, k) for p in range(len(prompts)) for k in range(g.samples_per_prompt)]
    mine = distributed.process_share(items)
    schema = RolloutRecord.schema(gen.shape, (v.frames, v.height, v.width, 3))
    with StoreWriter(out, schema, chunk_size=g.chunk_size) as writer:
        done = writer.done_ids()
        todo = [(p, k) for p, k in mine if RolloutRecord.make_id(p, k) not in done]
        progress = Progress(len(mine), "generate", start=len(mine) - len(todo), unit="video")
        for start in range(0, len(todo), g.batch_size):
            batch = todo[start:start + g.batch_size]
            seeds = [sample_seed(g.seed, p, k) for p, k in batch]
            latents, frames = gen.generate([prompts[p] for p, _ in batch], seeds)
            for (p, k), seed, lat, fr in zip(batch, seeds, latents, frames):
                write_rollout(writer, RolloutRecord(RolloutRecord.make_id(p, k), prompts[p], p, seed, k, lat, fr),
                              fps=g.fps)
            progress.update(len(batch))
    if distributed.is_main_process():
        atomic_write_text(out / "prompts.json",
                          json.dumps({"prompts": prompts, "samples_per_prompt": g.samples_per_prompt}, indent=2))
    distributed.barrier("generate")
    logging.info("generate: %d videos in %s", len(items), out)
    return out
