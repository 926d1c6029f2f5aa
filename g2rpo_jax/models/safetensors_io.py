"""Minimal lazy safetensors reader and writer on numpy memory maps.

The format is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then raw little-endian bytes. Reading through a memory map means a
tensor (or a slice of it) is only paged in when used, so an 8B checkpoint is never copied whole
into host memory; bfloat16 comes through ml_dtypes, which numpy-based loaders lack.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafetensorsFile:
    """Read-only view of one .safetensors file; `tensor(name)` is a zero-copy memmap view."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            first = f.read(8)
            if len(first) < 8:
                raise self._damaged(f"{size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", first)
            if 8 + header_len > size:
                raise self._damaged(f"its header claims {header_len} bytes but the file has {size}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise self._damaged(f"its header is not valid JSON ({error})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if self._data_start + data_end > size:
            raise self._damaged(f"its tensors need {self._data_start + data_end} bytes but the file has {size}")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > self._data_start else None

    def _damaged(self, cause: str) -> ValueError:
        return ValueError(f"{self.path} is not a complete safetensors file: {cause}; it is truncated or "
                          "corrupted (an interrupted copy or download?): copy or save the checkpoint again")

    def keys(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        dtype = _DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        raw = self._map[self._data_start + start : self._data_start + end]
        return raw.view(dtype).reshape(shape)


def write(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors (numpy arrays, bfloat16 via ml_dtypes) to one .safetensors file."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; supported: {sorted(_DTYPES)}")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)  # never leave a half-written checkpoint under the final name


def shard_names(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of (name, nbytes) into consecutive groups of at most max_shard_bytes each."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards
