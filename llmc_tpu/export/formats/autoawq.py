"""AutoAWQ GEMM checkpoints (``quant_method: awq``, ``version: gemm``), from the canonical result.

Per Linear (formats.md): ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32 ``[G, out/8]``
packed along the output dimension in the nibble order ``AWQ_ORDER``, ``scales`` float16
``[G, out]``, zeros stored as is; dequant ``(q - z) * s``. 4-bit only. Symmetric TPU codes
fit too: their zero points (all 8) are simply written out.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llmc_tpu.export.formats.canonical import ExportError, GpuWeight, scales_as_fp16
from llmc_tpu.export.formats.packing import awq_interleave, pack_int32
from llmc_tpu.export.formats.spec import ExportOptions, PackedModel

FOLDER = "autoawq_quant_model"


def pack_linear(name: str, w: GpuWeight) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales of one Linear (keys without the module prefix)."""
    if w.bits != 4:
        raise ExportError(f"AutoAWQ GEMM is 4-bit only; {name} has {w.bits}-bit codes (use save_gptq or save_vllm)")
    if w.out_features % 8:
        raise ExportError(f"AutoAWQ GEMM packs 8 output columns per int32; {name} has out_features {w.out_features}")
    return {
        "qweight": pack_int32(awq_interleave(w.codes.t()), 4, dim=1),
        "qzeros": pack_int32(awq_interleave(w.zero.t()), 4, dim=1),
        "scales": scales_as_fp16(w, name).t().contiguous(),
    }


def build(weights: Iterable[tuple[str, GpuWeight]], opts: ExportOptions) -> PackedModel:
    """Every quantized Linear packed, plus config.json's ``quantization_config``."""
    tensors = {}
    for name, w in weights:
        tensors.update({f"{name}.{k}": v for k, v in pack_linear(name, w).items()})
    config = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": -1 if opts.per_channel else opts.group_size,
        "zero_point": True,
        "modules_to_not_convert": opts.not_quantized or None,
    }
    return PackedModel(tensors, config)
