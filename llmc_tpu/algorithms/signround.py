"""SignRound on TPU-MLIR's grid: learned rounding and min/max shrink, tensors in, integer codes out.

In the spirit of SignRound / AutoRound (Cheng et al. 2023): each weight ``w [N, K]`` gets a rounding
offset ``v`` in ``[-0.5, 0.5]`` (same shape), each (row, group) a shrink factor for its minimum
(``alpha``) and maximum (``beta``) in ``[0.5, 1]``; a method trains them with signed gradient descent
through the straight-through estimator. This module holds the grid and the fake-quantizer; the
training loop over a decoder block is ``llmc_tpu.methods.signround``.

The grid is TPU-MLIR's (``rtn.tpu_grid``: fp32 math, ``round`` half away from zero) computed from the
shrunk ``alpha * min`` and ``beta * max``, made writable as a GPTQ checkpoint exactly as
``gptq.handoff_grid`` does (no zero point 0: such groups get ``z = 1`` and ``s = max(max / (qmax - 1), s)``;
scales that survive fp16 storage), and the codes are ``clamp(round(w / s + v) + z, 0, qmax)`` with the
fp32 ``s``. With ``v = 0``, ``alpha = beta = 1`` that is ``handoff_grid`` + ``quantize_codes``: TPU-MLIR's RTN.

- asymmetric per group, and per channel W4: ``s = max(beta max - alpha min, 1e-5) / qmax``,
  ``z = clamp(-round(alpha min / s), 0, qmax)``
- symmetric per group: ``s = 2 beta absmax / qmax``, ``z = 2^(bits-1)``; ``alpha`` is not used
- W8 per channel (signed codes, zero 0): refused (``ValueError``)

``fake_quantize`` computes in its forward pass exactly what ``final_result(...).dequantize()`` gives
(the TPU's ``(q - z) * stored_scale``); rounding, the zero point and the scale's cast to its stored dtype
pass gradients straight through.
"""

from __future__ import annotations

import torch

from llmc_tpu.algorithms.gptq import GptqResult, storable_scale
from llmc_tpu.tpu.rtn import TpuWeightFormat, round_half_away

V_RANGE = (-0.5, 0.5)
SHRINK_RANGE = (0.5, 1.0)
_ASYM_SCALE_FLOOR = 1e-5  # TPU-MLIR's (float)1e-5


def check_format(fmt: TpuWeightFormat) -> None:
    """Raise ``ValueError`` for the formats SignRound cannot produce."""
    if fmt.per_channel and fmt.bits == 8:
        raise ValueError("SignRound does not support W8 per channel: TPU-MLIR's W8 per-channel grid is signed "
                         "(absmax / 127, zero 0) and has no min/max to tune; use a group size (e.g. 64) or GPTQ/RTN")


def group_size(fmt: TpuWeightFormat, k: int) -> int:
    """Input features per group of a weight with ``k`` input features (``k`` per channel)."""
    g = k if fmt.per_channel else fmt.group_size
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of the group size {g} (TPU-MLIR asserts K % G == 0)")
    return g


def _symmetric(fmt: TpuWeightFormat) -> bool:
    return fmt.symmetric and not fmt.per_channel  # TPU-MLIR's per-channel W4 is asymmetric whatever --symmetric says


