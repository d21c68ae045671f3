"""Videos under VBench's file naming, so VBench (or VideoScore) can be run on them as they are.

VBench reads `{videos_path}/{prompt}-{index}.mp4` (index 0, 1, ... per prompt; its standard
suite samples 5 per prompt) and, in `--mode=custom_input`, takes the prompt from the file
name. Layout written here, one folder per model:

    DIR/{model}/{prompt}-{index}.mp4
    DIR/{model}/prompts.txt        the prompts, one per line (VBench's prompt-list format)

A prompt is used verbatim as the file name, except that '/' (not allowed in a file name)
becomes '_' and a NUL is dropped; a prompt longer than 200 bytes (file names are limited to
255) is an error that names it, since VBench could not map a shortened name back to it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from halo_jax.io import atomic_path, atomic_write_text

MAX_NAME_BYTES = 200


def vbench_name(prompt: str, index: int) -> str:
    """`{prompt}-{index}.mp4` with '/' -> '_' (module docstring)."""
    stem = prompt.strip().replace("/", "_").replace("\0", "")
    if not stem:
        raise ValueError("an empty prompt has no VBench file name")
    if len(stem.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"prompt {prompt[:60]!r}... is longer than {MAX_NAME_BYTES} bytes, too long for VBench's "
                         "`{prompt}-{index}.mp4` file name; shorten the prompt list")
    if index < 0:
        raise ValueError(f"VBench sample index must be >= 0, got {index}")
    return f"{stem}-{int(index)}.mp4"


def export_videos(out_dir: str | os.PathLike, items: Iterable[tuple[str, int, str | os.PathLike | np.ndarray]],
                  fps: float = 8.0) -> list[Path]:
    """Write each `(prompt, index, video)` as `out_dir/{prompt}-{index}.mp4` plus `prompts.txt`.

    `video` is an existing mp4 (copied byte for byte) or uint8 frames (F, H, W, 3) (encoded).
    Existing files are overwritten (atomically); two items with one name are an error.
    """
    from halo_jax.data.video_io import write_mp4

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, prompts = [], []
    seen: set[str] = set()
    for prompt, index, video in items:
        name = vbench_name(prompt, index)
        if name in seen:
            raise ValueError(f"two videos map to {name!r}; give each (prompt, index) one video")
        seen.add(name)
        if prompt not in prompts:
            prompts.append(prompt)
        target = out / name
        if isinstance(video, np.ndarray):
            write_mp4(target, video, fps=fps)
        else:
            src = Path(video)
            if src.suffix.lower() != ".mp4":
                raise ValueError(f"{src} is not an mp4; VBench reads mp4 files (pass the frames to encode them)")
            with atomic_path(target) as tmp:
                shutil.copyfile(src, tmp)
        written.append(target)
    atomic_write_text(out / "prompts.txt", "".join(p.strip() + "\n" for p in prompts))
    return written
