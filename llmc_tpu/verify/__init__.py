"""The ``verify`` stage: compile a saved model with TPU-MLIR and compare its integer weights with ours."""

from llmc_tpu.verify.compare import LinearCheck, VerifyResult, compare_lowered, format_verify_table, verify
from llmc_tpu.verify.tpu_mlir_env import TpuMlirEnv, VerifyError, find_tpu_mlir, tpu_mlir_home

__all__ = [
    "LinearCheck", "TpuMlirEnv", "VerifyError", "VerifyResult", "compare_lowered", "find_tpu_mlir",
    "format_verify_table", "tpu_mlir_home", "verify",
]
