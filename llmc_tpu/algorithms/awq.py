"""AWQ's searches, scored with whatever quantizer the caller passes (for us: TPU-MLIR's exact RTN).

- Scale search: per input channel ``s = x_mean**r`` (v2) or ``x_mean**r / w_mean**(1-r)`` (v1)
  over ``n_grid`` ratios ``r = i / n_grid``, normalized by ``sqrt(max(s) * min(s))``; the caller's
  loss function scores each candidate; the smallest total loss wins.
- Clip search: per (output row, group) shrink factors ``1 - i / n_grid`` for ``i < max_shrink * n_grid``;
  the error of a group is ``d^T H_g d`` with ``d = Q(W_clipped) - W`` and ``H_g`` the Gram matrix of
  the group's inputs summed over every calibration token (exactly the sum over tokens of
  ``(x_g . d)^2``, without materializing per-token products).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # float weight [N, K] -> the weight the hardware computes with
Loss = float | torch.Tensor  # a Python float, or a one-element tensor not read yet


def activation_abs_sums(xs: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of |x| per input channel, one row per sequence (``[..., seq, K]`` inputs; a 2-D input, e.g. an MoE
    expert's routed rows, is one row), and the number of tokens: ``rows.sum(0) / tokens`` is the mean |x|."""
    rows, tokens = [], 0
    for x in xs:
        xf = x.float().abs()
        rows.append(xf.sum(dim=-2).reshape(-1, x.shape[-1]) if x.dim() >= 3 else xf.sum(dim=0, keepdim=True))
        tokens += x.numel() // x.shape[-1]
    return torch.cat(rows), tokens


def activation_mean(xs: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean |x| per input channel over every token of every batch (float32)."""
    rows, tokens = activation_abs_sums(xs)
    return rows.sum(dim=0) / tokens


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| normalized by its group's max |W|, per input channel."""
    w = torch.cat([wi.float() for wi in weights], dim=0)
    n, k = w.shape
    g = group_size if group_size > 0 else k
    wg = w.abs().view(n, k // g, g)
    wg = wg / wg.amax(dim=2, keepdim=True).clamp(min=1e-12)
    return wg.view(n, k).mean(dim=0)


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, version: str) -> torch.Tensor:
    if version == "v1":
        s = x_mean.pow(ratio).clamp(min=1e-4) / w_mean.pow(1 - ratio).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    scale: torch.Tensor
    ratio: float
    loss: float
    loss_identity: float  # the loss with s = 1 (plain RTN of this subset)
    losses: list[float]


def search_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, loss_fn: Callable[[torch.Tensor], Loss],
                 n_grid: int = 20, version: str = "v2") -> ScaleSearch:
    """Try every ratio, keep the scale with the smallest loss (ties keep the smaller ratio).

    ``loss_fn`` may return its loss as a one-element tensor on the device: every candidate is then queued before
    any loss is read, so the device never waits for the host between candidates (one read at the end).
    """
    scales = [candidate_scale(x_mean, w_mean, i / n_grid, version) for i in range(n_grid)]
    identity_scale = torch.ones_like(x_mean)
    *losses, identity = read_losses([loss_fn(s) for s in [*scales, identity_scale]])
    best = min(range(n_grid), key=lambda i: (losses[i], i))
    if identity <= losses[best]:  # v1's grid does not contain s = 1; never do worse than RTN on the calibration loss
        return ScaleSearch(identity_scale, float("nan"), identity, identity, losses)
    return ScaleSearch(scales[best], best / n_grid, losses[best], identity, losses)


def read_losses(losses: list[Loss]) -> list[float]:
    """Python floats of losses given as floats or one-element tensors, the tensors read in one transfer."""
    tensors = [v.reshape(()) for v in losses if isinstance(v, torch.Tensor)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in losses]


