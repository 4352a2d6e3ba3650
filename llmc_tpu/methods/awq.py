"""AWQ for the TPU: per-channel scales and weight clipping, every candidate scored with TPU-MLIR's RTN.

The result is a float model (scales folded into the previous op, clamps baked into the
weights) that TPU-MLIR's own quantizer then turns into exactly the codes we scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from llmc_tpu.algorithms.awq import (activation_mean, apply_clip, group_gram, search_clip, search_scale,
                                     weight_mean)
from llmc_tpu.engine.blockwise import BlockInput, move
from llmc_tpu.methods.base import BlockContext, Method
from llmc_tpu.models.registry import Subset
from llmc_tpu.tpu.rtn import TpuWeightFormat, fake_quantize

Batch = tuple[torch.Tensor, dict[str, Any]]  # (input of the subset's layers, block kwargs)


def tpu_quantizer(fmt: TpuWeightFormat):
    """The weight the TPU computes with, for a float weight as we will save it (bf16 or f16)."""
    return lambda w: fake_quantize(w.to(fmt.handoff_dtype).float(), fmt)


def _chunks(x: torch.Tensor, kwargs: dict[str, Any], max_tokens: int) -> Iterator[Batch]:
    """Split a batch along its samples so that one forward sees at most ``max_tokens`` tokens."""
    bs, seq = x.shape[0], x.shape[1] if x.dim() > 2 else 1
    step = max(1, max_tokens // max(seq, 1))
    for i in range(0, bs, step):
        sub = {k: (v[i:i + step] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == bs and bs > 1 else v)
               for k, v in kwargs.items()}
        yield x[i:i + step], sub


@torch.no_grad()
def capture_inputs(block: nn.Module, names: list[str], inputs: list[BlockInput], device: torch.device,
                   ) -> dict[str, list[Batch]]:
    """Run the block on every batch and keep the input of each named Linear (with the batch's kwargs)."""
    seen: dict[str, list[Batch]] = {n: [] for n in names}
    current: dict[str, Any] = {}
    hooks = [block.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: seen[n].append((args[0].detach(), current["kwargs"]))) for n in names]
    try:
        for inp in inputs:
            kwargs = move(inp.kwargs, device)
            current["kwargs"] = kwargs
            args = kwargs.get("_positional", ())
            block(inp.hidden.to(device), *args, **{k: v for k, v in kwargs.items() if k != "_positional"})
    finally:
        for h in hooks:
            h.remove()
    return seen


