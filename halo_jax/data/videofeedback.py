"""Human video-level labels in the VideoFeedback layout, as a tensorflow-datasets builder.

VideoFeedback (MantisScore / VideoScore) rates generated videos on five aspects, each an
integer 1..4 (averages of raters may be fractional). This builder imports a *local copy*
laid out as follows (nothing is downloaded):

    ROOT/annotations.jsonl      one JSON object per video (or ROOT/annotations.json: a list of them)
    ROOT/...                    the videos, at the paths the annotations give

    {"id": "vf-000123",                                  unique, non-empty
     "prompt": "a cat playing the piano",
     "video": "videos/vf-000123.mp4",                    an mp4/gif, relative to ROOT ...
     "frames": ["frames/vf-000123/00.jpg", ...],         ... or the frame images, in order
     "scores": {"visual_quality": 3, "temporal_consistency": 2, "dynamic_degree": 4,
                "text_to_video_alignment": 3, "factual_consistency": 2}}

(the released VideoFeedback rows map onto this directly: its `id`, `text prompt`, frame
`images` and the five scores of its answer). Every clip is fitted to the builder's
(frames, height, width) (`reward.data.fit_clip`: uniform frame sampling, bilinear resize).

Rescaling to the project's 1..5 label schema (DESIGN section 4), per aspect:

    s' = 1 + (s - 1) * 4 / 3          (1 -> 1, 2 -> 2.33, 3 -> 3.67, 4 -> 5)

an affine map of the end points, so rankings, Pearson and Spearman are unchanged. Aspect
names map to the project's: visual_quality, temporal_consistency, dynamic_degree,
text_to_video_alignment -> text_alignment, factual_consistency. There are no patch labels.

A row that cannot be used (bad JSON, no id or a duplicate id, a missing or unreadable
video, a score missing for every aspect or outside [1, 4]) is skipped and listed with its
id and reason in `skipped` (and `videofeedback_skipped.json` beside the prepared data), or
raises with `on_bad="fail"`. tensorflow-datasets prepares and reads the `array_record`
format without TensorFlow; `code_path` is overridden as in `halo_jax.data.tfds_builders`.

    builder = prepare_videofeedback(ROOT, frames=17, height=32, width=32)   # process 0
    source = VideoFeedbackSource(load_videofeedback(ROOT, ...), aspects)   # random access
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from halo_jax.io import atomic_write_text

VF_ASPECTS: tuple[str, ...] = ("visual_quality", "temporal_consistency", "dynamic_degree",
                               "text_to_video_alignment", "factual_consistency")
TO_PROJECT: dict[str, str] = {"visual_quality": "visual_quality", "temporal_consistency": "temporal_consistency",
                              "dynamic_degree": "dynamic_degree", "text_to_video_alignment": "text_alignment",
                              "factual_consistency": "factual_consistency"}
VF_MIN, VF_MAX = 1.0, 4.0
ANNOTATION_FILES = ("annotations.jsonl", "annotations.json")
SPLIT = "train"


class VideoFeedbackError(ValueError):
    """A VideoFeedback folder or row that cannot be used; names the file or id and the fix."""


def rescale(score: float | np.ndarray) -> float | np.ndarray:
    """VideoFeedback 1..4 -> the project's 1..5: 1 + (s - 1) * 4 / 3."""
    out = 1.0 + (np.asarray(score, np.float64) - 1.0) * 4.0 / 3.0
    return float(out) if out.ndim == 0 else out


def annotation_file(root: str | os.PathLike) -> Path:
    root = Path(root)
    for name in ANNOTATION_FILES:
        if (root / name).is_file():
            return root / name
    raise VideoFeedbackError(f"no {' or '.join(ANNOTATION_FILES)} in {root}; a VideoFeedback-layout folder needs an "
                             "annotation file (see halo_jax/data/videofeedback.py for the layout)")


def read_annotations(root: str | os.PathLike) -> list[tuple[int, Any]]:
    """(row number, parsed object or an error string) of every annotation row."""
    path = annotation_file(root)
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise VideoFeedbackError(f"{path} is not valid JSON ({e}); it must hold a list of annotation "
                                     "objects") from e
        if not isinstance(rows, list):
            raise VideoFeedbackError(f"{path} must hold a JSON list of annotation objects")
        return list(enumerate(rows, start=1))
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((n, f"line is not JSON ({e.msg})"))
    return out


def _scores(row: dict) -> np.ndarray:
    """Raw scores (5,) float32 in VF_ASPECTS order, NaN where absent; raises ValueError on a bad value."""
    raw = row.get("scores")
    if not isinstance(raw, dict):
        raise ValueError("`scores` must be an object of aspect -> 1..4")
    unknown = sorted(set(raw) - set(VF_ASPECTS))
    if unknown:
        raise ValueError(f"unknown aspects {unknown}; VideoFeedback aspects are {list(VF_ASPECTS)}")
    out = np.full(len(VF_ASPECTS), np.nan, np.float32)
    for i, name in enumerate(VF_ASPECTS):
        if name not in raw:
            continue
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not VF_MIN <= v <= VF_MAX:
            raise ValueError(f"scores[{name!r}] = {v!r} is not a number in [{VF_MIN:g}, {VF_MAX:g}]")
        out[i] = v
    if np.all(np.isnan(out)):
        raise ValueError("no score for any aspect")
    return out


