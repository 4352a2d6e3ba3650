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


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round_half_away(x)`` in the forward pass, the identity's gradient in the backward pass."""
    xd = x.detach()
    return round_half_away(xd) + (x - xd)


def _constants(fmt: TpuWeightFormat, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qmax``, the asymmetric scale floor and ``qmax - 1`` as float32 tensors on ``device``: a division by a
    tensor is a true division on every device (CUDA multiplies by the reciprocal of a Python scalar)."""
    return (torch.tensor(float(fmt.qmax), device=device), torch.tensor(_ASYM_SCALE_FLOOR, device=device),
            torch.tensor(fmt.qmax - 1.0, device=device))


def _stats(groups: torch.Tensor, fmt: TpuWeightFormat) -> tuple[torch.Tensor, ...]:
    """What the grid needs of ``groups [..., g]``: ``(absmax,)`` (symmetric) or ``(min, max)``, per group."""
    if _symmetric(fmt):
        return (groups.abs().amax(dim=-1),)
    return groups.amin(dim=-1), groups.amax(dim=-1)


def _grid_of(stats: tuple[torch.Tensor, ...], alpha: torch.Tensor, beta: torch.Tensor, fmt: TpuWeightFormat,
             exact: bool, consts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (``stats`` of ``_stats``): the fp32 scale the codes are computed with, the zero point (float),
    the scale the TPU multiplies with, and which groups were moved off zero point 0.

    ``exact``: the final grid (``storable_scale``'s checks, no graph); else differentiable (STE)."""
    qmax = fmt.qmax
    qmax_t, floor_t, qmax1_t = consts
    if _symmetric(fmt):
        absmax = beta * stats[0]
        scale = 2 * absmax / qmax_t
        zero = torch.full_like(scale, float(1 << (fmt.bits - 1)))
        no_zero = torch.zeros_like(scale, dtype=torch.bool)
    else:
        mn = alpha * stats[0]
        mx = beta * stats[1]
        scale = torch.maximum(mx - mn, floor_t) / qmax_t
        ratio = mn / scale
        zero = -(round_half_away(ratio.detach()) if exact else _round_ste(ratio))
        zero = zero.clamp(0, qmax)
        no_zero = zero.detach() == 0
        fixed = torch.maximum(mx / qmax1_t, scale)
        scale = torch.where(no_zero, fixed, scale)
        zero = torch.where(no_zero, 1.0, zero)
    if exact:
        eff = storable_scale(scale, fmt)
        keep = scale.to(fmt.torch_scale_dtype).float() == eff
    else:
        # storable_scale's value without its checks; its first cast is ``keep``'s too
        low = scale.detach().to(fmt.torch_scale_dtype)
        stored = low.to(torch.float16).to(torch.bfloat16) if fmt.scale_dtype == "bfloat16" else low
        eff = _ste(scale, stored.float())
        keep = low.float() == eff.detach()
    scale = torch.where(keep, scale, eff)
    return scale, zero, eff, no_zero


def _grid(groups: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, fmt: TpuWeightFormat, exact: bool,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_grid_of`` for ``groups [N, G, g]``."""
    return _grid_of(_stats(groups, fmt), alpha, beta, fmt, exact, _constants(fmt, groups.device))


def _groups(w: torch.Tensor, fmt: TpuWeightFormat) -> torch.Tensor:
    check_format(fmt)
    n, k = w.shape
    g = group_size(fmt, k)
    return w.float().reshape(n, k // g, g)


class GroupedFakeQuant:
    """``fake_quantize`` of several weights of one group size at once: their groups stacked as one ``[T, g]``.

    What does not depend on the parameters is computed once: the float32 groups, their min/max (absmax),
    the device constants. A call runs only the parameter-dependent elementwise ops, for all the weights in
    one go. The parameters are stacked the same way: ``v [T, g]``, ``alpha``/``beta`` ``[T]``; weight ``i``
    owns the rows ``offsets[i]:offsets[i + 1]`` (its ``v [N, K]``, ``alpha [N, K // g]`` flattened)."""

    def __init__(self, weights: list[torch.Tensor], fmt: TpuWeightFormat, folded: list[bool] | None = None) -> None:
        grouped = [_groups(w.detach(), fmt) for w in weights]
        if len({x.shape[2] for x in grouped}) != 1:
            raise ValueError("GroupedFakeQuant: the weights differ in group size")
        self.fmt = fmt
        self.g = grouped[0].shape[2]
        self.shapes = [tuple(w.shape) for w in weights]
        self.rows = [x.shape[0] * x.shape[1] for x in grouped]
        self.offsets = [0]
        for r in self.rows:
            self.offsets.append(self.offsets[-1] + r)
        self.folded = list(folded) if folded is not None else [False] * len(weights)
        flat = [x.reshape(-1, self.g) for x in grouped]
        self.groups = flat[0] if len(flat) == 1 else torch.cat(flat)
        self.stats = _stats(self.groups, fmt)
        self.consts = _constants(fmt, self.groups.device)

    @property
    def n_groups(self) -> int:
        return self.groups.shape[0]

    def __call__(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> list[torch.Tensor]:
        """float32 ``[N, K]`` per weight (views of one tensor): what the TPU multiplies with."""
        fmt = self.fmt
        scale, zero, eff, _ = _grid_of(self.stats, alpha, beta, fmt, False, self.consts)
        if _symmetric(fmt):  # an all-zero group: 0 / 0 (asymmetric scales are >= 1e-5 / qmax)
            scale = torch.where(scale.detach() > 0, scale, 1.0)
        zero = zero.unsqueeze(1)
        x = self.groups / scale.unsqueeze(1) + v
        q = (_round_ste(x) + zero).clamp(0, fmt.qmax)
        out = (q - zero) * eff.unsqueeze(1)
        outs = [out.view(self.shapes[0])] if len(self.rows) == 1 else [o.view(s) for o, s in zip(out.split(self.rows), self.shapes)]
        # a Linear the compiler folds back to a float weight: a straight-through cast to the scale dtype
        return [_ste(o, o.detach().to(fmt.torch_scale_dtype).float()) if f else o for o, f in zip(outs, self.folded)]


def fake_quantize(w: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, fmt: TpuWeightFormat,
                  folded: bool = False) -> torch.Tensor:
    """float32 ``[N, K]``: what the TPU multiplies with, differentiable in ``v``, ``alpha``, ``beta``.

    ``w`` is the float weight as handed to TPU-MLIR (no gradient). ``folded``: the Linear is folded back to a
    float weight in the scale dtype (``TpuQuantizedWeight.folded``), applied with a straight-through cast."""
    fq = GroupedFakeQuant([w], fmt, [folded])
    return fq(v.reshape(fq.n_groups, fq.g), alpha.reshape(-1), beta.reshape(-1))[0]


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
