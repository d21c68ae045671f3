"""HALO's video + patch reward model: SigLIP towers, temporal transformer, two heads.

    frames (B, F, H, W, 3) uint8 (0..255) or float (0..1)
      -> sample `num_frames` frames: indices round(linspace(0, F-1, num_frames))
      -> resize each to the tower's image_size (bilinear, antialiased), (x - mean) / std
      -> SigLIP vision tower per frame: last hidden state, (B, T, Ht, Wt, Dv) patch tokens
      -> v = proj_in to width D (+ with frame_differences: PatchEmbed_d(x[t+1] - x[t-1]);
             + with pixel_mlp: PixelMLP of each token's pixels; + with conv_stem: ConvStem of the frame; `stems.py`)
      -> v + learned frame-index embedding + learned spatial embedding
      -> `num_layers` temporal blocks over all T*Ht*Wt tokens, each
             x += SelfAttn(LN x);  x += CrossAttn(LN x, text);  x += MLP(LN x)
         where text = text_proj(SigLIP text tower last hidden state) (B, S, D)
      -> final LN -> tokens h
    video head:  s_video = score_offset + MLP_v(mean over all tokens of h)          (B, A)
    patch head:  s_patch[c] = score_offset + MLP_p(mean of h over the tokens of cell c)
                 (B, A, Tp, Hp, Wp)
    with head_pool="mean_max" each head reads [mean, max] (the elementwise max over the same tokens
    next to their mean, 2D wide): an object fills a few of a cell's tokens, and a mean dilutes
    what those few say (docs/architecture.md, "Head pooling")

Scores are reals on the 1..5 label scale (linear output around `score_offset`, no squashing,
so regression and Bradley-Terry losses never saturate). With `clip_scores` each head's output s
becomes clip(sg(s), 1, 5) + (s - sg(s)): the value is exactly clipped to the label range, the gradient
is the identity's. Labels pile up at 5 (a clean cell or video scores exactly 5), and a clipped score can
tie them there: a regression label at a bound is met by any score beyond it (zero loss, a censored
regression), while a score beyond the bound with a label inside the range still gets the gradient
of its clipped error.

Video-text matching (phase 0 of `train_reward`, the towers' own SigLIP-style pretraining where
no pretrained SigLIP can be loaded): `match_logits` L_ij = exp(logit_scale) cos(i, j) + logit_bias
(logit_scale, logit_bias start at log 10 and -10, as SigLIP's), cos(i, j) from `matching.py`: with
`match_pool` "mean" ("max") the cosine of the mean (elementwise max) over the sampled frames and
patches of the tokens v above with the mean of text_proj(text tokens) over the unmasked tokens; with
"phrases" the mean over the prompt's phrases (cut at `separator_ids`) of the best token's cosine with
the phrase. Without frame differences v sees colours, shapes and background, not motion. With
`match_features` the heads also read the matching probability sigmoid(L) of the video with its own
prompt: the video head gets sigmoid(L(v, t)) appended to the mean token, the patch head gets
sigmoid(L(v_c, t)) appended to cell c's token mean, where v_c pools the tokens v over the cell as
v_i pools the clip's (a direct text-alignment signal once phase 0 has aligned the towers); with
"phrases" one value per phrase slot (`max_phrases`, 0 for a phrase the prompt lacks), each the
max over the view's tokens.

Word evidence (`word_evidence`, needs a text tower of depth 0): for every prompt token s the heads also
read log softmax_w L(v, t^(s<-w)) at w = the prompt's own word, where t^(s<-w) is the text embedding with
token s replaced by vocabulary word w (v = v_i for the video head, v_c for cell c's; with "phrases" the
embedding of token s's phrase and the max over the view's tokens): how much better the prompt's word
fits the video than every other word would in its place (0 at padding and separators; P =
max_position_embeddings values, padded with 0). The matching probability's level varies from video to
video; this per-word comparison does not. At depth 0 a token's output depends on its word and position
alone, so t^(s<-w) is exact in closed form (`matching.swapped_embeddings`), O(B S V D) memory for a
vocabulary of V (with "phrases" the cosines take O(B M S V) for M tokens: 1.6 times the run time).

With `patch_reads_clip` the patch head reads the clip's match features and word evidence next to its cell's (the
video head's, broadcast to every cell): the clip's say which word of the prompt the video does not show, the
cell's whether what that word names is in the cell. A cell's own evidence sees a part of an object in half the
frames, so it reads shape and motion worse than the clip's (docs/architecture.md, "Cells read the clip").

Frame differences, pixel MLP and conv stem: token embeddings of the pixels next to the tower's, in
`stems.py`.

Text conditioning is cross-attention to the text tokens in every temporal block (not FiLM):
every video token can attend to the words that concern it, which is what a per-patch
text-alignment score needs. `text_mask` (B, S) masks padded text keys of the cross-attention
only; the SigLIP text tower itself runs unmasked, as it was trained (max-length padding).

Cell membership (`token_cell_map`) follows `halo_jax.align.patches`: the grid lives in
pixel space of the *input* clip (F, H, W); a sampled frame f sits at pixel-frame midpoint
f + 0.5, token row j of Ht covers input rows [j*H/Ht, (j+1)*H/Ht) (the resize maps the whole
frame onto the token grid), and each token goes to the cell of its midpoint (ties earlier).

Tower tuning (`vision_tuning`, `text_tuning`): "frozen" (tower output under stop_gradient:
no backward pass through it), "full", "top:K" (only the last K encoder layers and the final
norm learn; the earlier layers run under stop_gradient), "lora" (gradients flow through the
tower; only adapter params are trainable: `apply_tower_lora` adds them with
`halo_jax.models.lora` on the encoder q/k/v/out and MLP projections).
`towers.trainable_filter(config)` is the matching nnx filter for the optimizer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from halo_jax.align.patches import CellMap, as_grid, pool_cells
from halo_jax.config import check_fields
from halo_jax.convert.safetensors_io import read_config
from halo_jax.models.reward import matching
from halo_jax.models.reward.siglip import (
    MLP,
    Attention,
    PatchEmbed,
    SiglipConfig,
    SiglipTextConfig,
    SiglipTextTower,
    SiglipVisionConfig,
    SiglipVisionTower,
    dense,
    layer_norm,
    scan_layers,
    stacked,
)
from halo_jax.models.reward.stems import ConvStem, PixelMLP, frame_differences
from halo_jax.parallel.sharding import param_init
from halo_jax.teachers.base import SCORE_MAX, SCORE_MIN

Dtype = Any
DEFAULT_ASPECTS = ("visual_quality", "temporal_consistency", "text_alignment")
HEAD_POOLS = ("mean", "mean_max")
MATCH_POOLS = ("mean", "max", "phrases")


def parse_tuning(mode: str, depth: int, what: str) -> tuple[str, int]:
    """'frozen' | 'full' | 'lora' | 'top:K' -> (kind, number of frozen encoder layers)."""
    if mode in ("frozen", "full", "lora"):
        return mode, {"frozen": depth, "full": 0, "lora": 0}[mode]
    if mode.startswith("top:"):
        try:
            k = int(mode[4:])
        except ValueError:
            k = -1
        if 0 <= k <= depth:
            return "top", depth - k
    raise ValueError(f"{what}={mode!r}: use 'frozen', 'full', 'lora' or 'top:K' with 0 <= K <= {depth} (encoder depth)")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """Hyper-parameters of `RewardModel` (towers + new temporal layers and heads)."""

    vision: SiglipVisionConfig = SiglipVisionConfig()
    text: SiglipTextConfig = SiglipTextConfig()
    num_frames: int = 8  # frames sampled uniformly from the clip
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # SigLIP normalisation, on 0..1 pixels
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    aspects: tuple[str, ...] = DEFAULT_ASPECTS
    grid: tuple[int, int, int] = (2, 2, 2)  # (Tp, Hp, Wp) of the patch head
    width: int = 512  # temporal transformer width D
    num_layers: int = 2  # temporal blocks
    num_heads: int = 8
    mlp_ratio: int = 4
    head_hidden: int = 256  # hidden width of the video and patch head MLPs
    score_offset: float = 3.0  # centre of the 1..5 scale; heads predict offsets from it
    vision_tuning: str = "frozen"  # frozen | full | lora | top:K
    text_tuning: str = "frozen"
    lora_rank: int = 8  # used by models/lora.py when a tower's tuning is "lora"
    lora_alpha: float = 16.0
    remat: bool = False  # rematerialise encoder / temporal layers in the backward pass
    attention_impl: str = "xla"  # see halo_jax.models.attention
    match_features: bool = False  # the heads also read the video's (cell's) matching probability with its prompt
    head_pool: str = "mean"  # mean | mean_max: what the heads read of their tokens (module docstring)
    clip_scores: bool = False  # scores clipped to [1, 5] with a straight-through gradient (module docstring)
    frame_differences: bool = False  # tokens also embed x[t+1] - x[t-1] (stems.py)
    match_pool: str = "mean"  # mean | max over the tokens | phrases: how video and prompt are matched (matching.py)
    separator_ids: tuple[int, ...] = ()  # with match_pool="phrases": token ids that end a phrase ("and", "on")
    max_phrases: int = 4  # with match_pool="phrases": phrases past this join the last
    phrase_window: int = 1  # with match_pool="phrases": each token's matching vector is the max over k x k tokens
    word_evidence: bool = False  # the heads also read each prompt word's fit against the vocabulary (module docstring)
    pixel_mlp: int = 0  # > 0: hidden width of a nonlinear embedding of each token's pixels (stems.py)
    conv_stem: int = 0  # > 0: channels of a convolutional embedding of each frame (stems.py)
    patch_reads_clip: bool = False  # the patch head also reads the clip's extra features (module docstring)

    def __post_init__(self):
        object.__setattr__(self, "grid", as_grid(self.grid))
        object.__setattr__(self, "aspects", tuple(self.aspects))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "separator_ids", tuple(int(i) for i in self.separator_ids))
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if not self.aspects or len(set(self.aspects)) != len(self.aspects):
            raise ValueError(f"aspects must be a non-empty list of distinct names, got {self.aspects}")
        if len(self.mean) != self.vision.num_channels or len(self.std) != self.vision.num_channels or min(self.std) <= 0:
            raise ValueError(f"mean/std need {self.vision.num_channels} values (std > 0), got {self.mean}, {self.std}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.grid[0] > self.num_frames or self.grid[1] > self.vision.grid or self.grid[2] > self.vision.grid:
            raise ValueError(f"grid {self.grid} is finer than the tokens: {self.num_frames} frames x "
                             f"{self.vision.grid}x{self.vision.grid} tokens per frame; coarsen the grid or sample more frames")
        if self.head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool={self.head_pool!r}: use one of {HEAD_POOLS}")
        if self.match_pool not in MATCH_POOLS:
            raise ValueError(f"match_pool={self.match_pool!r}: use one of {MATCH_POOLS}")
        if self.max_phrases < 1 or not 1 <= self.phrase_window <= self.vision.grid:
            raise ValueError(f"max_phrases must be >= 1 and phrase_window in 1..{self.vision.grid} (tokens per side), "
                             f"got {self.max_phrases} and {self.phrase_window}")
        if self.pixel_mlp < 0:
            raise ValueError(f"pixel_mlp must be >= 0 (0: off), got {self.pixel_mlp}")
        if self.conv_stem < 0 or (self.conv_stem and self.vision.patch_size % 2):
            raise ValueError(f"conv_stem must be >= 0 (0: off) and needs an even vision.patch_size, got conv_stem="
                             f"{self.conv_stem}, patch_size={self.vision.patch_size}")
        if self.patch_reads_clip and not (self.match_features or self.word_evidence):
            raise ValueError("patch_reads_clip gives the patch head the clip's match features and word evidence, and "
                             "neither is on: set match_features=True or word_evidence=True")
        if self.word_evidence and self.text.num_hidden_layers != 0:
            raise ValueError(f"word_evidence needs a text tower of depth 0 (each token its word and position alone), "
                             f"this one has {self.text.num_hidden_layers} layers: set text.num_hidden_layers=0 or "
                             "word_evidence=False")
        parse_tuning(self.vision_tuning, self.vision.num_hidden_layers, "vision_tuning")
        parse_tuning(self.text_tuning, self.text.num_hidden_layers, "text_tuning")

    @property
    def image_size(self) -> int:
        """Frames are resized to the vision tower's configured size (no position interpolation)."""
        return self.vision.image_size

    @property
    def num_aspects(self) -> int:
        return len(self.aspects)

    def frame_indices(self, clip_frames: int) -> np.ndarray:
        """Sampled frame indices round(linspace(0, F-1, num_frames)); a clip shorter than
        `num_frames` repeats frames."""
        if clip_frames < 1:
            raise ValueError(f"a clip needs at least one frame, got {clip_frames}")
        return np.round(np.linspace(0, clip_frames - 1, self.num_frames)).astype(np.int32)

    def token_cell_map(self, clip_shape: Sequence[int]) -> CellMap:
        """Cells of the (T, Ht, Wt) tokens of a clip of input shape (F, H, W) (module docstring)."""
        f, h, w = (int(x) for x in clip_shape)
        g = self.vision.grid
        mids = [self.frame_indices(f) + 0.5, (np.arange(g) + 0.5) * (h / g), (np.arange(g) + 0.5) * (w / g)]
        return CellMap.from_midpoints(mids, (f, h, w), self.grid, what="tokens")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vision"], d["text"] = self.vision.to_transformers_config(), self.text.to_transformers_config()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RewardModelConfig:
        check_fields(cls, d)
        kw = dict(d)
        if "vision" in kw:
            kw["vision"] = SiglipVisionConfig.from_transformers_config(kw["vision"])
        if "text" in kw:
            kw["text"] = SiglipTextConfig.from_transformers_config(kw["text"])
        for key in ("mean", "std", "aspects", "grid", "separator_ids"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    @classmethod
    def from_siglip_folder(cls, folder: str | os.PathLike, **overrides: Any) -> RewardModelConfig:
        """Tower configs from a transformers SigLIP folder's config.json, the rest from `overrides`."""
        sig = SiglipConfig.from_transformers_config(read_config(folder))
        return cls(vision=sig.vision, text=sig.text, **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> RewardModelConfig:
        kw = dict(vision=SiglipVisionConfig.tiny(), text=SiglipTextConfig.tiny(), num_frames=4, width=32, num_layers=1,
                  num_heads=4, head_hidden=16, grid=(2, 2, 2))
        kw.update(overrides)
        return cls(**kw)


def _pool_clip(v: jax.Array, reduce: str) -> jax.Array:
    """Mean (or max) of tokens (B, T, N, D) over the clip's frames and tokens: (B, D)."""
    return v.max(axis=(1, 2)) if reduce == "max" else v.mean(axis=(1, 2))


def pool_tokens(tokens: jax.Array, cells: CellMap, reduce: str = "mean") -> jax.Array:
    """Per-cell token mean (or max): (B, T, Ht, Wt, D) -> (B, Tp, Hp, Wp, D) (float32 accumulation)."""
    if tokens.ndim != 5 or tuple(tokens.shape[1:4]) != cells.shape:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not match the cell map of token shape {cells.shape}")
    pooled = pool_cells(jnp.moveaxis(tokens, -1, 1), cells, reduce)  # (B, D, Tp, Hp, Wp)
    return jnp.moveaxis(pooled, 1, -1).astype(tokens.dtype)


class TemporalBlock(nnx.Module):
    """Pre-LN block over all frame tokens: self-attention, cross-attention to text, MLP."""

    def __init__(self, cfg: RewardModelConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        d = cfg.width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layer_norm(d, 1e-6, **kw)
        self.self_attn = Attention(d, cfg.num_heads, attention_impl=cfg.attention_impl, **kw)
        self.norm2 = layer_norm(d, 1e-6, **kw)
        self.cross_attn = Attention(d, cfg.num_heads, attention_impl=cfg.attention_impl, **kw)
        self.norm3 = layer_norm(d, 1e-6, **kw)
        self.mlp = MLP(d, cfg.mlp_ratio * d, "gelu_pytorch_tanh", **kw)

    def __call__(self, x: jax.Array, text: jax.Array, text_mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), text, mask=text_mask)
        return x + self.mlp(self.norm3(x))


def clip_to_label_range(s: jax.Array) -> jax.Array:
    """Forward value clip(s, SCORE_MIN, SCORE_MAX), gradient the identity's (straight-through).

    Written clip(sg(s)) + (s - sg(s)), whose value is the clip exactly (s - s = 0), so scores beyond a
    bound tie there bit for bit (s + sg(clip(s) - s) rounds scores far beyond a bound, |s| > 10, off it)."""
    frozen = jax.lax.stop_gradient(s)
    return jnp.clip(frozen, SCORE_MIN, SCORE_MAX) + (s - frozen)


class ScoreHead(nnx.Module):
    """s = score_offset + fc2(gelu(fc1(x))): (..., D) -> (..., A), unbounded."""

    def __init__(self, dim: int, hidden: int, aspects: int, offset: float, *, rngs: nnx.Rngs,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.offset = offset
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = dense(hidden, aspects, ("mlp", None), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         kernel_init=nnx.initializers.normal(0.02))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.offset + self.fc2(jax.nn.gelu(self.fc1(x))).astype(jnp.float32)


class RewardModel(nnx.Module):
    """frames (B, F, H, W, 3) + prompt ids (B, S) -> {'video': (B, A), 'patch': (B, A, Tp, Hp, Wp)}."""

    def __init__(self, cfg: RewardModelConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        vision_cfg = dataclasses.replace(cfg.vision, vision_use_head=False)  # patch tokens only
        self.vision = SiglipVisionTower(vision_cfg, attention_impl=cfg.attention_impl, **kw)
        self.text = SiglipTextTower(cfg.text, attention_impl=cfg.attention_impl, **kw)
        d = cfg.width
        self.proj_in = dense(cfg.vision.hidden_size, d, (None, "embed"), **kw)
        self.text_proj = dense(cfg.text.hidden_size, d, (None, "embed"), **kw)
        emb = param_init(nnx.initializers.normal(0.02), None, "embed")
        self.frame_embedding = nnx.Param(emb(rngs.params(), (cfg.num_frames, d), param_dtype))
        self.spatial_embedding = nnx.Param(emb(rngs.params(), (cfg.vision.num_patches, d), param_dtype))
        if cfg.frame_differences:
            self.difference_embedding = PatchEmbed(cfg.vision.patch_size, cfg.vision.num_channels, d,
                                                   kernel_init=nnx.initializers.zeros, **kw)
        pixel_channels = cfg.vision.num_channels * (2 if cfg.frame_differences else 1)  # `video_tokens`' pixels
        if cfg.pixel_mlp:
            self.pixel_mlp = PixelMLP(cfg.vision.patch_size, cfg.vision.patch_size ** 2 * pixel_channels, cfg.pixel_mlp,
                                      d, **kw)
        if cfg.conv_stem:
            self.conv_stem = ConvStem(cfg.vision.patch_size, pixel_channels, cfg.conv_stem, d, **kw)
        self.temporal = stacked(cfg.num_layers, lambda r: TemporalBlock(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype),
                                rngs)
        self.final_norm = layer_norm(d, 1e-6, **kw)
        phrases = cfg.max_phrases if cfg.match_pool == "phrases" else 1
        pooled = d * (2 if cfg.head_pool == "mean_max" else 1)
        extra = phrases * int(cfg.match_features) + cfg.text.max_position_embeddings * int(cfg.word_evidence)
        self.video_head = ScoreHead(pooled + extra, cfg.head_hidden, cfg.num_aspects, cfg.score_offset, **kw)
        self.patch_head = ScoreHead(pooled + extra * (2 if cfg.patch_reads_clip else 1), cfg.head_hidden,
                                    cfg.num_aspects, cfg.score_offset, **kw)
        def scalar(value: float) -> nnx.Param:
            return nnx.Param(param_init(nnx.initializers.constant(value), None)(rngs.params(), (1,), param_dtype))

        self.logit_scale, self.logit_bias = scalar(math.log(10.0)), scalar(-10.0)  # of match_logits only
        self.dtype, self.param_dtype = dtype, param_dtype

    def preprocess(self, frames: jax.Array) -> jax.Array:
        """(N, H, W, C) uint8 0..255 or float 0..1 -> (N, S, S, C) resized and normalised."""
        cfg = self.config
        x = frames.astype(jnp.float32)
        if frames.dtype == jnp.uint8:
            x = x / 255.0
        size = cfg.image_size
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bilinear", antialias=True)
        x = (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)
        return x.astype(self.dtype or jnp.float32)

    def encode_text(self, input_ids: jax.Array) -> jax.Array:
        """Prompt ids (B, S) -> text tokens (B, S, D) for the cross-attention."""
        cfg = self.config
        kind, frozen = parse_tuning(cfg.text_tuning, cfg.text.num_hidden_layers, "text_tuning")
        tokens = self.text(input_ids, frozen_layers=frozen, remat=cfg.remat).last_hidden_state
        if kind == "frozen":
            tokens = jax.lax.stop_gradient(tokens)
        return self.text_proj(tokens)

    def sample_frames(self, frames: jax.Array) -> jax.Array:
        """Clip (B, F, H, W, C) -> the sampled frames, resized and normalised: (B, T, S, S, C)."""
        cfg = self.config
        if frames.ndim != 5 or frames.shape[-1] != cfg.vision.num_channels:
            raise ValueError(f"frames must be (B, F, H, W, {cfg.vision.num_channels}), got {frames.shape}")
        b, f = frames.shape[:2]
        x = frames[:, cfg.frame_indices(f)]
        x = self.preprocess(x.reshape(b * cfg.num_frames, *x.shape[2:]))
        return x.reshape(b, cfg.num_frames, *x.shape[1:])

    def encode_pixels(self, x: jax.Array) -> jax.Array:
        """Sampled frames (B, T, S, S, C) -> vision patch tokens (B, T, Ht*Wt, Dv)."""
        cfg = self.config
        kind, frozen = parse_tuning(cfg.vision_tuning, cfg.vision.num_hidden_layers, "vision_tuning")
        tokens = self.vision(x.reshape(-1, *x.shape[2:]), frozen_layers=frozen, remat=cfg.remat,
                             pool=False).last_hidden_state
        if kind == "frozen":
            tokens = jax.lax.stop_gradient(tokens)
        return tokens.reshape(*x.shape[:2], *tokens.shape[1:])

    def video_tokens(self, x: jax.Array) -> jax.Array:
        """Sampled frames (B, T, S, S, C) -> v = proj_in(vision tokens) (+ difference tokens, + pixel-MLP tokens,
        + conv-stem tokens): (B, T, Ht*Wt, D)."""
        cfg = self.config
        v = self.proj_in(self.encode_pixels(x))
        diff = frame_differences(x) if cfg.frame_differences else None
        if diff is not None:
            v = v + self._per_frame(self.difference_embedding, diff).astype(v.dtype)
        if cfg.pixel_mlp or cfg.conv_stem:
            pixels = x if diff is None else jnp.concatenate([x, diff], axis=-1)
            if cfg.pixel_mlp:
                v = v + self._per_frame(self.pixel_mlp, pixels).astype(v.dtype)
            if cfg.conv_stem:
                v = v + self._per_frame(self.conv_stem, pixels).astype(v.dtype)
        return v

    def difference_tokens(self, x: jax.Array) -> jax.Array:
        """Sampled frames (B, T, S, S, C) -> PatchEmbed_d(x[t+1] - x[t-1]) (B, T, Ht*Wt, D), one-sided at the ends."""
        return self._per_frame(self.difference_embedding, frame_differences(x))

    @staticmethod
    def _per_frame(embed: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
        """A per-image token embedding (N, S, S, C') -> (N, Ht*Wt, D) applied to frames (B, T, S, S, C')."""
        tokens = embed(x.reshape(-1, *x.shape[2:]))
        return tokens.reshape(*x.shape[:2], *tokens.shape[1:])

    def match_logits(self, frames: jax.Array, input_ids: jax.Array, text_mask: jax.Array | None = None) -> jax.Array:
        """Video-text logits (B videos, B' prompts), float32 (module docstring)."""
        return self.scaled(matching.match_cosines(self.match_video(frames), self.match_text(input_ids, text_mask)))

    def match_video(self, frames: jax.Array) -> jax.Array:
        """Matching vectors V (B, M, D) of clips (B, F, H, W, C), float32 (`matching`)."""
        v = self.video_tokens(self.sample_frames(frames))
        if self.config.match_pool == "phrases":
            v = matching.window_max(v, self.config.vision.grid, self.config.phrase_window)
            return matching.unit(v.reshape(v.shape[0], -1, v.shape[-1]))
        return matching.unit(_pool_clip(v, self.config.match_pool))[:, None]

    def match_text(self, input_ids: jax.Array, text_mask: jax.Array | None = None) -> jax.Array:
        """Matching phrase vectors T (B', P, D) of prompts (B', S), float32 (`matching`)."""
        return matching.phrase_vectors(self.encode_text(input_ids), self.text_groups(input_ids, text_mask))

    def text_groups(self, input_ids: jax.Array, text_mask: jax.Array | None) -> jax.Array:
        """Membership G (B, S, P) of the prompt tokens in the phrases (or P = 1, the whole prompt)."""
        cfg = self.config
        separators = cfg.separator_ids if cfg.match_pool == "phrases" else None
        return matching.membership(input_ids, text_mask, separators, cfg.max_phrases)

    def word_fit(self, video: jax.Array, input_ids: jax.Array, text_mask: jax.Array | None = None) -> jax.Array:
        """log softmax_w L(V_i, t_i^(s<-w)) at each prompt token's own word, for clips' matching vectors V_i =
        `match_video` (B, M, D) (the max over m of the logits) and their prompts (B, S): (B, S), 0 at padding and
        separators; needs a text tower of depth 0 (`_word_evidence`, module docstring)."""
        groups = self.text_groups(input_ids, text_mask)
        swapped = matching.swapped_embeddings(self.encode_text(input_ids), groups, self._vocabulary(input_ids.shape[1]))
        logits = self.scaled(jnp.einsum("bmd,bsvd->bmsv", video, swapped).max(axis=1))
        return matching.own_word_log_softmax(logits[:, None], input_ids, groups)[:, 0]

    def scaled(self, cosine: jax.Array) -> jax.Array:
        """Matching logits exp(logit_scale) cosine + logit_bias, float32."""
        return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * cosine + self.logit_bias[...].astype(jnp.float32)

    def _vocabulary(self, length: int) -> jax.Array:
        """A[w, s]: the projected depth-0 text output of every vocabulary word w at every position s < length."""
        if self.config.text.num_hidden_layers:
            raise ValueError(f"word evidence needs a text tower of depth 0, this one has "
                             f"{self.config.text.num_hidden_layers} layers: set text.num_hidden_layers=0")
        vocab = self.config.text.vocab_size
        return self.encode_text(jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32)[:, None], (vocab, length)))

    def _view_cosines(self, v: jax.Array, cells: CellMap, targets: jax.Array) -> jax.Array:
        """Cosines of the clip and of each cell with targets (B, Q, D) unit vectors: (B, 1 + C, Q), float32, the clip
        first, then the C = Tp*Hp*Wp cells. A view pools the tokens `v` (B, T, Ht*Wt, D) as `match_pool` says, and
        with "phrases" is the max over its tokens of their cosines."""
        b, t, _, d = v.shape
        g, pool = self.config.vision.grid, self.config.match_pool
        if pool == "phrases":
            u = matching.unit(matching.window_max(v, g, self.config.phrase_window))
            c = jnp.einsum("btnd,bqd->btnq", u, targets.astype(jnp.float32))
            clip = c.max(axis=(1, 2))[:, None]
            cell = pool_tokens(c.reshape(b, t, g, g, -1), cells, "max").reshape(b, -1, c.shape[-1])
            return jnp.concatenate([clip, cell], axis=1)
        clip = _pool_clip(v, pool)[:, None].astype(jnp.float32)
        cell = pool_tokens(v.astype(jnp.float32).reshape(b, t, g, g, d), cells, pool).reshape(b, -1, d)
        views = matching.unit(jnp.concatenate([clip, cell], axis=1))
        return jnp.einsum("bkd,bqd->bkq", views, targets.astype(jnp.float32))

    def _match_features(self, v: jax.Array, cells: CellMap, text: jax.Array, groups: jax.Array) -> jax.Array:
        """sigmoid(L) of each view (`_view_cosines`) with each phrase of its own prompt (text tokens (B, S, D),
        groups (B, S, P)): (B, 1 + C, P), 0 for phrases the prompt lacks."""
        m, n = matching.group_means(text, groups)
        return jax.nn.sigmoid(self.scaled(self._view_cosines(v, cells, matching.unit(m)))) * (n > 0)[:, None]

    def _word_evidence(self, v: jax.Array, cells: CellMap, text: jax.Array, groups: jax.Array, input_ids: jax.Array
                       ) -> jax.Array:
        """log softmax_w L(view, t^(s<-w)) at each prompt token's own word (module docstring) for each view
        (`_view_cosines`): (B, 1 + C, P) with P = max_position_embeddings, 0 at padding, separators and past S."""
        b, s = input_ids.shape
        swapped = matching.swapped_embeddings(text, groups, self._vocabulary(s))  # (B, S, V, D)
        cosines = self._view_cosines(v, cells, swapped.reshape(b, -1, swapped.shape[-1]))
        logits = self.scaled(cosines.reshape(*cosines.shape[:2], s, -1))  # (B, K, S, V)
        own = matching.own_word_log_softmax(logits, input_ids, groups)
        return jnp.pad(own, ((0, 0), (0, 0), (0, self.config.text.max_position_embeddings - s)))

    def encode(self, frames: jax.Array, input_ids: jax.Array, text_mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(v (B, T, N, D) the tokens `video_tokens`, text (B, S, D) the text tokens, h (B, T*N, D) the temporal
        blocks' normalised output): what the heads pool (module docstring)."""
        v = self.video_tokens(self.sample_frames(frames))
        x = v + self.frame_embedding[...].astype(v.dtype)[None, :, None]
        x = x + self.spatial_embedding[...].astype(v.dtype)[None, None]
        text = self.encode_text(input_ids)
        mask = None if text_mask is None else jnp.asarray(text_mask) != 0
        x = scan_layers(self.temporal, x.reshape(v.shape[0], -1, self.config.width), text, mask,
                        remat=self.config.remat)
        return v, text, self.final_norm(x)

    def __call__(self, frames: jax.Array, input_ids: jax.Array, text_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """Scores on the 1..5 scale: {'video': (B, A), 'patch': (B, A, Tp, Hp, Wp)}, float32; with
        `clip_scores` those are clipped (`clip_to_label_range`) and 'video_raw' / 'patch_raw' hold
        the unclipped head outputs (for the censored regression of `reward.losses`).

        `input_ids` (B, S) SigLIP token ids; `text_mask` (B, S), 1 = token, masks padding keys
        in the cross-attention (optional).
        """
        cfg = self.config
        cells = cfg.token_cell_map(frames.shape[1:4])
        b = frames.shape[0]
        g = cfg.vision.grid
        v, text, h = self.encode(frames, input_ids, text_mask)
        video_in = h.astype(jnp.float32).mean(axis=1).astype(h.dtype)
        grid_h = h.reshape(b, cfg.num_frames, g, g, cfg.width)
        cells_in = pool_tokens(grid_h, cells)  # (B, Tp, Hp, Wp, D)
        if cfg.head_pool == "mean_max":
            video_in = jnp.concatenate([video_in, h.max(axis=1)], axis=-1)
            cells_in = jnp.concatenate([cells_in, pool_tokens(grid_h, cells, "max")], axis=-1)
        if cfg.match_features or cfg.word_evidence:
            groups = self.text_groups(input_ids, text_mask)
            extra = []
            if cfg.match_features:
                extra.append(self._match_features(v, cells, text, groups))
            if cfg.word_evidence:
                extra.append(self._word_evidence(v, cells, text, groups, input_ids))
            extra = jnp.concatenate(extra, axis=-1)  # (B, 1 + C, E): the clip, then the cells
            video_in = jnp.concatenate([video_in, extra[:, 0].astype(video_in.dtype)], axis=-1)
            cell_extra = extra[:, 1:].reshape(*cells_in.shape[:-1], -1)
            if cfg.patch_reads_clip:
                clip_extra = jnp.broadcast_to(extra[:, 0, None, None, None], cell_extra.shape)
                cell_extra = jnp.concatenate([cell_extra, clip_extra], axis=-1)
            cells_in = jnp.concatenate([cells_in, cell_extra.astype(cells_in.dtype)], axis=-1)
        video = self.video_head(video_in)
        patch = jnp.moveaxis(self.patch_head(cells_in), -1, 1)  # (B, A, Tp, Hp, Wp)
        if not cfg.clip_scores:
            return {"video": video, "patch": patch}
        return {"video": clip_to_label_range(video), "patch": clip_to_label_range(patch),
                "video_raw": video, "patch_raw": patch}

