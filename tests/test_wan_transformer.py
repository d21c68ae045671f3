"""Wan DiT: parity with diffusers `WanTransformer3DModel`, layouts, sharding, import/export, bad folders.

Tolerances (float32, 'highest' matmul precision, tiny random config):
  vs diffusers:             max |ours - torch| <= 1e-5 * max |torch|  (measured 1.7e-6)
  scan vs loop, sharded:    max abs err <= 1e-5 * max |ref|  (same maths, other reduction order)
  remat'd gradients vs torch autograd: max abs err <= 2e-5 * max |grad|  (measured 4e-6)
  export / re-import:       bit-exact params; diffusers reloading our export: bit-exact torch output
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from halo_jax.convert.safetensors_io import (
    PERMUTATIONS, CheckpointError, SafetensorsFolder, map_checkpoint_keys, save_folder,
)
from halo_jax.models.attention import attention, resolve_implementation
from halo_jax.models.wan import (
    WanTransformer3D, WanTransformerConfig, checkpoint_rules, export_transformer, load_transformer,
)
from halo_jax.parallel.sharding import shard_batch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.utils.import_utils import is_accelerate_available  # noqa: E402

TINY = WanTransformerConfig.tiny()
PARITY_RTOL = 1e-5
SAME_RTOL = 1e-5
GRAD_RTOL = 2e-5


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _torch_model(cfg: WanTransformerConfig, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    model = diffusers.WanTransformer3DModel(**kwargs).eval()
    with torch.no_grad():  # every param random, so norms / biases are exercised too
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory):
    model = _torch_model(TINY)
    folder = tmp_path_factory.mktemp("wan_dit") / "transformer"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def inputs():
    """Batch 2, odd frame count, non-square (H != W) latents; sample 1's text zero-padded after 4 tokens."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, TINY.in_channels, 3, 4, 6)).astype(np.float32)
    timestep = np.array([37.5, 911.0], np.float32)
    text = rng.standard_normal((2, 7, TINY.text_dim)).astype(np.float32)
    text[1, 4:] = 0.0
    mask = np.ones((2, 7), bool)
    mask[1, 4:] = False
    return latents, timestep, text, mask


@pytest.fixture(scope="module")
def torch_out(torch_folder, inputs):
    _, model = torch_folder
    latents, timestep, text, _ = inputs
    with torch.no_grad():
        return model(torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(text), return_dict=False)[0].numpy()


def _forward(model: WanTransformer3D, latents, timestep, text, mask=None):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    return np.asarray(fn(state, latents, timestep, text, mask))


@pytest.fixture(scope="module")
def loop_model(torch_folder):
    return load_transformer(torch_folder[0])


@pytest.fixture(scope="module")
def loop_out(loop_model, inputs):
    return _forward(loop_model, *inputs[:3])


def _mesh():
    return jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


# ----------------------------------------------------------------------------- parity


def test_matches_diffusers(loop_out, torch_out):
    assert loop_out.shape == torch_out.shape == (2, TINY.out_channels, 3, 4, 6)
    assert _rel_err(loop_out, torch_out) < PARITY_RTOL


def test_scan_layers_equals_loop(torch_folder, inputs, loop_out, loop_model):
    scanned = load_transformer(torch_folder[0], scan_layers=True)
    kernel = nnx.state(scanned)["blocks"]["attn1"]["to_q"]["kernel"]
    assert kernel.shape[0] == TINY.num_layers and kernel.get_metadata()["out_sharding"][0] == "layers"
    np.testing.assert_array_equal(np.asarray(kernel[...][1]), np.asarray(loop_model.blocks[1].attn1.to_q.kernel[...]))
    assert _rel_err(_forward(scanned, *inputs[:3]), loop_out) < SAME_RTOL


