"""Stage `pairs`: the score store `scores/` (+ latents from `rollouts/`) -> the pair store `pairs/`.

Per prompt, `align.pairs.build_pairs` picks win/lose pairs by the combined video reward and
builds each pair's patch maps (s, a) from the patch rewards. Every pair record carries what
one DPO step needs, so `train_dpo` never runs the VAE or the text encoder:

    pair_id "<winner_id>__<loser_id>", prompt, winner_id, loser_id, reward_w, reward_l,
    latents_w, latents_l (C, F, H, W) float32      the rollouts' normalised latents (DiT space)
    text_embeds (L, D) float32                      the prompt's umT5 embedding, zero past the prompt
                                                    (computed once per prompt, as generation does)
    s (Tp, Hp, Wp) int8, a (Tp, Hp, Wp) float32     patch preference and weight
    video_reward_gap float, patch_reward_gap (Tp, Hp, Wp) float32

Checks (before anything is written): w and l latents have one shape, the same for every
pair, and the grid fits it (`GranDPOConfig.cell_map`); a failure names both videos, both
shapes and the grid. `pairs/summary.json` holds the `PairSummary` and the pair settings;
the summary line is printed. Resumable: pairs already stored are skipped (and a store
built with other settings is refused). Process 0 writes; the others wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from halo_jax.align.gran_dpo import GranDPOConfig
from halo_jax.align.pairs import Pair, PairConfig, build_pairs
from halo_jax.config import ConfigError
from halo_jax.data.stores import Field, Schema, StoreReader, StoreWriter, read_schema
from halo_jax.io import atomic_write_text
from halo_jax.parallel import distributed, mesh as mesh_lib
from halo_jax.stages.generate import model_path
from halo_jax.train.metrics import Progress

STORE_NAME = "pairs"


def pairs_schema(latent_shape: Sequence[int | None], text_shape: Sequence[int | None],
                 grid: Sequence[int | None]) -> Schema:
    """The pair store's schema (module docstring)."""
    grid = tuple(grid)
    return Schema(STORE_NAME, "pair_id", (
        Field("pair_id", "str"), Field("prompt", "str"), Field("winner_id", "str"), Field("loser_id", "str"),
        Field("reward_w", "float"), Field("reward_l", "float"),
        Field.array("latents_w", np.float32, tuple(latent_shape)),
        Field.array("latents_l", np.float32, tuple(latent_shape)),
        Field.array("text_embeds", np.float32, tuple(text_shape)),
        Field.array("s", np.int8, grid), Field.array("a", np.float32, grid),
        Field("video_reward_gap", "float"), Field.array("patch_reward_gap", np.float32, grid)))


def pair_id(winner_id: str, loser_id: str) -> str:
    return f"{winner_id}__{loser_id}"


def loss_config(config) -> GranDPOConfig:
    """The `GranDPOConfig` of a run: `config.dpo.loss` (when present) with the top-level `config.grid`."""
    loss = config.dpo.loss.to_dict() if "dpo" in config else {}
    if loss.get("beta_patch") in (0, 0.0):
        loss["beta_patch"] = None
    if loss.get("pixel_shape") in ((), []):
        loss["pixel_shape"] = None
    return GranDPOConfig.from_config({**loss, "grid": tuple(config.grid)})


def check_pair_shapes(what: str, winner: str, loser: str, shape_w: Sequence[int], shape_l: Sequence[int],
                      loss: GranDPOConfig) -> None:
    """Raise `ValueError` unless w and l latents share a (C, F, H, W) shape on which the grid fits."""
    shape_w, shape_l = tuple(int(x) for x in shape_w), tuple(int(x) for x in shape_l)
    if shape_w != shape_l or len(shape_w) != 4:
        raise ValueError(f"{what}: winner {winner!r} latents {shape_w} and loser {loser!r} latents {shape_l} must "
                         f"both be (C, F, H, W) of one shape; regenerate the rollouts at one video size")
    try:
        loss.cell_map(shape_w[1:])
    except ValueError as err:
        raise ValueError(f"{what}: grid {loss.grid} does not fit the latents {shape_w} of winner {winner!r} and "
                         f"loser {loser!r}: {err}; set config.grid to one the labels and latents share") from None


