"""SigLIP towers vs transformers `SiglipModel` on a tiny random config (float32).

Tolerance: max |ours - theirs| / max |theirs| < 1e-5 for hidden states, pooled outputs and
logits (measured ~1e-6); the export round trip is bit-exact.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from halo_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder, save_folder  # noqa: E402
from halo_jax.models.reward.siglip import SiglipConfig  # noqa: E402
from halo_jax.models.reward.siglip_params import export_siglip, load_siglip  # noqa: E402

REL_TOL = 1e-5


def rel_err(ours, theirs) -> float:
    theirs = np.asarray(theirs, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random transformers SiglipModel saved with save_pretrained, and inputs."""
    cfg = SiglipConfig.tiny()
    torch.manual_seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig.from_dict(cfg.to_transformers_config())).eval()
    with torch.no_grad():  # non-trivial values for params that initialise to constants
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.startswith("logit"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(folder)
    rng = np.random.RandomState(0)
    pixels = rng.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size).astype(np.float32)
    ids = rng.randint(0, cfg.text.vocab_size, (3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
        masked = model.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return dict(model=model, folder=folder, pixels=pixels, ids=ids, mask=mask, out=out, masked=masked, cfg=cfg)


@pytest.fixture(scope="module")
def ours(reference):
    return load_siglip(reference["folder"])


@pytest.fixture(scope="module")
def got(reference, ours):
    """Every output of our model on the reference inputs, from one jitted function."""
    graphdef, state = nnx.split(ours)

    @jax.jit(compiler_options={"xla_backend_optimization_level": 0})  # compiles 2-3x faster on CPU
    def run(state, pixels, ids, mask):
        model = nnx.merge(graphdef, state)
        return dict(vision=model.vision_model(pixels), text=model.text_model(ids),
                    masked=model.text_model(ids, mask), logits=model(pixels, ids))

    pixels = jnp.asarray(reference["pixels"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    return run(state, pixels, jnp.asarray(reference["ids"]), jnp.asarray(reference["mask"]))


def test_vision_tower_matches_transformers(reference, got):
    got = got["vision"]
    ref = reference["out"].vision_model_output
    assert got.last_hidden_state.shape == (2, reference["cfg"].vision.num_patches, 32)
    assert rel_err(got.last_hidden_state, ref.last_hidden_state.numpy()) < REL_TOL
    assert rel_err(got.pooled, ref.pooler_output.numpy()) < REL_TOL


def test_text_tower_matches_transformers(reference, got):
    masked = got["masked"]
    got = got["text"]
    ref = reference["out"].text_model_output
    assert rel_err(got.last_hidden_state, ref.last_hidden_state.numpy()) < REL_TOL
    assert rel_err(got.pooled, ref.pooler_output.numpy()) < REL_TOL
    assert rel_err(masked.last_hidden_state, reference["masked"].last_hidden_state.numpy()) < REL_TOL
    assert rel_err(masked.pooled, reference["masked"].pooler_output.numpy()) < REL_TOL
    # the mask matters (otherwise the masked comparison proves nothing)
    assert rel_err(masked.pooled, got.pooled) > 1e-3


def test_siglip_logits_match_transformers(reference, got):
    got = got["logits"]
    ref = reference["out"]
    assert got["logits_per_image"].shape == (2, 3)
    assert rel_err(got["logits_per_image"], ref.logits_per_image.numpy()) < REL_TOL
    assert rel_err(got["logits_per_text"], ref.logits_per_text.numpy()) < REL_TOL
    assert rel_err(got["image_embeds"], ref.image_embeds.numpy()) < REL_TOL


def test_export_reloads_in_transformers(reference, ours, tmp_path):
    export_siglip(ours, tmp_path / "exported")
    reloaded = transformers.SiglipModel.from_pretrained(tmp_path / "exported").eval()
    original = reference["model"].state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    with torch.no_grad():
        out = reloaded(input_ids=torch.tensor(reference["ids"]), pixel_values=torch.tensor(reference["pixels"]))
    np.testing.assert_array_equal(out.logits_per_image.numpy(), reference["out"].logits_per_image.numpy())


def test_missing_key_is_a_checkpoint_error(reference, tmp_path):
    source = SafetensorsFolder(reference["folder"])
    tensors = {k: np.asarray(source[k]) for k in source if k != "vision_model.encoder.layers.1.mlp.fc2.weight"}
    save_folder(tmp_path, tensors, reference["model"].config.to_dict(), weights_name="model")
    with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.mlp\.fc2\.kernel"):
        load_siglip(tmp_path)


def test_position_ids_buffers_are_skipped(reference, ours, tmp_path):
    """Older checkpoints carry non-persistent `*.position_ids`: they load as if absent."""
    source = SafetensorsFolder(reference["folder"])
    tensors = {k: np.asarray(source[k]) for k in source}
    cfg = reference["cfg"]
    tensors["vision_model.embeddings.position_ids"] = np.arange(cfg.vision.num_patches)[None].astype(np.int64)
    tensors["text_model.embeddings.position_ids"] = np.arange(cfg.text.max_position_embeddings)[None].astype(np.int64)
    save_folder(tmp_path, tensors, reference["model"].config.to_dict(), weights_name="model")
    loaded = load_siglip(tmp_path)
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
                                      nnx.to_flat_state(nnx.state(ours, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(path))


def test_sharded_load_places_params_by_logical_axes(reference):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = load_siglip(reference["folder"], mesh)
    kernel = model.vision_model.encoder.layers.self_attn.q_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    ref = reference["model"].vision_model.encoder.layers[1].self_attn.q_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel[1]), ref)


def test_wrong_image_size_is_rejected(ours):
    with pytest.raises(ValueError, match="image_size"):
        ours.vision_model(jnp.zeros((1, 32, 32, 3)))


def test_a_text_tower_without_layers_reads_its_embeddings_as_transformers_does(tmp_path):
    """Depth 0 (the shapes reward config's context-free words): embeddings + final norm, no empty arrays."""
    cfg = SiglipConfig.tiny()
    hf = cfg.to_transformers_config()
    hf["text_config"]["num_hidden_layers"] = 0
    torch.manual_seed(1)
    model = transformers.SiglipModel(transformers.SiglipConfig.from_dict(hf)).eval()
    model.save_pretrained(tmp_path)
    ours = load_siglip(tmp_path)
    assert ours.text_model.encoder.layers is None
    assert all(leaf.size for leaf in jax.tree.leaves(nnx.state(ours)))  # orbax refuses zero-size arrays
    ids = np.random.RandomState(1).randint(0, cfg.text.vocab_size, (2, 9))
    got = ours.text_model(jnp.asarray(ids))
    with torch.no_grad():
        ref = model.text_model(input_ids=torch.tensor(ids))
    assert rel_err(got.last_hidden_state, ref.last_hidden_state.numpy()) < REL_TOL
    assert rel_err(got.pooled, ref.pooler_output.numpy()) < REL_TOL
