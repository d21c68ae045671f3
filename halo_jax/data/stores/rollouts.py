"""The rollout store's records: one generated video (`RolloutRecord`) and its mp4 preview (`write_rollout`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from halo_jax.data.stores.schema import Field, Schema
from halo_jax.data.stores.writer import StoreWriter


@dataclass(frozen=True)
class RolloutRecord:
    """One generated video: `latents` (C, F, H, W) float32 and decoded `frames` (F, H, W, 3) uint8.

    The mp4 preview lives beside the store at `videos/<video_id>.mp4` (`video_path`).
    """

    video_id: str
    prompt: str
    prompt_index: int
    seed: int
    sample_index: int
    latents: np.ndarray
    frames: np.ndarray

    STORE_NAME = "rollouts"

    @staticmethod
    def schema(latent_shape: Sequence[int | None] = (None, None, None, None),
               frames_shape: Sequence[int | None] = (None, None, None, 3)) -> Schema:
        """The rollout store's schema; give the shapes to have every record checked against them."""
        if len(latent_shape) != 4 or len(frames_shape) != 4 or frames_shape[-1] not in (3, None):
            raise ValueError(f"latent_shape must be (C, F, H, W) and frames_shape (F, H, W, 3), got {latent_shape} "
                             f"and {frames_shape}")
        return Schema(RolloutRecord.STORE_NAME, "video_id", (
            Field("video_id", "str"), Field("prompt", "str"), Field("prompt_index", "int"), Field("seed", "int"),
            Field("sample_index", "int"), Field.array("latents", np.float32, latent_shape),
            Field.array("frames", np.uint8, frames_shape)))

    @staticmethod
    def make_id(prompt_index: int, sample_index: int) -> str:
        """The conventional id: sorts by prompt, then sample."""
        return f"p{prompt_index:06d}-s{sample_index:03d}"

    @staticmethod
    def video_path(store_dir: str | os.PathLike, video_id: str) -> Path:
        return Path(store_dir) / "videos" / f"{video_id}.mp4"

    def to_record(self) -> dict[str, Any]:
        return {"video_id": self.video_id, "prompt": self.prompt, "prompt_index": self.prompt_index,
                "seed": self.seed, "sample_index": self.sample_index, "latents": self.latents, "frames": self.frames}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RolloutRecord":
        return cls(**{k: record[k] for k in ("video_id", "prompt", "prompt_index", "seed", "sample_index", "latents",
                                             "frames")})


def write_rollout(writer: StoreWriter, rollout: RolloutRecord, fps: float = 8.0) -> None:
    """Write the mp4 preview (atomically, first) and then the record, whose index line names the mp4."""
    from halo_jax.data.video_io import write_mp4

    path = RolloutRecord.video_path(writer.dir, rollout.video_id)
    write_mp4(path, rollout.frames, fps)
    writer.write(rollout.to_record(), index_extra={"video": str(path.relative_to(writer.dir))})
