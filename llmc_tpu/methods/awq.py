"""AWQ for the TPU: per-channel scales and weight clipping, every candidate scored with TPU-MLIR's RTN.

The result is a float model (scales folded into the previous op, clamps baked into the
weights) that TPU-MLIR's own quantizer then turns into exactly the codes we scored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from llmc_tpu.algorithms.awq import (
    activation_abs_sums,
    apply_clip,
    gram,
    group_gram,
    search_clip,
    search_scale,
    weight_mean,
)
from llmc_tpu.algorithms.awq_kernel import sample_squared_errors
from llmc_tpu.engine.blockwise import BlockInput, move
from llmc_tpu.engine.distributed import OrderedSum, RunningSum, Shard, sample_sum
from llmc_tpu.engine.tf32 import tf32_matmuls
from llmc_tpu.methods.base import BlockContext, Method
from llmc_tpu.models.registry import Subset, part_rows
from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.tpu.rtn_kernel import handed_over_fake_quantize, scaled_fake_quantize


def tpu_quantizer(fmt: TpuWeightFormat):
    """The weight the TPU computes with, for a float weight as we will save it (bf16 or f16)."""
    return partial(handed_over_fake_quantize, fmt=fmt)


@dataclass
class Call:
    """One recorded call of a module: its input ``x`` and every other argument, to replay with another x."""

    x: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    x_key: str | None  # None: x was the first positional argument; else its keyword

    def replay(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.x_key is None:
            out = module(x, *self.args, **self.kwargs)
        else:
            out = module(*self.args, **{**self.kwargs, self.x_key: x})
        return out[0] if isinstance(out, (tuple, list)) else out

    def chunks(self, max_tokens: int) -> Iterator[Call]:
        """Split along the samples so that one replay sees at most ``max_tokens`` tokens."""
        x = self.x
        bs, seq = x.shape[0], x.shape[1] if x.dim() > 2 else 1
        step = max(1, max_tokens // max(seq, 1))
        if step >= bs:
            yield self
            return
        for i in range(0, bs, step):
            yield Call(x[i:i + step], tuple(_cut(a, bs, i, step) for a in self.args),
                       {k: _cut(v, bs, i, step) for k, v in self.kwargs.items()}, self.x_key)


def _cut(v: Any, bs: int, i: int, step: int) -> Any:
    """Samples i..i+step of a per-sample argument: leading dim ``bs`` or ``bs * m`` (ALiBi's [bs*heads, ...])."""
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        if v.shape[0] == bs:
            return v[i:i + step]
        if v.dim() >= 3 and v.shape[0] % bs == 0:
            m = v.shape[0] // bs
            return v[i * m:(i + step) * m]
        return v
    if isinstance(v, (tuple, list)):
        return type(v)(_cut(a, bs, i, step) for a in v)
    return v


@torch.no_grad()
def record_calls(block: nn.Module, names: list[str], inputs: list[BlockInput], device: torch.device,
                 on_call: Callable[[str, Call], None]) -> None:
    """Run the block on every batch and hand every call of the named modules (input and arguments) to
    ``on_call(name, call)`` as it happens, in the order of the batches."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict, name: str) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_attentions",)}
        if args:
            on_call(name, Call(args[0].detach(), args[1:], kwargs, None))
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            on_call(name, Call(kwargs.pop(key).detach(), (), kwargs, key))

    hooks = [block.get_submodule(n).register_forward_pre_hook(partial(hook, name=n), with_kwargs=True) for n in names]
    try:
        for inp in inputs:
            kwargs = move(inp.kwargs, device)
            args = kwargs.pop("_positional", ())
            block(inp.hidden.to(device), *args, **kwargs)
    finally:
        for h in hooks:
            h.remove()


def capture_calls(block: nn.Module, names: list[str], inputs: list[BlockInput], device: torch.device,
                  ) -> dict[str, list[Call]]:
    """Run the block on every batch and keep every call of the named modules that saw some tokens."""
    seen: dict[str, list[Call]] = {n: [] for n in names}
    record_calls(block, names, inputs, device, lambda name, call: seen[name].append(call) if call.x.numel() else None)
    return seen


def input_grams(block: nn.Module, names: list[str], inputs: list[BlockInput], device: torch.device,
                group_size: int, shard: Shard | None) -> dict[str, torch.Tensor | None]:
    """Per named Linear, the per-group Gram matrices of its inputs summed over every calibration sample (the
    fixed order over every process with a shard), added as the block runs: no input is kept. None for a Linear
    no token reached (an MoE expert the router never picked)."""
    sums: dict[str, Any] = {}

    def add(name: str, call: Call) -> None:
        x = call.x
        if not x.numel():
            return
        k = x.shape[-1]
        g = group_size if group_size > 0 else k
        if name not in sums:
            sums[name] = sample_sum(shard, (k // g, g, g), torch.float32, x.device)
        add_products(sums[name], x, partial(group_gram, group_size=group_size))

    record_calls(block, names, inputs, device, add)
    return {n: sums[n].result() if n in sums else None for n in names}


PRODUCT_TOKENS = 8192  # calibration tokens per Gram product: enough rows to keep the device's matrix units busy


def add_products(acc: OrderedSum | RunningSum, x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Add ``product`` of the inputs ``x`` to a sum over the calibration samples: of ``PRODUCT_TOKENS / seq`` samples
    at a time (``OrderedSum.add_samples``: the same bits however the samples were batched), or, for a 2-D input (an
    MoE expert's routed rows, not whole samples), of the rows as they come."""
    if x.dim() >= 3:
        acc.add_samples(x, product, max(1, PRODUCT_TOKENS // x.shape[-2]))
    else:
        acc.slot(False).add_(product(x))


@dataclass
class ScaleMap:
    """How the free scales (one per output channel of prev_op that feeds the layers) map onto the layers' inputs.

    The identity, except for o_proj under grouped-query attention with ``gqa_o_proj: repeat``:
    then each v channel feeds ``heads / kv_heads`` o_proj channels, which share its scale.
    """

    n_scales: int
    repeat: int = 1
    head_dim: int = 1

    @classmethod
    def between(cls, n_prev: int, first: nn.Linear, head_dim: int) -> ScaleMap:
        if n_prev == first.in_features:
            return cls(n_prev)
        return cls(n_prev, first.in_features // n_prev, head_dim)

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


@dataclass
class Prev:
    """Where 1/s goes: a norm (its affine weight and bias), a whole Linear, or some output rows of a fused one."""

    name: str
    module: nn.Module
    rows: list[int] | None  # a fused Linear's part
    norm_offset: float

    @classmethod
    def resolve(cls, ctx: BlockContext, prev_op: str) -> Prev:
        name, _, part = prev_op.partition(":")
        module = ctx.block.get_submodule(name)
        rows = None
        if part:
            fused = ctx.spec.fused_of(name)
            if fused is None:
                raise ValueError(f"registry: {ctx.spec.model_type} names {prev_op!r} but {name} is not in its fused Linears")
            rows = part_rows(fused, part, module.out_features, ctx.config)
        return cls(prev_op, module, rows, ctx.spec.norm_offset)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)

    def n_out(self, first: nn.Linear) -> int:
        if self.rows is not None:
            return len(self.rows)
        return self.module.out_features if self.is_linear else first.in_features

    def fold(self, s: torch.Tensor) -> None:
        """Divide the output channels that feed the layers by s."""
        m = self.module
        if self.is_linear:
            rows = slice(None) if self.rows is None else torch.tensor(self.rows, device=m.weight.device)
            w = m.weight.data.float()
            w[rows] = w[rows] / s.view(-1, 1)
            m.weight.data = w.to(m.weight.dtype)
            if m.bias is not None:
                b = m.bias.data.float()
                b[rows] = b[rows] / s
                m.bias.data = b.to(m.bias.dtype)
            return
        # a norm: y = (offset + w) * normalized + b; Gemma's offset 1 gives w' = (1 + w) / s - 1
        m.weight.data = ((m.weight.data.float() + self.norm_offset) / s - self.norm_offset).to(m.weight.dtype)
        if getattr(m, "bias", None) is not None:
            m.bias.data = (m.bias.data.float() / s).to(m.bias.dtype)


def _by_sample(per_module: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """Per-sample sums of several modules as ``[samples, modules]`` (rows in sample order, whatever process holds
    them); modules that saw different row counts (MoE experts: one process only) one after the other."""
    cols = [torch.cat(v) for v in per_module.values()]
    return torch.stack(cols, dim=1) if len({c.shape for c in cols}) == 1 else torch.cat(cols)


def _gather(shard: Shard | None, rows: torch.Tensor) -> torch.Tensor:
    """Every process's per-sample rows (one process: its own)."""
    return rows if shard is None else shard.gather(rows)


def _total(shard: Shard | None, count: int) -> int:
    return count if shard is None else shard.total(count)


def scale_groups(subsets: tuple[Subset, ...]) -> list[list[Subset]]:
    """Subsets that fold into the same prev_op share one s (parallel blocks, MoE experts); order kept."""
    groups: dict[str, list[Subset]] = {}
    alone = []
    for subset in subsets:
        if subset.prev_op is None:
            alone.append([subset])
        else:
            groups.setdefault(subset.prev_op, []).append(subset)
    return [*groups.values(), *alone]


# the Gram matrix pays off when the calibration tokens are at least this many times the Linear's input width
GRAM_TOKENS_PER_INPUT = 4


def gram_loss_applies(device: torch.device, group: list[Subset], block: nn.Module, tokens: int) -> bool:
    """Whether a group's candidates are scored through the Gram matrix of its input instead of forwards: one Linear
    that is its own inspected module (o_proj, down_proj), on CUDA, with ``tokens`` (every process's) at least
    ``GRAM_TOKENS_PER_INPUT`` times its input width ``K``. ``sum_t ||E x_t||^2 = sum((E @ G) * E)`` with
    ``G = sum_t x_t x_t^T`` costs ``N K^2`` per candidate instead of ``N K T`` (a 7B block's down_proj over 65,536
    tokens: a sixth), once ``G`` is summed (``T K^2``), and it has no bf16 rounding of the outputs. A 70B's
    down_proj (K = 28,672) keeps the forwards: its Gram products would cost about as much, and ``G`` would take
    3.3 GB of the device. The rule reads only totals, so every process count takes the same path. The CPU keeps the
    forwards, so that its results (the demo's, the tests') stay those the forwards gave."""
    if device.type != "cuda" or len(group) != 1:
        return False
    subset = group[0]
    linear = block.get_submodule(subset.inspect)
    return subset.layers == (subset.inspect,) and not subset.scale_only and isinstance(linear, nn.Linear) \
        and tokens >= GRAM_TOKENS_PER_INPUT * linear.in_features


def _output_loss(ctx: BlockContext, group: list[Subset], calls: dict[str, list[Call]], layers: list[nn.Module],
                 originals: list[torch.Tensor], smap: ScaleMap, chunk_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mean squared error of the inspected modules' outputs, replayed on the recorded inputs with the layers
    fake-quantized under a candidate scale, against their float outputs (summed per sample, in sample order)."""
    inspects = {s.inspect: ctx.block.get_submodule(s.inspect) for s in group}
    chunks = [(name, c) for name in inspects for call in calls[name] for c in call.chunks(chunk_tokens)]
    targets = [c.replay(inspects[name], c.x) for name, c in chunks]
    n_elems = _total(ctx.shard, sum(t.numel() for t in targets))

    def loss_fn(s: torch.Tensor) -> torch.Tensor:  # left on the device: search_scale reads them all at once
        s_in = smap.expand(s)
        for layer, w in zip(layers, originals):
            layer.weight.data = scaled_fake_quantize(w, s_in, ctx.fmt)
        per_sample: dict[str, list[torch.Tensor]] = {}  # per inspected module, one error sum per sample
        for (name, c), target in zip(chunks, targets):
            per_sample.setdefault(name, []).append(sample_squared_errors(c.replay(inspects[name], c.x), target))
        return _gather(ctx.shard, _by_sample(per_sample)).double().sum() / n_elems

    return loss_fn


def _gram_loss(w: torch.Tensor, calls: list[Call], tokens: int, smap: ScaleMap, fmt: TpuWeightFormat,
               shard: Shard | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``_output_loss`` of one Linear (see ``gram_loss_applies``): ``sum((E @ G) * E)`` over the elements of its
    outputs (``tokens`` of every process), ``E`` the fake-quantized weight under a candidate scale minus the float
    one (float32, TF32 products). ``G`` (unscaled, every token) is summed in the samples' fixed order over every
    process, thousands of tokens per product (``add_products``); bf16/f16 inputs are multiplied exactly on CUDA."""
    acc = sample_sum(shard, (w.shape[1], w.shape[1]), torch.float32, calls[0].x.device)
    for call in calls:
        add_products(acc, call.x, gram)
    input_gram = acc.result()
    n_elems = tokens * w.shape[0]
    wf = w.float()

    def loss_fn(s: torch.Tensor) -> torch.Tensor:
        e = scaled_fake_quantize(w, smap.expand(s), fmt).float() - wf
        with tf32_matmuls():
            return ((e @ input_gram) * e).sum().double() / n_elems

    return loss_fn


class AwqMethod(Method):
    name = "Awq"
    needs_calibration = True
    changes_weights = True

    def process_block(self, ctx: BlockContext) -> None:
        sp = self.special
        subsets = ctx.spec.block_subsets(ctx.block)
        scaled, skipped, uncalibrated = [], [], []
        times = ctx.report.setdefault("time_s", {})
        if sp["trans"]:
            groups = scale_groups(subsets)
            inspects = list(dict.fromkeys(s.inspect for g in groups if g[0].prev_op for s in g))
            start = time.perf_counter()
            calls = capture_calls(ctx.block, inspects, ctx.inputs, ctx.device)
            times["awq forward+statistics"] = round(time.perf_counter() - start, 4)
            start = time.perf_counter()
            readers = {name: sum(s.inspect == name for g in groups for s in g) for name in inspects}
            for group in groups:
                layers = [n for s in group for n in s.layers]
                why_not = self._skip_reason(ctx, group)
                if why_not is None and not any(calls[s.inspect] for s in group):
                    why_not = "no calibration token reached it (an expert the router never picked): plain RTN"
                    uncalibrated += layers
                if why_not:
                    skipped.append({"layers": layers, "reason": why_not})
                    continue
                scaled.append(self._scale_group(ctx, group, calls))
                for s in group:  # a module's recorded inputs go once no later group reads them (device memory)
                    if s.prev_op:
                        readers[s.inspect] -= 1
                        if not readers[s.inspect]:
                            calls.pop(s.inspect, None)
            del calls
            times["awq scale search"] = round(time.perf_counter() - start, 4)
        ctx.report["scaled"] = scaled
        ctx.report["skipped"] = skipped
        if sp["weight_clip"]:
            start = time.perf_counter()
            ctx.report["clipped"] = self._clip(ctx, subsets, uncalibrated)
            times["awq clip search"] = round(time.perf_counter() - start, 4)
        if uncalibrated:
            ctx.report["uncalibrated"] = sorted(set(uncalibrated))

    # -- scaling -----------------------------------------------------------------------------
    def _skip_reason(self, ctx: BlockContext, group: list[Subset]) -> str | None:
        subset = group[0]
        if subset.prev_op is None:
            return "no op before it can take 1/s (the registry gives no prev_op: e.g. a GELU in between)"
        prev = Prev.resolve(ctx, subset.prev_op)
        first = ctx.block.get_submodule(subset.layers[0])
        n_prev = prev.n_out(first)
        if n_prev != first.in_features:
            if self.special["gqa_o_proj"] == "skip":
                return (f"grouped-query attention: {subset.prev_op} has {n_prev} outputs, "
                        f"{subset.layers[0]} {first.in_features} inputs (quant.special.gqa_o_proj: skip)")
            if first.in_features % n_prev:
                return f"{subset.prev_op} outputs do not map onto {subset.layers[0]} inputs"
        return None

    @torch.no_grad()
    def _scale_group(self, ctx: BlockContext, group: list[Subset], calls: dict[str, list[Call]]) -> dict[str, Any]:
        block, fmt, sp = ctx.block, ctx.fmt, self.special
        names = [n for s in group for n in s.layers]
        layers = [block.get_submodule(n) for n in names]
        originals = [layer.weight.data.clone() for layer in layers]
        prev = Prev.resolve(ctx, group[0].prev_op)
        smap = ScaleMap.between(prev.n_out(layers[0]), layers[0], ctx.head_dim)

        rows, tokens = activation_abs_sums(c.x for c in calls[group[0].inspect])
        tokens = _total(ctx.shard, tokens)
        x_mean = smap.reduce(_gather(ctx.shard, rows).sum(dim=0) / tokens)
        w_mean = smap.reduce(weight_mean(originals, fmt.group_size)) if sp["trans_version"] == "v1" else None
        if gram_loss_applies(ctx.device, group, block, tokens):
            loss_fn = _gram_loss(originals[0], calls[group[0].inspect], tokens, smap, fmt, ctx.shard)
        else:
            loss_fn = _output_loss(ctx, group, calls, layers, originals, smap, sp["chunk_tokens"])

        try:
            result = search_scale(x_mean, w_mean, loss_fn, sp["n_grid"], sp["trans_version"])
        finally:
            for layer, w in zip(layers, originals):
                layer.weight.data = w
        s_in = smap.expand(result.scale)
        prev.fold(result.scale)
        for name in [*names, *dict.fromkeys(n for s in group for n in s.scale_only)]:
            m = block.get_submodule(name)  # the layers, and the routers that read the same input
            m.weight.data = (m.weight.data.float() * s_in.view(1, -1)).to(m.weight.dtype)
        return {"layers": names, "prev_op": group[0].prev_op, "ratio": result.ratio,
                "loss": result.loss, "loss_rtn": result.loss_identity}

    # -- clipping ----------------------------------------------------------------------------
    @torch.no_grad()
    def _clip(self, ctx: BlockContext, subsets: tuple[Subset, ...], uncalibrated: list[str]) -> list[dict[str, Any]]:
        block, spec, fmt, sp = ctx.block, ctx.spec, ctx.fmt, self.special
        targets = [(s, [n for n in s.layers if sp["clip_qk"] or n not in spec.qk_layers]) for s in subsets]
        targets = [(s, names) for s, names in targets if names]
        grams = input_grams(block, [s.layers[0] for s, _ in targets], ctx.inputs, ctx.device, fmt.group_size, ctx.shard)
        quantize = tpu_quantizer(fmt)
        done = []
        for subset, names in targets:
            gram = grams[subset.layers[0]]
            if gram is None:  # an expert no calibration token reached: left as it is (plain RTN)
                uncalibrated += subset.layers
                continue
            for name in names:
                layer = block.get_submodule(name)
                clip = search_clip(layer.weight.data, gram, quantize, sp["clip_sym"], sp["n_grid"], sp["max_shrink"])
                layer.weight.data = apply_clip(layer.weight.data.float(), clip).to(layer.weight.dtype)
                done.append({"layer": name, "err_before": clip.err_before, "err_after": clip.err_after,
                             "mean_factor": float(clip.factor.mean())})
        return done
