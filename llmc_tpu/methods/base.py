"""What a quantization method is to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmc_tpu.engine.blockwise import BlockInput
from llmc_tpu.engine.distributed import Shard
from llmc_tpu.models.registry import ModelSpec
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat


@dataclass
class BlockContext:
    """Everything a method sees of one block."""

    index: int
    block: nn.Module  # already on ``device``
    spec: ModelSpec
    fmt: TpuWeightFormat
    device: torch.device
    inputs: list[BlockInput] | None  # None when the method needs no calibration data
    head_dim: int = 0  # attention head size (for scales shared across grouped-query heads)
    config: Any = None  # the model's config (sizes of the parts of fused Linears)
    report: dict[str, Any] = field(default_factory=dict)  # per-block notes for the run report
    # Methods that choose integer codes themselves (GPTQ) put their result here, keyed by the
    # Linear's name relative to the block; every other Linear gets TPU-MLIR's RTN of its float weight.
    results: dict[str, TpuQuantizedWeight] = field(default_factory=dict)
    # The calibration samples this process holds among all of the run's (torchrun: a share); sums over the
    # samples go through it so that they do not depend on the number of processes. None: plain sums.
    shard: Shard | None = None


class Method:
    """Base class: transform the float weights of one block in place (or not at all)."""

    name = "base"
    needs_calibration = False
    changes_weights = False  # whether process_block leaves other float weights than it found (AWQ's scales)

    def __init__(self, special: dict[str, Any]) -> None:
        self.special = special

    def process_block(self, ctx: BlockContext) -> None:
        raise NotImplementedError