def _call_inspect(module: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], needs_kwargs: bool) -> torch.Tensor:
    if needs_kwargs:
        kw = {k: v for k, v in kwargs.items() if k not in ("_positional", "use_cache", "output_attentions")}
        out = module(x, **kw)
    else:
        out = module(x)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class ScaleMap:
    """How the free scales (one per output of prev_op) map onto the layers' input channels.

    The identity, except for o_proj under grouped-query attention with ``gqa_o_proj: repeat``:
    then each v_proj channel feeds ``heads / kv_heads`` o_proj channels, which share its scale.
    """

    n_scales: int
    repeat: int = 1
    head_dim: int = 1

    @classmethod
    def between(cls, prev: nn.Module, first: nn.Linear, head_dim: int) -> "ScaleMap":
        if not isinstance(prev, nn.Linear) or prev.out_features == first.in_features:
            return cls(first.in_features)
        return cls(prev.out_features, first.in_features // prev.out_features, head_dim)

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        if self.repeat == 1:
            return s
        kv = self.n_scales // self.head_dim
        return s.view(kv, 1, self.head_dim).expand(kv, self.repeat, self.head_dim).reshape(-1)

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """Average a per-input-channel statistic over the channels that share one scale."""
        if self.repeat == 1:
            return v
        kv = self.n_scales // self.head_dim
        return v.view(kv, self.repeat, self.head_dim).mean(dim=1).reshape(-1)


class AwqMethod(Method):
    name = "Awq"
    needs_calibration = True

    def process_block(self, ctx: BlockContext) -> None:
        sp = self.special
        block, spec = ctx.block, ctx.spec
        scaled, skipped = [], []
        if sp["trans"]:
            feats = capture_inputs(block, [s.layers[0] for s in spec.subsets], ctx.inputs, ctx.device)
            for subset in spec.subsets:
                why_not = self._skip_reason(block, subset)
                if why_not:
                    skipped.append({"layers": list(subset.layers), "reason": why_not})
                    continue
                scaled.append(self._scale_subset(ctx, subset, feats[subset.layers[0]]))
        ctx.report["scaled"] = scaled
        ctx.report["skipped"] = skipped
        if sp["weight_clip"]:
            ctx.report["clipped"] = self._clip(ctx)

    # -- scaling -----------------------------------------------------------------------------
    def _skip_reason(self, block: nn.Module, subset: Subset) -> str | None:
        if subset.prev_op is None:
            return "no previous op to fold 1/s into"
        prev = block.get_submodule(subset.prev_op)
        first = block.get_submodule(subset.layers[0])
        if isinstance(prev, nn.Linear) and prev.out_features != first.in_features:
            if self.special["gqa_o_proj"] == "skip":
                return (f"grouped-query attention: {subset.prev_op} has {prev.out_features} outputs, "
                        f"{subset.layers[0]} {first.in_features} inputs (quant.special.gqa_o_proj: skip)")
            if first.in_features % prev.out_features:
                return f"{subset.prev_op} outputs do not map onto {subset.layers[0]} inputs"
        return None

    @torch.no_grad()
    def _scale_subset(self, ctx: BlockContext, subset: Subset, batches: list[Batch]) -> dict[str, Any]:
        block, fmt, sp = ctx.block, ctx.fmt, self.special
        layers = [block.get_submodule(n) for n in subset.layers]
        prev = block.get_submodule(subset.prev_op)
        inspect = block.get_submodule(subset.inspect)
        chunks = [c for x, kw in batches for c in _chunks(x, kw, sp["chunk_tokens"])]
        targets = [_call_inspect(inspect, x, kw, subset.inspect_needs_block_kwargs) for x, kw in chunks]
        n_elems = sum(t.numel() for t in targets)
        originals = [layer.weight.data.clone() for layer in layers]
        quantize = tpu_quantizer(fmt)
        smap = ScaleMap.between(prev, layers[0], ctx.head_dim)
        expand = smap.expand

        x_mean = smap.reduce(activation_mean(x for x, _ in batches))
        w_mean = smap.reduce(weight_mean(originals, fmt.group_size)) if sp["trans_version"] == "v1" else None

        def loss_fn(s: torch.Tensor) -> float:
            s_in = expand(s)
            for layer, w in zip(layers, originals):
                layer.weight.data = (quantize(w.float() * s_in) / s_in).to(w.dtype)
            total = torch.zeros((), dtype=torch.float64, device=ctx.device)
            for (x, kw), target in zip(chunks, targets):
                out = _call_inspect(inspect, x, kw, subset.inspect_needs_block_kwargs)
                total += (out.float() - target.float()).pow(2).sum().double()
            return float(total) / n_elems

        try:
            result = search_scale(x_mean, w_mean, loss_fn, sp["n_grid"], sp["trans_version"])
        finally:
            for layer, w in zip(layers, originals):
                layer.weight.data = w
        self._fold(prev, layers, result.scale, expand)
        return {"layers": list(subset.layers), "prev_op": subset.prev_op, "ratio": result.ratio,
                "loss": result.loss, "loss_rtn": result.loss_identity}

    @staticmethod
    def _fold(prev: nn.Module, layers: list[nn.Linear], s: torch.Tensor, expand) -> None:
        """Divide prev's output channels by s, multiply the layers' input channels by s (function preserved)."""
        s_in = expand(s)
        if isinstance(prev, nn.Linear):
            prev.weight.data = (prev.weight.data.float() / s.view(-1, 1)).to(prev.weight.dtype)
            if prev.bias is not None:
                prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
        else:  # a norm: its affine weight (and bias) feed the layers directly
            prev.weight.data = (prev.weight.data.float() / s).to(prev.weight.dtype)
            if getattr(prev, "bias", None) is not None:
                prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
        for layer in layers:
            layer.weight.data = (layer.weight.data.float() * s_in.view(1, -1)).to(layer.weight.dtype)

    # -- clipping ----------------------------------------------------------------------------
    @torch.no_grad()
    def _clip(self, ctx: BlockContext) -> list[dict[str, Any]]:
        block, spec, fmt, sp = ctx.block, ctx.spec, ctx.fmt, self.special
        targets = [(s, [n for n in s.layers if sp["clip_qk"] or n not in spec.qk_layers]) for s in spec.subsets]
        targets = [(s, names) for s, names in targets if names]
        feats = capture_inputs(block, [s.layers[0] for s, _ in targets], ctx.inputs, ctx.device)
        quantize = tpu_quantizer(fmt)
        done = []
        for subset, names in targets:
            k = block.get_submodule(subset.layers[0]).in_features
            gram = group_gram((x for x, _ in feats[subset.layers[0]]), fmt.group_size, k)
            for name in names:
                layer = block.get_submodule(name)
                clip = search_clip(layer.weight.data, gram, quantize, sp["clip_sym"], sp["n_grid"], sp["max_shrink"])
                layer.weight.data = apply_clip(layer.weight.data.float(), clip).to(layer.weight.dtype)
                done.append({"layer": name, "err_before": clip.err_before, "err_after": clip.err_after,
                             "mean_factor": float(clip.factor.mean())})
        return done


