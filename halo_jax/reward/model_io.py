"""The reward model of a run: its config, tokenizer, construction, export and reload.

Backbone. With `reward.siglip_path` (a local transformers SigLIP folder) the towers, their
config and the tokenizer come from that folder (`load_towers`). Without it (the
moving-shapes world, where nothing can be downloaded) the towers are *randomly initialised
tiny SigLIP towers* (`reward.model.vision` / `reward.model.text`) and the tokenizer is a
closed-vocabulary word tokenizer (`models.text.build_word_tokenizer`) over the world's
grammar and every training prompt; the towers then learn from scratch (tune them "full").

Export folder (`reward_ckpt/`, reloadable with `load_reward_model(folder)`):

    config.json         {"format": "halo_jax.reward_model/1", "reward_model": RewardModelConfig.to_dict(),
                         "text_max_length": S, "dtype": "float32", "info": {...}}
    model.safetensors   every parameter (LoRA adapters included) under its nnx path,
                        e.g. "video_head.fc1.kernel", stacked layers kept stacked
    tokenizer/          the tokenizer (save_pretrained layout)

The folder is written to a temporary sibling and renamed into place, so a reader never
sees half an export.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from halo_jax.convert.safetensors_io import (
    CheckpointError,
    Rule,
    SafetensorsFolder,
    export_state,
    load_state,
    read_config,
    save_folder,
)
from halo_jax.io import atomic_dir
from halo_jax.models.reward import RewardModel, RewardModelConfig, apply_tower_lora, load_towers
from halo_jax.models.reward.siglip import SiglipTextConfig, SiglipVisionConfig
from halo_jax.parallel.sharding import DEFAULT_RULES, Rules, create_sharded, state_shardings

EXPORT_FORMAT = "halo_jax.reward_model/1"
WEIGHTS_NAME = "model"


def dtype_of(name: str | None) -> Any:
    """'float32' | 'bfloat16' | ... -> a jnp dtype (None/'' -> None: the param dtype)."""
    if not name:
        return None
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}; use e.g. 'float32' or 'bfloat16'") from None


# ----------------------------------------------------------------------------- tokenizer


def make_tokenizer(siglip_path: str, folder: str | os.PathLike, prompts: Sequence[str], max_length: int) -> Any:
    """The run's tokenizer, saved in `folder` (a resumed run reuses what is there).

    SigLIP folder given: its tokenizer. Otherwise a word tokenizer over the moving-shapes
    grammar and `prompts` (words it never saw map to <unk>).
    """
    from halo_jax.models.text.tokenizer import build_word_tokenizer, load_tokenizer

    folder = Path(folder)
    if (folder / "tokenizer_config.json").exists():
        return load_tokenizer(folder)
    if siglip_path:
        tok = load_tokenizer(siglip_path)
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(folder))
        return load_tokenizer(folder)
    from halo_jax.data import shapes

    words = list(shapes.train_prompts()) + list(shapes.heldout_prompts()) + sorted(set(prompts))
    return build_word_tokenizer(words, folder, model_max_length=max_length)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{prompt: (input_ids (S,), mask (S,))} int32, padded/truncated to `max_length`."""
    from halo_jax.models.text.tokenizer import encode_prompts

    unique = sorted(set(prompts))
    if not unique:
        return {}
    ids, mask = encode_prompts(tokenizer, unique, max_length=max_length, clean=False)
    return {p: (ids[i], mask[i]) for i, p in enumerate(unique)}


# ----------------------------------------------------------------------------- model


def model_config(section: Mapping[str, Any], aspects: Sequence[str], grid: Sequence[int], *, siglip_path: str = "",
                 tokenizer: Any = None, text_max_length: int | None = None) -> RewardModelConfig:
    """`RewardModelConfig` from a `reward.model` config section (+ the run's aspects and grid).

    `section["vision"]` / `section["text"]` (transformers field names) define the random towers
    when there is no `siglip_path`; the text tower's vocabulary and positions then follow the
    `tokenizer` and `text_max_length`. `section["phrase_separators"]` (words) become the model's
    `separator_ids` through the tokenizer.
    """
    kw = {k: v for k, v in dict(section).items() if k not in ("vision", "text", "phrase_separators")}
    for key in ("mean", "std"):
        if key in kw:
            kw[key] = tuple(kw[key])
    kw.update(aspects=tuple(aspects), grid=tuple(int(g) for g in grid))
    separators = tuple(section.get("phrase_separators") or ())
    if separators:
        if tokenizer is None:
            raise ValueError("reward.model.phrase_separators needs the run's tokenizer to find their token ids")
        kw["separator_ids"] = tuple(separator_id(tokenizer, w) for w in separators)
    try:
        if siglip_path:
            return RewardModelConfig.from_siglip_folder(siglip_path, **kw)
        vision = SiglipVisionConfig(**dict(section.get("vision") or {}))
        text_kw = dict(section.get("text") or {})
        if tokenizer is not None:
            text_kw["vocab_size"] = len(tokenizer)
        if text_max_length is not None:
            text_kw["max_position_embeddings"] = int(text_max_length)
        return RewardModelConfig(vision=vision, text=SiglipTextConfig(**text_kw), **kw)
    except TypeError as e:
        raise ValueError(f"reward.model: {e}; the fields are those of RewardModelConfig (and of the SigLIP vision/text "
                         "configs under vision/text)") from None


