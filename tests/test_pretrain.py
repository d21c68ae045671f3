"""Stage `pretrain` on a tiny config: every phase runs, a preempted run resumes, the export loads and generates."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from halo_jax import main as main_lib
from halo_jax.config import base_config, pretrain_config
from halo_jax.models.text import load_umt5
from halo_jax.models.wan.pipeline import Generator, load_pipeline
from halo_jax.train import checkpoint as checkpoint_lib
from halo_jax.train.loop import Preempted
from halo_jax.train.metrics import read_metrics


pytestmark = pytest.mark.usefixtures("compilation_cache")  # the resumed run reuses the compiled steps


def tiny_config():
    config = base_config()
    config.stage = "pretrain"
    config.pretrain = pretrain_config()
    p = config.pretrain
    p.video.frames, p.video.height, p.video.width = 5, 16, 16
    p.num_prompts = 4
    p.text.max_length = 16
    p.text.model.update(d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16)
    p.vae.model.update(base_dim=4, z_dim=4)
    p.vae.curriculum = ((5, 2, 2, 10.0),)  # one stage: each stage compiles its own step
    p.vae.num_seeds = 2
    p.latents.update(stats_videos=4, num_seeds=1, batch_size=4, chunk_size=2)
    p.dit.model.update(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, freq_dim=16, num_layers=1)
    p.dit.update(steps=4, batch_size=4, warmup_steps=1)
    config.mesh.update(data=1, fsdp=2, tensor=4)  # batches over 2 devices, params over fsdp x tensor
    config.checkpoint.every_steps = 1
    config.log.every_steps = 1
    return config


def test_pretrain_phases_resume_and_export(tmp_path, monkeypatch):
    config = tiny_config()
    # Preempt the DiT phase after its second step (as a SIGTERM would), then resume.
    original = checkpoint_lib.Checkpointer.preempted

    def preempt_dit_at_2(self, step):
        return ("dit" in str(self.directory) and step == 2) or original(self, step)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, "preempted", preempt_dit_at_2)
    with pytest.raises(Preempted):
        main_lib.run(config, str(tmp_path))
    assert not (tmp_path / "pretrain" / "dit" / "done.json").exists()
    monkeypatch.setattr(checkpoint_lib.Checkpointer, "preempted", original)
    main_lib.run(config, str(tmp_path))

    steps = [r["step"] for r in read_metrics(tmp_path / "pretrain" / "dit" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # steps 3 and 4 come from the resumed run
    for phase in ("text", "vae", "latents", "dit"):
        assert (tmp_path / "pretrain" / phase / "done.json").exists()
    stats = json.loads((tmp_path / "pretrain" / "latents" / "done.json").read_text())
    assert len(stats["latents_std"]) == 4 and all(s > 0 for s in stats["latents_std"])
    reliance = json.loads((tmp_path / "pretrain" / "dit" / "done.json").read_text())["prompt_reliance"]
    assert set(reliance) == {"sigma_0.5", "sigma_0.8", "sigma_0.95"}
    for loss in reliance.values():
        assert np.isfinite([loss["prompt"], loss["empty"]]).all()
        assert loss["gap"] == pytest.approx(loss["empty"] - loss["prompt"])

    shutil.rmtree(tmp_path / "base_ckpt")  # a run after the DiT phase finished only exports again
    main_lib.run(config, str(tmp_path))
    pipe = load_pipeline(tmp_path / "base_ckpt")
    assert pipe.max_text_length == 16
    # the umT5 was trained with the DiT (dit.train_text_encoder): the pipeline carries the trained one
    initial = load_umt5(tmp_path / "pretrain" / "text" / "text_encoder")
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(nnx.state(initial, nnx.Param)),
                                                          jax.tree.leaves(nnx.state(pipe.text_encoder, nnx.Param)))]
    assert max(moved) > 1e-4
    trained = load_umt5(tmp_path / "pretrain" / "dit" / "text_encoder")
    shipped = jax.tree.leaves(nnx.state(pipe.text_encoder, nnx.Param))
    for a, b in zip(jax.tree.leaves(nnx.state(trained, nnx.Param)), shipped):
        np.testing.assert_array_equal(a, b)
    gen = Generator(pipe, frames=5, height=16, width=16, num_steps=2, guidance_scale=3.0)
    latents, frames = gen.generate(["a red circle moving right on a black background"], [0])
    # the default VAE compresses 2x in time (causal: 1 + 4 / 2 latent frames) and 2x in space
    assert latents.shape == (1, 4, 3, 8, 8) and frames.shape == (1, 5, 16, 16, 3) and frames.dtype == np.uint8


def test_foreground_weights_mark_pixels_off_the_clip_median_colour():
    from halo_jax.train.objectives import foreground_weights

    video = np.full((2, 3, 3, 8, 8), -1.0, np.float32)   # two black clips
    video[0, :, 1, 2:4, 5:7] = 1.0                        # a white 2x2 object in frame 1 of clip 0
    video[1] = 1.0                                        # clip 1 is white with a red pixel
    video[1, 1:, 0, 0, 0] = -1.0
    w = np.asarray(foreground_weights(video, 10.0))
    assert w.shape == (2, 1, 3, 8, 8)
    expected = np.ones_like(w)
    expected[0, 0, 1, 2:4, 5:7] = 11.0
    expected[1, 0, 0, 0, 0] = 11.0
    np.testing.assert_array_equal(w, expected)


def test_between_clip_share_is_the_part_of_each_channels_variance_between_clip_means():
    from halo_jax.train.objectives import between_clip_share

    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(1, 2, 3, 4, 4)).astype(np.float32)
    pattern -= pattern.mean(axis=(2, 3, 4), keepdims=True)       # zero-mean within the clip
    same = np.repeat(pattern, 4, axis=0)
    assert float(between_clip_share(same)) == pytest.approx(0.0, abs=1e-6)
    offsets = np.array([-1.0, 1.0, -1.0, 1.0], np.float32)[:, None, None, None, None]
    # channel c: within-clip variance v_c, between-clip variance 1 (offsets +-1): share 1 / (1 + v_c)
    v = pattern.var(axis=(0, 2, 3, 4))
    assert float(between_clip_share(same + offsets)) == pytest.approx(float(np.mean(1 / (1 + v))), rel=1e-4)


def test_vae_loss_penalises_the_between_clip_share_above_its_bound():
    from halo_jax.train.objectives import between_clip_share, vae_loss

    class OffsetVAE:  # posterior mean: the video plus a per-clip offset; decoding is the identity
        def encode_posterior(self, x):
            return x + np.array([0.0, 2.0], np.float32)[:, None, None, None, None], np.zeros_like(x)

        def decode(self, z, clip):
            return z

    video = np.random.default_rng(1).uniform(-1, 1, (2, 3, 1, 4, 4)).astype(np.float32)
    key = jax.random.key(0)
    plain, metrics = vae_loss(OffsetVAE(), {"video": video}, key, kl_weight=0.0)
    assert "between_clip" not in metrics
    share = float(between_clip_share(OffsetVAE().encode_posterior(video)[0]))
    assert 0.5 < share < 1.0
    for bound, excess in ((0.1, share - 0.1), (0.99, 0.0)):
        loss, metrics = vae_loss(OffsetVAE(), {"video": video}, key, kl_weight=0.0, background_weight=2.0,
                                 background_share=bound)
        assert float(metrics["between_clip"]) == pytest.approx(share, rel=1e-6)
        assert float(loss) == pytest.approx(float(plain) + 2.0 * excess, rel=1e-5)


def test_prompt_reliance_is_zero_for_a_denoiser_blind_to_its_prompt():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from halo_jax.diffusion import FlowMatching
    from halo_jax.train.objectives import prompt_reliance

    class Denoiser(nnx.Module):
        """Predicts -x_t, plus the prompt's mean feature when `reads_prompt`."""

        def __init__(self, reads_prompt: bool):
            self.reads_prompt = reads_prompt

        def __call__(self, x, t, text):
            del t
            bias = jnp.mean(text, axis=(1, 2))[:, None, None, None, None] if self.reads_prompt else 0.0
            return -x + bias

    latents = jax.random.normal(jax.random.key(0), (4, 2, 1, 2, 2))
    text = jnp.ones((4, 3, 5))  # the empty prompt's embedding is zeros
    args = dict(latents=latents, text=text, null_text=jnp.zeros((3, 5)), key=jax.random.key(1),
                diffusion=FlowMatching(), sigmas=(0.5, 0.95))
    blind = prompt_reliance(Denoiser(False), **args)
    assert set(blind) == {"sigma_0.5", "sigma_0.95"}
    assert all(v["gap"] == 0.0 and v["prompt"] == v["empty"] for v in blind.values())
    reading = prompt_reliance(Denoiser(True), **args)
    # the prompt shifts every prediction by 1, so the two losses differ
    assert all(abs(v["gap"]) > 0.1 for v in reading.values())
