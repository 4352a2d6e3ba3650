"""Write a safetensors file one tensor at a time, so that saving a model never holds the model in memory.

``safetensors.torch.save_file`` takes every tensor at once: the weights of a run are views of mapped files
(the source model, the run's block checkpoints), and writing them all in one call makes every page of them
resident in the process, the whole model's worth. ``save_file`` here writes the same bytes (the header the
library writes, tensors in its order: by dtype, widest first, then by name) but takes each tensor only when
its turn comes: a ``Deferred`` entry is built then (a GPTQ Linear's packed codes), and a tensor's pages that
are still its file's are given back once they are written (``engine.host_memory``). The tests compare the
bytes with the library's for every dtype a checkpoint holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from llmc_tpu.engine.host_memory import release_file_pages
from llmc_tpu.export.manifest import remember_digest

# safetensors' dtype names, in the order of its Dtype enum (the file lists wider dtypes first)
_DTYPES = [
    (torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.uint16, "U16"), (torch.float16, "F16"),
    (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"), (torch.float32, "F32"),
    (torch.float64, "F64"), (torch.int64, "I64"), (torch.uint64, "U64"),
]
_NAME = dict(_DTYPES)
_RANK = {dtype: i for i, (dtype, _) in enumerate(_DTYPES)}
_ALIGN = 8  # the header is padded with spaces to a multiple of 8 bytes


@dataclass(frozen=True)
class Deferred:
    """A tensor built only when the writer reaches it: its dtype and shape (for the header) and how to make it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


Entry = torch.Tensor | Deferred


def _spec(entry: Entry) -> tuple[torch.dtype, tuple[int, ...]]:
    return (entry.dtype, tuple(entry.shape))


def header_bytes(entries: Mapping[str, Entry], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The length-prefixed JSON header and the order the tensors' bytes follow in."""
    for name, entry in entries.items():
        if entry.dtype not in _NAME:
            raise TypeError(f"{name}: dtype {entry.dtype} has no safetensors name")
    order = sorted(entries, key=lambda n: (-_RANK[entries[n].dtype], n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = _spec(entries[name])
        size = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw, order


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def save_file(entries: Mapping[str, Entry], filename: str | os.PathLike, metadata: Mapping[str, str] | None = None,
              build_ahead: bool = True) -> None:
    """Write ``entries`` (tensors, or ``Deferred`` ones) as ``safetensors.torch.save_file`` would, one at a time.

    ``build_ahead``: a ``Deferred`` entry is built while the tensor before it is written and hashed (a GPTQ Linear's
    codes are packed while the previous Linear's words go to the file); at most one built tensor waits beside the one
    being written. False builds each in its turn (``benchmarks/gptq_save.py`` compares the two).
    """
    head, order = header_bytes(entries, metadata)
    path = Path(filename)
    digest = hashlib.sha256(head)

    def build(name: str) -> torch.Tensor:
        entry = entries[name]
        t = entry.make() if isinstance(entry, Deferred) else entry
        if _spec(t) != _spec(entry):
            raise ValueError(f"{name}: built as {t.dtype} {tuple(t.shape)}, announced as {entry.dtype} {entry.shape}")
        return t

    def later(i: int) -> Future | None:  # the next Deferred entry, built in the background
        if build_ahead and i < len(order) and isinstance(entries[order[i]], Deferred):
            return builder.submit(build, order[i])
        return None

    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="llmc_tpu-sha256") as hasher, \
            ThreadPoolExecutor(1, thread_name_prefix="llmc_tpu-build") as builder:
        f.write(head)
        next_built = later(0)
        for i, name in enumerate(order):
            t = next_built.result() if next_built is not None else build(name)
            next_built = later(i + 1)
            data = t.detach().to("cpu").contiguous()
            if data.numel():
                raw = data.reshape(-1).view(torch.uint8).numpy().data
                hashed = hasher.submit(digest.update, raw)  # hashed while written (both let go of the GIL)
                f.write(raw)
                hashed.result()
            release_file_pages([t])
            del t, data
    remember_digest(path, digest.hexdigest())  # the output's manifest need not read the file back