def test_remat_gradients_match_diffusers(torch_folder, inputs):
    """One JAX compile: gradients through remat'd blocks equal torch autograd on the same loss."""
    latents, timestep, text, _ = inputs
    weights = np.random.default_rng(1).standard_normal((2, TINY.out_channels, 3, 4, 6)).astype(np.float32)
    _, reference = torch_folder
    reference.zero_grad()
    out = reference(torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(text), return_dict=False)[0]
    torch_loss = (out * torch.from_numpy(weights)).sum()
    torch_loss.backward()
    torch_loss = float(torch_loss.detach())

    model = load_transformer(torch_folder[0], remat="full")
    graphdef, state = nnx.split(model)
    loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(latents, timestep, text) * weights)  # noqa: E731
    remat_eqns = [e for e in jax.make_jaxpr(loss)(state).eqns if e.primitive.name in ("remat2", "checkpoint")]
    assert len(remat_eqns) == TINY.num_layers  # one rematerialised region per block
    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    assert abs(float(value) - torch_loss) < 1e-4 * float(np.abs(weights).sum())
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    torch_grads = dict(reference.named_parameters())
    for theirs, ours, transposed in [
        ("blocks.0.attn1.to_q.weight", "blocks.0.attn1.to_q.kernel", True),
        ("blocks.1.ffn.net.2.weight", "blocks.1.ffn.proj_out.kernel", True),
        ("blocks.0.attn2.norm_k.weight", "blocks.0.attn2.norm_k.scale", False),
        ("blocks.1.scale_shift_table", "blocks.1.scale_shift_table", False),
        ("condition_embedder.time_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_1.kernel", True),
        ("condition_embedder.text_embedder.linear_1.weight", "condition_embedder.text_embedder.linear_1.kernel", True),
    ]:
        g = torch_grads[theirs].grad.numpy()
        assert _rel_err(flat[ours], g.T if transposed else g) < GRAD_RTOL, theirs


def test_bfloat16_scanned_remat_close_to_float32(torch_folder, inputs, torch_out):
    model = load_transformer(torch_folder[0], dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                             remat="dots_saveable", attention_impl="auto")
    out = _forward(model, *inputs[:3])
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out.astype(np.float32), torch_out) < 3e-2  # measured 0.7%


def test_text_mask_equals_truncated_text(loop_model, inputs, loop_out):
    latents, timestep, text, mask = inputs
    masked = _forward(loop_model, latents, timestep, text, mask)
    # sample 0 has no padding: the mask changes nothing there; sample 1 equals running on its 4 valid tokens.
    np.testing.assert_allclose(masked[0], loop_out[0], rtol=0, atol=1e-6 * np.abs(loop_out).max())
    cut = _forward(loop_model, latents[1:], timestep[1:], text[1:, :4])
    assert _rel_err(masked[1:], cut) < SAME_RTOL
    assert _rel_err(masked[1], loop_out[1]) > 1e-4  # diffusers' unmasked zero padding does change the output


# ----------------------------------------------------------------------------- sharding


def test_sharded_load_and_forward_equal_single_device(torch_folder, inputs, loop_out):
    """Each tensor is read straight onto its NamedSharding (fsdp x tensor), here for the scanned layout."""
    mesh = _mesh()
    model = load_transformer(torch_folder[0], mesh=mesh, scan_layers=True)
    assert tuple(model.blocks.ffn.proj_in.kernel[...].sharding.spec) == (None, "fsdp", "tensor")
    assert tuple(model.blocks.attn1.to_out.kernel[...].sharding.spec) == (None, "tensor", "fsdp")
    assert tuple(model.condition_embedder.time_proj.kernel[...].sharding.spec) == ("fsdp", "tensor")
    batch = shard_batch(tuple(inputs[:3]), mesh)  # batch over ('data', 'fsdp')
    assert _rel_err(_forward(model, *batch), loop_out) < SAME_RTOL


# ----------------------------------------------------------------------------- import / export


def test_export_reimport_exact_and_diffusers_loads_it(tmp_path, torch_folder, inputs, torch_out, loop_model):
    scanned = load_transformer(torch_folder[0], scan_layers=True)
    export_transformer(scanned, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel"
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()

    again = load_transformer(tmp_path / "out")  # scanned export -> looped import
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again)), nnx.to_flat_state(nnx.state(loop_model))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))

    export_transformer(loop_model, tmp_path / "shards", max_shard_bytes=20_000)  # sharded files + index
    assert len(list((tmp_path / "shards").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json").exists()
    from_shards = load_transformer(tmp_path / "shards", scan_layers=True)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(from_shards)), nnx.to_flat_state(nnx.state(scanned))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))

    reloaded = _diffusers_from_pretrained(tmp_path / "out")
    latents, timestep, text, _ = inputs
    with torch.no_grad():
        out = reloaded(torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(text), return_dict=False)[0]
    np.testing.assert_array_equal(out.numpy(), torch_out)


def _diffusers_from_pretrained(folder):
    """`from_pretrained`; without `accelerate` (which diffusers needs for Wan's fp32-kept modules) the
    same config + strict state-dict load it performs."""
    cls = diffusers.WanTransformer3DModel
    if is_accelerate_available():
        return cls.from_pretrained(folder).eval()
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return model.eval()


def _copy_with(folder, tmp_path, edit):
    src = SafetensorsFolder(folder)
    tensors = {k: np.array(src[k]) for k in src}
    edit(tensors)
    out = tmp_path / "bad"
    save_folder(out, tensors, json.loads((folder / "config.json").read_text()))
    return out


