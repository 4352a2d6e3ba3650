"""Quantization algorithms. Each transforms a block's float weights; the TPU's RTN then quantizes them."""

from llmc_tpu.methods.awq import AwqMethod
from llmc_tpu.methods.base import Method
from llmc_tpu.methods.gptq import GptqMethod
from llmc_tpu.methods.rtn import RtnMethod

METHODS: dict[str, type[Method]] = {"RTN": RtnMethod, "Awq": AwqMethod, "GPTQ": GptqMethod}

__all__ = ["METHODS", "Method"]
