"""SignRound for the TPU: per block, rounding offsets and min/max shrink learned by signed gradient descent.

In the spirit of SignRound / AutoRound (Cheng et al. 2023). For each block: the float block's outputs
on the calibration inputs are the targets; every quantized Linear of the block gets the parameters of
``algorithms.signround`` (``v`` per weight, ``alpha``/``beta`` per (row, group)), trained jointly to
minimize the block's output MSE with the weights fake-quantized on TPU-MLIR's grid (float32, straight-
through rounding): ``p -= lr * sign(grad)`` then clamped to its range, a few calibration samples per
step. As AutoRound does, the parameters of the best step are kept; a step is judged by its loss relative to
RTN's on the same samples (a few samples' raw loss mostly says which samples were drawn). At the end the
best step's parameters, the last ones and RTN are scored on every calibration sample with their exact
integer weights, and the lowest loss wins (never worse than RTN on the calibration data).

The integer result of every Linear goes to ``ctx.results`` (the pipeline fake-quantizes with it and a GPTQ
checkpoint carries it to TPU-MLIR); the block's float weights are left as they were (the block runs
through ``torch.func.functional_call`` on float32 copies of its tensors, never modified).

``special`` keys: ``iters`` (200), ``lr`` (None: 1 / iters), ``lr_decay`` (True: linear to 0 over the
iterations), ``batch_size`` (8 calibration samples per step), ``min_max_tune`` (True: train alpha/beta;
False: only the rounding), ``seed`` (0; block i draws its samples with seed + i).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from llmc_tpu.algorithms.gptq import GptqResult
from llmc_tpu.algorithms.signround import (
    SHRINK_RANGE,
    V_RANGE,
    check_format,
    fake_quantize,
    final_result,
    init_params,
)
from llmc_tpu.engine.blockwise import BlockInput, move
from llmc_tpu.fake_quant import handoff_weight
from llmc_tpu.methods.base import BlockContext, Method
from llmc_tpu.methods.gptq import _to_cpu
from llmc_tpu.tpu.chips import quantized_out_features

log = logging.getLogger("llmc_tpu")

DEFAULTS: dict[str, Any] = {"iters": 200, "lr": None, "lr_decay": True, "batch_size": 8, "min_max_tune": True, "seed": 0}


# -- calibration samples -------------------------------------------------------------------------
class _NotMergeable(Exception):
    pass


def _select(v: Any, bs: int, idx: torch.Tensor) -> Any:
    """Samples ``idx`` of an argument of a batch of ``bs`` samples: tensors (2-D or more) with leading dim
    ``bs`` are per sample, ``bs * m`` (3-D or more) per sample in blocks of m (ALiBi's ``[bs * heads, ...]``);
    everything else (leading dim 1, cache positions, flags) is shared by the samples and kept."""
    if isinstance(v, torch.Tensor) and v.dim() >= 2:
        if v.shape[0] == bs:
            return v[idx.to(v.device)]
        if v.dim() >= 3 and v.shape[0] % bs == 0:
            m = v.shape[0] // bs
            return v.reshape(bs, m, *v.shape[1:])[idx.to(v.device)].reshape(-1, *v.shape[1:])
        return v
    if isinstance(v, dict):
        return {k: _select(a, bs, idx) for k, a in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(_select(a, bs, idx) for a in v)
    return v


def _merge(vals: list[Any], sizes: list[int]) -> Any:
    """One argument for the concatenated samples of several batches' selections (``sizes[i]`` samples each)."""
    first = vals[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) and v.dim() == first.dim() and v.dtype == first.dtype for v in vals):
            raise _NotMergeable
        if (first.dim() < 2 or first.shape[0] == 1) and all(v.shape == first.shape and torch.equal(v, first)
                                                             for v in vals[1:]):
            return first  # shared by every sample
        if first.dim() < 2:
            raise _NotMergeable
        parts, blocks = [], set()
        for v, k in zip(vals, sizes):
            if v.shape[0] == 1 and k > 1:  # broadcast over this batch: one copy per sample
                v = v.expand(k, *v.shape[1:])
            if v.shape[0] % k:
                raise _NotMergeable
            blocks.add(v.shape[0] // k)
            parts.append(v)
        if len(blocks) > 1 or len({v.shape[1:] for v in parts}) > 1:
            raise _NotMergeable
        return torch.cat(parts)
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in vals):
            raise _NotMergeable
        return {k: _merge([v[k] for v in vals], sizes) for k in first}
    if isinstance(first, (tuple, list)):
        if not all(type(v) is type(first) and len(v) == len(first) for v in vals):
            raise _NotMergeable
        return type(first)(_merge([v[i] for v in vals], sizes) for i in range(len(first)))
    for v in vals[1:]:
        try:
            same = v is first or bool(v == first)
        except Exception as e:  # an object without a usable ==
            raise _NotMergeable from e
        if not same:
            raise _NotMergeable
    return first


