"""Safetensors files read by hand, in one place: the header checked against the file's size (a truncated or
mislabelled shard is named before anything loads it), and a tensor's raw bytes for the leak check's bit-exact
comparison.  One table of the format's dtypes serves both."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..common.errors import TaylorMLPError

# safetensors dtype: (bytes per element, the numpy dtype its raw bytes are read as: bf16 and fp8 as unsigned ints)
DTYPES = {"F64": (8, np.float64), "F32": (4, np.float32), "F16": (2, np.float16), "BF16": (2, np.uint16),
          "I64": (8, np.int64), "I32": (4, np.int32), "I16": (2, np.int16), "I8": (1, np.int8), "U8": (1, np.uint8),
          "BOOL": (1, np.bool_), "F8_E4M3": (1, np.uint8), "F8_E5M2": (1, np.uint8), "U16": (2, np.uint16),
          "U32": (4, np.uint32), "U64": (8, np.uint64)}
SAFETENSORS_DTYPES = {name: width for name, (width, _) in DTYPES.items()}  # bytes per element


def _entries(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(header length, {tensor name: (dtype, shape, begin, end)}) of a safetensors file, its header checked against
    its size; TaylorMLPError otherwise."""
    fix = "re-download or re-convert it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise TaylorMLPError(f"{path}: not a safetensors file (only {size} bytes); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise TaylorMLPError(f"{path}: not a safetensors file (header length {n} does not fit in {size} "
                                     f"bytes: truncated, or another format renamed to .safetensors); {fix}")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as exc:
        raise TaylorMLPError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaylorMLPError(f"{path}: not a safetensors file (corrupt header: {exc}); {fix}") from exc
    if not isinstance(header, dict):
        raise TaylorMLPError(f"{path}: not a safetensors file (header is not a table); {fix}")
    end = 0
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64)) if info["shape"] else 1
            width = SAFETENSORS_DTYPES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise TaylorMLPError(f"{path}: corrupt safetensors header entry for {name!r}; {fix}") from exc
        if stop - begin != count * width:
            raise TaylorMLPError(f"{path}: tensor {name!r} is mislabelled ({info['dtype']} {info['shape']} needs "
                                 f"{count * width} bytes, the header gives {stop - begin}); {fix}")
        end = max(end, stop)
        entries[name] = (info["dtype"], tuple(int(k) for k in info["shape"]), int(begin), int(stop))
    if 8 + n + end != size:
        raise TaylorMLPError(f"{path}: {size} bytes, but its header describes {8 + n + end} (truncated or "
                             f"damaged); {fix}")
    return n, entries


def check_safetensors_file(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} of a safetensors file after checking its header against its size;
    TaylorMLPError otherwise."""
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in _entries(Path(path))[1].items()}


def read_safetensors_raw(path: Path):
    """Yield (name, safetensors dtype, numpy array of its raw values) for every tensor of a checked safetensors
    file, read from a memory map."""
    n, entries = _entries(Path(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, (dtype, shape, begin, end) in entries.items():
        yield name, dtype, data[8 + n + begin:8 + n + end].view(DTYPES[dtype][1]).reshape(shape)
