"""Two tiny random Wan pipelines for the evaluate / report tests (NumPy-filled: no initialiser compiles).

Both share the VAE, text encoder and tokenizer; they differ in the DiT's random values, so
the same seeds give different videos. Video size: the shapes world's 9 frames x 32 x 32.
"""

from pathlib import Path

from dpo_world import tiny_dit, tiny_pipeline
from halo_jax.data import shapes
from halo_jax.models.wan.pipeline import save_pipeline

PROMPTS = list(shapes.heldout_prompts()[:2])
VIDEO = {"frames": 9, "height": 32, "width": 32}


def make_pipelines(root: Path) -> tuple[Path, Path]:
    """(base folder, other folder): two diffusers Wan folders that differ only in the DiT."""
    pipe = tiny_pipeline(PROMPTS, root / "tokenizer_src")
    return save_pipeline(pipe, root / "base"), save_pipeline(pipe, root / "other", transformer=tiny_dit(7))
