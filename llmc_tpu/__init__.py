"""llmc_tpu: prepare LLMs for Sophgo TPUs (RTN/AWQ/GPTQ scored with TPU-MLIR's own quantizer)."""

__version__ = "0.1.0"
