"""The machine: what it is (describe), memory available and in use (Linux /proc), handing freed heap back, the
device to run on."""

from __future__ import annotations

import ctypes
import os
import platform

import torch

from .errors import TaylorMLPError


def proc_kb(path: str, key: str) -> int | None:
    """The bytes of a "Key:  N kB" line of a Linux /proc file (/proc/meminfo, /proc/self/status), None where
    unknown."""
    try:
        for line in open(path, encoding="utf-8"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe(device: str | None = None) -> dict:
    """What a timing was measured on (a slowdown is a property of the machine): the device, the GPU's name or the
    CPU's model with torch's threads and the cores, the platform and torch's version."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": device, "platform": platform.platform(), "torch": torch.__version__}
    if device == "cuda":
        return {**out, "gpu": torch.cuda.get_device_name(0)}
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {**out, "cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None where unknown."""
    return proc_kb("/proc/meminfo", "MemAvailable")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept from then on


def keep_mmap_threshold() -> None:
    """Fix glibc's mmap threshold at 128 KiB for this process: every block above it is its own memory map, handed
    back to the OS the moment it is freed.  Left to itself glibc raises the threshold to the size of each large block
    freed (up to 32 MiB), so a layer's temporaries land on the heap, and a streamed walk over L layers ends with a
    heap that grew with L (peak RSS 1.34x from 4 to 8 layers of benchmarks/scale.py's smol-wide shape; 1.05x with
    the threshold kept).  Setting it once is enough; elsewhere than glibc it does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Hand freed heap back to the OS after a layer (glibc keeps large freed blocks otherwise, and peak RSS then
    creeps up layer after layer).  Tensors are freed by reference counting the moment their last name goes; no
    gc.collect() here: with transformers loaded it costs ~0.2 s a call, 40 s of a SmolLM2 coverage search."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TaylorMLPError("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                             "use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise TaylorMLPError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device
