"""Give back the host memory of weights mapped from safetensors files once a block is done with them.

transformers maps a model's safetensors files into memory and its tensors are views of those mappings: a
block's weights become resident the first time they are read (copied to the GPU, or used by a CPU run) and
stay resident, counted in the process's memory, until the mapping goes away, which for a whole model is the
end of the run. ``release_file_pages`` hands such pages back with ``madvise(MADV_DONTNEED)``: the next read
faults them in again from the file (the page cache, or the disk), so the values do not change, and a run
that reads each block once keeps about one block's weights resident instead of the model's.

Only pages that are still the file's are given back. The mapping is private and writable, so a page that was
written holds the only copy of the new values; ``/proc/self/pagemap`` says which pages those are, and a
tensor with any of them is left alone. Linux only; elsewhere (or without ``/proc``) nothing is released.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import mmap
import os
import struct
import sys
import time
from collections.abc import Iterable

import torch

log = logging.getLogger("llmc_tpu")

MADV_DONTNEED = 4  # Linux
PAGE = mmap.PAGESIZE
_PRESENT, _FILE_OR_SHARED = 1 << 63, 1 << 61  # pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()


def file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's memory mappings of files whose name ends with ``suffix``, sorted."""
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").endswith(suffix):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    found.append((start, end, parts[5].rstrip("\n")))
    except OSError:
        return []
    return sorted(found)


def _pages_still_the_files(pagemap, first: int, count: int) -> bool:
    """Whether some of ``count`` pages from page number ``first`` are present and none of those is private
    anonymous (written). No page present: nothing to give back, or a pagemap that shows no flags (trusted
    with nothing)."""
    pagemap.seek(first * 8)
    data = pagemap.read(count * 8)
    if len(data) != count * 8:
        return False
    present = False
    for (entry,) in struct.iter_unpack("<Q", data):
        if entry & _PRESENT:
            if not entry & _FILE_OR_SHARED:
                return False
            present = True
    return present


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """``madvise(MADV_DONTNEED)`` the whole pages of CPU tensors that lie in a mapped ``.safetensors`` file and
    were not written; returns the bytes given back (0 where the platform has no such call)."""
    if _LIBC is None:
        return 0
    maps = file_mappings()
    if not maps:
        return 0
    starts = [m[0] for m in maps]
    released = 0
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:
        return 0
    with pagemap:
        seen = set()
        for t in tensors:
            if t.device.type != "cpu" or t.numel() == 0:
                continue
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            i = bisect.bisect_right(starts, lo) - 1
            if i < 0 or hi > maps[i][1]:
                continue  # not (wholly) in a mapped safetensors file: anonymous memory, never released
            first, last = -(-lo // PAGE), hi // PAGE  # whole pages only: a neighbour may share the edge pages
            if last <= first or (first, last) in seen:
                continue
            if not _pages_still_the_files(pagemap, first, last - first):
                continue
            if _LIBC.madvise(ctypes.c_void_p(first * PAGE), (last - first) * PAGE, MADV_DONTNEED) == 0:
                seen.add((first, last))
                released += (last - first) * PAGE
            else:
                log.debug("madvise failed: %s", os.strerror(ctypes.get_errno()))
    return released


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory so far (``ru_maxrss``), or None where the platform has no such count."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: ``/proc/self/stat``), or None where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the man page: start time after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