def separator_id(tokenizer: Any, word: str) -> int:
    """The one token id of `word` (a phrase separator); ValueError when the tokenizer splits it or lacks it."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1 or ids[0] == unknown:
        raise ValueError(f"reward.model.phrase_separators: {word!r} is not one known token of the tokenizer (ids "
                         f"{ids}); use words the tokenizer keeps whole, e.g. 'and'")
    return int(ids[0])


def create_model(cfg: RewardModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, seed: int = 0,
                 siglip_path: str = "", dtype: Any = None) -> RewardModel:
    """A sharded `RewardModel`: new layers from `seed`, towers from `siglip_path` (if given), LoRA
    adapters on towers tuned with 'lora'."""
    model = create_sharded(lambda: RewardModel(cfg, rngs=nnx.Rngs(seed), dtype=dtype), mesh, rules)
    if siglip_path:
        load_towers(model, siglip_path, mesh, rules)
    apply_tower_lora(model, key=seed + 1)
    return model


def _identity_rules(state: nnx.State) -> list[Rule]:
    return [Rule(".".join(map(str, path)), ".".join(map(str, path))) for path, _ in nnx.to_flat_state(state)]


class LoadedReward(NamedTuple):
    """A reloaded reward model: the model, its tokenizer, the prompt length and the export's config.json."""

    model: RewardModel
    tokenizer: Any
    text_max_length: int
    info: dict


def save_reward_model(model: RewardModel, folder: str | os.PathLike, tokenizer: Any, text_max_length: int,
                      info: Mapping[str, Any] | None = None) -> Path:
    """Write the export folder (module docstring), atomically; returns its path."""
    folder = Path(folder)
    params = nnx.state(model, nnx.Param)
    tensors = export_state(params, _identity_rules(params))
    dtype = model.dtype
    config = {"format": EXPORT_FORMAT, "reward_model": model.config.to_dict(), "text_max_length": int(text_max_length),
              "dtype": jnp.dtype(dtype).name if dtype is not None else None, "info": dict(info or {})}
    with atomic_dir(folder) as tmp:
        save_folder(tmp, tensors, config, weights_name=WEIGHTS_NAME)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return folder


def load_reward_model(folder: str | os.PathLike, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, *,
                      dtype: Any = "config") -> LoadedReward:
    """Reload an export of `save_reward_model` (the `train_reward` stage's `reward_ckpt/`).

    With `mesh`, every parameter is read straight onto its sharding; otherwise onto the first
    device. `dtype`: compute dtype ("config": the one it was trained with). Raises
    `CheckpointError` for a folder that is not a reward-model export or does not match its config.
    """
    from halo_jax.models.text.tokenizer import load_tokenizer

    folder = Path(folder)
    meta = read_config(folder)
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{folder}/config.json has format {meta.get('format')!r}, not {EXPORT_FORMAT!r}: "
                              "not a reward-model export; pass the reward_ckpt/ folder a train_reward stage wrote")
    try:
        cfg = RewardModelConfig.from_dict(meta["reward_model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: bad reward_model config ({e})") from None
    compute = dtype_of(meta.get("dtype")) if dtype == "config" else dtype_of(dtype) if isinstance(dtype, str) else dtype

    def build() -> RewardModel:
        return apply_tower_lora(RewardModel(cfg, rngs=nnx.Rngs(0), dtype=compute), key=1)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    others = [".".join(map(str, p)) for p, v in nnx.to_flat_state(state) if not isinstance(v, nnx.Param)]
    if others:  # the export carries parameters only
        raise CheckpointError(f"{folder}: the reward model holds non-parameter state {others[:5]} that an export "
                              "does not carry")
    state = load_state(state, SafetensorsFolder(folder), _identity_rules(state), shardings,
                       name=f"reward model {folder}")
    model = nnx.merge(graphdef, state)
    return LoadedReward(model, load_tokenizer(folder / "tokenizer"), int(meta["text_max_length"]), meta)


def config_summary(cfg: RewardModelConfig) -> dict:
    """A few headline numbers of a reward-model config (for logs and reports)."""
    d = dataclasses.asdict(cfg)
    return {k: d[k] for k in ("num_frames", "width", "num_layers", "grid", "aspects", "vision_tuning", "text_tuning")}