def _exact_products(x: torch.Tensor) -> bool:
    """Whether products of ``x`` with itself may run in bf16/f16 with float32 results: on CUDA, where such a product
    of two bf16/f16 values is exact in float32 and the sums are float32 (as for float32 inputs, in another order)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_t x_t^T`` over every row of ``x`` (``[..., K]``), float32, in one matrix product."""
    rows = x.reshape(-1, x.shape[-1])
    if _exact_products(rows):
        return torch.mm(rows.T, rows, out_dtype=torch.float32)
    rows = rows.float()
    return rows.T @ rows


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group Gram matrices ``[G, g, g]`` (float32) over every row of ``x`` (``[..., K]``), in one batched product:
    group ``j`` of ``K / g`` takes input channels ``j*g .. (j+1)*g``."""
    k = x.shape[-1]
    g = group_size if group_size > 0 else k
    groups = x.reshape(-1, k // g, g).transpose(0, 1)  # [G, rows, g]
    if _exact_products(groups):
        return torch.bmm(groups.transpose(1, 2), groups, out_dtype=torch.float32)
    groups = groups.float()
    return torch.bmm(groups.transpose(1, 2), groups)


@dataclass
class ClipSearch:
    lo: torch.Tensor  # [N, G] lower clamp per group
    hi: torch.Tensor  # [N, G] upper clamp per group
    factor: torch.Tensor  # [N, G] chosen shrink factor
    err_before: float
    err_after: float


CLIP_CHUNK_ELEMENTS = 1 << 26  # weight elements scored at once by the clip search (256 MB per float32 temporary)


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, quantize: Quantizer, symmetric: bool,
                n_grid: int = 20, max_shrink: float = 0.5, row_chunk: int | None = None) -> ClipSearch:
    """Per (row, group) shrink factor minimizing the output error of ``quantize(clamp(W))``; ``row_chunk`` rows
    scored at a time (default: as many as make ``CLIP_CHUNK_ELEMENTS``)."""
    n, k = w.shape
    row_chunk = row_chunk or max(1, CLIP_CHUNK_ELEMENTS // k)
    n_groups, g, _ = gram.shape
    wf = w.float()
    wg = wf.view(n, n_groups, g)
    if symmetric:
        hi0 = wg.abs().amax(dim=2)
        lo0 = -hi0
    else:
        hi0, lo0 = wg.amax(dim=2), wg.amin(dim=2)
    best_err = torch.full((n, n_groups), float("inf"), device=w.device)
    best_f = torch.ones(n, n_groups, device=w.device)
    err_before = None
    for i in range(int(max_shrink * n_grid)):
        f = 1 - i / n_grid
        lo, hi = lo0 * f, hi0 * f
        clipped = torch.maximum(torch.minimum(wg, hi.unsqueeze(2)), lo.unsqueeze(2)).view(n, k)
        diff = quantize(clipped) - wf  # the whole matrix: TPU-MLIR's NPU rule depends on the row count
        err = torch.empty(n, n_groups, device=w.device)
        for r in range(0, n, row_chunk):
            d = diff[r:r + row_chunk].view(-1, n_groups, g).transpose(0, 1)  # [G, rows, g]
            err[r:r + row_chunk] = (torch.bmm(d, gram) * d).sum(dim=2).T  # d^T H_g d per (row, group)
        if err_before is None:
            err_before = err.sum()  # read at the end with the result: no wait for the device in between
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    before, after = read_losses([err_before, best_err.sum()])
    return ClipSearch(lo0 * best_f, hi0 * best_f, best_f, before, after)


def apply_clip(w: torch.Tensor, clip: ClipSearch) -> torch.Tensor:
    n, k = w.shape
    n_groups = clip.lo.shape[1]
    wg = w.view(n, n_groups, k // n_groups)
    out = torch.maximum(torch.minimum(wg, clip.hi.unsqueeze(2).to(w.dtype)), clip.lo.unsqueeze(2).to(w.dtype))
    return out.view(n, k)
