"""Training data of the reward model: labelled examples from every source, the split, the batches.

Sources (any combination; each example is one video with its labels):

    labels      `labels/` (the `label` stage's store) joined to the frames in `rollouts/`
                by `video_id`; video and patch labels
    synthetic   the moving-shapes world: `shapes.render` + `defects.random_defects`,
                labelled by `OracleTeacher`; video and patch labels; cached as a store
                (`synthesize`) so a resumed run never renders or judges them again
    videofeedback  human video-level labels (`halo_jax.data.videofeedback`); no patch labels

Every label record goes through `teachers.base.validate_label` (aspects and grid of the
run): a bad one (missing aspect, wrong grid, NaN, out of range, no rollout for its
video_id, ...) is rejected with its id and reason, counted in a `BadLabels` report, and
either skipped or fatal (`on_bad_label`).

Clips. Every example is fitted to one clip shape (F, H, W) (`fit_clip`: frames sampled at
round(linspace(0, F_in - 1, F)), each frame resized bilinearly), so the sources batch
together. Patch labels refer to grid cells of the clip, so they survive the resize.

Split. A prompt is held out iff u(prompt) < fraction, u = the first 8 hex digits of
sha256("{seed}|{prompt}") / 2^32 (deterministic, independent of the data's order and of
the process count); at least one prompt lands on each side when there are two or more.

Batches. Training items are *prompt groups*: the videos of one prompt (sorted by id) cut
into groups of `group_size`, a short group padded by repeating its videos with
`valid = 0`. A batch of B groups is flattened to B * group_size videos, with `group` = the
prompt's index, so the Bradley-Terry loss always finds pairs inside a batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from halo_jax.io import atomic_write_text
from halo_jax.teachers.base import LabelError, validate_label

ON_BAD_LABEL = ("skip", "fail")


class BadLabelError(ValueError):
    """A rejected label under on_bad_label='fail'; names the record and the reason."""


# ----------------------------------------------------------------------------- clips


def fit_clip(frames: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """uint8 (F_in, H_in, W_in, 3) -> (F, H, W, 3): frames round(linspace(0, F_in-1, F)), bilinear resize."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    f, h, w = (int(x) for x in shape)
    if frames.shape[0] != f:
        frames = frames[np.round(np.linspace(0, frames.shape[0] - 1, f)).astype(np.int64)]
    if frames.shape[1:3] != (h, w):
        from PIL import Image

        frames = np.stack([np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR)) for x in frames])
    return np.ascontiguousarray(frames)


# ----------------------------------------------------------------------------- labels


@dataclasses.dataclass
class BadLabels:
    """Rejected label records: (video_id, source, reason) each; `counts` per source."""

    rejected: list[tuple[str | None, str, str]] = dataclasses.field(default_factory=list)

    def add(self, video_id: str | None, source: str, reason: str) -> None:
        self.rejected.append((video_id, source, reason))

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, source, _ in self.rejected:
            out[source] = out.get(source, 0) + 1
        return out

    def __len__(self) -> int:
        return len(self.rejected)

    def to_json(self) -> dict:
        return {"rejected": len(self.rejected), "by_source": self.counts,
                "records": [{"video_id": v, "source": s, "reason": r} for v, s, r in self.rejected]}

    def summary_lines(self, limit: int = 10) -> list[str]:
        if not self.rejected:
            return ["bad labels: none"]
        by_source = ", ".join(f"{k}: {v}" for k, v in self.counts.items())
        lines = [f"bad labels: {len(self.rejected)} rejected ({by_source})"]
        for v, s, r in self.rejected[:limit]:
            lines.append(f"  {s} video {v!r}: {r}")
        if len(self.rejected) > limit:
            lines.append(f"  ... and {len(self.rejected) - limit} more (see bad_labels.json)")
        return lines


