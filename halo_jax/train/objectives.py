"""Training objectives of the pretraining stage: the denoising loss and the VAE loss.

Denoising (flow matching or epsilon prediction, per `diffusion.prediction_type`):

    t ~ diffusion.sample_timesteps,  n ~ N(0, I),  x_t = diffusion.noisy(x0, n, t)
    L_denoise = mean ‖f(x_t, t, c) − diffusion.training_target(x0, n, t)‖²
    with prompt dropout: c replaced by the empty prompt's embedding with probability p
    (so classifier-free guidance has an unconditional model to contrast with).
    `text_denoising_loss` trains the text encoder E with the denoiser: c = E(prompt ids), and the
    empty prompt's embedding is E(empty ids) under the current weights.

Prompt reliance (a diagnostic of the denoiser, `prompt_reliance`): at fixed noise levels s,
the same loss with the prompt and with the empty prompt on the same (x0, n),

    L_s(c) = mean ‖f(x_t, t, c) − target‖²,   gap_s = L_s(empty) − L_s(prompt)

A denoiser that ignores its prompt has gap_s = 0 at every s; one that reads it has gap_s > 0 where
the noised video alone does not determine what the prompt says (large s).

VAE (the Wan VAE trained on rendered videos x in [-1, 1]):

    (μ, log σ²) = encode(x),  z = μ + posterior_noise · σ ε,  x̂ = decode(z)
    L_vae = Σ w|x̂ − x| / Σ w + Σ w(x̂ − x)² / Σ w + kl_weight · mean_z ½(μ² + σ² − log σ² − 1)
            + background_weight · max(0, share − background_share)
    share = mean_c Var_b(m_bc) / Var_{b,f,h,w}(μ_c),   m_bc = mean_{f,h,w} μ_bc

    with per-pixel weights w = 1 + foreground_weight · [the pixel differs from its clip's
    median colour by more than 0.1 in some channel]. The world's backgrounds are flat and its
    objects cover ~5% of a frame, so an unweighted loss is minimised by painting background
    everywhere; the weight makes a missed object cost as much as the rest of the frame.
    `share` is the part of each latent channel's variance over the batch that lies between clips, which in
    this world is the background's offset (per-channel normalisation of the latents keeps it). Left alone
    it is half the variance, and the DiT's loss then barely depends on the direction word; the last term holds
    it at most at `background_share` (measured effect: docs/architecture.md, "The moving-shapes world").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from halo_jax.models.text.umt5 import prompt_embeddings


def denoising_loss(model: Any, batch: dict, key: jax.Array, *, diffusion: Any,
                   null_text: jax.Array | None = None, text_dropout: float = 0.0) -> tuple[jax.Array, dict]:
    """`batch`: latents (B, C, F, H, W), text (B, L, D); `model(x_t, t, text)` predicts the target."""
    x0 = batch["latents"].astype(jnp.float32)
    text = batch["text"]
    b = x0.shape[0]
    k_t, k_n, k_drop = jax.random.split(key, 3)
    t = diffusion.sample_timesteps(k_t, b)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    if text_dropout > 0.0 and null_text is not None:
        drop = jax.random.bernoulli(k_drop, text_dropout, (b, 1, 1))
        text = jnp.where(drop, null_text[None].astype(text.dtype), text)
    return jnp.mean(denoising_error(model, x0, noise, t, text, diffusion)), {"t_mean": jnp.mean(t)}


def text_denoising_loss(model: Any, batch: dict, key: jax.Array, *, diffusion: Any, null_ids: jax.Array,
                        null_mask: jax.Array, text_dropout: float = 0.0) -> tuple[jax.Array, dict]:
    """`denoising_loss` of `model.dit` with the prompts embedded by the trained `model.text` (umT5):
    `batch`: latents (B, C, F, H, W), ids and mask (B, L); `null_ids`/`null_mask` (1, L) the empty prompt's."""
    text = prompt_embeddings(model.text, batch["ids"], batch["mask"])
    null_text = prompt_embeddings(model.text, null_ids, null_mask)[0]
    return denoising_loss(model.dit, {"latents": batch["latents"], "text": text}, key, diffusion=diffusion,
                          null_text=null_text, text_dropout=text_dropout)


