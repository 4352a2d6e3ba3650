"""Apply the TPU's quantization to a model's Linears: the canonical per-Linear result and fake-quant weights."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from llmc_tpu.models.registry import ModelSpec
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat, quantize_weight

QuantResults = dict[str, TpuQuantizedWeight]


def handoff_weight(linear: nn.Linear, fmt: TpuWeightFormat) -> torch.Tensor:
    """The weight exactly as TPU-MLIR will read it from the saved model (bf16 or f16), as float32."""
    return linear.weight.detach().to(fmt.handoff_dtype).float()


def quantize_block(block: nn.Module, spec: ModelSpec, fmt: TpuWeightFormat, prefix: str,
                   chosen: dict[str, TpuQuantizedWeight] | None = None) -> QuantResults:
    """Every quantized Linear of one block, keyed by the full module name: the method's own
    result where it chose codes (``chosen``), else TPU-MLIR's RTN of the float weight."""
    chosen = chosen or {}
    results = {}
    for name in spec.block_linear_names(block):
        result = chosen.get(name)
        if result is None:
            result = quantize_weight(handoff_weight(block.get_submodule(name), fmt), fmt)
        results[f"{prefix}.{name}"] = result
    return results


def fake_quant_weight(result: TpuQuantizedWeight, like: torch.Tensor) -> torch.Tensor:
    """What the TPU multiplies with, dequantized where ``like`` lives (a GPU block: on the GPU), in its dtype."""
    return result.to(like.device).dequantize().to(like.dtype)


def apply_fake_quant(model: nn.Module, results: QuantResults) -> None:
    """Replace each quantized Linear's weight by what the TPU multiplies with."""
    for name, result in results.items():
        linear = model.get_submodule(name)
        linear.weight.data = fake_quant_weight(result, linear.weight.data)


class RtnWhereNotChosen(Mapping[str, TpuQuantizedWeight]):
    """Every quantized Linear of ``model`` by name: the method's result where it chose the codes, else TPU-MLIR's
    RTN of the Linear's weight as it is when asked, computed where it lies. For the fake_quant eval, which then
    needs no RTN codes kept from the quantize stage (a 7B model's are 13 GB as int16)."""

    def __init__(self, model: nn.Module, names: Iterable[str], chosen: QuantResults, fmt: TpuWeightFormat) -> None:
        self.model, self.names, self.chosen, self.fmt = model, dict.fromkeys(names), chosen, fmt  # ordered, a set

    def __getitem__(self, name: str) -> TpuQuantizedWeight:
        if name in self.chosen:
            return self.chosen[name]
        if name not in self.names:
            raise KeyError(name)
        return quantize_weight(handoff_weight(self.model.get_submodule(name), self.fmt), self.fmt)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@contextmanager
def fake_quantized(module: nn.Module, results: Mapping[str, TpuQuantizedWeight], prefix: str = "",
                   restore: bool = True) -> Iterator[None]:
    """Temporarily fake-quantize the Linears of ``module`` (a block named ``prefix``, or with no prefix the model the
    results are named in) that ``results`` has, where their weights lie; their float weights are put back after
    (``restore=False``: not kept, for a caller that puts the module's own tensors back itself)."""
    start = f"{prefix}." if prefix else ""
    saved = {}
    try:
        for name in results:
            if not name.startswith(start):
                continue
            linear = module.get_submodule(name[len(start):])
            weight = linear.weight.data
            linear.weight.data = fake_quant_weight(results[name], weight)
            if restore:
                saved[name] = weight
            del weight
        yield
    finally:
        for name, weight in saved.items():
            module.get_submodule(name[len(start):]).weight.data = weight
