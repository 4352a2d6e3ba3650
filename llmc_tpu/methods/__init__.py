"""Quantization algorithms. Each transforms a block's float weights (or picks its codes); the TPU's RTN does the rest."""

from typing import Any

from llmc_tpu.methods.awq import AwqMethod
from llmc_tpu.methods.base import Method
from llmc_tpu.methods.gptq import GptqMethod
from llmc_tpu.methods.rtn import RtnMethod
from llmc_tpu.methods.sequence import MethodSequence
from llmc_tpu.methods.signround import SignRoundMethod

METHODS: dict[str, type[Method]] = {"RTN": RtnMethod, "Awq": AwqMethod, "GPTQ": GptqMethod, "SignRound": SignRoundMethod}


def build_method(name: str, special: dict[str, Any]) -> Method:
    """The method a validated ``quant.method`` names; a combination ('Awq+GPTQ') runs its steps in order per block."""
    steps = name.split("+")
    if len(steps) == 1:
        return METHODS[name](special)
    return MethodSequence([METHODS[step](special) for step in steps])


def needs_calibration(name: str) -> bool:
    return any(METHODS[step].needs_calibration for step in name.split("+"))


__all__ = ["METHODS", "Method", "build_method", "needs_calibration"]