def test_corrupted_folders_name_the_key(tmp_path, torch_folder):
    folder = torch_folder[0]
    key = "blocks.1.attn2.to_k.weight"

    missing = _copy_with(folder, tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn2\.to_k\.kernel"):
        load_transformer(missing)

    def reshape(t):
        t[key] = t[key][:, :-1]
    wrong = _copy_with(folder, tmp_path / "w", reshape)
    with pytest.raises(CheckpointError, match=rf"{key}.*shape"):
        load_transformer(wrong)

    def extra(t):
        t["blocks.9.ffn.net.0.proj.weight"] = t["blocks.0.ffn.net.0.proj.weight"]
    unexpected = _copy_with(folder, tmp_path / "u", extra)
    with pytest.raises(CheckpointError, match=r"blocks\.9\.ffn\.net\.0\.proj\.weight"):
        load_transformer(unexpected)

    truncated = tmp_path / "t"
    shutil.copytree(folder, truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 64])
    header_keys = list(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]))
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(truncated)
    assert header_keys  # the file really had tensors

    no_config = tmp_path / "c"
    shutil.copytree(folder, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_transformer(no_config)


def test_keys_diffusers_ignores_are_skipped(tmp_path, torch_folder, loop_model):
    """`norm_added_q` keys (dropped by diffusers on load) load as if absent; other extra keys still fail."""
    folder = torch_folder[0]

    def extra(t):
        t["blocks.0.attn2.norm_added_q.weight"] = np.ones((TINY.num_attention_heads * TINY.attention_head_dim,),
                                                          np.float32)
    model = load_transformer(_copy_with(folder, tmp_path / "i", extra))
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                      nnx.to_flat_state(nnx.state(loop_model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(path))


# ----------------------------------------------------------------------------- config and inputs


def test_config_round_trip_and_unsupported_features():
    cfg = WanTransformerConfig.wan2_1_t2v_1_3b()
    theirs = cfg.to_diffusers_config()
    assert WanTransformerConfig.from_diffusers_config(theirs) == cfg
    assert cfg.inner_dim == 1536 and cfg.rope_dims == (44, 42, 42)
    with pytest.raises(ValueError, match="image_dim"):
        WanTransformerConfig.from_diffusers_config({**theirs, "image_dim": 1280})
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        WanTransformerConfig.from_diffusers_config({**theirs, "added_kv_proj_dim": 5120})
    with pytest.raises(ValueError, match="remat"):
        TINY.replace(remat="sometimes")
    assert WanTransformerConfig.from_diffusers_config({**theirs, "out_channels": None}).out_channels == 16


def test_real_1_3b_keys_and_shapes_match_diffusers():
    """Abstractly (torch meta tensors, nnx.eval_shape): the rule table covers Wan2.1-T2V-1.3B exactly."""
    cfg = WanTransformerConfig.wan2_1_t2v_1_3b(scan_layers=True)
    kwargs = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in diffusers.WanTransformer3DModel(**kwargs).state_dict().items()}
    ours = {".".join(map(str, p)): v.get_value().shape
            for p, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: WanTransformer3D(cfg, rngs=nnx.Rngs(0)))))}
    targets, unmatched = map_checkpoint_keys(theirs, checkpoint_rules(cfg))
    assert not unmatched and set(targets) == set(ours)
    for path, items in targets.items():
        want = list(range(cfg.num_layers)) if path.startswith("blocks.") else [None]
        assert sorted((i for i, _, _ in items), key=lambda i: -1 if i is None else i) == want, path
        for index, key, transform in items:
            perm = PERMUTATIONS[transform]
            shape = theirs[key] if perm is None else tuple(theirs[key][p] for p in perm)
            assert shape == (ours[path][1:] if index is not None else ours[path]), key
    assert sum(int(np.prod(v)) for v in theirs.values()) == 1_418_996_800  # Wan2.1-T2V-1.3B


def test_bad_inputs_are_named(loop_model, inputs):
    latents, timestep, text, _ = inputs
    with pytest.raises(ValueError, match="divisible by patch_size"):
        loop_model(latents[..., :5], timestep, text)
    with pytest.raises(ValueError, match="text_embeds"):
        loop_model(latents, timestep, text[..., :5])
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        loop_model(np.zeros((1, 4, 33, 2, 2), np.float32), timestep[:1], text[:1])


def test_attention_function():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 2, 8)), jnp.float32) for _ in range(3))
    mask = np.array([[True, True, False], [True, False, False]])
    out = attention(q, k, v, mask=mask)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8) + np.where(mask, 0.0, -np.inf)[:, None, None, :]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bnts,bsnh->btnh", probs, v), atol=1e-6)
    assert resolve_implementation("auto", jnp.bfloat16, 128) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn"):
            attention(q, k, v, implementation="cudnn")
