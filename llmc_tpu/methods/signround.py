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
checkpoint carries it to TPU-MLIR); the block's float weights are left as they were (the block runs on
float32 copies of its tensors, put in place of its own while it runs, as ``functional_call`` does).

A step is kept cheap (the GPU is launch-bound at these sizes): everything it needs is on the device before
the loop (all hidden states, targets and per-sample arguments, indexed with one ``index_select`` each; every
step's sample indices and RTN loss), the fake-quantizer stacks all Linears of a group size into one set of
elementwise ops on precomputed groups and min/max, the parameters are one flat tensor (one update), the best
step is tracked on the device, and nothing in the loop waits for the device.

``special`` keys: ``iters`` (50), ``lr`` (None: 1 / iters), ``lr_decay`` (True: linear to 0 over the
iterations), ``batch_size`` (32 calibration samples per step), ``min_max_tune`` (True: train alpha/beta;
False: only the rounding), ``seed`` (0; block i draws its samples with seed + i).
"""

from __future__ import annotations

import logging
import math
import time
from itertools import chain
from typing import Any

import torch
from torch import nn

from llmc_tpu.algorithms.gptq import GptqResult
from llmc_tpu.algorithms.signround import (
    SHRINK_RANGE,
    V_RANGE,
    GroupedFakeQuant,
    check_format,
    final_result,
    group_size,
    init_params,
)
from llmc_tpu.config.schema import SignRoundSpecial
from llmc_tpu.engine.samples import CalibrationSamples
from llmc_tpu.fake_quant import handoff_weight
from llmc_tpu.methods.base import BlockContext, Method
from llmc_tpu.methods.gptq import to_host
from llmc_tpu.tpu.chips import quantized_out_features

log = logging.getLogger("llmc_tpu")

DEFAULTS: dict[str, Any] = SignRoundSpecial().model_dump()  # the config's defaults, for keys a caller leaves out


class _Swapped:
    """The block running on other tensors than its own (what ``functional_call`` does for one call, here for
    as many calls as the ``with`` lasts): ``set(tensors)`` (names as ``named_parameters``/``named_buffers`` give
    them) puts them in place of the block's, tied names included; leaving the ``with`` puts its own back."""

    def __init__(self, block: nn.Module) -> None:
        self.slots: dict[str, list[tuple[dict, str]]] = {}  # name -> every (module dict, key) holding that tensor
        first: dict[int, str] = {}
        for name, t in chain(block.named_parameters(remove_duplicate=False), block.named_buffers(remove_duplicate=False)):
            prefix, _, key = name.rpartition(".")
            mod = block.get_submodule(prefix)
            self.slots.setdefault(first.setdefault(id(t), name), []).append(
                (mod._parameters if key in mod._parameters else mod._buffers, key))
        self.saved: list[tuple[dict, str, Any]] = []

    def __enter__(self) -> _Swapped:
        self.saved = [(d, key, d[key]) for places in self.slots.values() for d, key in places]
        return self

    def set(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            for d, key in self.slots[name]:
                d[key] = t

    def __exit__(self, *exc: Any) -> None:
        for d, key, orig in reversed(self.saved):
            d[key] = orig
        self.saved = []


def _forward(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


class _Params:
    """The trained parameters of every quantized Linear of a block as one flat float32 tensor, and the
    fake-quantizers (one per group size, ``GroupedFakeQuant``) that turn it into the Linears' weights.

    Layout: the rounding offsets ``v`` of every group-size bucket, then per bucket its trained shrink factors
    (``alpha`` unless symmetric, ``beta``; with ``min_max_tune`` only). An untrained factor is 1. One update
    of every parameter is then one ``sign``, one ``sub_`` and two ``clamp_``."""

    def __init__(self, weights: dict[str, torch.Tensor], folded: dict[str, bool], fmt: Any, min_max_tune: bool) -> None:
        by_g: dict[int, list[str]] = {}
        for n, w in weights.items():
            by_g.setdefault(group_size(fmt, w.shape[1]), []).append(n)
        self.buckets = [(ns, GroupedFakeQuant([weights[n] for n in ns], fmt, [folded[n] for n in ns]))
                        for ns in by_g.values()]
        tune_alpha = min_max_tune and not (fmt.symmetric and not fmt.per_channel)  # symmetric: alpha has no effect
        self.sizes = [fq.n_groups * fq.g for _, fq in self.buckets]
        self.n_v = sum(self.sizes)
        self.slots: list[tuple[int | None, int | None]] = []  # per bucket: its alpha's and beta's part, if trained
        for _, fq in self.buckets:
            slot = []
            for tuned in (tune_alpha, min_max_tune):
                slot.append(len(self.sizes) if tuned else None)
                if tuned:
                    self.sizes.append(fq.n_groups)
            self.slots.append((slot[0], slot[1]))
        self.ones = [torch.ones(fq.n_groups, device=fq.groups.device) for _, fq in self.buckets]

    def init(self) -> torch.Tensor:
        """The starting point (TPU-MLIR's RTN, as ``init_params``): ``v = 0``, ``alpha = beta = 1``."""
        flat = torch.zeros(sum(self.sizes), device=self.ones[0].device)
        flat[self.n_v:] = 1.0
        return flat

    def clamp_(self, flat: torch.Tensor) -> None:
        flat[:self.n_v].clamp_(*V_RANGE)
        if flat.shape[0] > self.n_v:
            flat[self.n_v:].clamp_(*SHRINK_RANGE)

    def _split(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        parts = flat.split(self.sizes)
        return [(parts[b].view(fq.n_groups, fq.g), self.ones[b] if ia is None else parts[ia],
                 self.ones[b] if ib is None else parts[ib])
                for b, ((_, fq), (ia, ib)) in enumerate(zip(self.buckets, self.slots))]

    def weights(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every Linear's fake-quantized float32 weight, differentiable in ``flat``."""
        out: dict[str, torch.Tensor] = {}
        for (ns, fq), p in zip(self.buckets, self._split(flat)):
            out.update(zip(ns, fq(*p)))
        return out

    def per_linear(self, flat: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every Linear's ``(v [N, K], alpha, beta [N, n_groups])`` (views of ``flat``), as ``init_params``."""
        out = {}
        for (ns, fq), (v, alpha, beta) in zip(self.buckets, self._split(flat)):
            for i, n in enumerate(ns):
                (rows, k), lo, hi = fq.shapes[i], fq.offsets[i], fq.offsets[i + 1]
                out[n] = (v[lo:hi].reshape(rows, k), alpha[lo:hi].reshape(rows, k // fq.g),
                          beta[lo:hi].reshape(rows, k // fq.g))
        return out


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
        # (_Swapped), so its own weights are never touched
        state = {k: t.detach().float() if t.is_floating_point() else t.detach()
                 for k, t in chain(block.named_parameters(), block.named_buffers())}
        samples = CalibrationSamples(ctx.inputs or [], device)
        if not len(samples):
            raise ValueError("SignRound needs calibration samples (ctx.inputs is empty)")
        with torch.no_grad(), _Swapped(block) as swapped:
            swapped.set(state)
            targets = [[] for _ in samples.sizes]
            for idx in samples.chunks(batch_size):
                for hidden, args, kwargs, _ in samples.calls(idx):
                    targets[samples.owner[idx[0]][0]].append(_forward(block, hidden, args, kwargs))
            samples.set_targets(targets)
            del targets

        params = _Params(weights, folded, fmt, bool(sp["min_max_tune"]))
        theta = params.init().requires_grad_(True)
        rtn = {n: final_result(w, *init_params(w, fmt), fmt) for n, w in weights.items()}
        err_rtn = self._errors(block, state, samples, rtn, batch_size)  # per sample: the yardstick of every step

        # every step's samples, drawn up front (the generator draws nothing else), with their RTN loss and their
        # indices on the device: a step copies nothing to the device and waits for nothing from it
        gen = torch.Generator().manual_seed(int(sp["seed"]) + ctx.index)
        n_samples, per_step = len(samples), min(batch_size, len(samples))
        order, pos, steps = torch.randperm(n_samples, generator=gen).tolist(), 0, []
        for _ in range(iters):
            if pos + per_step > n_samples:
                order, pos = torch.randperm(n_samples, generator=gen).tolist(), 0
            steps.append(order[pos:pos + per_step])
            pos += per_step
        rtn_loss = torch.tensor([max(float(err_rtn[idx].sum()), 1e-30) for idx in steps], dtype=torch.float64,
                                device=device).unbind(0)
        index = (torch.tensor([sorted(idx) for idx in steps], dtype=torch.long).to(device).unbind(0)
                 if iters and samples.plan is not None else [None] * iters)

        # the best step: the lowest loss relative to RTN's on the same samples (the raw loss of a few samples
        # says more about which samples were drawn than about the parameters); kept on the device
        best = theta.detach().clone()
        best_ratio = torch.tensor(math.inf, dtype=torch.float64, device=device)
        best_step = torch.tensor(-1, dtype=torch.long, device=device)
        reached: set[str] = set()
        with torch.enable_grad(), _Swapped(block) as swapped:
            swapped.set(state)  # the frozen float32 tensors, once; a call replaces the quantized weights only
            for it, idx in enumerate(steps):
                calls = samples.calls(idx, index[it])
                n_elems = sum(t.numel() for *_, t in calls)
                grad: torch.Tensor | None = None
                step_err: torch.Tensor | None = None
                for hidden, args, kwargs, target in calls:
                    quantized = params.weights(theta)
                    swapped.set({f"{n}.weight": q for n, q in quantized.items()})
                    out = _forward(block, hidden, args, kwargs)
                    err = (out - target).pow(2).sum()
                    g, *used = torch.autograd.grad(err / n_elems, [theta, *quantized.values()], allow_unused=True)
                    reached.update(n for n, u in zip(quantized, used) if u is not None)
                    if g is not None:
                        grad = g if grad is None else grad + g
                    err = err.detach().double()
                    step_err = err if step_err is None else step_err + err
                ratio = step_err / rtn_loss[it]
                better = ratio < best_ratio  # the parameters before this step's update
                best_ratio = torch.where(better, ratio, best_ratio)
                best_step = torch.where(better, it, best_step)
                with torch.no_grad():
                    if device.type == "cpu":  # waiting costs nothing: copy only when better
                        if better:
                            best.copy_(theta)
                    else:
                        torch.where(better, theta, best, out=best)
                    if grad is not None:
                        step_lr = lr * (1 - it / iters) if sp["lr_decay"] else lr
                        theta.sub_(step_lr * torch.sign(grad))
                        params.clamp_(theta)
        theta.requires_grad_(False)
        best_ratio, best_step = float(best_ratio), int(best_step)

        # the candidates on every calibration sample, with their exact integer weights: the last parameters,
        # the best step's, RTN; the lowest loss wins
        total = float(sum(t.numel() for t in samples.targets))
        last = {n: final_result(weights[n], *p, fmt) for n, p in params.per_linear(theta).items()}
        best_res = {n: final_result(weights[n], *p, fmt) for n, p in params.per_linear(best).items()}
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
            ctx.results[n] = to_host(q)
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
    def _errors(block: nn.Module, state: dict[str, torch.Tensor], samples: CalibrationSamples, results: dict[str, GptqResult],
                batch_size: int) -> torch.Tensor:
        """Per calibration sample (float64 ``[n]``, on the CPU): the squared error of the block's output against
        the float target, with the results' exact integer weights (``(q - z) * stored scale``, folds included)."""
        tensors = {**state, **{f"{n}.weight": r.tpu_weight().dequantize().to(samples.device) for n, r in results.items()}}
        errors = []
        with _Swapped(block) as swapped:
            swapped.set(tensors)
            for idx in samples.chunks(batch_size):  # in order: every sample once
                for hidden, args, kwargs, target in samples.calls(idx):  # one call: samples idx of one batch, in order
                    err = (_forward(block, hidden, args, kwargs) - target).double().pow(2)
                    errors.append(err.reshape(err.shape[0], -1).sum(dim=1))
        return torch.cat(errors).cpu()