def _float32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_float32(v) for v in obj)
    return obj


class _Samples:
    """The calibration samples of every batch of ``ctx.inputs`` as one sequence; ``calls(idx)`` gives the block
    calls for some of them: one call where the batches' arguments combine, else one per batch."""

    def __init__(self, inputs: list[BlockInput], device: torch.device) -> None:
        self.inputs = inputs
        self.device = device
        self.sizes = [inp.hidden.shape[0] for inp in inputs]
        self.owner = [(p, i) for p, size in enumerate(self.sizes) for i in range(size)]
        self.targets: list[torch.Tensor] | None = None
        self.mergeable = False
        if len(inputs) > 1:
            try:
                self._merged([self._piece(p, [0]) for p in range(len(inputs))])
                self.mergeable = True
            except _NotMergeable:
                log.info("SignRound: the calibration batches' block arguments differ; samples of different "
                         "batches run as separate calls")

    def __len__(self) -> int:
        return len(self.owner)

    def _piece(self, p: int, local: list[int]) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None, int]:
        inp = self.inputs[p]
        idx = torch.tensor(local, dtype=torch.long)
        target = None if self.targets is None else self.targets[p][idx.to(self.targets[p].device)]
        return inp.hidden[idx.to(inp.hidden.device)], _select(inp.kwargs, self.sizes[p], idx), target, len(local)

    @staticmethod
    def _merged(parts: list[tuple]) -> tuple:
        sizes = [k for *_, k in parts]
        if len({h.shape[1:] for h, *_ in parts}) > 1:
            raise _NotMergeable
        hidden = torch.cat([h for h, *_ in parts])
        kwargs = _merge([kw for _, kw, _, _ in parts], sizes)
        target = None if parts[0][2] is None else torch.cat([t for _, _, t, _ in parts])
        return hidden, kwargs, target, sum(sizes)

    def calls(self, idx: list[int]) -> list[tuple[torch.Tensor, tuple, dict[str, Any], torch.Tensor | None]]:
        """``(hidden, args, kwargs, target)`` on the device, floats in float32, for the samples ``idx``."""
        by_piece: dict[int, list[int]] = {}
        for i in sorted(idx):  # batch by batch, in order
            p, local = self.owner[i]
            by_piece.setdefault(p, []).append(local)
        parts = [self._piece(p, local) for p, local in by_piece.items()]
        if len(parts) > 1 and self.mergeable:
            try:
                parts = [self._merged(parts)]
            except _NotMergeable:
                pass
        out = []
        for hidden, kwargs, target, _ in parts:
            kwargs = _float32(move(kwargs, self.device))
            args = kwargs.pop("_positional", ())
            out.append((hidden.to(self.device).float(), args, kwargs, target))
        return out

    def chunks(self, size: int) -> Iterator[list[int]]:
        """Every sample once, in chunks of at most ``size`` samples of one batch each."""
        start = 0
        for n in self.sizes:
            for a in range(0, n, size):
                yield list(range(start + a, start + min(a + size, n)))
            start += n


