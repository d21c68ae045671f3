"""Safetensors folders <-> nnx state, one tensor at a time, straight onto shardings.

A checkpoint folder holds `config.json` and either one `*.safetensors` file or
shards listed by `*.safetensors.index.json` (the diffusers / transformers
layout). Files are read through `np.memmap`, so a parameter is sliced from disk
per device shard and the whole model never sits on one host (bf16 included,
via `ml_dtypes`).

Key mapping is a table of `Rule(checkpoint_template, param_template, transform)`.
Templates may hold `{name}` placeholders that match integers (layer indices):

    Rule("blocks.{i}.attn1.to_q.weight", "blocks.{i}.attn1.to_q.kernel", "linear")

A param template may end with `[{i}]` to address index i of a stacked (scanned)
parameter: `Rule("blocks.{i}.ffn.weight", "blocks.ffn.kernel[{i}]", "linear")`.

Checkpoint keys the reference itself drops on load (non-persistent buffers, ...) are skipped
with `load_state(..., ignore=regex)`, the one place such filters live.

Transforms convert the PyTorch layout to ours (and back, for export):
    linear  (out, in) -> (in, out)
    conv1d  (O, I, K) -> (K, I, O)
    conv2d  (O, I, H, W) -> (H, W, I, O)
    conv3d  (O, I, T, H, W) -> (T, H, W, I, O)
    none    unchanged
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from halo_jax.io import atomic_path, atomic_write_text

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

PERMUTATIONS: dict[str, tuple[int, ...] | None] = {
    "none": None,
    "linear": (1, 0),
    "conv1d": (2, 1, 0),
    "conv2d": (2, 3, 1, 0),
    "conv3d": (2, 3, 4, 1, 0),
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message lists what is wrong and where."""


# ----------------------------------------------------------------------------- files


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header); re-export or re-download it")
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e}); re-export or re-download it") from e
    return header, 8 + n