def init_params(w: torch.Tensor, fmt: TpuWeightFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The starting point (TPU-MLIR's RTN): ``v = 0`` ``[N, K]``, ``alpha = beta = 1`` ``[N, n_groups]``, float32."""
    check_format(fmt)
    n, k = w.shape
    n_groups = k // group_size(fmt, k)
    v = torch.zeros(n, k, dtype=torch.float32, device=w.device)
    ones = torch.ones(n, n_groups, dtype=torch.float32, device=w.device)
    return v, ones, ones.clone()


def clamp_params(v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> None:
    """Clamp the parameters in place to their ranges."""
    v.clamp_(*V_RANGE)
    alpha.clamp_(*SHRINK_RANGE)
    beta.clamp_(*SHRINK_RANGE)


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass (bit for bit), the identity's gradient to ``x`` in the backward pass."""
    return value.detach() + (x - x.detach())


def _stored(scale: torch.Tensor, fmt: TpuWeightFormat) -> torch.Tensor:
    """``storable_scale`` without its checks (float32)."""
    stored = scale.to(fmt.torch_scale_dtype)
    if fmt.scale_dtype == "bfloat16":
        stored = stored.to(torch.float16).to(torch.bfloat16)
    return stored.float()


def _grid(groups: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, fmt: TpuWeightFormat, exact: bool,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (row, group) of ``groups [N, G, g]``: the fp32 scale the codes are computed with, the zero point
    (float), the scale the TPU multiplies with, and which groups were moved off zero point 0.

    ``exact``: the final grid (``storable_scale``'s checks, no graph); else differentiable (STE)."""
    qmax = fmt.qmax
    qmax_t = torch.tensor(float(qmax), device=groups.device)
    if _symmetric(fmt):
        absmax = beta * groups.abs().amax(dim=2)
        scale = 2 * absmax / qmax_t
        zero = torch.full_like(scale, float(1 << (fmt.bits - 1)))
        no_zero = torch.zeros_like(scale, dtype=torch.bool)
    else:
        mn = alpha * groups.amin(dim=2)
        mx = beta * groups.amax(dim=2)
        scale = torch.maximum(mx - mn, torch.tensor(_ASYM_SCALE_FLOOR, device=groups.device)) / qmax_t
        ratio = mn / scale
        r = round_half_away(ratio.detach())
        zero = -(r if exact else _ste(ratio, r))
        zero = zero.clamp(0, qmax)
        no_zero = zero.detach() == 0
        fixed = torch.maximum(mx / torch.tensor(qmax - 1.0, device=mx.device), scale)
        scale = torch.where(no_zero, fixed, scale)
        zero = torch.where(no_zero, torch.ones_like(zero), zero)
    if exact:
        eff = storable_scale(scale, fmt)
    else:
        eff = _ste(scale, _stored(scale.detach(), fmt))
    keep = scale.detach().to(fmt.torch_scale_dtype).float() == eff.detach()
    scale = torch.where(keep, scale, eff)
    return scale, zero, eff, no_zero


def _groups(w: torch.Tensor, fmt: TpuWeightFormat) -> torch.Tensor:
    check_format(fmt)
    n, k = w.shape
    g = group_size(fmt, k)
    return w.float().reshape(n, k // g, g)


def fake_quantize(w: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, fmt: TpuWeightFormat,
                  folded: bool = False) -> torch.Tensor:
    """float32 ``[N, K]``: what the TPU multiplies with, differentiable in ``v``, ``alpha``, ``beta``.

    ``w`` is the float weight as handed to TPU-MLIR (no gradient). ``folded``: the Linear is folded back to a
    float weight in the scale dtype (``TpuQuantizedWeight.folded``), applied with a straight-through cast."""
    groups = _groups(w.detach(), fmt)
    n, n_groups, g = groups.shape
    scale, zero, eff, _ = _grid(groups, alpha, beta, fmt, exact=False)
    scale = torch.where(scale.detach() > 0, scale, torch.ones_like(scale))  # an all-zero symmetric group: 0 / 0
    x = groups / scale.unsqueeze(2) + v.reshape(n, n_groups, g)
    q = (_ste(x, round_half_away(x.detach())) + zero.unsqueeze(2)).clamp(0, fmt.qmax)
    out = ((q - zero.unsqueeze(2)) * eff.unsqueeze(2)).reshape(n, n_groups * g)
    if folded:
        out = _ste(out, out.detach().to(fmt.torch_scale_dtype).float())
    return out


@torch.no_grad()
def final_result(w: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                 fmt: TpuWeightFormat) -> GptqResult:
    """The integer result for ``w [N, K]`` with the learned parameters, writable as a GPTQ checkpoint.

    Codes ``clamp(round_half_away(w / s + v) + z, 0, qmax)`` with the fp32 scale ``s``; ``v = 0``,
    ``alpha = beta = 1`` gives ``handoff_grid`` + ``quantize_codes`` (TPU-MLIR's RTN) code for code."""
    groups = _groups(w.detach(), fmt)
    n, n_groups, g = groups.shape
    v, alpha, beta = (t.detach().float().to(groups.device) for t in (v, alpha, beta))
    scale, zero, _, no_zero = _grid(groups, alpha, beta, fmt, exact=True)
    q = round_half_away(groups / scale.unsqueeze(2) + v.reshape(n, n_groups, g)) + zero.unsqueeze(2)
    codes = q.clamp(0, fmt.qmax).to(torch.int16).reshape(n, n_groups * g)
    return GptqResult(fmt, codes, scale, zero.to(torch.int16), percdamp=0.0, zero_point_fixes=int(no_zero.sum()))