def score_to_label(record: Mapping[str, Any]) -> dict:
    """A score-store record -> the dict `align.pairs` reads ({aspect: score}, {aspect: Tp x Hp x Wp})."""
    vid = record["video_id"]
    aspects = [str(a) for a in record["aspects"]]
    vs, ps = np.asarray(record["video_scores"]), np.asarray(record["patch_scores"])
    if vs.shape != (len(aspects),) or ps.ndim != 4 or ps.shape[0] != len(aspects):
        raise ValueError(f"score record {vid!r}: aspects {aspects} do not match video_scores {vs.shape} and "
                         f"patch_scores {ps.shape} (expected (A,) and (A, Tp, Hp, Wp)); re-run the score stage")
    return {"video_id": vid, "prompt": record["prompt"], "grid": list(ps.shape[1:]),
            "video_scores": {a: float(vs[i]) for i, a in enumerate(aspects)},
            "patch_scores": {a: ps[i] for i, a in enumerate(aspects)}}


def pair_config(config) -> PairConfig:
    section = config.pairs.to_dict()
    for k in ("aspect_weights", "patch_aspect_weights"):
        section[k] = section.get(k) or None
    return PairConfig.from_config({**section, "grid": tuple(config.grid)})


class _TextEncoder:
    """The model folder's tokenizer + umT5 (only these two components are loaded)."""

    def __init__(self, folder: Path, batch_size: int, rules):
        from halo_jax.models.text import encode_prompts, load_tokenizer, load_umt5, text_embeddings

        self.tokenizer = load_tokenizer(folder / "tokenizer")
        # Process 0 alone encodes: parameters sharded FSDP over its own devices (umT5-XXL is 5.7B).
        local = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.local_devices())
        self.encoder = load_umt5(folder / "text_encoder", mesh=local, rules=rules)
        self.max_length = min(int(self.tokenizer.model_max_length), 512)  # as load_pipeline
        self.batch_size = batch_size
        self._encode, self._embed = encode_prompts, text_embeddings

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            padded = chunk + [""] * (self.batch_size - len(chunk))  # one compiled shape
            ids, mask = self._encode(self.tokenizer, padded, max_length=self.max_length)
            emb = np.asarray(self._embed(self.encoder, ids, mask)[0], np.float32)
            out.update({p: emb[j] for j, p in enumerate(chunk)})
        return out


