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
(GPTQ's lazy updates). Rows do not interact, so each chunk of rows is refined on its own: a process that holds
some whole chunks gets those rows of the one-process result bit for bit.
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
    each column's weights to the grid point nearest to their best value, update the block's ``e``, record the moves."""
    diag = h.diagonal()
    for j in range(what.shape[1]):
        target = what[:, j] + e[:, j] / diag[j]
        x = target / d[:, j]
        code = (round_half_away(x) + z[:, j]).clamp_(0, qmax)
        code = torch.where(d[:, j] > 0, code, q[:, j])  # a zero scale has one grid point: keep it
        new = (code - z[:, j]) * d[:, j]
        moved = new - what[:, j]
        e.addcmul_(moved[:, None], h[j:j + 1], value=-1)
        delta[:, j] = moved
        what[:, j] = new
        q[:, j] = code


def _refine_rows(w: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, deq: torch.Tensor, h: torch.Tensor,
                 sweeps: int, blocksize: int, qmax: int) -> torch.Tensor:
    """The refined codes (float32) of some rows; ``zero`` / ``deq`` per column."""
    q = codes.float()
    what = (q - zero) * deq
    e = (w - what) @ h
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
            e.sub_(delta @ hb)
    return q


@torch.no_grad()
def refine_codes(result: GptqResult, w: torch.Tensor, hessian: torch.Tensor, sweeps: int, blocksize: int = 128,
                 row_chunks: Sequence[int] | None = None) -> GptqResult:
    """``result`` (``gptq_quantize`` of ``w`` ``[N, K]`` with ``hessian``) after ``sweeps`` sweeps of coordinate
    descent on its codes, with the damping the solve used; scales and zeros unchanged.

    ``row_chunks``: as in ``gptq_quantize`` (each chunk of rows is refined on its own)."""
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
    codes = torch.empty_like(result.codes)
    for rows in bounds:
        refined = _refine_rows(W[rows], result.codes[rows], zero[rows], deq[rows], H, sweeps, blocksize, result.fmt.qmax)
        codes[rows] = refined.to(codes.dtype)
    return dataclasses.replace(result, codes=codes)
