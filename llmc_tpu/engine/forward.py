"""Logits of a causal LM over eval windows: whole model on the device, or one block at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from llmc_tpu.engine.blockwise import blocks_of, capture_block_inputs, run_block
from llmc_tpu.models.registry import ModelSpec

Progress = Callable[..., Iterator]


def _batches(win: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [win[i:i + bs] for i in range(0, win.shape[0], bs)]


@torch.no_grad()
def whole_model_logits(model: nn.Module, win: torch.Tensor, bs: int, device: torch.device,
                       progress: Progress | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Move the model to the device once and yield (ids, logits) per batch; the model goes back to the CPU after."""
    model.to(device)
    try:
        batches = _batches(win, bs)
        for ids in progress(batches, desc="eval", unit="batch") if progress else batches:
            yield ids, model(input_ids=ids.to(device), use_cache=False).logits
    finally:
        model.to("cpu")


@torch.no_grad()
def streamed_logits(model: nn.Module, spec: ModelSpec, batches: list, device: torch.device,
                    progress: Progress | None = None) -> Iterator[torch.Tensor]:
    """Logits per batch (ids, or a dict of model inputs), streaming the blocks through the device one at a time
    (for models that do not fit), then the final norm and lm_head."""
    inputs = capture_block_inputs(model, spec, batches)
    blocks = blocks_of(model, spec)
    for block in progress(blocks, desc="eval (per block)", unit="block") if progress else blocks:
        block.to(device)
        inputs = run_block(block, inputs, device)
        block.to("cpu")
    norm = model.get_submodule(spec.final_norm).to(device)
    head = model.get_submodule(spec.lm_head).to(device)
    try:
        for inp in inputs:
            yield head(norm(inp.hidden.to(device)))
    finally:
        norm.to("cpu")
        head.to("cpu")


def blockwise_logits(model: nn.Module, spec: ModelSpec, win: torch.Tensor, bs: int, device: torch.device,
                     progress: Progress | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, logits) per batch of eval windows, one block on the device at a time."""
    batches = _batches(win, bs)
    yield from zip(batches, streamed_logits(model, spec, batches, device, progress))