def _rollout_latents(rollouts: StoreReader, video_id: str, what: str) -> np.ndarray:
    try:
        index = rollouts.index_of(video_id)
    except KeyError:
        index = None
    rec = rollouts[index] if index is not None else None
    if rec is None:
        raise ValueError(f"{what}: video {video_id!r} is scored but has no readable record in {rollouts.dir}; "
                         f"re-run generate and score")
    return np.asarray(rec["latents"], np.float32)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def build_pair_store(config, workdir: str | Path) -> dict:
    """Build (or complete) `pairs/`; returns the summary dict. Run on process 0 only."""
    workdir = Path(workdir)
    section = config.pairs
    scores_dir, rollouts_dir, out = workdir / "scores", workdir / "rollouts", workdir / STORE_NAME
    for d, stage in ((scores_dir, "score"), (rollouts_dir, "generate")):
        if not d.exists():
            raise ConfigError(f"{d} does not exist; run the {stage} stage first")
    pcfg, loss = pair_config(config), loss_config(config)
    scores = StoreReader(scores_dir, on_corrupt=section.on_corrupt)
    rollouts = StoreReader(rollouts_dir, on_corrupt=section.on_corrupt)
    pairs, summary = build_pairs((score_to_label(r) for r in scores), pcfg)
    pairs_by_id: dict[str, Pair] = {pair_id(p.winner_id, p.loser_id): p for p in pairs}

    # Validate every pair's latent shapes before writing anything (from the rollout schema when it
    # declares one shape for all, else from the records; latents are read again when written).
    declared = read_schema(rollouts_dir)["latents"].shape
    shapes: dict[str, tuple[int, ...]] = {}

    def shape_of(vid: str, what: str) -> tuple[int, ...]:
        if vid not in shapes:
            shapes[vid] = (tuple(declared) if declared is not None and None not in declared
                           else _rollout_latents(rollouts, vid, what).shape)
        return shapes[vid]

    first_shape = None
    for pid, p in pairs_by_id.items():
        sw, sl = shape_of(p.winner_id, f"pair {pid!r}"), shape_of(p.loser_id, f"pair {pid!r}")
        check_pair_shapes(f"pair {pid!r}", p.winner_id, p.loser_id, sw, sl, loss)
        if first_shape is None:
            first_shape = (sw, pid)
        elif sw != first_shape[0]:
            raise ValueError(f"pair {pid!r} has latents {sw} but pair {first_shape[1]!r} has {first_shape[0]}; "
                             f"every pair must share one latent shape (one video size per run)")

    grid = tuple(config.grid)
    lat_shape = first_shape[0] if first_shape else (None,) * 4
    text_shape: tuple = (None, None)
    encoder = None
    done: set[str] = set()
    if out.exists() and (out / "store.json").exists():
        done = set(StoreReader(out, on_corrupt="skip").ids())
        stale = sorted(done - set(pairs_by_id))
        if stale:
            raise ConfigError(f"{out} holds pairs {stale[:3]} that the current scores and pair settings do not "
                              f"give; it was built with other settings: delete {out} and re-run the pairs stage")
    todo = [pid for pid in pairs_by_id if pid not in done]
    if todo:
        encoder = _TextEncoder(model_path(config, str(workdir)), int(section.text_batch_size), config.sharding.rules)
        text_shape = (encoder.max_length, int(encoder.encoder.config.d_model))
    elif done:
        text_shape = tuple(StoreReader(out).get(next(iter(done)))["text_embeds"].shape)

    with StoreWriter(out, pairs_schema(lat_shape, text_shape, grid), chunk_size=int(section.chunk_size)) as writer:
        todo = [pid for pid in todo if pid not in writer.done_ids()]
        progress = Progress(len(pairs_by_id), "pairs", start=len(pairs_by_id) - len(todo), unit="pair")
        prompts = sorted({pairs_by_id[pid].prompt for pid in todo})
        embeds = encoder(prompts) if todo else {}
        for pid in todo:
            p = pairs_by_id[pid]
            writer.write({"pair_id": pid, "prompt": p.prompt, "winner_id": p.winner_id, "loser_id": p.loser_id,
                          "reward_w": float(p.reward_w), "reward_l": float(p.reward_l),
                          "latents_w": _rollout_latents(rollouts, p.winner_id, f"pair {pid!r}"),
                          "latents_l": _rollout_latents(rollouts, p.loser_id, f"pair {pid!r}"),
                          "text_embeds": embeds[p.prompt], "s": p.s.astype(np.int8), "a": p.a.astype(np.float32),
                          "video_reward_gap": float(p.video_gap), "patch_reward_gap": p.patch_gap.astype(np.float32)})
            progress.update(1)
    result = {**dataclasses.asdict(summary), "grid": list(grid),
              "pair_config": json.loads(json.dumps(dataclasses.asdict(pcfg), default=list))}
    _write_json(out / "summary.json", result)
    line = summary.format()
    print(line, flush=True)
    logging.info("%s", line)
    if not pairs:
        logging.warning("pairs: no pair cleared margin_video=%s; lower it or score more samples per prompt",
                        pcfg.margin_video)
    return result


def run(config, workdir: str) -> Path:
    out = Path(workdir) / STORE_NAME
    if distributed.is_main_process():
        build_pair_store(config, workdir)
    distributed.barrier("pairs")
    return out