class SafetensorsFolder(Mapping[str, np.ndarray]):
    """Read-only mapping key -> lazily memory-mapped numpy array, over one folder (or file)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist; pass the local path of a diffusers/transformers folder")
        files = self._files()
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for file in files:
            header, offset = _read_header(file)
            size = file.stat().st_size
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                if offset + end > size:
                    raise CheckpointError(f"{file}: tensor {key!r} runs past the end of the file (truncated download?)")
                self._where[key] = (file, info, offset)

    def _files(self) -> list[Path]:
        if self.folder.is_file():
            return [self.folder]
        index = sorted(self.folder.glob("*.safetensors.index.json"))
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).exists()]
            if missing:
                raise CheckpointError(f"{self.folder}: shards listed in {index[0].name} are missing: {missing}")
            return [self.folder / n for n in names]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors file and no *.safetensors.index.json found")
        return files

    def __getitem__(self, key: str) -> np.ndarray:
        file, info, offset = self._where[key]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=offset + start, shape=shape)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing; a model folder needs its config.json next to the weights")
    return json.loads(path.read_text())


def save_folder(
    folder: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    config: dict | None = None,
    weights_name: str = "diffusion_pytorch_model",
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write `tensors` (+ `config.json`) as one or more safetensors files, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[key]))
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    names = (
        [f"{weights_name}.safetensors"]
        if len(shards) == 1
        else [f"{weights_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        _write_file(folder / name, shard)
    if len(shards) > 1:
        weight_map = {k: n for n, s in zip(names, shards) for k in s}
        total = sum(a.nbytes for s in shards for a in s.values())
        atomic_write_text(folder / f"{weights_name}.safetensors.index.json",
                           json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if config is not None:
        atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True))


def _write_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, arr in tensors.items():
        if arr.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"cannot write tensor {key!r} of dtype {arr.dtype} to safetensors")
        header[key] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:  # streamed: no second copy in memory
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in tensors.values():
            f.write(arr.tobytes())


# ----------------------------------------------------------------------------- key mapping


@dataclasses.dataclass(frozen=True)
class Rule:
    """One checkpoint key template <-> one param path template, with a layout transform."""

    checkpoint: str
    param: str
    transform: str = "none"

    def __post_init__(self):
        if self.transform not in PERMUTATIONS:
            raise ValueError(f"unknown transform {self.transform!r}; choose from {sorted(PERMUTATIONS)}")


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p) for p in parts) + "$")


def _resolve(template: str, groups: dict[str, str]) -> tuple[str, int | None]:
    """Fill a param template; returns (path, stacked index or None)."""
    filled = template.format(**groups)
    m = re.fullmatch(r"(.*)\[(\d+)\]", filled)
    return (m.group(1), int(m.group(2))) if m else (filled, None)


def map_checkpoint_keys(keys: Iterable[str], rules: Sequence[Rule]) -> tuple[dict[str, list], list[str]]:
    """Group checkpoint keys by param path: {path: [(stack_index, key, transform)]}, plus unmatched keys."""
    compiled = [(_template_regex(r.checkpoint), r) for r in rules]
    targets: dict[str, list] = {}
    unmatched = []
    for key in keys:
        for regex, rule in compiled:
            m = regex.match(key)
            if m:
                path, index = _resolve(rule.param, m.groupdict())
                targets.setdefault(path, []).append((index, key, rule.transform))
                break
        else:
            unmatched.append(key)
    return targets, unmatched


def _flat_state(state) -> dict[str, nnx.Variable]:
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def _to_theirs(arr: np.ndarray, transform: str) -> np.ndarray:
    perm = PERMUTATIONS[transform]
    return arr if perm is None else np.transpose(arr, np.argsort(perm))


def load_state(
    state: Any,
    source: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    shardings: Any | None = None,
    strict: bool = True,
    name: str = "checkpoint",
    ignore: str | re.Pattern | None = None,
) -> Any:
    """Fill `state` (nnx State, concrete or abstract) from `source` by `rules`.

    `ignore` is a regex: checkpoint keys it matches anywhere (`re.search`) are skipped, neither
    loaded nor reported unexpected (e.g. buffers the reference itself drops on load). Each tensor is cast explicitly to the dtype of its param and placed with
    `jax.make_array_from_callback`, so each device reads only its own slice.
    Raises `CheckpointError` listing every missing / unexpected key and shape
    mismatch at once.
    """
    flat = _flat_state(state)
    flat_shardings = _flat_state(shardings) if shardings is not None else {}
    keys = source.keys()
    if ignore is not None:
        pattern = re.compile(ignore)
        keys = [k for k in keys if not pattern.search(k)]
    targets, unmatched = map_checkpoint_keys(keys, rules)
    problems = []
    unexpected = list(unmatched) + [k for p, items in targets.items() if p not in flat for _, k, _ in items]
    missing = [p for p in flat if p not in targets]
    if strict and unexpected:
        problems.append(f"unexpected keys in {name} ({len(unexpected)}): {sorted(unexpected)[:20]}")
    if strict and missing:
        problems.append(f"params with no key in {name} ({len(missing)}): {sorted(missing)[:20]}")
    loaders: dict[str, Callable] = {}
    for path, items in targets.items():
        if path not in flat:
            continue
        var = flat[path]
        shape = tuple(var.get_value().shape)
        stacked = items[0][0] is not None
        if stacked:
            got = sorted(i for i, _, _ in items)
            if got != list(range(shape[0])):
                problems.append(f"{path}: stacked param of {shape[0]} layers got layer keys {got}")
                continue
        for index, key, transform in items:
            theirs = tuple(source[key].shape)
            perm = PERMUTATIONS[transform]
            ours = theirs if perm is None else tuple(theirs[p] for p in perm)
            want = shape[1:] if stacked else shape
            if ours != want:
                problems.append(f"{path}: {name} key {key!r} has shape {theirs} -> {ours} after {transform!r}, param needs {want}")
        loaders[path] = _make_loader(source, items, stacked, np.dtype(var.get_value().dtype))
    if problems:
        raise CheckpointError(f"cannot load {name}:\n  " + "\n  ".join(problems))

    def place(path: str, var: nnx.Variable):
        value = var.get_value()
        sharding = flat_shardings.get(path)
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if path not in loaders:
            return var
        arr = jax.make_array_from_callback(tuple(value.shape), sharding, loaders[path])
        return var.replace(arr)

    new_flat = [(tuple(path.split(".")), place(path, var)) for path, var in flat.items()]
    return _rebuild(state, new_flat)


def _rebuild(state, new_flat):
    by_key = {k: v for k, v in new_flat}
    pairs = []
    for path, var in nnx.to_flat_state(state):
        pairs.append((path, by_key[tuple(str(p) for p in path)]))
    return nnx.from_flat_state(pairs)


def _make_loader(source, items, stacked: bool, dtype: np.dtype) -> Callable:
    def read(key: str, transform: str, index: tuple) -> np.ndarray:
        perm = PERMUTATIONS[transform]
        arr = source[key]
        if perm is None:
            return np.asarray(arr[index])
        src_index = [slice(None)] * arr.ndim
        for our_dim, their_dim in enumerate(perm):
            if our_dim < len(index):
                src_index[their_dim] = index[our_dim]
        return np.transpose(np.asarray(arr[tuple(src_index)]), perm)

    def loader(index: tuple) -> np.ndarray:
        if not stacked:
            _, key, transform = items[0]
            return read(key, transform, index).astype(dtype)
        by_layer = {i: (k, t) for i, k, t in items}
        layers = range(len(by_layer))[index[0]] if index else range(len(by_layer))
        rest = tuple(index[1:])
        return np.stack([read(*by_layer[i], rest) for i in layers]).astype(dtype)

    return loader


def export_state(state: Any, rules: Sequence[Rule], dtype: Any | None = None) -> dict[str, np.ndarray]:
    """Inverse of `load_state`: {checkpoint key: numpy array in the PyTorch layout}.

    Every param must be covered by a rule (stacked params unstack into one key per layer).
    """
    out: dict[str, np.ndarray] = {}
    flat = _flat_state(state)
    unmapped = []
    for path, var in flat.items():
        value = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            value = value.astype(dtype)
        done = False
        for rule in rules:
            regex = _template_regex(rule.param.removesuffix("[{i}]") if rule.param.endswith("[{i}]") else rule.param)
            m = regex.match(path)
            if not m:
                continue
            groups = m.groupdict()
            if rule.param.endswith("[{i}]"):
                for i in range(value.shape[0]):
                    out[rule.checkpoint.format(**groups, i=i)] = _to_theirs(value[i], rule.transform)
            else:
                out[rule.checkpoint.format(**groups)] = _to_theirs(value, rule.transform)
            done = True
            break
        if not done:
            unmapped.append(path)
    if unmapped:
        raise CheckpointError(f"no export rule for params: {unmapped[:20]}")
    return out
