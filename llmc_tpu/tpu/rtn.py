"""TPU-MLIR's weight round-to-nearest, reproduced bit for bit.

Re-derived from TPU-MLIR 1.30.2's A16MatMul lowering (see docs/tpu_mlir.md):
float32 math, ``round`` half away from zero, groups of ``group_size`` consecutive
input features of one output row, and scales stored as bf16 (W*BF16) or f16 (W*F16)
with round-to-nearest-even. The TPU multiplies with ``(q - z) * stored_scale``.

Grids:
- per group, asymmetric: ``s = max(max - min, 1e-5) / qmax``, ``z = clamp(-round(min / s), 0, qmax)``
- per group, symmetric (TPU-MLIR's ``--symmetric``): ``s = 2 * absmax / qmax``, ``z = 8`` (W4) or 128 (W8)
- per channel W4: asymmetric as above over the whole row
- per channel W8: ``s = absmax / 127`` with signed codes (``absmax / 255`` unsigned when every
  weight of the matrix is positive), ``z = 0``

``q = clamp(round(w / s) + z, lo, hi)`` in every case.

Which rows keep integer codes (``chips.quantized_out_features``): per group, the first
``N - N % NPU_NUM`` (the rest stay float, unchanged); per channel, all or none. A Linear
left with no integer rows is quantized all the same and folded back into a float weight
``storage((q - z) * stored_scale)`` (``TpuQuantizedWeight.folded``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llmc_tpu.tpu.chips import quantized_out_features

_SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_ASYM_SCALE_FLOOR = torch.tensor(1e-5, dtype=torch.float32)  # C++ (float)1e-5


@dataclass(frozen=True)
class TpuWeightFormat:
    """One TPU-MLIR weight format: what ``-q`` / ``-g`` / ``--symmetric`` / ``-c`` select."""

    bits: int = 4
    group_size: int = 64  # 0 means per channel (TPU-MLIR's q_group_size 0)
    symmetric: bool = False
    scale_dtype: str = "bfloat16"  # bfloat16 for W*BF16, float16 for W*F16
    chip: str = "bm1684x"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_channel(self) -> bool:
        return self.group_size == 0

    @property
    def llm_convert_quantize(self) -> str:
        """The ``llm_convert.py -q`` value (w4bf16, w8f16, ...)."""
        return f"w{self.bits}{'bf16' if self.scale_dtype == 'bfloat16' else 'f16'}"

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    @property
    def handoff_dtype(self) -> torch.dtype:
        """The dtype the float model is handed to TPU-MLIR in: llm_convert takes -q w*bf16 only from
        a bfloat16 config and -q w*f16 only from a float16 one. TPU-MLIR quantizes the weights as
        stored in that dtype, so that is what we quantize too."""
        return self.torch_scale_dtype


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``std::round``: ties go away from zero (``torch.round`` sends them to even).

    ``trunc(x) + trunc(2 (x - trunc(x)))``: the fraction ``x - trunc(x)`` and its double are exact in floating
    point, so this is exact for every finite value (no ``x + 0.5``, which rounds for some ``x`` below 1/2).
    """
    t = torch.trunc(x)
    return t + torch.trunc((x - t) * 2)


