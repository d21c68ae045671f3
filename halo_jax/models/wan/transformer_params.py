"""diffusers `WanTransformer3DModel` safetensors <-> `WanTransformer3D` params.

    load_transformer(folder, mesh=None, rules=DEFAULT_RULES, **run_options) -> WanTransformer3D
    export_transformer(model, folder, dtype=None)  # a folder diffusers' from_pretrained reads

Loading builds the model abstractly (`nnx.eval_shape`), then fills every param
from the memory-mapped safetensors (single file or sharded with an index),
placing it straight onto its `NamedSharding` when a mesh is given: no host ever
holds the whole model. Key names follow diffusers; the block rules come in two
layouts, looped (`blocks.{i}.…`) and scanned (`blocks.…[{i}]`, stacked on the
leading `layers` axis).
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from halo_jax.convert.safetensors_io import (
    Rule, SafetensorsFolder, export_state, load_state, read_config, save_folder,
)
from halo_jax.models.wan.transformer import WanTransformer3D, WanTransformerConfig
from halo_jax.parallel.sharding import DEFAULT_RULES, Rules, state_shardings

WEIGHTS_NAME = "diffusion_pytorch_model"
# Keys diffusers itself skips when loading (`_keys_to_ignore_on_load_unexpected`), as a regex.
IGNORED_KEYS = r"norm_added_q"

_TOP = (
    ("patch_embedding.weight", "patch_embedding.kernel", "conv3d"),
    ("patch_embedding.bias", "patch_embedding.bias", "none"),
    ("condition_embedder.time_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_1.kernel", "linear"),
    ("condition_embedder.time_embedder.linear_1.bias", "condition_embedder.time_embedder.linear_1.bias", "none"),
    ("condition_embedder.time_embedder.linear_2.weight", "condition_embedder.time_embedder.linear_2.kernel", "linear"),
    ("condition_embedder.time_embedder.linear_2.bias", "condition_embedder.time_embedder.linear_2.bias", "none"),
    ("condition_embedder.time_proj.weight", "condition_embedder.time_proj.kernel", "linear"),
    ("condition_embedder.time_proj.bias", "condition_embedder.time_proj.bias", "none"),
    ("condition_embedder.text_embedder.linear_1.weight", "condition_embedder.text_embedder.linear_1.kernel", "linear"),
    ("condition_embedder.text_embedder.linear_1.bias", "condition_embedder.text_embedder.linear_1.bias", "none"),
    ("condition_embedder.text_embedder.linear_2.weight", "condition_embedder.text_embedder.linear_2.kernel", "linear"),
    ("condition_embedder.text_embedder.linear_2.bias", "condition_embedder.text_embedder.linear_2.bias", "none"),
    ("proj_out.weight", "proj_out.kernel", "linear"),
    ("proj_out.bias", "proj_out.bias", "none"),
    ("scale_shift_table", "scale_shift_table", "none"),
)


def _block_pairs(cross_attn_norm: bool) -> list[tuple[str, str, str]]:
    """(diffusers suffix, our suffix, transform) for one block."""
    pairs = []
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            pairs += [(f"{attn}.{proj}.weight", f"{attn}.{proj}.kernel", "linear"), (f"{attn}.{proj}.bias", f"{attn}.{proj}.bias", "none")]
        pairs += [(f"{attn}.to_out.0.weight", f"{attn}.to_out.kernel", "linear"), (f"{attn}.to_out.0.bias", f"{attn}.to_out.bias", "none")]
        pairs += [(f"{attn}.norm_q.weight", f"{attn}.norm_q.scale", "none"), (f"{attn}.norm_k.weight", f"{attn}.norm_k.scale", "none")]
    if cross_attn_norm:
        pairs += [("norm2.weight", "norm2.scale", "none"), ("norm2.bias", "norm2.bias", "none")]
    pairs += [
        ("ffn.net.0.proj.weight", "ffn.proj_in.kernel", "linear"), ("ffn.net.0.proj.bias", "ffn.proj_in.bias", "none"),
        ("ffn.net.2.weight", "ffn.proj_out.kernel", "linear"), ("ffn.net.2.bias", "ffn.proj_out.bias", "none"),
        ("scale_shift_table", "scale_shift_table", "none"),
    ]
    return pairs


def checkpoint_rules(config: WanTransformerConfig) -> tuple[Rule, ...]:
    """The key table for `config`'s layout (looped or scanned blocks)."""
    rules = [Rule(*t) for t in _TOP]
    for theirs, ours, transform in _block_pairs(config.cross_attn_norm):
        param = f"blocks.{ours}[{{i}}]" if config.scan_layers else f"blocks.{{i}}.{ours}"
        rules.append(Rule(f"blocks.{{i}}.{theirs}", param, transform))
    return tuple(rules)


def load_transformer(
    folder: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    **run_options: Any,
) -> WanTransformer3D:
    """Load a diffusers-format Wan transformer folder (config.json + safetensors, sharded or not).

    `run_options` are `WanTransformerConfig` fields to set or override (dtype,
    param_dtype, remat, scan_layers, attention_impl, ...). With a `mesh`, each
    param is read slice by slice onto its sharding (logical names mapped by
    `rules`); without, onto the first device. Weights are cast explicitly to
    `param_dtype`. Raises `CheckpointError` naming missing / unexpected keys,
    shape mismatches and truncated files.
    """
    config = WanTransformerConfig.from_diffusers_config(read_config(folder), **run_options)
    abstract = nnx.eval_shape(lambda: WanTransformer3D(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    state = load_state(state, SafetensorsFolder(folder), checkpoint_rules(config), shardings=shardings,
                       name=str(folder), ignore=IGNORED_KEYS)
    return nnx.merge(graphdef, state)


def export_transformer(model: WanTransformer3D, folder: str | os.PathLike, dtype: Any | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a diffusers `WanTransformer3DModel` folder (config.json + diffusion_pytorch_model*.safetensors).

    `dtype` (e.g. np.float32 or ml_dtypes.bfloat16) casts every tensor; None keeps
    the param dtype. Scanned models unstack into per-block keys. Every array is
    fetched to this host (single-process export).
    """
    tensors = export_state(nnx.state(model, nnx.Param), checkpoint_rules(model.config), dtype=dtype)
    save_folder(folder, tensors, model.config.to_diffusers_config(), WEIGHTS_NAME, max_shard_bytes=max_shard_bytes)
