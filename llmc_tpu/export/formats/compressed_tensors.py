"""compressed-tensors ``pack-quantized`` checkpoints (vLLM's and SGLang's native format).

Per Linear (formats.md): ``weight_packed`` int32 ``[out, ceil(in*bits/32)]`` along the input,
``weight_scale`` ``[out, G]``, ``weight_shape`` int64 ``[2]``, and for asymmetric codes
``weight_zero_point`` int32 ``[ceil(out*bits/32), G]`` packed along the output. Values are
signed ``q - 2^(bits-1)`` stored with a ``+2^(bits-1)`` offset, so the stored bits are our
unsigned codes and zero points exactly. Scales keep the TPU's stored dtype (bf16 or f16),
the dtype of the model's float tensors, so nothing is rounded on the way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llmc_tpu.export.formats.canonical import ExportError, GpuWeight
from llmc_tpu.export.formats.packing import pack_int32
from llmc_tpu.export.formats.spec import ExportOptions, PackedModel

VLLM_FOLDER = "vllm_quant_model"
SGL_FOLDER = "sgl_quant_model"
FORMAT_VERSION = "0.20.0"  # the compressed-tensors release our files are tested against (tests/test_export_formats.py)


def pack_linear(name: str, w: GpuWeight, symmetric: bool) -> dict[str, torch.Tensor]:
    """weight_packed, weight_scale, weight_shape (+ weight_zero_point) of one Linear."""
    if w.bits not in (4, 8):
        raise ExportError(f"{name}: {w.bits}-bit codes; this exporter writes 4 or 8 bits")
    if symmetric and not w.is_symmetric:
        raise ExportError(f"{name}: a symmetric config needs every zero point at {w.mid}; "
                          "this Linear has other zero points (W8 per channel on an all-positive matrix)")
    out = {
        "weight_packed": pack_int32(w.codes, w.bits, dim=1, pad=True),
        "weight_scale": w.scale.contiguous(),
        "weight_shape": torch.tensor([w.out_features, w.in_features], dtype=torch.int64),
    }
    if not symmetric:
        out["weight_zero_point"] = pack_int32(w.zero, w.bits, dim=0, pad=True)
    return out


def build(weights: Iterable[tuple[str, GpuWeight]], opts: ExportOptions) -> PackedModel:
    """Every quantized Linear packed, plus the compressed-tensors ``quantization_config``."""
    tensors = {}
    for name, w in weights:
        tensors.update({f"{name}.{k}": v for k, v in pack_linear(name, w, opts.symmetric).items()})
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "version": FORMAT_VERSION,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": opts.bits,
                    "type": "int",
                    "symmetric": opts.symmetric,
                    "group_size": None if opts.per_channel else opts.group_size,
                    "strategy": "channel" if opts.per_channel else "group",
                    "dynamic": False,
                    "actorder": None,  # groups are contiguous: no weight_g_idx
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": list(opts.not_quantized),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
    return PackedModel(tensors, config)