@dataclass
class TpuQuantizedWeight:
    """A Linear weight as TPU-MLIR lowers it.

    ``codes``/``scale``/``zero`` cover the first ``n_quantized`` output rows; the
    remaining rows (``float_rows``) stay in float, as the compiler leaves them.
    ``folded``: the compiler keeps no integer codes for this Linear but replaces its
    weight by ``storage((q - z) * stored_scale)`` in the activation dtype (bf16/f16);
    it does so when no row would keep codes (per group N < NPU_NUM, per channel
    N % NPU_NUM != 0).
    """

    fmt: TpuWeightFormat
    codes: torch.Tensor  # int16 [n_quantized, K]: unsigned codes, or signed for W8 per channel
    scale: torch.Tensor  # float32 [n_quantized, n_groups], the scale the codes were computed with
    zero: torch.Tensor  # int16 [n_quantized, n_groups]
    float_rows: torch.Tensor  # float32 [N - n_quantized, K]
    signed: bool = False  # W8 per-channel signed int8 codes
    folded: bool = False  # quantized, then folded back to a float weight by the compiler

    @property
    def n_quantized(self) -> int:
        return self.codes.shape[0]

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1] if self.n_quantized else 0

    def to(self, device: torch.device | str) -> TpuQuantizedWeight:
        """The same result with its tensors on ``device`` (dequantize there: the same values, elementwise fp32)."""
        return dataclasses.replace(self, codes=self.codes.to(device), scale=self.scale.to(device),
                                   zero=self.zero.to(device), float_rows=self.float_rows.to(device))

    @property
    def stored_scale(self) -> torch.Tensor:
        """The scale as the TPU stores it (bf16 or f16, round-to-nearest-even)."""
        return self.scale.to(self.fmt.torch_scale_dtype)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: exactly what the TPU multiplies with."""
        parts = []
        if self.n_quantized:
            n, k = self.codes.shape
            groups = self.scale.shape[1]
            s = self.stored_scale.float()[..., None]  # broadcast over each group's columns (no repeated copy)
            z = self.zero.float()[..., None]
            codes = self.codes
            if self.folded:
                # TPU-MLIR 1.30.2 folds the stored byte back as unsigned: a signed W8 code
                # -3 becomes 253 (a compiler bug; only W8 per channel has signed codes)
                codes = codes & 0xFF
            w = ((codes.float().view(n, groups, k // groups) - z) * s).view(n, k)
            if self.folded:
                w = w.to(self.fmt.torch_scale_dtype).float()
            parts.append(w)
        parts.append(self.float_rows)
        return torch.cat(parts, dim=0)


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if k % group_size:
        raise ValueError(
            f"in_features {k} is not a multiple of the group size {group_size} "
            "(TPU-MLIR asserts K % G == 0)"
        )
    return w.reshape(n, k // group_size, group_size)


def _div(x: torch.Tensor, d: float) -> torch.Tensor:
    """``x / d`` rounded as C++ does on every device: CUDA turns a division by a Python number into a
    multiplication by its reciprocal, one ulp off for about a third of the scales."""
    return x / torch.tensor(d, dtype=x.dtype, device=x.device)


def tpu_grid(w: torch.Tensor, fmt: TpuWeightFormat) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Scale and zero per (row, group) of a float32 ``[N, K]`` weight, and whether codes are signed."""
    w = w.float()
    qmax = fmt.qmax
    if fmt.per_channel and fmt.bits == 8:
        signed = not bool(w.min() > 0) if w.numel() else True
        absmax = w.abs().amax(dim=1, keepdim=True)
        scale = _div(absmax, 127.0 if signed else 255.0)
        return scale, torch.zeros_like(scale, dtype=torch.int16), signed
    groups = _group_view(w, w.shape[1] if fmt.per_channel else fmt.group_size)
    if fmt.symmetric and not fmt.per_channel:
        absmax = groups.abs().amax(dim=2)
        scale = _div(2 * absmax, qmax)
        zero = torch.full_like(scale, 1 << (fmt.bits - 1), dtype=torch.int16)
        return scale, zero, False
    mn = groups.amin(dim=2)
    mx = groups.amax(dim=2)
    scale = _div(torch.maximum(mx - mn, _ASYM_SCALE_FLOOR), qmax)
    zero = (-round_half_away(mn / scale)).clamp(0, qmax).to(torch.int16)
    return scale, zero, False


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: TpuWeightFormat, signed: bool = False
) -> torch.Tensor:
    """``clamp(round(w / s) + z)`` per group, int16 ``[N, K]``."""
    n, k = w.shape
    groups = scale.shape[1]
    # the same division per weight as with the scales repeated per column, broadcast instead of copied
    q = round_half_away(w.float().view(n, groups, k // groups) / scale[..., None]) + zero.float()[..., None]
    lo, hi = (-128, 127) if signed else (0, fmt.qmax)
    return q.clamp_(lo, hi).to(torch.int16).view(n, k)


def quantize_weight(w: torch.Tensor, fmt: TpuWeightFormat) -> TpuQuantizedWeight:
    """Quantize a ``[N, K]`` Linear weight exactly as TPU-MLIR will (give it the saved values)."""
    w = w.detach().float()
    n, k = w.shape
    n_q = quantized_out_features(n, fmt.bits, fmt.chip, fmt.per_channel)
    folded = n_q == 0 and n > 0
    if folded:
        n_q = n
    wq, rest = w[:n_q], w[n_q:]
    if n_q:
        scale, zero, signed = tpu_grid(wq, fmt)
        codes = quantize_codes(wq, scale, zero, fmt, signed)
    else:
        n_groups = 1 if fmt.per_channel else k // fmt.group_size
        scale = w.new_zeros(0, n_groups)
        zero = torch.zeros(0, n_groups, dtype=torch.int16)
        codes = torch.zeros(0, k, dtype=torch.int16)
        signed = False
    return TpuQuantizedWeight(fmt, codes, scale, zero, rest.clone(), signed, folded)


def fake_quantize(w: torch.Tensor, fmt: TpuWeightFormat) -> torch.Tensor:
    """The weight the TPU computes with, float32 ``[N, K]``."""
    return quantize_weight(w, fmt).dequantize()
