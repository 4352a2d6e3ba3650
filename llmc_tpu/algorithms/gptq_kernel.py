"""GPTQ's column loop as one Triton kernel per block of columns (CUDA only; ``algorithms.gptq`` falls back without it).

The loop quantizes one column at a time and spreads its error over the later columns of the block:
done with PyTorch operations that is about a dozen tiny kernels per column, and a 7B model has
750 000 columns. Rows are independent, so here each program holds a tile of rows of the block
(weights, codes, errors) in registers and runs every column of the range over it. The arithmetic
is ``gptq._columns``' step for step, with the same roundings: IEEE division (``div_rn``), the
rounding half away from zero as ``rtn.round_half_away`` computes it, and no fused multiply-adds
(PyTorch's ``addcmul_`` rounds the product before it subtracts it).
The benchmark ``benchmarks/gptq_solver.py`` counts the codes on which the two paths differ.

``run_sweep`` does the same for a block of ``gptq_refine``'s coordinate descent: each program holds a tile of rows
of the block's error products and runs every column over it, with ``gptq_refine._column_steps``' arithmetic.
"""

from __future__ import annotations

import functools

import torch

from llmc_tpu.engine.triton_import import libdevice, tl, triton

ROWS_PER_PROGRAM = 32

if triton is not None:

    @triton.jit
    def _columns_kernel(w_ptr, q_ptr, err_ptr, s_ptr, z_ptr, d_ptr, hinv_ptr, n_rows, width, a, b, qmax,
                        WIDTH: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, WIDTH)
        live = rows < n_rows
        tile = rows[:, None] * width + cols[None, :]
        inside = live[:, None] & (cols[None, :] < width)
        w = tl.load(w_ptr + tile, mask=inside, other=0.0)
        q_tile = tl.load(q_ptr + tile, mask=inside, other=0.0)
        err_tile = tl.load(err_ptr + tile, mask=inside, other=0.0)
        for jj in range(a, b):
            here = cols[None, :] == jj
            wj = tl.sum(tl.where(here, w, 0.0), axis=1)
            at = rows * width + jj
            s = tl.load(s_ptr + at, mask=live, other=1.0)
            z = tl.load(z_ptr + at, mask=live, other=0.0)
            d = tl.load(d_ptr + at, mask=live, other=0.0)
            x = libdevice.div_rn(wj, s)
            t = libdevice.trunc(x)
            q = tl.minimum(tl.maximum(t + libdevice.trunc((x - t) * 2.0) + z, 0.0), qmax)
            err = libdevice.div_rn(wj - (q - z) * d, tl.load(hinv_ptr + jj * width + jj))
            h_row = tl.load(hinv_ptr + jj * width + cols, mask=(cols >= jj) & (cols < width), other=0.0)
            w = tl.where(cols[None, :] >= jj, w - err[:, None] * h_row[None, :], w)
            q_tile = tl.where(here, q[:, None], q_tile)
            err_tile = tl.where(here, err[:, None], err_tile)
        tl.store(w_ptr + tile, w, mask=inside)
        tl.store(q_ptr + tile, q_tile, mask=inside)
        tl.store(err_ptr + tile, err_tile, mask=inside)


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` (a CUDA device and a Triton that compiles for it)."""
    return triton is not None and device.type == "cuda"


def run_columns(W: torch.Tensor, Q: torch.Tensor, Err: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, D: torch.Tensor,
                Hinv: torch.Tensor, a: int, b: int, qmax: int) -> None:
    """``gptq._columns`` on the block's buffers (float32, contiguous, ``[n, width]`` and ``Hinv`` ``[width, width]``)."""
    n, width = W.shape
    for t in (W, Q, Err, S, Z, D, Hinv):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("the column kernel takes contiguous float32 buffers")
    grid = (triton.cdiv(n, ROWS_PER_PROGRAM),)
    _columns_kernel[grid](W, Q, Err, S, Z, D, Hinv, n, width, a, b, float(qmax),
                          WIDTH=triton.next_power_of_2(width), ROWS=ROWS_PER_PROGRAM,
                          enable_fp_fusion=False)  # every product rounded on its own, as PyTorch's kernels do


if triton is not None:

    @triton.jit
    def _sweep_kernel(what_ptr, e_ptr, q_ptr, delta_ptr, z_ptr, d_ptr, h_ptr, n_rows, width, qmax,
                      WIDTH: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, WIDTH)
        live = rows < n_rows
        tile = rows[:, None] * width + cols[None, :]
        inside = live[:, None] & (cols[None, :] < width)
        e = tl.load(e_ptr + tile, mask=inside, other=0.0)
        delta = tl.zeros([ROWS, WIDTH], dtype=tl.float32)
        for j in range(0, width):
            here = cols[None, :] == j
            ej = tl.sum(tl.where(here, e, 0.0), axis=1)
            at = rows * width + j
            wh = tl.load(what_ptr + at, mask=live, other=0.0)
            q_old = tl.load(q_ptr + at, mask=live, other=0.0)
            z = tl.load(z_ptr + at, mask=live, other=0.0)
            d = tl.load(d_ptr + at, mask=live, other=0.0)
            target = wh + libdevice.div_rn(ej, tl.load(h_ptr + j * width + j))
            x = libdevice.div_rn(target, d)
            t = libdevice.trunc(x)
            q = tl.minimum(tl.maximum(t + libdevice.trunc((x - t) * 2.0) + z, 0.0), qmax)
            q = tl.where(d > 0, q, q_old)
            new = (q - z) * d
            moved = new - wh
            h_row = tl.load(h_ptr + j * width + cols, mask=cols < width, other=0.0)
            e = e - moved[:, None] * h_row[None, :]
            delta = tl.where(here, moved[:, None], delta)
            tl.store(what_ptr + at, new, mask=live)
            tl.store(q_ptr + at, q, mask=live)
        tl.store(delta_ptr + tile, delta, mask=inside)


def run_sweep(what: torch.Tensor, e: torch.Tensor, q: torch.Tensor, delta: torch.Tensor, z: torch.Tensor,
              d: torch.Tensor, h: torch.Tensor, qmax: int) -> None:
    """``gptq_refine._column_steps`` on one block's buffers (float32, contiguous, ``[n, width]``, ``h`` ``[width, width]``)."""
    n, width = what.shape
    for t in (what, e, q, delta, z, d, h):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("the sweep kernel takes contiguous float32 buffers")
    grid = (triton.cdiv(n, ROWS_PER_PROGRAM),)
    _sweep_kernel[grid](what, e, q, delta, z, d, h, n, width, float(qmax), WIDTH=triton.next_power_of_2(width),
                        ROWS=ROWS_PER_PROGRAM, enable_fp_fusion=False)