def _load_clip(root: Path, row: dict) -> np.ndarray:
    from halo_jax.data.video_io import read_gif, read_mp4

    if isinstance(row.get("video"), str):
        path = root / row["video"]
        if not path.is_file():
            raise ValueError(f"video file {path} does not exist")
        return read_gif(path) if path.suffix.lower() == ".gif" else read_mp4(path)
    if isinstance(row.get("frames"), list) and row["frames"]:
        from PIL import Image

        frames = []
        for name in row["frames"]:
            path = root / str(name)
            if not path.is_file():
                raise ValueError(f"frame image {path} does not exist")
            frames.append(np.asarray(Image.open(path).convert("RGB")))
        if len({f.shape for f in frames}) != 1:
            raise ValueError("frame images differ in size")
        return np.stack(frames)
    raise ValueError("a row needs `video` (a file path) or `frames` (a list of image paths)")


def _fingerprint(root: Path, frames: int, height: int, width: int) -> dict:
    digest = hashlib.sha256(annotation_file(root).read_bytes()).hexdigest()
    return {"annotations_sha256": digest, "clip": [frames, height, width]}


class VideoFeedbackConfig(tfds.core.BuilderConfig):
    """The clip shape every video is fitted to."""

    def __init__(self, *, frames: int, height: int, width: int, **kwargs):
        super().__init__(name=f"clip{frames}x{height}x{width}",
                         description=f"videos fitted to {frames} frames of {height}x{width}", **kwargs)
        self.frames, self.height, self.width = int(frames), int(height), int(width)


