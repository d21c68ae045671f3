"""One record <-> its bytes: the `HALOREC1` format, one ArrayRecord entry per record.

    b"HALOREC1" | u32 n | header (n bytes of UTF-8 JSON) | array bytes | u32 crc32

all little-endian. The header is `{"scalars": {name: value}, "arrays": [[name, dtype,
shape], ...]}`; the array bytes follow in header order, C-contiguous; the CRC32 covers
every byte before it. No pickle: a store is safe to read from any source.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from halo_jax.data.stores.schema import CorruptRecordError, Schema

MAGIC = b"HALOREC1"
_U32 = struct.Struct("<I")


def encode_record(record: Mapping[str, Any], schema: Schema) -> bytes:
    """The HALOREC1 bytes of a validated record (see the module docstring)."""
    scalars = {f.name: record[f.name] for f in schema.small_fields}
    arrays = [np.ascontiguousarray(record[f.name], dtype=np.dtype(f.dtype).newbyteorder("<"))
              for f in schema.array_fields]
    header = json.dumps({"scalars": scalars,
                         "arrays": [[f.name, f.dtype, list(a.shape)] for f, a in zip(schema.array_fields, arrays)]},
                        ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    body = b"".join([MAGIC, _U32.pack(len(header)), header, *(a.tobytes() for a in arrays)])
    return body + _U32.pack(zlib.crc32(body))


def decode_record(data: bytes, schema: Schema) -> dict[str, Any]:
    """Parse and validate HALOREC1 bytes; raises CorruptRecordError naming what is wrong."""
    if len(data) < len(MAGIC) + 8 or not data.startswith(MAGIC):
        raise CorruptRecordError(f"not a HALOREC1 record ({len(data)} bytes, starts {bytes(data[:8])!r})")
    body, (crc,) = memoryview(data)[:-4], _U32.unpack_from(data, len(data) - 4)
    if zlib.crc32(body) != crc:
        raise CorruptRecordError(f"crc32 mismatch (stored {crc:#010x}, computed {zlib.crc32(body):#010x})")
    (n,) = _U32.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(bytes(body[start:start + n]).decode("utf-8"))
        scalars, arrays = header["scalars"], header["arrays"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CorruptRecordError(f"unreadable header: {e}") from None
    out = dict(scalars)
    offset = start + n
    for name, dtype, shape in arrays:
        dt = np.dtype(dtype).newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64))
        if offset + count * dt.itemsize > len(body):
            raise CorruptRecordError(f"array {name!r} runs past the end of the record")
        out[name] = np.frombuffer(body, dt, count, offset).reshape(shape).astype(dt.newbyteorder("="))
        offset += count * dt.itemsize
    if offset != len(body):
        raise CorruptRecordError(f"{len(body) - offset} unexplained bytes after the arrays")
    try:
        return schema.validate(out)
    except ValueError as e:
        raise CorruptRecordError(f"does not match the store's schema: {e}") from None
