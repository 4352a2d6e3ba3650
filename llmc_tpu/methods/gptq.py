"""GPTQ for the TPU: per block, Hessians of each subset's input, codes chosen by the solver on TPU-MLIR's grid.

The result of every Linear goes to ``ctx.results`` (the pipeline fake-quantizes with it and the
GPTQ checkpoint carries it to TPU-MLIR); the block's float weights are left as they were.
Linears of one subset read the same input, so they share one Hessian and are solved as one
matrix (rows concatenated). With ``true_sequential`` the subsets are processed in order and each
Hessian is collected with the earlier subsets already quantized.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch import nn

from llmc_tpu.algorithms.gptq import GptqResult, Hessian, gptq_quantize, output_errors
from llmc_tpu.algorithms.gptq_refine import default_sweeps, refine_codes
from llmc_tpu.engine import transfer
from llmc_tpu.engine.blockwise import BlockInput, move
from llmc_tpu.engine.distributed import Shard
from llmc_tpu.fake_quant import fake_quant_weight
from llmc_tpu.methods.base import BlockContext, Method
from llmc_tpu.models.registry import Subset
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, fake_quantize

log = logging.getLogger("llmc_tpu")


class _Stop(Exception):
    pass


@torch.no_grad()
def collect_hessians(block: nn.Module, subsets: list[Subset], inputs: list[BlockInput], device: torch.device,
                     stop_early: bool = False, token_clip: float = 0.0, shard: Shard | None = None,
                     sink_weight: float = 1.0) -> dict[str, Hessian]:
    """Run the block on every batch and accumulate the Hessian of each subset's input (keyed by its first layer).

    ``stop_early``: end each forward pass once the last subset's input is seen. ``shard``: the pipeline's
    calibration samples of this process (sums in the fixed order, completed over every process).
    """
    hessians: dict[str, Hessian] = {}
    hooks = []
    last = subsets[-1].layers[0]
    for subset in subsets:
        name = subset.layers[0]
        linear = block.get_submodule(name)
        hessians[name] = Hessian(linear.in_features, device, token_clip, shard, sink_weight)

        def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
            hessians[name].add(args[0])
            if stop_early and name == last:
                raise _Stop

        hooks.append(linear.register_forward_pre_hook(hook))
    try:
        for inp in inputs:
            kwargs = move(inp.kwargs, device)
            args = kwargs.pop("_positional", ())
            try:
                block(inp.hidden.to(device), *args, **kwargs)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    for hessian in hessians.values():  # in the subsets' order, the same on every process
        hessian.finish()
    return hessians


def to_host(q: TpuQuantizedWeight) -> TpuQuantizedWeight:
    """A result's tensors in host memory (page-locked from a GPU: ``engine.transfer``)."""
    return dataclasses.replace(q, **transfer.to_host({"codes": q.codes, "scale": q.scale, "zero": q.zero,
                                                      "float_rows": q.float_rows}))