def denoising_error(model: Any, x0: jax.Array, noise: jax.Array, t: jax.Array, text: jax.Array,
                    diffusion: Any) -> jax.Array:
    """(B,): the per-video mean ‖f(x_t, t, c) − target‖² of the denoising loss, for given t and noise n."""
    pred = model(diffusion.noisy(x0, noise, t), t, text).astype(jnp.float32)
    return jnp.mean((pred - diffusion.training_target(x0, noise, t)) ** 2, axis=tuple(range(1, x0.ndim)))


def prompt_reliance(model: Any, latents: jax.Array, text: jax.Array, null_text: jax.Array, key: jax.Array, *,
                    diffusion: Any, sigmas: tuple[float, ...] = (0.5, 0.8, 0.95)) -> dict[str, dict[str, float]]:
    """{f"sigma_{s}": {"prompt": L_s(prompt), "empty": L_s(empty), "gap": L_s(empty) − L_s(prompt)}} (see above).

    `latents` (B, C, F, H, W), `text` (B, L, D) their prompts' embeddings, `null_text` (L, D) the empty prompt's.
    """
    x0 = jnp.asarray(latents, jnp.float32)
    noise = jax.random.normal(key, x0.shape, jnp.float32)
    null = jnp.broadcast_to(jnp.asarray(null_text, text.dtype)[None], text.shape)
    loss_at = nnx.jit(lambda m, t, c: jnp.mean(denoising_error(m, x0, noise, t, c, diffusion)))
    out = {}
    for s in sigmas:
        t = jnp.full((x0.shape[0],), s * diffusion.num_train_timesteps, jnp.float32)
        loss = {name: float(loss_at(model, t, c)) for name, c in (("prompt", text), ("empty", null))}
        out[f"sigma_{s}"] = {**loss, "gap": loss["empty"] - loss["prompt"]}
    return out


def foreground_weights(x: jax.Array, foreground_weight: float, tolerance: float = 0.1) -> jax.Array:
    """(B, 1, F, H, W): 1 + foreground_weight where a pixel of `x` (B, 3, F, H, W) is off its clip's median colour."""
    background = jnp.median(x, axis=(2, 3, 4), keepdims=True)
    foreground = jnp.any(jnp.abs(x - background) > tolerance, axis=1, keepdims=True)
    return 1.0 + foreground_weight * foreground.astype(x.dtype)


def between_clip_share(mean: jax.Array) -> jax.Array:
    """mean_c Var_b(m_bc) / Var_{b,f,h,w}(μ_c) of posterior means `mean` (B, C, f, h, w), m_bc their clip means."""
    between = jnp.var(jnp.mean(mean, axis=(2, 3, 4)), axis=0)
    total = jnp.var(jnp.moveaxis(mean, 1, 0).reshape(mean.shape[1], -1), axis=1)
    return jnp.mean(between / (total + 1e-6))


def vae_loss(vae: Any, batch: dict, key: jax.Array, *, kl_weight: float, foreground_weight: float = 0.0,
             posterior_noise: float = 1.0, background_weight: float = 0.0,
             background_share: float = 0.0) -> tuple[jax.Array, dict]:
    """`batch["video"]`: (B, 3, F, H, W) in [-1, 1]; weighted reconstruction (L1 + L2), a weighted KL and the
    weighted excess of the between-clip share of the latents' variance over `background_share`."""
    x = batch["video"].astype(jnp.float32)
    mean, logvar = vae.encode_posterior(x)
    z = mean + posterior_noise * jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = vae.decode(z, clip=False).astype(jnp.float32)
    w = jnp.broadcast_to(foreground_weights(x, foreground_weight), x.shape)
    err = recon - x
    l1 = jnp.sum(w * jnp.abs(err)) / jnp.sum(w)
    l2 = jnp.sum(w * err**2) / jnp.sum(w)
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - logvar - 1.0)
    loss = l1 + l2 + kl_weight * kl
    metrics = {"l1": l1, "l2": l2, "kl": kl,
               "foreground_l1": jnp.sum((w > 1) * jnp.abs(err)) / jnp.maximum(jnp.sum(w > 1), 1)}
    if background_weight > 0.0:  # a Python branch: without the term the compiled step is the one shipped before it
        metrics["between_clip"] = share = between_clip_share(mean)
        loss = loss + background_weight * jnp.maximum(share - background_share, 0.0)
    return loss, metrics
