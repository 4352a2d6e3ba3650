"""Bit packing of unsigned codes into int32 words, shared by the GPU formats.

Element j of a word sits at bits ``bits * j`` (low bits first). With 4 or 8 bits no
element straddles two words, so this is also compressed-tensors' dense layout
("element i at global bits i * bits"). AutoAWQ reorders the 8 nibbles of a word
first (``AWQ_ORDER``).
"""

from __future__ import annotations

import torch

from llmc_tpu.export import gptq_checkpoint

# AutoAWQ GEMM: nibble i of a packed word holds column 8 * word + AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a word sits in nibble AWQ_REVERSE_ORDER[j]


def per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"packing supports 2, 4 or 8 bits, not {bits}")
    return 32 // bits


def pack_int32(values: torch.Tensor, bits: int, dim: int, pad: bool = False) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values of a 2-D tensor along ``dim`` into int32 words.

    ``pad``: zero-fill to a whole number of words (compressed-tensors); otherwise the size
    along ``dim`` must be a multiple of ``32 / bits`` (AutoAWQ, GPTQ). The word layout is
    the GPTQ handoff's (``gptq_checkpoint.pack``), reused here; it refuses values outside
    ``0 .. 2**bits - 1`` (a ``ValueError``).
    """
    n = per_word(bits)
    size = values.shape[dim]
    if size % n:
        if not pad:
            raise ValueError(f"size {size} along dim {dim} is not a multiple of {n} ({bits}-bit values per int32)")
        values = torch.nn.functional.pad(values, (0, n - size % n) if dim in (1, -1) else (0, 0, 0, n - size % n))
    return gptq_checkpoint.pack(values.contiguous(), bits, dim)


def unpack_int32(words: torch.Tensor, bits: int, dim: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: the first ``count`` values along ``dim``, as int16."""
    per_word(bits)
    w = words if dim == 0 else words.t()
    v = gptq_checkpoint.unpack(w.contiguous(), bits)[:count]
    return (v if dim == 0 else v.t()).contiguous()


def awq_interleave(values: torch.Tensor) -> torch.Tensor:
    """Reorder columns (within each 8) so that natural 4-bit packing gives AutoAWQ's nibble order."""
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"AutoAWQ packs 8 output columns per int32; out_features {cols} is not a multiple of 8")
    return values.view(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols)


def awq_deinterleave(values: torch.Tensor) -> torch.Tensor:
    """Inverse of ``awq_interleave``."""
    rows, cols = values.shape
    return values.view(rows, cols // 8, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(rows, cols)
