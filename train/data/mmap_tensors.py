"""Tensors of a safetensors file as read-only numpy memory maps: nothing is read until a slice is used.

Distill reads the teacher's stored top-k this way: every rank of a node maps the same shard files,
the pages live once in the page cache, and a rank's own memory holds only the current batch (the
earlier loader read every shard whole into each rank and widened the ids to int64: about twice the
disk size per rank). bfloat16, which numpy lacks, is mapped as int16 and viewed as bf16 by `to_torch`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def mmap_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(name -> read-only memmap, name -> safetensors dtype, the file's metadata)."""
    p = Path(path)
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", {}) or {}
    arrays, dtypes = {}, {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        dtypes[name] = info["dtype"]
        if end == begin:
            arrays[name] = np.zeros(shape, dtype=_NUMPY[info["dtype"]])
        else:
            arrays[name] = np.memmap(p, dtype=_NUMPY[info["dtype"]], mode="r", offset=8 + n + begin, shape=shape)
    return arrays, dtypes, metadata


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A (copied) torch tensor of a slice of a mapped array, with bfloat16 restored."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.bfloat16) if dtype == "BF16" else t
