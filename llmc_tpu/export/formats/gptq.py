"""GPTQ checkpoints (``quant_method: gptq``), v1 by default or v2, from the canonical result.

Per Linear (formats.md): ``qweight`` int32 ``[in*bits/32, out]`` packed along the input
dimension, ``qzeros`` int32 ``[G, out*bits/32]`` packed along the output, ``scales`` float16
``[G, out]``, ``g_idx`` int32 ``[in]`` (``i // group_size``: groups stay contiguous, there
is no act-order permutation to undo, so ``desc_act`` is false).

Zero points: v1 (``checkpoint_format: gptq``) stores ``zero - 1`` and kernels add 1 back,
so a zero point of 0 cannot be stored (it would read back as 2^bits); v2 stores zeros as
is. The TPU's symmetric grid (``z = 2^(bits-1)``) is GPTQ's ``sym`` (4-bit: stored 7,
``qzeros = 0x77777777``); W8 per-channel signed codes are the same values with z = 128.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

import llmc_tpu
from llmc_tpu.export.formats.canonical import ExportError, GpuWeight, scales_as_fp16
from llmc_tpu.export.formats.packing import pack_int32, per_word
from llmc_tpu.export.formats.spec import ExportOptions, PackedModel

FOLDER = "gptq_quant_model"


def stored_zeros(w: GpuWeight, checkpoint_format: str, name: str) -> torch.Tensor:
    """Zero points as the checkpoint stores them (v1: minus one)."""
    if checkpoint_format == "gptq_v2":
        return w.zero
    n_zero = int((w.zero == 0).sum())
    if n_zero:
        raise ExportError(
            f"{name}: {n_zero} group(s) have zero point 0, which GPTQ v1 cannot store (it writes zero - 1); "
            "set save.gptq_checkpoint_format: gptq_v2, or use save_vllm / save_autoawq")
    return w.zero - 1


def pack_linear(name: str, w: GpuWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one Linear (keys without the module prefix)."""
    if w.bits not in (4, 8):
        raise ExportError(f"{name}: {w.bits}-bit codes; this GPTQ exporter writes 4 or 8 bits")
    n = per_word(w.bits)
    for dim, size in (("in_features", w.in_features), ("out_features", w.out_features)):
        if size % n:
            raise ExportError(f"GPTQ packs {n} {w.bits}-bit values per int32; {name} has {dim} {size}")
    return {
        "qweight": pack_int32(w.codes.t(), w.bits, dim=0),
        "qzeros": pack_int32(stored_zeros(w, checkpoint_format, name).t(), w.bits, dim=1),
        "scales": scales_as_fp16(w, name).t().contiguous(),
        "g_idx": (torch.arange(w.in_features) // w.group_size).to(torch.int32),
    }


def build(weights: Iterable[tuple[str, GpuWeight]], opts: ExportOptions) -> PackedModel:
    """Every quantized Linear packed, plus ``quantization_config`` (also written as quantize_config.json)."""
    tensors = {}
    for name, w in weights:
        if opts.symmetric and not w.is_symmetric:
            raise ExportError(f"{name}: sym GPTQ needs every zero point at {w.mid}; this Linear has others "
                              "(W8 per channel on an all-positive matrix)")
        tensors.update({f"{name}.{k}": v for k, v in pack_linear(name, w, opts.gptq_checkpoint_format).items()})
    special = opts.method_options
    config = {
        "quant_method": "gptq",
        "bits": opts.bits,
        "group_size": -1 if opts.per_channel else opts.group_size,
        "desc_act": False,  # codes are in the original column order; g_idx is i // group_size
        "sym": opts.symmetric,
        "lm_head": False,
        "checkpoint_format": opts.gptq_checkpoint_format,
        "pack_dtype": "int32",
        "true_sequential": bool(special.get("true_sequential", True)),
        "static_groups": bool(special.get("static_groups", False)),
        "damp_percent": float(special.get("percdamp", 0.01)),
        "meta": {
            "quantizer": [f"llmc_tpu:{llmc_tpu.__version__}"],
            "method": opts.method,
            "grid": "TPU-MLIR RTN (s = (max-min)/qmax, or 2*absmax/qmax when symmetric)",
            "damp_percent": float(special.get("percdamp", 0.01)),
            "static_groups": bool(special.get("static_groups", False)),
            "true_sequential": bool(special.get("true_sequential", True)),
            "act_order": bool(special.get("actorder", False)),
        },
    }
    return PackedModel(tensors, config, extra_json={"quantize_config.json": config})
