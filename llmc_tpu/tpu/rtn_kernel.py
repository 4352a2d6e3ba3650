"""TPU-MLIR's RTN of a (scaled) weight in one pass over it (a Triton kernel, CUDA only).

AWQ scores every candidate scale ``s`` by the weight the TPU would compute with,
``fake_quantize(w * s as handed over) / s``. Done with PyTorch operations that is about twenty
passes over the weight in float32 (the grid, the codes, their int16 copy, the dequantized
weight, the division by ``s``), and on a 7B block it cost as much as a quarter of the search.
AWQ's clip search quantizes every clamped candidate the same way. Here one program holds a tile of
whole groups in registers and writes the result once.

The arithmetic is ``rtn``'s step for step, with its roundings: IEEE division (``div_rn``),
rounding half away from zero as ``rtn.round_half_away`` computes it, the handoff and stored-scale
dtype conversions round to nearest even, and no fused multiply-adds. ``tests/test_tpu_rtn.py``
(CUDA only) checks the bits against the PyTorch path, which is what runs elsewhere.
"""

from __future__ import annotations

import torch

from llmc_tpu.engine.triton_import import libdevice, tl, triton
from llmc_tpu.tpu.chips import quantized_out_features
from llmc_tpu.tpu.rtn import _ASYM_SCALE_FLOOR, TpuWeightFormat, fake_quantize

GROUPS_PER_PROGRAM = 32

if triton is not None:

    @triton.jit
    def _round_half_away(x):
        t = libdevice.trunc(x)
        return t + libdevice.trunc((x - t) * 2.0)

    @triton.jit
    def _scaled_rtn_kernel(w_ptr, s_ptr, out_ptr, n_groups_total, groups_per_row, quantized_groups, qmax, floor, zero_sym,
                           GS: tl.constexpr, GROUPS: tl.constexpr, SYMMETRIC: tl.constexpr, HANDOFF: tl.constexpr,
                           SCALED: tl.constexpr):
        g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)  # one (row, group) pair per line of the tile
        c = tl.arange(0, GS)
        live = g < n_groups_total
        offs = g[:, None] * GS + c[None, :]
        w = tl.load(w_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
        if SCALED:
            s = tl.load(s_ptr + (g % groups_per_row)[:, None] * GS + c[None, :], mask=live[:, None], other=1.0)
            w = w * s
        x = w.to(HANDOFF).to(tl.float32)  # the weight as handed over
        if SYMMETRIC:
            scale = libdevice.div_rn(2.0 * tl.max(tl.abs(x), axis=1), qmax)
            zero = tl.zeros_like(scale) + zero_sym
        else:
            scale = libdevice.div_rn(tl.maximum(tl.max(x, axis=1) - tl.min(x, axis=1), floor), qmax)
            zero = tl.minimum(tl.maximum(-_round_half_away(libdevice.div_rn(tl.min(x, axis=1), scale)), 0.0), qmax)
            zero = zero + 0.0  # -0.0 as +0.0, as the int16 zero point PyTorch keeps
        q = _round_half_away(libdevice.div_rn(x, scale[:, None])) + zero[:, None]
        q = tl.minimum(tl.maximum(q, 0.0), qmax)
        stored = scale.to(HANDOFF).to(tl.float32)
        deq = tl.where((g < quantized_groups)[:, None], (q - zero[:, None]) * stored[:, None], x)
        if SCALED:
            deq = libdevice.div_rn(deq, s)
        tl.store(out_ptr + offs, deq.to(out_ptr.dtype.element_ty), mask=live[:, None])

    _TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _kernel_takes(w: torch.Tensor, fmt: TpuWeightFormat) -> bool:
    gs = fmt.group_size
    return (triton is not None and w.device.type == "cuda" and w.dim() == 2 and w.is_contiguous()
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16) and not fmt.per_channel
            and gs & (gs - 1) == 0 and w.shape[1] % gs == 0
            and quantized_out_features(w.shape[0], fmt.bits, fmt.chip, False) > 0)


@torch.no_grad()
def handed_over_fake_quantize(w: torch.Tensor, fmt: TpuWeightFormat, use_kernel: bool = True) -> torch.Tensor:
    """``fake_quantize(w as handed over, fmt)``, float32: the weight the TPU computes with for ``w`` once it is saved
    in the handoff dtype (bf16 or f16). The kernel where it applies (``use_kernel=False``: the PyTorch operations)."""
    if use_kernel and _kernel_takes(w, fmt):
        return _run_kernel(w, None, fmt, torch.float32)
    return fake_quantize(w.to(fmt.handoff_dtype).float(), fmt)


@torch.no_grad()
def scaled_fake_quantize(w: torch.Tensor, s: torch.Tensor, fmt: TpuWeightFormat, use_kernel: bool = True,
                         ) -> torch.Tensor:
    """``fake_quantize(w * s as handed over, fmt) / s`` in ``w``'s dtype: the weight the TPU computes with once the
    scale ``s`` (one per input channel, float32) is folded into the layer and ``1/s`` into the op before it.
    The kernel where it applies (``use_kernel=False``: the PyTorch operations, as on the CPU)."""
    s = s.float().reshape(-1)
    if use_kernel and _kernel_takes(w, fmt) and s.numel() == w.shape[1]:
        return _run_kernel(w, s.contiguous(), fmt, w.dtype)
    return (fake_quantize((w.float() * s).to(fmt.handoff_dtype).float(), fmt) / s).to(w.dtype)


def _run_kernel(w: torch.Tensor, s: torch.Tensor | None, fmt: TpuWeightFormat, out_dtype: torch.dtype) -> torch.Tensor:
    n, k = w.shape
    gs = fmt.group_size
    groups_per_row = k // gs
    n_q = quantized_out_features(n, fmt.bits, fmt.chip, False)
    out = torch.empty(n, k, dtype=out_dtype, device=w.device)
    total = n * groups_per_row
    grid = (triton.cdiv(total, GROUPS_PER_PROGRAM),)
    _scaled_rtn_kernel[grid](w, w if s is None else s, out, total, groups_per_row, n_q * groups_per_row,
                             float(fmt.qmax), float(_ASYM_SCALE_FLOOR), float(1 << (fmt.bits - 1)), GS=gs,
                             GROUPS=GROUPS_PER_PROGRAM, SYMMETRIC=fmt.symmetric, HANDOFF=_TL_DTYPES[fmt.handoff_dtype], SCALED=s is not None,
                             enable_fp_fusion=False)  # every product rounded on its own, as PyTorch's kernels do
    return out