def _forward(block: nn.Module, tensors: dict[str, torch.Tensor], hidden: torch.Tensor, args: tuple,
             kwargs: dict[str, Any]) -> torch.Tensor:
    out = functional_call(block, tensors, (hidden, *args), kwargs, strict=False)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


# -- the method ----------------------------------------------------------------------------------
class SignRoundMethod(Method):
    name = "SignRound"
    needs_calibration = True

    def process_block(self, ctx: BlockContext) -> None:
        sp = {**DEFAULTS, **(self.special or {})}
        fmt, block, device = ctx.fmt, ctx.block, ctx.device
        check_format(fmt)
        iters, batch_size = int(sp["iters"]), int(sp["batch_size"])
        lr = float(sp["lr"]) if sp["lr"] is not None else 1.0 / max(iters, 1)
        t0 = time.perf_counter()
        names = list(ctx.spec.block_linear_names(block))
        weights = {n: handoff_weight(block.get_submodule(n), fmt).to(device) for n in names}
        folded = {n: quantized_out_features(w.shape[0], fmt.bits, fmt.chip, per_channel=True) == 0
                  for n, w in weights.items()}
        # every parameter and buffer of the block as float32 tensors without grad: the block runs on these
        # (functional_call), so its own weights are never touched
        state = {k: t.detach().float() if t.is_floating_point() else t.detach()
                 for k, t in chain(block.named_parameters(), block.named_buffers())}
        samples = _Samples(ctx.inputs or [], device)
        if not len(samples):
            raise ValueError("SignRound needs calibration samples (ctx.inputs is empty)")
        with torch.no_grad():
            targets = [[] for _ in samples.sizes]
            for idx in samples.chunks(batch_size):
                for hidden, args, kwargs, _ in samples.calls(idx):
                    targets[samples.owner[idx[0]][0]].append(_forward(block, state, hidden, args, kwargs))
            samples.targets = [torch.cat(t) for t in targets]

        params = {n: init_params(w, fmt) for n, w in weights.items()}
        trained: list[tuple[str, int, torch.Tensor]] = []  # (linear, which: 0 v / 1 alpha / 2 beta, tensor)
        for n, (v, alpha, beta) in params.items():
            trained.append((n, 0, v))
            if sp["min_max_tune"]:
                if not (fmt.symmetric and not fmt.per_channel):  # symmetric: alpha has no effect
                    trained.append((n, 1, alpha))
                trained.append((n, 2, beta))
        tensors = [t for _, _, t in trained]
        for t in tensors:
            t.requires_grad_(True)

        def quantized(p: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
            return {f"{n}.weight": fake_quantize(weights[n], *p[n], fmt, folded=folded[n]) for n in names}

        rtn = {n: final_result(w, *init_params(w, fmt), fmt) for n, w in weights.items()}
        err_rtn = self._errors(block, state, samples, rtn, batch_size)  # per sample: the yardstick of every step
        # the best step: the lowest loss relative to RTN's on the same samples (the raw loss of a few samples
        # says more about which samples were drawn than about the parameters)
        best = [t.detach().clone() for t in tensors]
        best_ratio, best_step, reached = math.inf, -1, set()
        gen = torch.Generator().manual_seed(int(sp["seed"]) + ctx.index)
        n_samples, per_step = len(samples), min(batch_size, len(samples))
        order, pos = torch.randperm(n_samples, generator=gen).tolist(), 0
        with torch.enable_grad():
            for it in range(iters):
                if pos + per_step > n_samples:
                    order, pos = torch.randperm(n_samples, generator=gen).tolist(), 0
                idx, pos = order[pos:pos + per_step], pos + per_step
                calls = samples.calls(idx)
                n_elems = sum(t.numel() for *_, t in calls)
                grads: list[torch.Tensor | None] = [None] * len(tensors)
                step_err = 0.0
                for hidden, args, kwargs, target in calls:
                    out = _forward(block, {**state, **quantized(params)}, hidden, args, kwargs)
                    err = (out - target).pow(2).sum()
                    for k, g in enumerate(torch.autograd.grad(err / n_elems, tensors, allow_unused=True)):
                        if g is not None:
                            grads[k] = g if grads[k] is None else grads[k] + g
                    step_err += float(err.detach())
                ratio = step_err / max(float(err_rtn[idx].sum()), 1e-30)
                if ratio < best_ratio:  # the parameters before this step's update
                    best_ratio, best_step = ratio, it
                    for b, t in zip(best, tensors):
                        b.copy_(t.detach())
                step_lr = lr * (1 - it / iters) if sp["lr_decay"] else lr
                with torch.no_grad():
                    for (n, which, t), g in zip(trained, grads):
                        if g is None:
                            continue
                        reached.add(n)
                        t.sub_(step_lr * torch.sign(g))
                        t.clamp_(*(V_RANGE if which == 0 else SHRINK_RANGE))
        for t in tensors:
            t.requires_grad_(False)

        # the candidates on every calibration sample, with their exact integer weights: the last parameters,
        # the best step's, RTN; the lowest loss wins
        total = float(sum(t.numel() for t in samples.targets))
        last = {n: final_result(w, *params[n], fmt) for n, w in weights.items()}
        for b, t in zip(best, tensors):
            t.copy_(b)
        best_res = {n: final_result(w, *params[n], fmt) for n, w in weights.items()}
        losses = {"rtn": float(err_rtn.sum()) / total}
        if iters:
            losses["last"] = float(self._errors(block, state, samples, last, batch_size).sum()) / total
            losses["best_step"] = (losses["last"] if all(all(torch.equal(getattr(last[n], a), getattr(best_res[n], a))
                                                              for a in ("codes", "scale", "zero")) for n in names)
                                   else float(self._errors(block, state, samples, best_res, batch_size).sum()) / total)
        kept = min(losses, key=lambda k: (losses[k], k != "rtn"))
        chosen = {"rtn": rtn, "last": last, "best_step": best_res}[kept]
        note: dict[str, Any] = {"layers": names, "samples": n_samples, "iters": iters, "lr": lr,
                                "loss_rtn": losses["rtn"], "loss": losses[kept], "kept": kept,
                                "loss_last": losses.get("last"), "loss_best_step": losses.get("best_step"),
                                "best_step": best_step, "best_step_ratio": best_ratio}
        for n in names:
            q = chosen[n].tpu_weight()
            if q.folded:
                note.setdefault("folded_to_float", []).append(n)
            if chosen[n].zero_point_fixes:
                note["zero_point_fixes"] = note.get("zero_point_fixes", 0) + chosen[n].zero_point_fixes
            ctx.results[n] = _to_cpu(q)
        note["time_s"] = round(time.perf_counter() - t0, 3)
        ctx.report["signround"] = note
        uncalibrated = [n for n in names if n not in reached] if iters else []
        if uncalibrated:  # MoE experts no calibration token reached: no gradient, TPU-MLIR's RTN codes
            ctx.report["uncalibrated"] = uncalibrated
        if iters and kept == "rtn":
            log.warning("block %d: SignRound's loss is not below RTN's (%.4g) on the calibration samples; kept RTN",
                        ctx.index, losses["rtn"])

    @staticmethod
    @torch.no_grad()
    def _errors(block: nn.Module, state: dict[str, torch.Tensor], samples: _Samples, results: dict[str, GptqResult],
                batch_size: int) -> torch.Tensor:
        """Per calibration sample (float64 ``[n]``, on the CPU): the squared error of the block's output against
        the float target, with the results' exact integer weights (``(q - z) * stored scale``, folds included)."""
        tensors = {**state, **{f"{n}.weight": r.tpu_weight().dequantize().to(samples.device) for n, r in results.items()}}
        errors = torch.zeros(len(samples), dtype=torch.float64)
        for idx in samples.chunks(batch_size):
            for hidden, args, kwargs, target in samples.calls(idx):  # one call: samples idx of one batch, in order
                err = (_forward(block, tensors, hidden, args, kwargs) - target).double().pow(2)
                errors[idx] = err.reshape(err.shape[0], -1).sum(dim=1).cpu()
        return errors
