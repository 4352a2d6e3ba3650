"""Coordinate descent on GPTQ's codes, its grid fixed: the codes of a natural-order solve made to fit the outputs again.

GPTQ rounds each column once and spreads its error over the columns not yet rounded. A column rounded late has
few columns left to take its error, and in natural order the strongest input channels (those act-order rounds
first) often come late. Cyclic coordinate descent (as in QuantEase, Behdin et al. 2023) visits every column
again with all the others fixed. For column ``j`` of a row, the output error ``(w - w_hat) H (w - w_hat)^T`` is
a quadratic in ``w_hat_j`` alone, smallest at ``w_hat_j + e_j / H_jj`` with ``e = (w - w_hat) H``; the grid point
nearest to it is the best code for that column. So no step raises the error. The groups' scales and zeros stay as
GPTQ chose them, so the result is a GPTQ checkpoint exactly as before, only with other codes.

A sweep goes through the columns in natural order, a block at a time: inside a block every step updates the
block's columns of ``e``; the other columns are brought up to date once per block with one matrix product
(GPTQ's lazy updates). Rows do not interact: the products go one chunk of rows at a time, as in GPTQ's solve,
and the rest is row by row, so a process that holds some whole chunks gets those rows of the one-process result
bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from llmc_tpu.algorithms import gptq_kernel
from llmc_tpu.algorithms.gptq import GptqResult, row_chunk_bounds
from llmc_tpu.engine.distributed import parts_sizes
from llmc_tpu.tpu.rtn import round_half_away

# quant.special.refine_sweeps left out: sweeps after a natural-order solve, none after act-order. On SmolLM2-135M
# three sweeps took natural order from 71.8 / 61.7 % of the RTN-to-float gap to 75.0 / 68.2 % (three calibration
# seeds); after act-order they gave 76.5 / 72.0 % against its 77.2 / 72.8 % (docs/gptq.md)
NATURAL_ORDER_SWEEPS = 3


def default_sweeps(actorder: bool) -> int:
    return 0 if actorder else NATURAL_ORDER_SWEEPS


def _column_steps(what: torch.Tensor, e: torch.Tensor, q: torch.Tensor, delta: torch.Tensor, z: torch.Tensor,
                  d: torch.Tensor, h: torch.Tensor, qmax: int) -> None:
    """Every column of one block, in order (float32 ``[n, B]`` buffers, ``h`` the block's ``[B, B]`` of H): move
    each column's weights to the grid point nearest to their best value, update the block's ``e``, record the moves.
    Worked on transposed copies, where a column is one contiguous row (the same arithmetic, element for element)."""
    wt, et, qt, zt, dt = (t.t().contiguous() for t in (what, e, q, z, d))
    moves = torch.empty_like(wt)
    zero_scales = bool((dt <= 0).any())  # a zero scale has one grid point: its weights keep their code
    diag = h.diagonal()
    for j in range(wt.shape[0]):
        target = wt[j] + et[j] / diag[j]
        code = (round_half_away(target / dt[j]) + zt[j]).clamp_(0, qmax)
        if zero_scales:
            code = torch.where(dt[j] > 0, code, qt[j])
        new = (code - zt[j]) * dt[j]
        torch.sub(new, wt[j], out=moves[j])
        et.addcmul_(h[j][:, None], moves[j][None, :], value=-1)
        wt[j] = new
        qt[j] = code
    what.copy_(wt.t())
    q.copy_(qt.t())
    delta.copy_(moves.t())


def _refine_rows(w: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, deq: torch.Tensor, h: torch.Tensor,
                 sweeps: int, blocksize: int, qmax: int, bounds: list[slice]) -> torch.Tensor:
    """The refined codes (float32); ``zero`` / ``deq`` per column. The matrix products go one chunk of rows at a
    time (``bounds``), the column steps are elementwise per row: a row's result does not depend on the others."""
    q = codes.float()
    what = (q - zero) * deq
    e = torch.empty_like(w)
    for r in bounds:
        e[r] = (w[r] - what[r]) @ h
    k = w.shape[1]
    use_kernel = gptq_kernel.available(w.device)
    for _ in range(sweeps):
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            block = slice(i1, i2)
            hb = h[block].contiguous()
            parts = [t[:, block].clone(memory_format=torch.contiguous_format) for t in (what, e, q, zero, deq)]
            delta = torch.zeros_like(parts[0])
            if use_kernel:
                gptq_kernel.run_sweep(*parts[:3], delta, *parts[3:], hb[:, block].contiguous(), qmax)
            else:
                _column_steps(*parts[:3], delta, *parts[3:], hb[:, block], qmax)
            what[:, block], q[:, block] = parts[0], parts[2]
            for r in bounds:
                e[r].sub_(delta[r] @ hb)
    return q


@torch.no_grad()
def refine_codes(result: GptqResult, w: torch.Tensor, hessian: torch.Tensor, sweeps: int, blocksize: int = 128,
                 row_chunks: Sequence[int] | None = None) -> GptqResult:
    """``result`` (``gptq_quantize`` of ``w`` ``[N, K]`` with ``hessian``) after ``sweeps`` sweeps of coordinate
    descent on its codes, with the damping the solve used; scales and zeros unchanged.

    ``row_chunks``: as in ``gptq_quantize`` (the sizes of the row chunks the matrix products take one at a time; the
    rest is row by row, so a call on some whole chunks gives those rows of the call on all of them, bit for bit)."""
    if sweeps <= 0:
        return result
    W = w.detach().float().to(result.codes.device)
    n, k = W.shape
    if result.codes.shape != (n, k):
        raise ValueError(f"the codes {tuple(result.codes.shape)} are not those of a {n} x {k} weight")
    bounds = row_chunk_bounds(parts_sizes(n) if row_chunks is None else list(row_chunks), n)
    g = k // result.scale.shape[1]
    H = hessian.detach().to(W.device, torch.float32, copy=True)
    diag = H.diagonal()
    diag[diag == 0] = 1  # dead columns, as the solve treats them: their weights stay as close to w as the grid allows
    diag.add_(result.percdamp * float(diag.mean()))
    deq = result.scale.to(result.fmt.torch_scale_dtype).float().repeat_interleave(g, dim=1)
    zero = result.zero.float().repeat_interleave(g, dim=1)
    refined = _refine_rows(W, result.codes, zero, deq, H, sweeps, blocksize, result.fmt.qmax, bounds)
    return dataclasses.replace(result, codes=refined.to(result.codes.dtype))
