"""ONNX pieces (blocks, cache blocks, embedding, lm_head, greedy head) for TPU-MLIR's model_transform / model_deploy flow."""

from llmc_tpu.export.onnx.export import TOLERANCE, OnnxModel, check_exportable, save_onnx
from llmc_tpu.export.onnx.graph import OnnxExportError

__all__ = ["TOLERANCE", "OnnxExportError", "OnnxModel", "check_exportable", "save_onnx"]
