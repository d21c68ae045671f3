"""A store's schema: the fields of its records (`Field`, `Schema`), validation, and the store errors.

Array fields are numeric numpy arrays of a declared dtype and shape (a `None` dimension takes
any size); small fields are str, int, float (finite), bool, or any strict JSON value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STORE_FORMAT = "halo_jax.store/1"
SCALAR_KINDS = ("str", "int", "float", "bool", "json")


class StoreError(RuntimeError):
    """A store that cannot be opened or written as asked; the message names the input and the fix."""


class CorruptRecordError(StoreError):
    """A record, index line or chunk file failed validation (raised when on_corrupt='fail')."""


@dataclass(frozen=True)
class Field:
    """One field of a record: an array (`shape` given; None dims take any size) or a small value.

    Arrays: `dtype` is a numpy dtype name ("float32", "uint8", ...). Small values: `dtype` is
    one of "str", "int", "float", "bool", "json" and `shape` is None.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None = None

    def __post_init__(self):
        if self.shape is None:
            if self.dtype not in SCALAR_KINDS:
                raise ValueError(f"field {self.name!r}: a small field's dtype must be one of {SCALAR_KINDS}, got "
                                 f"{self.dtype!r}; give a shape to declare an array field")
        else:
            dt = np.dtype(self.dtype)
            if dt.kind not in "biuf" or dt.itemsize == 0:
                raise ValueError(f"field {self.name!r}: array dtype must be numeric (bool/int/uint/float), got "
                                 f"{self.dtype!r}")
            object.__setattr__(self, "dtype", dt.name)
            object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in self.shape))

    @property
    def is_array(self) -> bool:
        return self.shape is not None

    @classmethod
    def array(cls, name: str, dtype: Any, shape: Sequence[int | None]) -> "Field":
        return cls(name, np.dtype(dtype).name, tuple(shape))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping) -> "Field":
        return cls(d["name"], d["dtype"], None if d.get("shape") is None else tuple(d["shape"]))


@dataclass(frozen=True)
class Schema:
    """The fields of a store's records; `id_field` (a "str" field) names each record uniquely."""

    name: str
    id_field: str
    fields: tuple[Field, ...]
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "fields", tuple(self.fields))
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"schema {self.name!r}: duplicated field names in {names}")
        by_name = {f.name: f for f in self.fields}
        if self.id_field not in by_name or by_name[self.id_field].dtype != "str":
            raise ValueError(f"schema {self.name!r}: id_field {self.id_field!r} must name a 'str' field of {names}")
        object.__setattr__(self, "_by_name", by_name)

    def __getitem__(self, name: str) -> Field:
        return self._by_name[name]

    @property
    def array_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.is_array)

    @property
    def small_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.is_array)

    def to_json(self) -> dict:
        return {"format": STORE_FORMAT, "name": self.name, "id_field": self.id_field,
                "fields": [f.to_json() for f in self.fields],
                "record_format": "HALOREC1 | u32 n | JSON header | array bytes | u32 crc32 (little-endian)"}

    @classmethod
    def from_json(cls, d: Mapping) -> "Schema":
        if d.get("format") != STORE_FORMAT:
            raise StoreError(f"schema format {d.get('format')!r} is not {STORE_FORMAT!r}")
        return cls(d["name"], d["id_field"], tuple(Field.from_json(f) for f in d["fields"]))

    def validate(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The record with arrays as numpy arrays of the declared dtype; raises ValueError on any mismatch."""
        rid = record.get(self.id_field, "?") if isinstance(record, Mapping) else "?"
        where = f"record {rid!r} of store {self.name!r}"
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: a record must be a mapping of field name to value, got {type(record).__name__}")
        missing = [f.name for f in self.fields if f.name not in record]
        extra = sorted(set(record) - set(self._by_name))
        if missing or extra:
            raise ValueError(f"{where}: missing fields {missing}, unexpected fields {extra}; "
                             f"the schema has {[f.name for f in self.fields]}")
        return {f.name: _check_value(f, record[f.name], where) for f in self.fields}


def _check_value(f: Field, value: Any, where: str) -> Any:
    if f.is_array:
        arr = np.asarray(value)
        want = np.dtype(f.dtype)
        if arr.dtype != want:
            if not isinstance(value, np.ndarray) or np.can_cast(arr.dtype, want, "safe"):
                arr = arr.astype(want)
            else:
                raise ValueError(f"{where}: field {f.name!r} has dtype {arr.dtype}, the schema says {want} and the "
                                 f"cast would lose information; cast it yourself (x.astype(np.{want.name}))")
        if arr.ndim != len(f.shape) or any(d is not None and d != s for d, s in zip(f.shape, arr.shape)):
            raise ValueError(f"{where}: field {f.name!r} has shape {arr.shape}, the schema says {f.shape}")
        return arr
    kind = f.dtype
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "int":
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        value = int(value) if ok else value
    elif kind == "float":
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ValueError(f"{where}: field {f.name!r} is {value}; small fields must be finite (strict JSON); "
                             "store non-finite values in an array field")
    elif kind == "bool":
        ok = isinstance(value, (bool, np.bool_))
        value = bool(value) if ok else value
    else:  # json
        try:
            json.dumps(value, allow_nan=False)
            ok = True
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise ValueError(f"{where}: field {f.name!r} must be {kind}, got {type(value).__name__} {value!r:.80}")
    return value