def label_arrays(record: Mapping[str, Any], aspects: Sequence[str], grid: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(video_scores (A,), patch_scores (A, Tp, Hp, Wp)) float32 of a record; `LabelError` if it is invalid."""
    validate_label(record, aspects, grid)
    video = np.array([record["video_scores"][a] for a in aspects], np.float32)
    patch = np.array([record["patch_scores"][a] for a in aspects], np.float32)
    return video, patch


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled video: where its frames are (`source`, `index`) and its labels.

    `patch_scores` is None for video-level-only labels. `rendered_prompt` is the prompt the video
    was made from when it differs from the labelled `prompt` (a synthetic mismatch), else None.
    """

    video_id: str
    prompt: str
    source: str
    index: int
    video_scores: np.ndarray
    patch_scores: np.ndarray | None
    rendered_prompt: str | None = None

    @property
    def prompt_is_rendered(self) -> bool:
        """The video shows its `prompt` (the pairs phase 0's video-text matching learns from)."""
        return self.rendered_prompt in (None, self.prompt)


def _reject(bad: BadLabels, video_id: str | None, source: str, reason: str, on_bad_label: str) -> None:
    if on_bad_label == "fail":
        raise BadLabelError(f"{source} label for video {video_id!r} rejected: {reason} (set "
                            "reward.on_bad_label=skip to leave such records out)")
    bad.add(video_id, source, reason)


def examples_from_labels(records: Sequence[Mapping[str, Any]], rollouts: Any, aspects: Sequence[str],
                         grid: Sequence[int], bad: BadLabels, on_bad_label: str = "skip",
                         source: str = "labels") -> list[Example]:
    """Validated `Example`s of label records whose frames live in a store (`rollouts`: a StoreReader).

    Rejected (with id and reason): invalid records, a video_id missing from the store, a prompt
    different from the rollout's, and a second label of an already labelled video_id.
    """
    if on_bad_label not in ON_BAD_LABEL:
        raise ValueError(f"on_bad_label={on_bad_label!r}; choose one of {ON_BAD_LABEL}")
    ids = {rid: i for i, rid in enumerate(rollouts.ids())}
    out: list[Example] = []
    seen: set[str] = set()
    for rec in records:
        vid = rec.get("video_id") if isinstance(rec, Mapping) else None
        try:
            video, patch = label_arrays(rec, aspects, grid)
        except LabelError as e:
            _reject(bad, e.video_id, source, e.reason, on_bad_label)
            continue
        if vid not in ids:
            _reject(bad, vid, source, f"no rollout with this video_id in {getattr(rollouts, 'dir', 'the store')}",
                    on_bad_label)
            continue
        stored_prompt = rollouts.fields(ids[vid]).get("prompt")
        if stored_prompt != rec["prompt"]:
            _reject(bad, vid, source, f"prompt {rec['prompt']!r} differs from the rollout's {stored_prompt!r}",
                    on_bad_label)
            continue
        if vid in seen:
            _reject(bad, vid, source, "a second label for an already labelled video (the first is used)",
                    on_bad_label)
            continue
        seen.add(vid)
        out.append(Example(vid, rec["prompt"], source, ids[vid], video, patch))
    return out


# ----------------------------------------------------------------------------- synthetic shapes data


def synthetic_schema(clip_shape: Sequence[int]):
    from halo_jax.data.stores import Field, Schema

    f, h, w = (int(x) for x in clip_shape)
    return Schema("reward_synthetic", "video_id", (
        Field("video_id", "str"), Field("prompt", "str"), Field("rendered_prompt", "str"), Field("seed", "int"),
        Field("defects", "json"),
        Field("label", "json"), Field.array("frames", np.uint8, (f, h, w, 3))))


def synthetic_plan(n: int, seed: int, videos_per_prompt: int) -> list[tuple[str, str, int]]:
    """(video_id, prompt, render seed) of the N synthetic videos: ceil(N / K) prompts drawn without
    replacement from the world's train + held-out prompts by `seed`, K videos each."""
    from halo_jax.data import shapes

    if n < 0 or videos_per_prompt < 1:
        raise ValueError(f"need synthetic_videos >= 0 and videos_per_prompt >= 1, got {n}, {videos_per_prompt}")
    prompts = list(shapes.train_prompts()) + list(shapes.heldout_prompts())
    num_prompts = -(-n // videos_per_prompt)
    rng = np.random.default_rng([int(seed), 77])
    picks = rng.choice(len(prompts), size=num_prompts, replace=num_prompts > len(prompts))
    plan = []
    for i in range(n):
        p, k = divmod(i, videos_per_prompt)
        plan.append((f"syn-{i:06d}", prompts[int(picks[p])], int(seed) * 1_000_003 + i))
    return plan


SHOWN_SUFFIX = "+shown"


def shown_id(video_id: str) -> str:
    """Id of the second record of a mismatched synthetic video, labelled against the prompt it shows."""
    return video_id + SHOWN_SUFFIX


def planned_video_id(video_id: str) -> str:
    """The `synthetic_plan` id a synthetic record belongs to (itself, or the video a `shown_id` copies)."""
    return video_id.removesuffix(SHOWN_SUFFIX)


def synthesize(store_dir: str | os.PathLike, n: int, *, seed: int, clip_shape: Sequence[int], grid: Sequence[int],
               aspects: Sequence[str], videos_per_prompt: int = 4, max_defects: int = 3,
               kinds: Sequence[str] | None = None, mismatch_fraction: float = 0.0, mismatch_pairs: bool = False,
               process_index: int = 0, process_count: int = 1, chunk_size: int = 64,
               progress: Callable[[int], None] | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Render, corrupt and oracle-label this process's share of the N synthetic videos into a store.

    A `mismatch_fraction` of the videos is labelled (and stored) with `shapes.altered_prompt` of the
    prompt it was rendered from (kept as `rendered_prompt`): one object's colour, shape or motion
    differs, so the oracle's text alignment (and the cells it touches) drops there. Without such
    videos every text-alignment label comes from local defects alone and the text is barely needed.
    With `mismatch_pairs` such a video is stored a second time, labelled against the prompt it shows
    (id `shown_id(video_id)`): the same pixels under both texts, so only the text tells their labels apart.

    Deterministic: video i depends only on (seed, i). Ids already in the store are skipped
    (resume). A video the oracle cannot judge is left out and listed. Returns (videos
    written now, [(video_id, reason)] of the videos left out).
    """
    from halo_jax.data import defects, shapes
    from halo_jax.data.stores import StoreWriter
    from halo_jax.teachers.oracle import OracleTeacher

    f, h, w = (int(x) for x in clip_shape)
    teacher = OracleTeacher(aspects=tuple(aspects), grid=tuple(grid))
    plan = synthetic_plan(n, seed, videos_per_prompt)[process_index::process_count]
    written = 0
    failures: list[tuple[str, str]] = []
    with StoreWriter(store_dir, synthetic_schema(clip_shape), process_index=process_index,
                     chunk_size=chunk_size) as writer:
        done = writer.done_ids()
        for vid, prompt, s in plan:
            rng = np.random.default_rng([s, 91])
            records = [(vid, shapes.altered_prompt(prompt, rng) if rng.random() < mismatch_fraction else prompt)]
            if mismatch_pairs and records[0][1] != prompt:
                records.append((shown_id(vid), prompt))
            records = [(rid, text) for rid, text in records if rid not in done]
            if not records:
                continue
            clean = shapes.render(prompt, s, f, h, w)
            frames, applied = defects.random_defects(clean, prompt, grid, s, max_defects=max_defects,
                                                     kinds=tuple(kinds or defects.KINDS))
            for rid, label_prompt in records:
                try:
                    label = teacher.label(frames, label_prompt, rid)
                except Exception as e:  # noqa: BLE001 -- one unjudgeable video must not stop the run
                    failures.append((rid, f"the oracle could not label it ({type(e).__name__}: {e})"))
                    continue
                writer.write({"video_id": rid, "prompt": label_prompt, "rendered_prompt": prompt, "seed": s,
                              "label": label, "frames": frames,
                              "defects": [{"kind": d.kind, "cells": [list(c) for c in d.cells]} for d in applied]})
                written += 1
            if progress is not None:
                progress(1)
    return written, failures


def examples_from_synthetic(reader: Any, aspects: Sequence[str], grid: Sequence[int], bad: BadLabels,
                            on_bad_label: str = "skip") -> list[Example]:
    """Validated `Example`s of a synthetic store (labels from the index, frames read on use)."""
    out = []
    for i in range(len(reader)):
        small = reader.fields(i)
        try:
            video, patch = label_arrays(small["label"], aspects, grid)
        except LabelError as e:
            _reject(bad, e.video_id or small.get("video_id"), "synthetic", e.reason, on_bad_label)
            continue
        out.append(Example(small["video_id"], small["prompt"], "synthetic", i, video, patch,
                           small.get("rendered_prompt")))
    return out


# ----------------------------------------------------------------------------- split


def prompt_fraction_hash(prompt: str, seed: int) -> float:
    """u(prompt) in [0, 1): the first 8 hex digits of sha256("{seed}|{prompt}") / 2^32."""
    return int(hashlib.sha256(f"{seed}|{prompt}".encode("utf-8")).hexdigest()[:8], 16) / 2**32


def split_by_prompt(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples, held out by prompt (module docstring)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    prompts = sorted({e.prompt for e in examples})
    u = {p: prompt_fraction_hash(p, seed) for p in prompts}
    held = {p for p in prompts if u[p] < fraction}
    if fraction > 0 and len(prompts) >= 2:
        if not held:
            held = {min(prompts, key=lambda p: u[p])}
        elif len(held) == len(prompts):
            held.discard(max(prompts, key=lambda p: u[p]))
    train = [e for e in examples if e.prompt not in held]
    heldout = [e for e in examples if e.prompt in held]
    return train, heldout


# ----------------------------------------------------------------------------- sources


class RewardData:
    """Frames + labels + prompt tokens of a list of `Example`s (random access by example index).

    `readers`: {source name: random-access object whose item `index` holds `frames`};
    `tokens`: {prompt: (input_ids (S,), mask (S,))}. Items are dicts of numpy arrays:
    frames (F, H, W, 3) uint8, input_ids, text_mask (S,) int32, video_scores (A,),
    patch_scores (A, Tp, Hp, Wp) float32, has_patch, valid float32, group int32 (the prompt),
    video_key int32 (the video: equal for the records of one video, `planned_video_id`).
    """

    def __init__(self, examples: Sequence[Example], readers: Mapping[str, Any], clip_shape: Sequence[int],
                 tokens: Mapping[str, tuple[np.ndarray, np.ndarray]], num_aspects: int, grid: Sequence[int],
                 negatives: Sequence[Sequence[str]] | None = None):
        self.examples = list(examples)
        self.negatives = None if negatives is None else [list(n) for n in negatives]
        self.readers = dict(readers)
        self.clip_shape = tuple(int(x) for x in clip_shape)
        self.tokens = dict(tokens)
        self.num_aspects = num_aspects
        self.grid = tuple(int(g) for g in grid)
        self.prompt_ids = {p: i for i, p in enumerate(sorted({e.prompt for e in self.examples}))}
        self.video_keys = {v: i for i, v in enumerate(sorted({planned_video_id(e.video_id) for e in self.examples}))}
        wanted = {e.prompt for e in self.examples} | {p for n in self.negatives or () for p in n}
        missing = sorted(wanted - set(self.tokens))
        if missing:
            raise ValueError(f"no tokens for prompts {missing[:3]}; tokenize every prompt of the examples")
        if self.negatives is not None:
            if len(self.negatives) != len(self.examples):
                raise ValueError(f"{len(self.negatives)} lists of negatives for {len(self.examples)} examples")
            self.num_negatives = max(map(len, self.negatives), default=0)
            others = sorted({p for n in self.negatives for p in n} - set(self.prompt_ids))
            extra = {p: len(self.prompt_ids) + i for i, p in enumerate(others)}  # groups no example has
            self.negative_prompt_ids = {**self.prompt_ids, **extra}

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, keep: Callable[[Example], bool]) -> RewardData:
        """The examples `keep` accepts (and their negatives), with the same readers, clip, tokens and grid."""
        kept = [i for i, e in enumerate(self.examples) if keep(e)]
        negatives = None if self.negatives is None else [self.negatives[i] for i in kept]
        return RewardData([self.examples[i] for i in kept], self.readers, self.clip_shape, self.tokens,
                          self.num_aspects, self.grid, negatives)

    def with_negatives(self, negatives: Sequence[Sequence[str]], tokens: Mapping[str, tuple[np.ndarray, np.ndarray]]
                       ) -> RewardData:
        """The same examples, each item also carrying its `negatives` prompts (tokens of new prompts added)."""
        return RewardData(self.examples, self.readers, self.clip_shape, {**tokens, **self.tokens}, self.num_aspects,
                          self.grid, negatives)

    def frames(self, i: int) -> np.ndarray:
        e = self.examples[i]
        rec = self.readers[e.source][e.index]
        if rec is None:
            raise ValueError(f"{e.source} record {e.index} (video {e.video_id!r}) is unreadable")
        return fit_clip(rec["frames"], self.clip_shape)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        e = self.examples[int(i)]
        ids, mask = self.tokens[e.prompt]
        has_patch = e.patch_scores is not None
        patch = e.patch_scores if has_patch else np.zeros((self.num_aspects, *self.grid), np.float32)
        item = {"frames": self.frames(int(i)), "input_ids": ids, "text_mask": mask,
                "video_scores": e.video_scores, "patch_scores": patch,
                "has_patch": np.float32(has_patch), "valid": np.float32(1.0),
                "group": np.int32(self.prompt_ids[e.prompt]),
                "video_key": np.int32(self.video_keys[planned_video_id(e.video_id)])}
        if self.negatives is not None:  # padded to num_negatives with the own prompt at valid 0
            mine = self.negatives[int(i)]
            padded = mine + [e.prompt] * (self.num_negatives - len(mine))
            item.update(negative_ids=np.stack([self.tokens[p][0] for p in padded]),
                        negative_mask=np.stack([self.tokens[p][1] for p in padded]),
                        negative_group=np.array([self.negative_prompt_ids[p] for p in padded], np.int32),
                        negative_valid=(np.arange(self.num_negatives) < len(mine)).astype(np.float32))
        return item


def attribute_contrasts(prompt: str, rng: np.random.Generator, attributes: Sequence[str] | None = None) -> list[str]:
    """One prompt per entry of `attributes` (default `shapes.ATTRIBUTES`; repeats give more of one kind), each
    with that attribute of one object of `prompt` changed (`shapes.altered_prompt`, drawn from `rng`, so two
    entries may give the same prompt); [] for a prompt outside the shapes world's grammar (then `rng` is not
    drawn from)."""
    from halo_jax.data import shapes

    try:
        scene = shapes.as_scene(prompt)
    except ValueError:
        return []
    return [shapes.altered_prompt(scene, rng, a) for a in (shapes.ATTRIBUTES if attributes is None else attributes)]


def hard_negatives(examples: Sequence[Example], seed: int, attributes: Sequence[str] | None = None
                   ) -> list[list[str]]:
    """Phase 0's hard negatives: each example's `attribute_contrasts` (of `attributes`), drawn from a generator
    seeded by (seed, crc32 of the video id), so the same for an example however the data is cut."""
    import zlib

    return [attribute_contrasts(e.prompt, np.random.default_rng([seed, zlib.crc32(e.video_id.encode())]), attributes)
            for e in examples]


def prompt_groups(examples: Sequence[Example], group_size: int, twins: bool = False) -> list[list[int]]:
    """Example indices grouped by prompt (sorted by video id), cut into chunks of `group_size`.

    With `twins`, grouped by the prompt the video shows (`rendered_prompt`, else `prompt`) and cut so that the
    records of one video (`planned_video_id`: a mismatched video and its `shown_id` copy) share a chunk."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if twins and group_size < 2:
        raise ValueError(f"twin pairs need group_size >= 2, got {group_size}")
    by_prompt: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_prompt.setdefault((e.rendered_prompt or e.prompt) if twins else e.prompt, []).append(i)
    groups = []
    for prompt in sorted(by_prompt):
        idx = sorted(by_prompt[prompt], key=lambda i: examples[i].video_id)
        if not twins:
            groups += [idx[s:s + group_size] for s in range(0, len(idx), group_size)]
            continue
        units: dict[str, list[int]] = {}  # the records of one video, in id order
        for i in idx:
            units.setdefault(planned_video_id(examples[i].video_id), []).append(i)
        chunk: list[int] = []
        for unit in units.values():
            if len(chunk) + len(unit) > group_size:
                groups.append(chunk)
                chunk = []
            chunk += unit
        groups.append(chunk)
    return groups


class GroupedSource:
    """Random access over prompt groups of a `RewardData` (`prompt_groups`): item g stacks `group_size` examples
    (a short group repeats its videos with valid = 0). `ids()` names the groups (pipeline checks)."""

    def __init__(self, data: RewardData, group_size: int, twins: bool = False):
        self.data = data
        self.group_size = group_size
        self.groups = prompt_groups(data.examples, group_size, twins)
        if not self.groups:
            raise ValueError("no training examples: every example is held out or rejected; add data or lower "
                             "reward.heldout_fraction")

    def __len__(self) -> int:
        return len(self.groups)

    def ids(self) -> list[str]:
        return ["|".join(self.data.examples[i].video_id for i in g) for g in self.groups]

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        idx = self.groups[int(g)]
        items = [self.data[i] for i in idx]
        for k in range(self.group_size - len(idx)):
            pad = dict(items[k % len(idx)])
            pad["valid"] = np.float32(0.0)
            items.append(pad)
        return {k: np.stack([it[k] for it in items]) for k in items[0]}


def concat_groups(groups: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batch function: B groups of G videos -> one flat batch of B * G videos."""
    return {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomic JSON write (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False))


def log_bad_labels(bad: BadLabels) -> None:
    for line in bad.summary_lines():
        logging.warning("%s", line) if bad.rejected else logging.info("%s", line)