class GptqMethod(Method):
    name = "GPTQ"
    needs_calibration = True

    def process_block(self, ctx: BlockContext) -> None:
        block = ctx.block
        subsets = ctx.spec.block_subsets(block)
        originals = {n: block.get_submodule(n).weight.data for s in subsets for n in s.layers}
        notes = []
        start, solving = time.perf_counter(), 0.0
        try:
            if self.special["true_sequential"]:
                # one stage = one registry entry (all experts of an entry are independent of each other)
                stages: dict[int, list[Subset]] = {}
                for subset in subsets:
                    stages.setdefault(subset.stage, []).append(subset)
                for stage in stages.values():
                    hessians = collect_hessians(block, stage, ctx.inputs, ctx.device, stop_early=len(stage) == 1,
                                                token_clip=self.special["token_clip"], shard=ctx.shard,
                                                sink_weight=self.special["sink_weight"])
                    for subset in stage:
                        t = time.perf_counter()
                        on_device = self._solve(ctx, subset, hessians[subset.layers[0]], notes)
                        solving += time.perf_counter() - t
                        for name in subset.layers:  # the next stages see this one quantized
                            linear = block.get_submodule(name)
                            linear.weight.data = fake_quant_weight(on_device[name], linear.weight)
            else:
                hessians = collect_hessians(block, list(subsets), ctx.inputs, ctx.device, token_clip=self.special["token_clip"],
                                            shard=ctx.shard, sink_weight=self.special["sink_weight"])
                t = time.perf_counter()
                for subset in subsets:
                    self._solve(ctx, subset, hessians[subset.layers[0]], notes)
                solving += time.perf_counter() - t
        finally:
            for name, weight in originals.items():
                block.get_submodule(name).weight.data = weight
        ctx.report["gptq"] = notes
        # forward passes with the Hessian hooks vs the solver (weights restored in between are negligible)
        ctx.report.setdefault("time_s", {}).update({"gptq forward+statistics": round(time.perf_counter() - start - solving, 4),
                                                     "gptq solve": round(solving, 4)})
        uncalibrated = [n for note in notes if note.get("uncalibrated") for n in note["layers"]]
        if uncalibrated:
            ctx.report["uncalibrated"] = uncalibrated

    def refine_sweeps(self) -> int:
        """Coordinate-descent sweeps after each solve (``quant.special.refine_sweeps``, by default by the order)."""
        sweeps = self.special.get("refine_sweeps")
        return default_sweeps(self.special["actorder"]) if sweeps is None else sweeps

    def _solve_rows(self, w: torch.Tensor, h: torch.Tensor, ctx: BlockContext, sweeps: int) -> GptqResult:
        """GPTQ on ``w``, then ``sweeps`` of coordinate descent on its codes: under torchrun each process solves its
        parts of the rows and every process gets all of them (each row is solved on its own, in the same row chunks
        whatever the number of processes)."""
        sp = self.special
        shard = ctx.shard
        rows, chunks = shard.matrix_rows(w.shape[0]) if shard is not None else (range(w.shape[0]), None)
        mine = w[rows.start:rows.stop]
        res = gptq_quantize(mine, h, ctx.fmt, blocksize=sp["blocksize"], percdamp=sp["percdamp"],
                            actorder=sp["actorder"], static_groups=sp["static_groups"], row_chunks=chunks)
        res = refine_codes(res, mine, h, sweeps, blocksize=sp["blocksize"], row_chunks=chunks)
        if shard is None or shard.ranks.world == 1:
            return res
        return dataclasses.replace(res, codes=shard.gather(res.codes), scale=shard.gather(res.scale),
                                   zero=shard.gather(res.zero), zero_point_fixes=shard.total(res.zero_point_fixes))

    @torch.no_grad()
    def _solve(self, ctx: BlockContext, subset: Subset, hessian: Hessian, notes: list[dict[str, Any]]
               ) -> dict[str, TpuQuantizedWeight]:
        """Quantize the subset's Linears as one matrix; record each Linear's result (in host memory) and output
        error (in ``notes``). Returns the results where they were computed."""
        weights = [ctx.block.get_submodule(n).weight.data.float() for n in subset.layers]
        h = hessian.h
        if hessian.n == 0:  # an expert no calibration token reached: identity Hessian = TPU-MLIR's RTN codes
            h = torch.eye(h.shape[0], device=h.device)
        sweeps = 0 if hessian.n == 0 else self.refine_sweeps()  # RTN's codes stay RTN's
        res = self._solve_rows(torch.cat(weights), h, ctx, sweeps)
        for w in res.warnings:
            log.warning("block %d %s: %s", ctx.index, "/".join(subset.layers), w)
        note: dict[str, Any] = {"layers": list(subset.layers), "tokens": hessian.n, "percdamp": res.percdamp,
                                "err": {}, "err_rtn": {}}
        if hessian.n == 0:
            note["uncalibrated"] = True
        if sweeps:
            note["refine_sweeps"] = sweeps
        row, on_device = 0, {}
        for name, w in zip(subset.layers, weights):
            q = res.tpu_weight(slice(row, row + w.shape[0]))
            row += w.shape[0]
            rtn = fake_quantize(w.to(ctx.fmt.handoff_dtype).float(), ctx.fmt)
            note["err"][name], note["err_rtn"][name] = output_errors(w, [q.dequantize(), rtn], hessian.h)
            if q.folded:
                note.setdefault("folded_to_float", []).append(name)
            on_device[name] = q
            ctx.results[name] = to_host(q)
        if res.warnings:
            note["warnings"] = res.warnings
        if res.dead_columns:
            note["dead_columns"] = res.dead_columns
        if res.zero_point_fixes:
            note["zero_point_fixes"] = res.zero_point_fixes
        notes.append(note)
        return on_device
