"""Logits of a causal LM over eval windows: whole model on the device, or one block at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from llmc_tpu.engine.blockwise import blocks_of, capture_block_inputs, host_tensors, put_back, run_block
from llmc_tpu.engine.host_memory import release_file_pages
from llmc_tpu.fake_quant import fake_quantized
from llmc_tpu.models.registry import ModelSpec
from llmc_tpu.tpu.rtn import TpuQuantizedWeight

Progress = Callable[..., Iterator]


def _batches(win: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [win[i:i + bs] for i in range(0, win.shape[0], bs)]


def to_device(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)``, module by module: off the CPU, each module's host pages are given back once copied, so
    the host holds about one module's weights at a time instead of the whole model (they are the file's pages)."""
    if device.type == "cpu":
        model.to(device)
        return
    for module in model.modules():
        if next(module.children(), None) is None:  # a leaf: its own parameters and buffers
            on_host = host_tensors(module)
            module.to(device)
            release_file_pages(t for *_, t in on_host)
    model.to(device)  # what non-leaf modules hold themselves


@torch.no_grad()
def whole_model_logits(model: nn.Module, win: torch.Tensor, bs: int, device: torch.device,
                       progress: Progress | None = None, results: Mapping[str, TpuQuantizedWeight] | None = None
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Move the model to the device once and yield (ids, logits) per batch. ``results``: with those Linears
    fake-quantized (the TPU's weights, made on the device). After, the model points at its own host tensors
    again (file-backed where they were: no copy back, and their pages are given back once on a GPU)."""
    on_host = host_tensors(model)
    to_device(model, device)
    try:
        with fake_quantized(model, results or {}, restore=False):  # put_back restores the host tensors
            batches = _batches(win, bs)
            for ids in progress(batches, desc="eval", unit="batch") if progress else batches:
                yield ids, model(input_ids=ids.to(device), use_cache=False).logits
    finally:
        put_back(on_host)


@torch.no_grad()
def streamed_logits(model: nn.Module, spec: ModelSpec, batches: list, device: torch.device,
                    progress: Progress | None = None, results: Mapping[str, TpuQuantizedWeight] | None = None) -> Iterator[torch.Tensor]:
    """Logits per batch (ids, or a dict of model inputs), streaming the blocks through the device one at a time
    (for models that do not fit), then the final norm and lm_head. ``results``: each block runs with its Linears
    fake-quantized, made where it runs and dropped after, so no fake-quant model is ever held in host memory."""
    inputs = capture_block_inputs(model, spec, batches)
    blocks = blocks_of(model, spec)
    for i, block in enumerate(progress(blocks, desc="eval (per block)", unit="block") if progress else blocks):
        on_host = host_tensors(block)
        block.to(device)
        with fake_quantized(block, results or {}, f"{spec.blocks}.{i}", restore=False):
            inputs = run_block(block, inputs, device)
        put_back(on_host)
        release_file_pages(t for *_, t in on_host)  # read for this pass; faulted in again from the file if needed
    norm, head = model.get_submodule(spec.final_norm), model.get_submodule(spec.lm_head)
    on_host = host_tensors(norm) + host_tensors(head)
    norm.to(device)
    head.to(device)
    try:
        for inp in inputs:
            yield head(norm(inp.hidden.to(device)))
    finally:
        put_back(on_host)


def blockwise_logits(model: nn.Module, spec: ModelSpec, win: torch.Tensor, bs: int, device: torch.device,
                     progress: Progress | None = None, results: Mapping[str, TpuQuantizedWeight] | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, logits) per batch of eval windows, one block on the device at a time (``results``: fake-quantized)."""
    batches = _batches(win, bs)
    yield from zip(batches, streamed_logits(model, spec, batches, device, progress, results))
