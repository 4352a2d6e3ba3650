"""What every GPU exporter takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

GptqCheckpointFormat = Literal["gptq", "gptq_v2"]


@dataclass(frozen=True)
class ExportOptions:
    """Run-level facts the formats write into their configs."""

    bits: int
    group_size: int  # the run's group size (ignored per channel)
    per_channel: bool
    symmetric: bool  # zero points are all 2^(bits-1): TPU --symmetric, or W8 per channel (signed int8)
    dtype: torch.dtype  # of the float tensors and (compressed-tensors) of the scales: the TPU's bf16 or f16
    not_quantized: list[str] = field(default_factory=list)  # Linears left in float (lm_head, ...)
    gptq_checkpoint_format: GptqCheckpointFormat = "gptq"
    method: str = "RTN"
    method_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PackedModel:
    """The quantized tensors of every Linear (full names) and config.json's ``quantization_config``."""

    tensors: dict[str, torch.Tensor]
    quantization_config: dict[str, Any]
    extra_json: dict[str, dict[str, Any]] = field(default_factory=dict)  # more files for the folder
