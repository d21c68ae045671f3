"""tensorflow-datasets builders for the project's stores (no TensorFlow needed).

tensorflow-datasets 4.9 prepares and reads datasets in the `array_record` file format
with NumPy only: `HaloStore`, a `tfds.core.GeneratorBasedBuilder`, takes its features
from a store's `store.json` and its examples from a `StoreReader`, so any store (rollouts,
scores, pairs) becomes a standard tfds dataset:

    builder = prepare_tfds("workdir/rollouts")          # process 0; others: load_tfds(...)
    source = TfdsStoreSource(builder)                   # random access, for grain
    it = make_iterator(source, batch_size=8, seed=0)    # halo_jax.data.pipeline

The dataset lives inside the store, under `<store>/tfds/halo_store/<store name>/1.0.0/`
(`dataset_info.json`, `features.json`, `halo_store-train.array_record-*`). It is a copy
of the records in tfds' own example encoding (disk: about the store's size again), in
the store's id order (`disable_shuffling`), so `source[i]` is `StoreReader(store)[i]`.

Feature mapping: str -> `Text`, int -> int64 scalar, float -> float64 `Tensor` of raw bytes
(tf.Example's float lists would round to float32), bool -> bool scalar, json -> `Text` holding the JSON, arrays -> `Tensor(shape, dtype,
encoding=BYTES)` (raw bytes: exact, no upcast, any `None` dimensions).
`TfdsStoreSource` turns tfds' bytes back into str/JSON values and NumPy scalars into
Python numbers, so its records equal the store's.

A prepared dataset records the store's fingerprint (record count and a hash of ids);
`prepare_tfds` on a store that has changed since (a resumed stage added records)
prepares it again, and `load_tfds` refuses a stale copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from halo_jax.data.stores import Field, Schema, StoreError, StoreReader
from halo_jax.io import atomic_write_text

SPLIT = "train"


def store_fingerprint(reader: StoreReader) -> dict:
    """{"num_records", "ids_sha256"} of a store's current contents (index only)."""
    digest = hashlib.sha256("\n".join(reader.ids()).encode("utf-8")).hexdigest()
    return {"num_records": len(reader), "ids_sha256": digest}


def _feature(f: Field):
    if f.is_array:
        return tfds.features.Tensor(shape=f.shape, dtype=np.dtype(f.dtype), encoding=tfds.features.Encoding.BYTES)
    if f.dtype == "float":  # tf.Example float lists are float32: keep the float64 bytes instead
        return tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES)
    return {"str": tfds.features.Text(), "json": tfds.features.Text(), "int": tfds.features.Scalar(np.int64),
            "bool": tfds.features.Scalar(np.bool_)}[f.dtype]


def _to_example(record: Mapping[str, Any], schema: Schema) -> dict:
    return {f.name: json.dumps(record[f.name], ensure_ascii=False, allow_nan=False) if f.dtype == "json"
            else record[f.name] for f in schema.fields}


def from_example(example: Mapping[str, Any], schema: Schema) -> dict:
    """A decoded tfds example back as a store record (str, JSON and Python numbers restored)."""
    out = {}
    for f in schema.fields:
        v = example[f.name]
        if f.is_array:
            out[f.name] = np.asarray(v, dtype=f.dtype)
        elif f.dtype in ("str", "json"):
            text = v.decode("utf-8") if isinstance(v, bytes) else str(v)
            out[f.name] = json.loads(text) if f.dtype == "json" else text
        elif f.dtype == "int":
            out[f.name] = int(v)
        elif f.dtype == "float":
            out[f.name] = float(v)
        else:
            out[f.name] = bool(v)
    return out


class HaloStore(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset prepared from one halo_jax store (one config per store name, one `train` split)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "HALOREC1 store records as tfds examples."}

    # tfds' own `code_path` needs the `importlib_resources` backport (not a tfds dependency)
    # for a builder that lives inside a package; this file is the builder's code.
    @tfds.core.utils.py_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, *, store_dir: str | os.PathLike, on_corrupt: str = "fail", **kwargs):
        self.store_dir = Path(store_dir)
        self._on_corrupt = on_corrupt
        self.reader = StoreReader(self.store_dir, on_corrupt=on_corrupt)
        self.schema = self.reader.schema
        kwargs.setdefault("data_dir", str(self.store_dir / "tfds"))
        kwargs.setdefault("file_format", "array_record")
        kwargs.setdefault("config", tfds.core.BuilderConfig(name=self.schema.name,
                                                            description=f"halo_jax store {self.schema.name!r}"))
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs would look for metadata files beside this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"halo_jax store {self.schema.name!r} (schema: {json.dumps(self.schema.to_json()['fields'])})",
            features=tfds.features.FeaturesDict({f.name: _feature(f) for f in self.schema.fields}),
            # Keep the store's id order: tfds would otherwise reorder examples by a hash of their keys.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        for i in range(len(self.reader)):
            rec = self.reader[i]
            if rec is None:  # reported and counted by the reader (on_corrupt="skip")
                continue
            yield rec[self.schema.id_field], _to_example(rec, self.schema)

    def _stored_fingerprint(self) -> dict | None:
        path = Path(self.data_path) / "halo_store_fingerprint.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_fingerprint(self) -> None:
        fp = {**store_fingerprint(self.reader), "skipped": list(self.reader.problems)}
        path = Path(self.data_path) / "halo_store_fingerprint.json"
        atomic_write_text(path, json.dumps(fp, indent=1))

    def is_current(self) -> bool:
        """Prepared, and from the store as it is now."""
        fp = self._stored_fingerprint()
        return fp is not None and {k: fp.get(k) for k in ("num_records", "ids_sha256")} == store_fingerprint(
            self.reader)


def prepare_tfds(store_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                 on_corrupt: str = "fail") -> HaloStore:
    """Prepare (or refresh) the tfds copy of a store; returns the builder. Run it on one process."""
    kwargs = {} if data_dir is None else {"data_dir": str(data_dir)}
    builder = HaloStore(store_dir=store_dir, on_corrupt=on_corrupt, **kwargs)
    mode = None
    if builder.is_current():
        logging.info("tfds copy of %s is up to date (%s)", store_dir, builder.data_path)
        return builder
    if builder._stored_fingerprint() is not None or Path(builder.data_path).exists():
        logging.info("store %s changed since its tfds copy was prepared: preparing it again", store_dir)
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    builder.download_and_prepare(download_dir=str(builder.data_dir_root / "downloads"),
                                 download_config=tfds.download.DownloadConfig(download_mode=mode) if mode else None)
    builder._write_fingerprint()
    return builder


def load_tfds(store_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
              allow_stale: bool = False) -> HaloStore:
    """The prepared tfds dataset of a store; raises if it was never prepared or the store changed since."""
    kwargs = {} if data_dir is None else {"data_dir": str(data_dir)}
    builder = HaloStore(store_dir=store_dir, on_corrupt="skip", **kwargs)
    if builder._stored_fingerprint() is None:
        raise StoreError(f"no tfds copy of store {store_dir} under {builder.data_path}; run prepare_tfds(store_dir) "
                         "on process 0 first")
    if not allow_stale and not builder.is_current():
        raise StoreError(f"the tfds copy at {builder.data_path} is older than store {store_dir}; run prepare_tfds "
                         "again (or pass allow_stale=True)")
    return builder


class TfdsStoreSource:
    """Random access to a prepared `HaloStore` split, yielding records equal to the store's."""

    def __init__(self, builder: HaloStore, split: str = SPLIT):
        self.schema = builder.schema
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return from_example(self._source[int(index)], self.schema)
