"""The reward model's SigLIP towers: which of their parameters train (`trainable_filter`, the tuning modes
of `RewardModelConfig`), LoRA adapters on them (`apply_tower_lora`) and loading them from a transformers
SigLIP folder (`load_towers`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from halo_jax.convert.safetensors_io import CheckpointError, read_config
from halo_jax.models.reward.reward_model import RewardModel, RewardModelConfig, parse_tuning
from halo_jax.models.reward.siglip import SiglipConfig
from halo_jax.parallel.sharding import DEFAULT_RULES, Rules


def trainable_filter(cfg: RewardModelConfig) -> Callable[[tuple, Any], bool]:
    """nnx filter `(path, variable) -> bool` of the parameters the optimizer should update.

    New layers and heads always train; a tower follows its tuning mode. For 'top:K' the
    whole stacked encoder is selected (one array), but its first L-K layers receive exactly
    zero gradient (stop_gradient), so use no weight decay on it or mask per layer.
    'lora' selects only variables of type `nnx.LoRAParam` or with 'lora' in their path.
    """

    def tower_rule(mode: str, depth: int, rest: tuple) -> Callable[[Any], bool]:
        kind, _ = parse_tuning(mode, depth, "tuning")
        if kind == "full":
            return lambda var: True
        if kind == "frozen":
            return lambda var: False
        if kind == "top":
            return lambda var: rest[0] in ("encoder", "post_layernorm", "final_layer_norm") and mode != "top:0"
        return lambda var: isinstance(var, nnx.LoRAParam) or any("lora" in str(p).lower() for p in rest)

    def predicate(path: tuple, var: Any) -> bool:
        if not isinstance(var, nnx.Param):
            return False
        head, rest = str(path[0]), tuple(str(p) for p in path[1:])
        if head == "vision":
            return tower_rule(cfg.vision_tuning, cfg.vision.num_hidden_layers, rest)(var)
        if head == "text":
            return tower_rule(cfg.text_tuning, cfg.text.num_hidden_layers, rest)(var)
        return True

    return predicate


TOWER_LORA_TARGETS = ("encoder.layers.self_attn.q_proj", "encoder.layers.self_attn.k_proj",
                      "encoder.layers.self_attn.v_proj", "encoder.layers.self_attn.out_proj",
                      "encoder.layers.mlp.fc1", "encoder.layers.mlp.fc2")


def apply_tower_lora(model: RewardModel, key: jax.Array | int = 0) -> RewardModel:
    """Wrap the encoder projections of every tower whose tuning is 'lora' in LoRA adapters
    (`halo_jax.models.lora`, rank/alpha from the config); in place, returns `model`.

    Call after `load_towers` (adapters start at B = 0, so the model is unchanged).
    """
    cfg = model.config
    targets = [f"{tower}.{t}" for tower, mode in (("vision", cfg.vision_tuning), ("text", cfg.text_tuning))
               if mode == "lora" for t in TOWER_LORA_TARGETS]
    if not targets:
        return model
    from halo_jax.models.lora import LoRAConfig, apply_lora

    return apply_lora(model, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=tuple(targets)), key=key)


def load_towers(model: RewardModel, folder: str | os.PathLike, mesh: Mesh | None = None,
                rules: Rules = DEFAULT_RULES) -> RewardModel:
    """Fill `model.vision` / `model.text` (in place) from a transformers SigLIP folder.

    The folder's tower configs must equal `model.config`'s (build the config with
    `RewardModelConfig.from_siglip_folder`). The vision pooling head is not used.
    """
    from halo_jax.models.reward.siglip_params import load_siglip

    cfg = model.config
    sig = SiglipConfig.from_transformers_config(read_config(folder))
    for name, theirs, ours in (("vision", sig.vision, cfg.vision), ("text", sig.text, cfg.text)):
        if name == "vision":
            theirs, ours = (dataclasses.replace(c, vision_use_head=False) for c in (theirs, ours))
        if theirs != ours:
            raise CheckpointError(f"{folder}: {name} tower config {theirs} differs from the reward model's {ours}; "
                                  "build the config with RewardModelConfig.from_siglip_folder(folder, ...)")
    siglip = load_siglip(folder, mesh, rules, dtype=model.dtype, param_dtype=model.param_dtype,
                         attention_impl=cfg.attention_impl)
    vision_state = nnx.state(siglip.vision_model)
    if "head" in vision_state:
        del vision_state["head"]
    nnx.update(model.vision, vision_state)
    nnx.update(model.text, nnx.state(siglip.text_model))
    return model