class VideoFeedback(tfds.core.GeneratorBasedBuilder):
    """A local VideoFeedback-layout label set (module docstring) as a tfds dataset (one `train` split)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "VideoFeedback-layout folder: fitted clips + raw 1..4 scores."}

    @tfds.core.utils.py_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # see halo_jax.data.tfds_builders.HaloStore.code_path
        return epath.Path(__file__)

    def __init__(self, *, root: str | os.PathLike, frames: int = 17, height: int = 32, width: int = 32,
                 on_bad: str = "skip", **kwargs):
        if on_bad not in ("skip", "fail"):
            raise ValueError(f"on_bad={on_bad!r}; choose 'skip' or 'fail'")
        self.root = Path(root)
        self.on_bad = on_bad
        self.skipped: list[dict] = []
        kwargs.setdefault("data_dir", str(self.root / "tfds"))
        kwargs.setdefault("file_format", "array_record")
        kwargs.setdefault("config", VideoFeedbackConfig(frames=frames, height=height, width=width))
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=("VideoFeedback-layout human ratings (raw 1..4 scores, NaN = not rated) in the order "
                         f"{list(VF_ASPECTS)}; rescale with 1 + (s - 1) * 4/3"),
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "prompt": tfds.features.Text(),
                "frames": tfds.features.Tensor(shape=(c.frames, c.height, c.width, 3), dtype=np.uint8,
                                               encoding=tfds.features.Encoding.BYTES),
                "scores": tfds.features.Tensor(shape=(len(VF_ASPECTS),), dtype=np.float32,
                                               encoding=tfds.features.Encoding.BYTES),
            }),
            disable_shuffling=True,  # keep the annotation file's order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {SPLIT: self._generate_examples()}

    def _skip(self, row_id: Any, where: str, reason: str) -> None:
        if self.on_bad == "fail":
            raise VideoFeedbackError(f"{where} (id {row_id!r}): {reason}; fix the row or prepare with on_bad='skip'")
        logging.warning("videofeedback: %s (id %r) skipped: %s", where, row_id, reason)
        self.skipped.append({"id": row_id, "where": where, "reason": reason})

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        from halo_jax.reward.data import fit_clip

        c = self.builder_config
        name = annotation_file(self.root).name
        seen: set[str] = set()
        for n, row in read_annotations(self.root):
            where = f"{name}:{n}"
            if isinstance(row, str):
                self._skip(None, where, row)
                continue
            if not isinstance(row, dict):
                self._skip(None, where, "a row must be a JSON object")
                continue
            rid = row.get("id")
            if not isinstance(rid, str) or not rid:
                self._skip(rid, where, "`id` must be a non-empty string")
                continue
            if rid in seen:
                self._skip(rid, where, "duplicate id (the first row is used)")
                continue
            if not isinstance(row.get("prompt"), str):
                self._skip(rid, where, "`prompt` must be a string")
                continue
            try:
                scores = _scores(row)
                clip = fit_clip(_load_clip(self.root, row), (c.frames, c.height, c.width))
            except Exception as e:  # noqa: BLE001 -- any unreadable row is reported, not fatal
                self._skip(rid, where, str(e))
                continue
            seen.add(rid)
            yield rid, {"id": rid, "prompt": row["prompt"], "frames": clip, "scores": scores}


def _builder(root, data_dir, frames, height, width, on_bad="skip") -> VideoFeedback:
    kw = {} if data_dir is None else {"data_dir": str(data_dir)}
    return VideoFeedback(root=root, frames=frames, height=height, width=width, on_bad=on_bad, **kw)


def prepare_videofeedback(root: str | os.PathLike, *, frames: int = 17, height: int = 32, width: int = 32,
                          data_dir: str | os.PathLike | None = None, on_bad: str = "skip") -> VideoFeedback:
    """Prepare (or refresh, when the annotation file changed) the tfds copy; run it on one process."""
    b = _builder(root, data_dir, frames, height, width, on_bad)
    fp_path = Path(b.data_path) / "videofeedback_fingerprint.json"
    fp = _fingerprint(Path(root), frames, height, width)
    if fp_path.is_file() and json.loads(fp_path.read_text()) == fp:
        return b
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if Path(b.data_path).exists() else None
    if fp_path.is_file():  # a changed annotation file: regenerate from scratch
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    b.download_and_prepare(download_dir=str(b.data_dir_root / "downloads"),
                           download_config=tfds.download.DownloadConfig(download_mode=mode) if mode else None)
    for name, data in (("videofeedback_skipped.json", b.skipped), ("videofeedback_fingerprint.json", fp)):
        atomic_write_text(Path(b.data_path) / name, json.dumps(data, indent=1))
    if b.skipped:
        logging.warning("videofeedback: %d rows of %s skipped (see %s)", len(b.skipped), root,
                        Path(b.data_path) / "videofeedback_skipped.json")
    return b


def load_videofeedback(root: str | os.PathLike, *, frames: int = 17, height: int = 32, width: int = 32,
                       data_dir: str | os.PathLike | None = None) -> VideoFeedback:
    """The prepared builder; raises if it was never prepared or the annotations changed since."""
    b = _builder(root, data_dir, frames, height, width)
    fp_path = Path(b.data_path) / "videofeedback_fingerprint.json"
    if not fp_path.is_file() or json.loads(fp_path.read_text()) != _fingerprint(Path(root), frames, height, width):
        raise VideoFeedbackError(f"the tfds copy of {root} under {b.data_path} is missing or older than the "
                                 "annotations; run prepare_videofeedback first (process 0)")
    b.skipped = json.loads((Path(b.data_path) / "videofeedback_skipped.json").read_text())
    return b


class VideoFeedbackSource:
    """Random access to a prepared VideoFeedback split as project examples.

    Item i: {"video_id", "prompt", "frames" (F, H, W, 3) uint8, "raw_scores" (5,),
    "video_scores" (A,) float32 rescaled to 1..5 for `aspects`}.
    """

    def __init__(self, builder: VideoFeedback, aspects: Sequence[str], split: str = SPLIT):
        back = {ours: i for i, ours in enumerate(TO_PROJECT[v] for v in VF_ASPECTS)}
        unknown = [a for a in aspects if a not in back]
        if unknown:
            raise VideoFeedbackError(f"aspects {unknown} have no VideoFeedback counterpart; VideoFeedback rates "
                                     f"{sorted(back)} (train on those aspects, or leave videofeedback_path empty)")
        self.aspects = tuple(aspects)
        self._columns = np.array([back[a] for a in self.aspects])
        self._source = builder.as_data_source(split=split)
        self.skipped = list(builder.skipped)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        ex = self._source[int(i)]
        raw = np.asarray(ex["scores"], np.float32)
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        return {"video_id": text(ex["id"]), "prompt": text(ex["prompt"]), "frames": np.asarray(ex["frames"], np.uint8),
                "raw_scores": raw, "video_scores": rescale(raw[self._columns]).astype(np.float32)}

    def examples(self, bad: Any, on_bad_label: str = "skip") -> list:
        """`reward.data.Example`s (video labels only); a row missing one of `aspects` is rejected."""
        from halo_jax.reward.data import BadLabelError, Example

        for s in self.skipped:
            if on_bad_label == "fail":
                raise BadLabelError(f"videofeedback row {s['where']} (id {s['id']!r}) rejected: {s['reason']}")
            bad.add(s["id"], "videofeedback", f"{s['where']}: {s['reason']}")
        out = []
        for i in range(len(self)):
            ex = self._source[i]
            raw = np.asarray(ex["scores"], np.float32)[self._columns]
            vid = ex["id"].decode("utf-8") if isinstance(ex["id"], bytes) else str(ex["id"])
            prompt = ex["prompt"].decode("utf-8") if isinstance(ex["prompt"], bytes) else str(ex["prompt"])
            if np.any(np.isnan(raw)):
                missing = [a for a, v in zip(self.aspects, raw) if np.isnan(v)]
                reason = f"no VideoFeedback score for aspects {missing}"
                if on_bad_label == "fail":
                    raise BadLabelError(f"videofeedback label for video {vid!r} rejected: {reason}")
                bad.add(vid, "videofeedback", reason)
                continue
            out.append(Example(vid, prompt, "videofeedback", i, rescale(raw).astype(np.float32), None))
        return out
