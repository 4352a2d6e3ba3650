"""Capture the first block's inputs, then run decoder blocks one at a time on a device.

Only one block lives on the device at a time, so a model larger than the device
memory can be calibrated and evaluated. Captured inputs are the hidden states plus
every keyword argument the model passes to its blocks (attention mask, position ids,
position embeddings, ...), exactly as the model built them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmc_tpu.models.registry import ModelSpec


class _StopForward(Exception):
    pass


@dataclass
class BlockInput:
    """The inputs of one batch to a decoder block."""

    hidden: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


def move(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts to a device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device) for v in obj)
    return obj


def host_tensors(module: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """Every parameter's and buffer's tensor of ``module`` as it is now, to be put back by ``put_back``."""
    return [(m, name, True, p.data) for m in module.modules() for name, p in m._parameters.items() if p is not None] + \
           [(m, name, False, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]


def put_back(saved: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
    """Point the parameters and buffers at the tensors ``host_tensors`` saved (same values, as the caller knows):
    after a block's device work, the model's own host tensors (mapped from the safetensors files) instead of
    the fresh host copies ``block.to("cpu")`` would allocate, a whole model's worth over a run."""
    for m, name, is_param, t in saved:
        point_at(m, name, is_param, t)


def point_at(module: nn.Module, name: str, is_param: bool, t: torch.Tensor) -> None:
    """Make a module's parameter (the same Parameter object where the tensor type allows, as ``Module._apply``
    decides) or buffer hold ``t``."""
    if is_param:
        param = module._parameters[name]
        if torch._has_compatible_shallow_copy_type(param, t):
            param.data = t
        else:
            module._parameters[name] = nn.Parameter(t, requires_grad=param.requires_grad)
    else:
        module._buffers[name] = t


View = tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]


def view_of(t: torch.Tensor) -> View:
    """What identifies a tensor's bytes while its storage lives: address, dtype, shape, strides."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def blocks_of(model: nn.Module, spec: ModelSpec) -> nn.ModuleList:
    return model.get_submodule(spec.blocks)


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module, sink: list[BlockInput]):
        super().__init__()
        self.block = block
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:  # some families pass the mask positionally
            kwargs = {**kwargs, "_positional": args}
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        self.sink.append(BlockInput(hidden_states.detach(), {k: _detach(v) for k, v in kwargs.items()}))
        raise _StopForward


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: ModelSpec, batches: Iterable[torch.Tensor | dict[str, Any]],
                         store_device: torch.device | str = "cpu") -> list[BlockInput]:
    """Run the model up to its first block for each batch and keep the block inputs.

    A batch is token ids, or a dict of model inputs (a VLM's ids, pixel values, grids, masks): then the
    multimodal prefill builds the first block's hidden states (image embeddings included) and kwargs.
    """
    blocks = blocks_of(model, spec)
    first = blocks[0]
    captured: list[BlockInput] = []
    stored: list[BlockInput] = []
    pin = torch.device(store_device).type == "cpu" and torch.cuda.is_available()  # host copies of CUDA work: pinned
    blocks[0] = _Catcher(first, captured)
    try:
        for ids in batches:
            try:
                if isinstance(ids, dict):
                    model(**ids, use_cache=False)
                else:
                    model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            for c in captured:  # stored as each batch is captured: the host never holds every batch's states at once
                stored.append(BlockInput(_pinned(c.hidden) if pin else c.hidden.to(store_device),
                                         move(c.kwargs, store_device)))
            captured.clear()
    finally:
        blocks[0] = first
    return stored


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in pinned host memory (copies to and from the GPU at full speed, with no staging)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput], device: torch.device | str) -> list[BlockInput]:
    """Outputs of one block for every batch, as inputs for the next block (same kwargs)."""
    outputs = []
    for inp in inputs:
        kwargs = move(inp.kwargs, device)
        args = kwargs.pop("_positional", ())
        out = block(inp.hidden.to(device), *args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        kept = _pinned(hidden) if inp.hidden.is_pinned() else hidden.to(inp.hidden.device)  # where the inputs were
        outputs.append(BlockInput(kept, inp.kwargs))
    return outputs
