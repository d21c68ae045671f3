"""Video-text matching of the reward model: the maths of phase 0, of `match_features` and of `word_evidence`.

A video is matched as a set of unit vectors V (B, M, D) and a prompt as a set of phrase vectors T (B', P, D):

    cos(i, j) = sum_p max_m <V_im, T_jp>

- `match_pool` "mean" / "max": M = P = 1, V_i = unit(mean / elementwise max of the video's tokens), T_j = unit(mean
  of the prompt's text tokens): cos is the plain cosine of two embeddings.
- `match_pool` "phrases": V_i = every token of the video, each unit-normalised (M = T*N); the prompt is cut into
  phrases at separator tokens (`separator_ids`, e.g. the ids of "and" and "on"; the separators belong to no phrase,
  phrases past `max_phrases` join the last), and T_jp = unit(mean of phrase p's tokens) / P_j for the P_j phrases the
  prompt has (0 for the others; without separators the whole prompt is one phrase). cos is then the mean over the
  prompt's phrases of the cosine of its best-matching token: each phrase ("a red circle moving right") must be found
  whole in one token, so a colour, shape and motion are bound to one object, which a clip-wide pool need not do.
  With `phrase_window` = k a token's vector is the max over k x k tokens (`window_max`). Measured on the
  shapes world it reads shape no better than the max of the tokens (docs/architecture.md, "Phrase matching").

Membership G (B, S, P): G[b, s, p] = 1 when prompt token s is an unmasked token of phrase p (P = 1 and G = the text
mask without phrases). Word evidence swaps one token s for a vocabulary word w within its own group (its phrase, or
the whole prompt): with A[w, s] the depth-0 text output of word w at position s, m and n the group's mean and size,
t^(s<-w) = unit(m + (A[w, s] - T_s) / n).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def unit(x: jax.Array) -> jax.Array:
    """x / |x| over the last axis, float32; 0 stays 0 with a zero gradient (|x|'s own gradient there is NaN)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def window_max(tokens: jax.Array, grid: int, k: int) -> jax.Array:
    """Tokens (B, T, g*g, D) of g x g per frame -> the elementwise max over the k x k tokens from each token down and
    right within its frame (fewer at the far borders): with k = 2, a view of a whole object two tokens wide."""
    if k == 1:
        return tokens
    x = tokens.reshape(*tokens.shape[:2], grid, grid, tokens.shape[-1])
    pad = ((0, 0), (0, 0), (0, k - 1), (0, k - 1), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, k, k, 1), (1, 1, 1, 1, 1), pad).reshape(tokens.shape)


def token_weights(shape: Sequence[int], text_mask: jax.Array | None) -> jax.Array:
    """The text mask as float32 weights (B, S), 1 = token, 0 = padding (all ones without a mask)."""
    return jnp.ones(tuple(shape)) if text_mask is None else (jnp.asarray(text_mask) != 0).astype(jnp.float32)


def membership(input_ids: jax.Array, text_mask: jax.Array | None, separator_ids: Sequence[int] | None,
               max_phrases: int) -> jax.Array:
    """G (B, S, P) float32 (module docstring): with `separator_ids` None, P = 1 and G = the mask; otherwise
    token s is in phrase min(#separators before s, max_phrases - 1), separators and padding in none."""
    w = token_weights(input_ids.shape, text_mask)
    if separator_ids is None:
        return w[..., None]
    is_sep = jnp.isin(input_ids, jnp.asarray(tuple(separator_ids), input_ids.dtype)).astype(jnp.int32)
    phrase = jnp.minimum(jnp.cumsum(is_sep, axis=1), max_phrases - 1)
    return jax.nn.one_hot(phrase, max_phrases) * (w * (1 - is_sep))[..., None]


def group_means(text: jax.Array, groups: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Means m (B, P, D) of text tokens (B, S, D) over each group of G (B, S, P) and the group sizes n (B, P)."""
    n = jnp.sum(groups, axis=1)
    m = jnp.einsum("bsp,bsd->bpd", groups, text.astype(jnp.float32)) / jnp.maximum(n, 1.0)[..., None]
    return m, n


def phrase_vectors(text: jax.Array, groups: jax.Array) -> jax.Array:
    """T (B, P, D) of the module docstring: unit(m_p) / P_j for the P_j non-empty groups, 0 for empty ones."""
    m, n = group_means(text, groups)
    present = (n > 0).astype(jnp.float32)
    return unit(m) * (present / jnp.maximum(jnp.sum(present, axis=1, keepdims=True), 1.0))[..., None]


def match_cosines(video: jax.Array, phrases: jax.Array) -> jax.Array:
    """cos(i, j) = sum_p max_m <V_im, T_jp> of videos V (B, M, D) and prompts T (B', P, D): (B, B'), float32."""
    return jnp.einsum("bmd,jpd->bjpm", video.astype(jnp.float32), phrases.astype(jnp.float32)).max(-1).sum(-1)


def swapped_embeddings(text: jax.Array, groups: jax.Array, words: jax.Array) -> jax.Array:
    """t^(s<-w) (module docstring) for text tokens T (B, S, D), membership G (B, S, P) and the vocabulary's depth-0
    outputs A (V, S, D): (B, S, V, D) unit vectors; meaningless at tokens in no group (weight them 0)."""
    m, n = group_means(text, groups)
    own_m = jnp.einsum("bsp,bpd->bsd", groups, m)  # each token's group mean and size
    own_n = jnp.maximum(jnp.einsum("bsp,bp->bs", groups, n), 1.0)
    change = (jnp.swapaxes(words.astype(jnp.float32), 0, 1)[None] - text.astype(jnp.float32)[:, :, None])
    return unit(own_m[:, :, None] + change / own_n[..., None, None])


def own_word_log_softmax(logits: jax.Array, input_ids: jax.Array, groups: jax.Array) -> jax.Array:
    """log softmax over the vocabulary of logits (B, K, S, V) at each token's own word (B, S), weighted by its
    membership in a group (0 at padding and separators): (B, K, S)."""
    own = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), input_ids[:, None, :, None], axis=-1)[..., 0]
    return own * jnp.sum(groups, axis=-1)[:, None]
