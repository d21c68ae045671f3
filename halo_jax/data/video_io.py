"""Video files: browser-playable H.264 mp4 (and GIF) from uint8 frames, written atomically.

`write_mp4(path, frames, fps)` encodes `frames` (F, H, W, 3) uint8 RGB with libx264 in
yuv420p (the pixel format every browser plays), `+faststart` so a page can stream it.
yuv420p needs even sizes: an odd height or width is padded by one edge-replicated row or
column (never resampled); `read_mp4(path, size=(H, W))` crops it away again.

Every write goes to a hidden temporary file in the same folder and is renamed into
place, so a killed process never leaves a half-written video under the final name.
H.264 is lossy: a round trip returns the same shape and values close to the input
(the tests bound the mean absolute error), not the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from halo_jax.io import atomic_path

DEFAULT_CRF = 18  # x264 constant rate factor: 0 lossless .. 51 worst; 18 is visually near-lossless


def _check_frames(frames: np.ndarray, what: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(
            f"{what}: frames must be uint8 of shape (F, H, W, 3) with F >= 1, got {frames.dtype} {frames.shape}; "
            "convert floats in [0, 1] with (np.clip(x, 0, 1) * 255).round().astype(np.uint8)")
    return np.ascontiguousarray(frames)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, *, crf: int = DEFAULT_CRF) -> Path:
    """Write `frames` (F, H, W, 3) uint8 as an H.264/yuv420p mp4 at `path`, atomically; returns the path."""
    import imageio_ffmpeg

    path = Path(path)
    frames = _pad_even(_check_frames(frames, str(path)))
    if fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _, h, w, _ = frames.shape
    with atomic_path(path, durable=True) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
            macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf)), "-preset", "medium", "-movflags", "+faststart", "-f", "mp4"])
        try:
            writer.send(None)  # start ffmpeg
            for frame in frames:
                writer.send(frame.tobytes())
        finally:
            writer.close()
    return path


def read_mp4(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an mp4 to uint8 RGB frames (F, H, W, 3); `size=(H, W)` crops the even-size padding."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(raw, np.uint8).reshape(h, w, 3) for raw in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    out = np.stack(frames)
    if size is not None:
        if size[0] > h or size[1] > w:
            raise ValueError(f"{path}: crop size {tuple(size)} is larger than the video's {(h, w)}")
        out = out[:, : size[0], : size[1]]
    return np.ascontiguousarray(out)


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write `frames` (F, H, W, 3) uint8 as a looping GIF at `path`, atomically (for HTML reports)."""
    from PIL import Image

    path = Path(path)
    frames = _check_frames(frames, str(path))
    if fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path, durable=True) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=max(int(round(1000.0 / fps)), 20), optimize=False)
    return path


def read_gif(path: str | os.PathLike) -> np.ndarray:
    """Decode a GIF to uint8 RGB frames (F, H, W, 3) (GIF palettes are lossy for many colours)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
