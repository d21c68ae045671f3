"""transformers SigLIP checkpoints <-> `siglip.SiglipModel`: key table, loader, exporter.

A transformers `SiglipModel` folder (`config.json` + `model.safetensors`, sharded or not) loads with
`load_siglip(folder, mesh)`; `export_siglip(model, folder)` writes a folder that
`transformers.SiglipModel.from_pretrained` loads. Non-persistent `position_ids` buffers that
older checkpoints may carry are ignored.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
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
from halo_jax.models.reward.siglip import SiglipConfig, SiglipModel
from halo_jax.parallel.sharding import DEFAULT_RULES, Rules, state_shardings


# Non-persistent buffers older checkpoints may carry (`*.position_ids`), as a regex.
IGNORED_KEYS = r"position_ids$"


def _linear(ckpt: str, param: str) -> list[Rule]:
    return [Rule(f"{ckpt}.weight", f"{param}.kernel", "linear"), Rule(f"{ckpt}.bias", f"{param}.bias")]


def _norm(ckpt: str, param: str) -> list[Rule]:
    return [Rule(f"{ckpt}.weight", f"{param}.scale"), Rule(f"{ckpt}.bias", f"{param}.bias")]


def encoder_rules(ckpt: str, param: str) -> list[Rule]:
    """`{ckpt}.layers.{i}.*` <-> the stacked `{param}.layers.*[{i}]`."""
    src, dst = f"{ckpt}.layers.{{i}}", f"{param}.layers"
    rules: list[Rule] = []
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        rules += [Rule(f"{src}.{name}.weight", f"{dst}.{name}.kernel[{{i}}]", "linear"),
                  Rule(f"{src}.{name}.bias", f"{dst}.{name}.bias[{{i}}]")]
    for name in ("layer_norm1", "layer_norm2"):
        rules += [Rule(f"{src}.{name}.weight", f"{dst}.{name}.scale[{{i}}]"),
                  Rule(f"{src}.{name}.bias", f"{dst}.{name}.bias[{{i}}]")]
    return rules


def vision_rules(ckpt: str = "vision_model", param: str = "vision_model") -> list[Rule]:
    """Key table of a `SiglipVisionTower` (checkpoint prefix `ckpt`, param prefix `param`)."""
    return [
        Rule(f"{ckpt}.embeddings.patch_embedding.weight", f"{param}.embeddings.patch_embedding.kernel", "conv2d"),
        Rule(f"{ckpt}.embeddings.patch_embedding.bias", f"{param}.embeddings.patch_embedding.bias"),
        Rule(f"{ckpt}.embeddings.position_embedding.weight", f"{param}.embeddings.position_embedding.embedding"),
        *encoder_rules(f"{ckpt}.encoder", f"{param}.encoder"),
        *_norm(f"{ckpt}.post_layernorm", f"{param}.post_layernorm"),
        Rule(f"{ckpt}.head.probe", f"{param}.head.probe"),
        Rule(f"{ckpt}.head.attention.in_proj_weight", f"{param}.head.attention.in_proj.kernel", "linear"),
        Rule(f"{ckpt}.head.attention.in_proj_bias", f"{param}.head.attention.in_proj.bias"),
        *_linear(f"{ckpt}.head.attention.out_proj", f"{param}.head.attention.out_proj"),
        *_norm(f"{ckpt}.head.layernorm", f"{param}.head.layernorm"),
        *_linear(f"{ckpt}.head.mlp.fc1", f"{param}.head.mlp.fc1"),
        *_linear(f"{ckpt}.head.mlp.fc2", f"{param}.head.mlp.fc2"),
    ]


def text_rules(ckpt: str = "text_model", param: str = "text_model") -> list[Rule]:
    """Key table of a `SiglipTextTower`."""
    return [
        Rule(f"{ckpt}.embeddings.token_embedding.weight", f"{param}.embeddings.token_embedding.embedding"),
        Rule(f"{ckpt}.embeddings.position_embedding.weight", f"{param}.embeddings.position_embedding.embedding"),
        *encoder_rules(f"{ckpt}.encoder", f"{param}.encoder"),
        *_norm(f"{ckpt}.final_layer_norm", f"{param}.final_layer_norm"),
        *_linear(f"{ckpt}.head", f"{param}.head"),
    ]


def siglip_rules() -> list[Rule]:
    """Key table of a whole transformers `SiglipModel`."""
    return [*vision_rules(), *text_rules(), Rule("logit_scale", "logit_scale"), Rule("logit_bias", "logit_bias")]


def load_siglip(folder: str | os.PathLike, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, *,
                dtype: Any = None, param_dtype: Any = jnp.float32, attention_impl: str = "xla") -> SiglipModel:
    """A `SiglipModel` (both towers + logit scale/bias) from a local transformers folder.

    With `mesh`, each parameter is read straight onto its sharding (logical-axis `rules`);
    otherwise onto the first device. Raises `CheckpointError` naming missing/unexpected keys.
    """
    try:
        cfg = SiglipConfig.from_transformers_config(read_config(folder))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from e
    abstract = nnx.eval_shape(lambda: SiglipModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                 attention_impl=attention_impl))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    state = load_state(state, SafetensorsFolder(folder), siglip_rules(), shardings,
                       name=f"SigLIP checkpoint {folder}", ignore=IGNORED_KEYS)
    return nnx.merge(graphdef, state)


def export_siglip(model: SiglipModel, folder: str | os.PathLike, dtype: Any | None = None) -> None:
    """Write `model` as a transformers `SiglipModel` folder (`config.json` + `model.safetensors`)."""
    tensors = export_state(nnx.state(model, nnx.Param), siglip_rules(), dtype=dtype)
    save_folder(folder, tensors, model.config.to_transformers_config(), weights_name="model")
