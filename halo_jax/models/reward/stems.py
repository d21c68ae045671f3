"""Token embeddings of the pixels next to the SigLIP tower's linear patch embedding (`RewardModel.video_tokens`).

Frame differences (`frame_differences`): the towers see one frame at a time, so motion is left to the
temporal blocks, which must find the object in every frame and compare positions. With this option
every token also gets PatchEmbed_d(x[t+1] - x[t-1]) of the sampled, normalised frames x (one-sided
x[1] - x[0] and x[T-1] - x[T-2] at the ends, 0 for one frame), a new patch embedding to width D
with the tower's patch size, initialised to zero (a loaded model starts unchanged): a moving
object's difference shows its leading and trailing edges, so its direction is local to a token
(RGB-difference inputs of two-stream video networks).

Pixel MLP (`pixel_mlp` = H > 0): every token also gets fc2(gelu(fc1(p))) of its own square p of the sampled,
normalised frame (with `frame_differences`, of that frame and of x[t+1] - x[t-1], concatenated): a nonlinear
patch embedding of hidden width H next to the tower's linear one, fc2 initialised to zero (a loaded model
starts unchanged). A ViT's patch embedding is linear in the pixels; outlines and the direction of an edge's
movement are not, and a small tower finds them late or not at all (docs/architecture.md, "Pixel MLP").

Conv stem (`conv_stem` = C > 0): every token also gets PatchEmbed_{p/2}(h) of h = gelu(conv_2(gelu(conv_1(x)))),
conv_1 a 3x3 convolution of stride 2 and conv_2 one of stride 1 (zero padding 1, C channels each) of the sampled,
normalised frame x (with `frame_differences`, of it and x[t+1] - x[t-1]); the patch embedding is initialised to
zero (a loaded model starts unchanged). Its 3x3 receptive fields cross the tokens' borders, so an outline split
between tokens still reaches each of them whole (docs/architecture.md, "Conv stem").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from halo_jax.models.reward.siglip import PatchEmbed, dense, patchify
from halo_jax.parallel.sharding import param_init

Dtype = Any


def frame_differences(x: jax.Array) -> jax.Array:
    """x[t+1] - x[t-1] of frames (B, T, ...), one-sided (x[1] - x[0], x[T-1] - x[T-2]) at the ends, 0 for T = 1."""
    padded = jnp.concatenate([x[:, :1], x, x[:, -1:]], axis=1)
    return padded[:, 2:] - padded[:, :-2]


class PixelMLP(nnx.Module):
    """fc2(gelu(fc1(square))) of every p x p square of an image, fc2 zero-initialised: (N, S, S, C) -> (N, (S/p)^2, D)
    (module docstring, "Pixel MLP")."""

    def __init__(self, patch: int, inputs: int, hidden: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32):
        self.patch = patch
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = dense(inputs, hidden, (None, "mlp"), **kw)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), kernel_init=nnx.initializers.zeros, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        squares = patchify(x, self.patch)
        return self.fc2(jax.nn.gelu(self.fc1(squares.reshape(*squares.shape[:2], -1))))


class ConvStem(nnx.Module):
    """PatchEmbed_{p/2}(gelu(conv_2(gelu(conv_1(x))))), conv_1 3x3 of stride 2, conv_2 3x3 of stride 1, zero padding 1,
    the patch embedding zero-initialised: (N, S, S, C_in) -> (N, (S/p)^2, D) (module docstring, "Conv stem")."""

    def __init__(self, patch: int, inputs: int, channels: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32):
        self.dtype = dtype
        conv_init = param_init(nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3), None, None, None, None)
        bias_init = param_init(nnx.initializers.zeros, None)
        self.kernel1 = nnx.Param(conv_init(rngs.params(), (3, 3, inputs, channels), param_dtype))
        self.bias1 = nnx.Param(bias_init(rngs.params(), (channels,), param_dtype))
        self.kernel2 = nnx.Param(conv_init(rngs.params(), (3, 3, channels, channels), param_dtype))
        self.bias2 = nnx.Param(bias_init(rngs.params(), (channels,), param_dtype))
        self.embed = PatchEmbed(patch // 2, channels, dim, kernel_init=nnx.initializers.zeros, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype)

    def _conv(self, x: jax.Array, kernel: nnx.Param, bias: nnx.Param, stride: int) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jax.lax.conv_general_dilated(x.astype(dtype), kernel[...].astype(dtype), (stride, stride), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.gelu(y + bias[...].astype(dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.embed(self._conv(self._conv(x, self.kernel1, self.bias1, 2), self.kernel2, self.bias2, 1))
