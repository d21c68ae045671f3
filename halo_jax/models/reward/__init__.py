"""Reward models: SigLIP towers (`siglip`, `siglip_params`), HALO's video + patch reward model (`reward_model`)
and the towers' tuning and loading (`towers`)."""

from halo_jax.models.reward.reward_model import RewardModel, RewardModelConfig, pool_tokens
from halo_jax.models.reward.siglip import (
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextTower,
    SiglipVisionConfig,
    SiglipVisionTower,
    TowerOutput,
)
from halo_jax.models.reward.siglip_params import export_siglip, load_siglip, siglip_rules
from halo_jax.models.reward.towers import apply_tower_lora, load_towers, trainable_filter

__all__ = [
    "RewardModel", "RewardModelConfig", "apply_tower_lora", "load_towers", "pool_tokens", "trainable_filter",
    "SiglipConfig", "SiglipModel", "SiglipTextConfig", "SiglipTextTower", "SiglipVisionConfig",
    "SiglipVisionTower", "TowerOutput", "export_siglip", "load_siglip", "siglip_rules",
]
