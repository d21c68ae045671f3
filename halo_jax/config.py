"""The run configuration shared by every stage: `base_config()` and its sections.

A config file in `configs/` is a small program: `get_config()` starts from
`base_config()` and changes what its experiment needs. Every field can be
overridden on the command line: `--config.mesh.fsdp=4`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import ml_collections

from halo_jax.parallel.logical_axes import DEFAULT_RULES

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the field and the fix (CLI: one line, exit 2)."""


def field_names(cls: type) -> frozenset[str]:
    """The field names of dataclass `cls`."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def check_fields(cls: type, keys: Iterable[str], where: str = "") -> None:
    """Raise ConfigError if any of `keys` is not a field of dataclass `cls`; the message names the
    unknown keys, `where` they came from (e.g. "config.model.fields") and the valid fields."""
    names = field_names(cls)
    unknown = sorted(set(keys) - names)
    if unknown:
        place = f" in {where}" if where else ""
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}{place}; known: {sorted(names)}")


def dataclass_from_dict(cls: type[T], values: Mapping[str, Any], where: str = "", *,
                        unknown: str = "error") -> T:
    """`cls(**values)` for dataclass `cls`; keys that are not fields raise ConfigError (`unknown="error"`,
    see `check_fields`) or are dropped (`unknown="ignore"`: e.g. the extra keys of a transformers config.json)."""
    if unknown == "ignore":
        names = field_names(cls)
        values = {k: v for k, v in values.items() if k in names}
    elif unknown == "error":
        check_fields(cls, values, where)
    else:
        raise ValueError(f"unknown={unknown!r}: use 'error' or 'ignore'")
    return cls(**values)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "describe"  # a stage name from halo_jax.stages.STAGES, or "pipeline"
    c.pipeline = ml_collections.ConfigDict({"stages": ("describe",)})
    c.seed = 0

    # One patch grid (Tp, Hp, Wp) and one list of aspects for labels, reward heads, pairs and the loss.
    c.aspects = ("visual_quality", "temporal_consistency", "text_alignment")
    c.grid = (2, 2, 2)
    c.defect_threshold = 3.0  # a patch whose mean score is below this is a defect

    # One mesh for every stage: axes ('data', 'fsdp', 'tensor'); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Logical parameter axis -> mesh axis (or None); see halo_jax/parallel/sharding.py.
    c.sharding = ml_collections.ConfigDict({"rules": tuple((k, v) for k, v in DEFAULT_RULES)})

    c.checkpoint = ml_collections.ConfigDict({
        "every_steps": 100,   # save every N steps (and at the end, and on SIGTERM)
        "keep": 3,            # keep the last K checkpoints
    })
    c.log = ml_collections.ConfigDict({
        "every_steps": 10,    # scalars to TensorBoard + metrics.jsonl
        "progress": True,     # steps/s and ETA on the terminal
    })
    # Multi-host: `jax.distributed.initialize()` runs on TPU pods and whenever the coordinator
    # variables are set (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or here.
    c.distributed = ml_collections.ConfigDict({
        "coordinator_address": "",
        "num_processes": 0,
        "process_id": -1,
        "cpu_collectives": "gloo",
    })
    return c


def _training(steps: int, batch_size: int, learning_rate: float, warmup_steps: int) -> dict:
    # schedule_steps: length of the cosine schedule (0 = steps); set it to extend a run later
    return {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
            "warmup_steps": warmup_steps, "grad_clip": 1.0, "weight_decay": 0.0, "schedule_steps": 0}


def pretrain_config() -> ml_collections.ConfigDict:
    """`config.pretrain`: the tiny Wan model of the moving-shapes world (stage `pretrain`)."""
    return ml_collections.ConfigDict({
        "video": {"frames": 9, "height": 32, "width": 32},
        "num_prompts": 0,  # train on the first N training prompts (0: all)
        "text": {
            "max_length": 32,  # padded prompt length (Wan uses 512; the world's prompts are short)
            "model": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
                      "relative_attention_num_buckets": 16, "relative_attention_max_distance": 32},
        },
        "vae": {
            # 2x spatial and 2x temporal compression: 9 x 32 x 32 frames -> 5 x 16 x 16 latents
            "model": {"base_dim": 8, "z_dim": 8, "dim_mult": (1, 2), "num_res_blocks": 1,
                      "temperal_downsample": (True,)},
            # posterior_noise scales the reparameterisation noise: at 1.0 the decoder learns the average object
            "num_seeds": 256, "kl_weight": 1e-4, "posterior_noise": 0.1,
            # with background_weight > 0, the share of the latents' variance between clips (the background's
            # offset) is held at most at background_share by a penalty of that weight on the excess
            # (train/objectives.vae_loss). Off: 1.0 / 0.02 made the DiT read the direction word, not reliably
            # draw better, and with this curriculum's 200 video steps the VAE halves the objects' speed
            # (400 keep it; docs/architecture.md, sessions 33 and 34)
            "background_weight": 0.0, "background_share": 0.02,
            # (clip frames, steps, batch size, foreground weight): stages of a curriculum, each
            # warm-started from the previous one. Single frames first (the causal VAE's image path,
            # 48 scenes per batch): unweighted, it learns the backgrounds; then weighting the object
            # pixels (train/objectives.vae_loss; objects cover ~5% of a frame) teaches the objects;
            # last, 9-frame clips train the video path (the causal convolutions' other taps). A longer video
            # stage reconstructs better and makes the DiT's samples worse (docs/architecture.md, session 35).
            "curriculum": ((1, 100, 48, 0.0), (1, 300, 48, 10.0), (9, 200, 6, 10.0)),
            "learning_rate": 2e-3, "warmup_steps": 30, "grad_clip": 1.0, "weight_decay": 0.0,
        },
        "latents": {"stats_videos": 256, "num_seeds": 8, "batch_size": 16, "chunk_size": 256},
        "dit": {
            # 320 tokens. Many small steps, the cosine schedule run to its end: at batch 32 (4x fewer
            # steps in the same time) and at checkpoints taken before the decay, samples are noise
            "model": {"patch_size": (1, 2, 2), "num_attention_heads": 4, "attention_head_dim": 24, "ffn_dim": 256,
                      "freq_dim": 64, "num_layers": 4},
            # sigmas drawn uniformly and shifted by 3, as the sampler spaces its steps
            "shift": 3.0, "timestep_sampling": "uniform", "text_dropout": 0.1,
            # the umT5 learns with the DiT (frozen at its random init, held-out text alignment was 2.04, not 2.47)
            "train_text_encoder": True,
            **_training(steps=6000, batch_size=8, learning_rate=2e-3, warmup_steps=100),
        },
        "sampler": {"name": "unipc", "shift": 3.0},
    })


def generate_config(config: ml_collections.ConfigDict) -> None:
    """Add the sections the `generate` stage reads: model, video, sampler, generate."""
    config.model = ml_collections.ConfigDict({
        "path": "",  # a local diffusers-format Wan folder; empty: WORKDIR/base_ckpt
        # WanTransformerConfig run options: dtype, param_dtype, remat, scan_layers, attention_impl
        "options": ml_collections.ConfigDict({"dtype": "float32", "param_dtype": "float32"}),
    })
    config.video = ml_collections.ConfigDict({"frames": 9, "height": 32, "width": 32})
    config.sampler = ml_collections.ConfigDict({"num_steps": 20, "guidance_scale": 5.0, "negative_prompt": ""})
    config.generate = ml_collections.ConfigDict({
        "prompts": (), "prompts_file": "", "shapes_split": "train", "num_prompts": 0,
        "samples_per_prompt": 4, "seed": 0, "batch_size": 8, "fps": 8.0, "chunk_size": 64,
    })


def label_config() -> ml_collections.ConfigDict:
    """`config.label`: the teacher and the labelling loop (stage `label`).

    `openai` mirrors `teachers.openai_vlm.OpenAIVLMConfig` (aspects and grid come from the
    top-level `config.aspects` / `config.grid`).
    """
    from halo_jax.teachers.openai_vlm import OpenAIVLMConfig

    openai = {f.name: getattr(OpenAIVLMConfig(), f.name) for f in dataclasses.fields(OpenAIVLMConfig)
              if f.name not in ("aspects", "grid")}
    return ml_collections.ConfigDict({
        "teacher": "oracle",          # "oracle" (the shapes world's exact judge) or "openai_vlm"
        "concurrency": 8,             # videos in flight
        "retry_failures": "transient",  # what a re-run asks again: none | transient | all
        "dry_run": False,             # print requests, tokens and cost; send nothing
        "on_corrupt": "skip",         # a corrupt rollout record or label line: skip (reported) or fail
        "openai": openai,
    })


def reward_config() -> ml_collections.ConfigDict:
    """`config.reward`: data, backbone and the two phases of stage `train_reward`.

    Without `siglip_path` the towers are the small random SigLIP towers under `model.vision` /
    `model.text`, trained from scratch (the moving-shapes world); with it, the towers, their
    config and the tokenizer come from that local transformers SigLIP folder (then tune them
    "frozen", "lora" or "top:K"). Aspects and grid are the top-level `config.aspects` / `config.grid`.
    """
    def phase(steps: int, learning_rate: float) -> dict:
        return _training(steps=steps, batch_size=32, learning_rate=learning_rate, warmup_steps=30)

    return ml_collections.ConfigDict({
        # -- data (any combination)
        "use_labels": True,           # WORKDIR/labels (the label stage) joined to WORKDIR/rollouts, when present
        "synthetic_videos": 0,        # + N rendered shapes videos with random defects, oracle-labelled
        # kinds: defect kinds drawn (halo_jax/data/defects.py KINDS); empty = all of them
        # mismatch_fraction: share of synthetic videos labelled against an altered prompt (one object's
        # colour, shape or motion changed): text-alignment labels that need the text; mismatch_pairs: each
        # such video is also kept labelled against the prompt it shows (same pixels, both texts)
        "synthetic": {"videos_per_prompt": 4, "max_defects": 3, "kinds": (), "mismatch_fraction": 0.0,
                      "mismatch_pairs": False, "seed": 0, "chunk_size": 64},
        "videofeedback_path": "",     # + a local VideoFeedback-layout label set (halo_jax/data/videofeedback.py)
        "video": {"frames": 17, "height": 32, "width": 32},  # every clip is fitted to this shape
        "heldout_fraction": 0.1,      # prompts held out for evaluation (deterministic by config.seed)
        "on_bad_label": "skip",       # a rejected label: skip (counted, reported) or fail
        # -- backbone
        "siglip_path": "",            # a local transformers SigLIP folder; empty: random tiny towers
        "text_max_length": 32,        # prompt tokens (0 with a SigLIP folder: its max_position_embeddings)
        "dtype": "float32",           # compute dtype (params stay float32)
        "model": {
            "num_frames": 8, "width": 64, "num_layers": 2, "num_heads": 4, "mlp_ratio": 4, "head_hidden": 64,
            "score_offset": 3.0, "vision_tuning": "full", "text_tuning": "full", "lora_rank": 8, "lora_alpha": 16.0,
            "remat": False, "attention_impl": "xla", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "match_features": False,  # the heads also read the matching probability (RewardModel docstring)
            "head_pool": "mean",  # mean | mean_max: the heads read the mean (and max) of their tokens
            "clip_scores": False,  # scores clipped to [1, 5], straight-through gradient (RewardModel docstring)
            "frame_differences": False,  # tokens also embed x[t+1] - x[t-1], a motion cue (models/reward/stems.py)
            "match_pool": "mean",  # mean | max over the tokens | phrases: how videos and prompts match (phase 0)
            # with match_pool="phrases": the words that end a phrase, at most how many phrases, the k x k tokens
            # a token matches with (RewardModel)
            "phrase_separators": (), "max_phrases": 4, "phrase_window": 1,
            "word_evidence": False,  # the heads also read each prompt word's fit (depth-0 text; RewardModel docstring)
            "pixel_mlp": 0,  # > 0: width of a nonlinear embedding of each token's pixels (models/reward/stems.py)
            "conv_stem": 0,  # > 0: channels of two 3x3 convolutions embedding each frame (models/reward/stems.py)
            "patch_reads_clip": False,  # the patch head also reads the clip's match features and word evidence
            "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 4},
            "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4},
        },
        # -- training: videos of one prompt come in groups (Bradley-Terry pairs form inside a group)
        "group_size": 4,
        # bound_margin: with model.clip_scores, labels at 1 or 5 ask the raw score to pass the bound by this
        # much (a censored regression, reward/losses.py), so clean cells tie at 5 as their labels do
        # word: phase 0's weight of L_w, each prompt word against every vocabulary word in its place (text towers
        # of depth 0; reward/losses.py)
        # twin: phases 1-2's Bradley-Terry weight over the records of one video (a mismatched video and its copy
        # labelled against the prompt it shows: synthetic.mismatch_pairs), its score and its cells' (reward/losses.py);
        # > 0 also groups the videos by the prompt they show, each video's records in one group (a warning when
        # no training video has two records)
        # cell_ranking: phase 2's Bradley-Terry weight over the cells of one video (reward/losses.py)
        "losses": {"regression": 1.0, "bradley_terry": 0.5, "bt_margin": 0.25, "bt_temperature": 1.0,
                   "patch": 1.0, "consistency": 0.1, "bound_margin": 0.0, "word": 0.0, "twin": 0.0,
                   "cell_ranking": 0.0},
        # phase 0 (0 steps: off): the towers' video-text matching before phase 1 (SigLIP's sigmoid loss on
        # the videos that show their prompt), for towers trained from scratch
        # hard_negatives: each video also meets its prompt with one object's attribute changed, one prompt per
        # entry of negative_attributes (reward/data.hard_negatives), which in-batch prompts rarely are
        "phase0": {**phase(steps=0, learning_rate=1e-3), "hard_negatives": False,
                   "negative_attributes": ("colour", "shape", "motion")},
        "phase1": phase(steps=300, learning_rate=1e-3),   # video head (+ what the tuning modes unfreeze)
        "phase2": phase(steps=300, learning_rate=5e-4),   # + patch head, patch and consistency losses
        "eval_batch_size": 32,
    })


def score_config() -> ml_collections.ConfigDict:
    """`config.score`: stage `score` (the reward model over every rollout)."""
    return ml_collections.ConfigDict({
        "model_path": "",             # a reward-model export; empty: WORKDIR/reward_ckpt
        "batch_size": 8,              # videos per jitted forward (per process)
        # overall reward = sum_a w_a video_scores[a] / sum_a w_a over the model's aspects
        "aspect_weights": {"visual_quality": 1.0, "temporal_consistency": 1.0, "text_alignment": 1.0},
        "chunk_size": 64,
        "on_corrupt": "skip",         # a corrupt rollout record: skip (reported) or fail
    })


def pairs_config() -> ml_collections.ConfigDict:
    """`config.pairs`: stage `pairs` (win/lose pairs from `scores/`; fields of `align.pairs.PairConfig`).

    The grid is the top-level `config.grid`. Empty weight dicts mean every aspect, equally
    (`patch_aspect_weights` empty: as `aspect_weights`).
    """
    return ml_collections.ConfigDict({
        "aspect_weights": {},         # {aspect: weight} for the video reward R
        "patch_aspect_weights": {},   # {aspect: weight} for the patch reward r_p
        "margin_video": 0.0,          # a pair needs R(w) - R(l) >= margin_video (and > 0)
        "margin_patch": 0.0,          # s_p = 0 where |r_p(w) - r_p(l)| < margin_patch
        "strategy": "best_vs_worst",  # "best_vs_worst" | "all" (largest gaps first, up to the cap)
        "max_pairs_per_prompt": 1,
        "patch_weighting": "uniform",  # a_p: "uniform" (1) or "gap" (|r_p(w) - r_p(l)|)
        "text_batch_size": 8,         # prompts per umT5 forward
        "chunk_size": 64,
        "on_corrupt": "skip",         # a corrupt score or rollout record: skip (reported) or fail
    })


def dpo_config() -> ml_collections.ConfigDict:
    """`config.dpo`: stage `train_dpo` (Gran-DPO, or Diffusion-DPO with `loss.patch_weight = 0`).

    The loss grid is the top-level `config.grid`; the model comes from `config.model`
    (`generate_config`). `loss` mirrors `align.gran_dpo.GranDPOConfig` (beta_patch 0: = beta),
    `lora` mirrors `models.lora.LoRAConfig`, `diffusion` the training-time `FlowMatching`.
    """
    from halo_jax.models.lora import WAN_TARGETS

    return ml_collections.ConfigDict({
        "mode": "lora",               # "lora" (reference = adapters off) or "full" (frozen reference copy)
        "lora": {"rank": 16, "alpha": 16.0, "targets": WAN_TARGETS, "dropout": 0.0, "param_dtype": "float32"},
        "loss": {"beta": 500.0, "beta_patch": 0.0, "patch_weight": 1.0, "beta_schedule": "constant",
                 "num_train_timesteps": 1000},
        "diffusion": {"shift": 1.0, "timestep_sampling": "uniform"},
        **_training(steps=200, batch_size=8, learning_rate=1e-4, warmup_steps=10),
        "grad_accum": 1,              # micro-batches per step (batch_size must divide by it)
        "max_skipped": 10,            # stop after this many non-finite steps (0: never)
        "on_corrupt": "skip",         # a corrupt pair record: skip (reported) or fail
        "pairs_dir": "",              # the pair store to train on; empty: WORKDIR/pairs
    })


def shapes_dpo_config(config: ml_collections.ConfigDict) -> None:
    """Add `config.pairs` and `config.dpo` with the moving-shapes world's Gran-DPO settings
    (configs/shapes_dpo.py, configs/demo.py): every qualifying pair up to 2 per prompt, video and
    patch margins 0.25; LoRA rank 8, alpha 8 on WAN_TARGETS; constant β = 500, λ = 1; flow matching
    with logit-normal timesteps and shift 1 (as the tiny model was pretrained); AdamW lr 1e-4,
    10 warmup steps, 8 pairs a step, 200 steps."""
    config.pairs = pairs_config()
    config.pairs.update(strategy="all", max_pairs_per_prompt=2, margin_video=0.25, margin_patch=0.25)
    config.dpo = dpo_config()
    config.dpo.lora.update(rank=8, alpha=8.0)
    config.dpo.loss.update(beta=500.0, patch_weight=1.0)
    config.dpo.diffusion.update(shift=1.0, timestep_sampling="logit_normal")
    config.dpo.update(steps=200, batch_size=8, learning_rate=1e-4, warmup_steps=10)


def evaluate_config() -> ml_collections.ConfigDict:
    """`config.evaluate`: stage `evaluate` (base vs aligned models on held-out prompts, same seeds).

    Needs the `model`, `video` and `sampler` sections of `generate_config` (video size and
    sampler of every evaluated model). `models` maps a name to a diffusers Wan folder
    ("{workdir}" expands); empty: "base" (`model.path` or WORKDIR/base_ckpt) + WORKDIR/dpo_ckpt
    if present. Defects use the top-level `config.defect_threshold`; the oracle uses
    `config.aspects` and `config.grid`.
    """
    return ml_collections.ConfigDict({
        "models": {},                 # name -> diffusers Wan folder; empty: the workdir's base_ckpt + dpo_ckpt
        "base": "base",               # the model the others are compared with (win rates)
        "groups": {},                 # name -> models pooled in the metrics (per-unit mean), e.g. one recipe's seeds
        # prompts, as generate: a tuple, a file (.txt / .jsonl), or a moving-shapes split (first num_prompts)
        "prompts": (), "prompts_file": "", "shapes_split": "heldout", "num_prompts": 8,
        "prompt_selection": "first",  # "first" num_prompts, or "spread": evenly spaced over the list
        "samples_per_prompt": 4,      # seeds per prompt, the same for every model
        "seed": -1,                   # base of the per-video seeds (as generate.seed); -1: config.seed
        "batch_size": 8,              # videos per sampling call (per process)
        "teacher": "auto",            # "auto" (the oracle if every prompt is a shapes prompt) | "oracle" | "none"
        "reward_model": "",           # a reward-model export (reward_ckpt/) to score with as well; empty: skip
        "vlm_judge": False,           # also judge with the VLM teacher of config.label.openai (GPT-4o; costs money)
        "bootstrap": 1000,            # bootstrap resamples of the (prompt, seed) units
        "bootstrap_seed": 0,
        "video_format": "mp4",        # videos under evaluate/<model>/videos: "mp4" or "gif"
        "fps": 8.0,
        "report": True,               # evaluate/report/index.html
        "report_prompts": 4,          # prompts shown side by side in the report
        "report_sample": 0,           # which sample (seed) of each shown prompt
        "heatmap_judge": "auto",      # patch scores over the videos: "auto" (the oracle, else the reward model)
        "train_metrics": {},          # name -> train_dpo metrics.jsonl; default: <model folder>/../dpo/metrics.jsonl
        "vbench": False,              # also write VBench-named videos
        "vbench_dir": "",             # empty: WORKDIR/evaluate/vbench
    })


def compare_config() -> ml_collections.ConfigDict:
    """`config.compare`: stage `compare` (one DPO run per variant and training seed on one pair store, then
    `evaluate` of the base and every run, each variant's runs pooled). Needs `config.dpo` and `config.evaluate`."""
    return ml_collections.ConfigDict({
        "variants": {"diffusion_dpo": 0.0, "gran_dpo": 1.0},  # name -> dpo.loss.patch_weight
        "seeds": (0, 1, 2),                                    # training seeds (LoRA init, data order, t and noise)
    })
