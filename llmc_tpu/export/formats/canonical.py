"""The canonical per-Linear result every GPU exporter derives from.

``GpuWeight`` is the TPU result (``rtn.TpuQuantizedWeight``) restated for GPU formats:
unsigned codes and zero points with ``w = (q - z) * scale``, the scale exactly as the TPU
stores it (bf16 for W*BF16, f16 for W*F16), and codes for **every** output row.

Rows TPU-MLIR keeps in float (the ``N % NPU_NUM`` remainder of a chip's NPU rule) are a
TPU artefact: a GPU kernel quantizes whole matrices. Those rows get codes from the same
grid function (``rtn.tpu_grid`` + ``rtn.quantize_codes``) applied to the same handed-over
float values the TPU would have kept; ``n_tpu_rows`` says how many leading rows carry the
TPU's own codes. Linears the compiler folds back to float already have codes for every row.
Nothing here recomputes a scale the TPU result already has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmc_tpu.tpu.rtn import TpuQuantizedWeight, quantize_codes, tpu_grid


class ExportError(ValueError):
    """A requested GPU format cannot represent the result; the message says why."""


@dataclass(frozen=True)
class GpuWeight:
    """One quantized Linear for the GPU formats: ``w = (codes - zero) * scale`` per group."""

    bits: int
    group_size: int  # in-features per group; equals in_features per channel
    per_channel: bool
    codes: torch.Tensor  # int16 [N, K], unsigned 0 .. 2^bits - 1
    zero: torch.Tensor  # int16 [N, G], unsigned 0 .. 2^bits - 1
    scale: torch.Tensor  # [N, G] in the TPU's stored dtype (bfloat16 or float16)
    n_tpu_rows: int  # leading rows whose codes are the TPU's; the rest were float on the TPU

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def mid(self) -> int:
        """The symmetric zero point, 2^(bits-1) (8 for 4-bit, 128 for 8-bit)."""
        return 1 << (self.bits - 1)

    @property
    def is_symmetric(self) -> bool:
        """Every zero point is the midpoint: a symmetric format can hold it without zeros."""
        return bool((self.zero == self.mid).all())

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: ``(q - z) * scale``, exact in float32."""
        g = self.group_size
        z = self.zero.float().repeat_interleave(g, dim=1)
        s = self.scale.float().repeat_interleave(g, dim=1)
        return (self.codes.float() - z) * s


def gpu_weight(result: TpuQuantizedWeight) -> GpuWeight:
    """Restate a TPU result for GPU formats, adding codes for the rows the TPU keeps in float."""
    fmt = result.fmt
    codes, zero, scale = result.codes, result.zero, result.scale
    if result.signed:  # W8 per channel, signed int8 with z = 0: the same values as uint8 with z = 128
        codes, zero = codes + 128, torch.full_like(zero, 128)
    rest = result.float_rows
    if rest.shape[0]:
        if fmt.per_channel:  # per channel keeps all rows or none (chips.quantized_out_features)
            raise ExportError("per-channel result with float rows: not produced by TPU-MLIR")
        rest_scale, rest_zero, _ = tpu_grid(rest, fmt)
        rest_codes = quantize_codes(rest, rest_scale, rest_zero, fmt)
        codes = torch.cat([codes, rest_codes])
        zero = torch.cat([zero, rest_zero])
        scale = torch.cat([scale, rest_scale])
    k = codes.shape[1]
    return GpuWeight(bits=fmt.bits, group_size=k // scale.shape[1], per_channel=fmt.per_channel,  # on the CPU: files
                     codes=codes.to("cpu", torch.int16), zero=zero.to("cpu", torch.int16),
                     scale=scale.to("cpu", fmt.torch_scale_dtype), n_tpu_rows=result.n_quantized)


def scales_as_fp16(w: GpuWeight, name: str) -> torch.Tensor:
    """The scale in float16 (AutoAWQ / GPTQ files), refusing any change of the dequantized weights.

    bf16 -> fp16 is exact for normal values (bf16 has 8 significant bits, fp16 11) inside
    fp16's range, and down to 2^-17 through fp16 subnormals; a scale outside that only
    matters if a code of its group is off its zero point.
    """
    fp16 = w.scale.to(torch.float16)
    changed = fp16.float() != w.scale.float()
    if changed.any():
        used = (w.codes.view(w.out_features, w.n_groups, w.group_size) != w.zero.unsqueeze(-1)).any(dim=-1)
        bad = changed & used
        if bad.any():
            worst = w.scale.float()[bad].abs()
            raise ExportError(
                f"{name}: {int(bad.sum())} group scale(s) are not representable in float16 "
                f"(|scale| from {float(worst.min()):.3g} to {float(worst.max()):.3g}; float16 is exact for "
                f"bf16 values between 2^-17 and 65504), so float16-scale formats would change the weights")
        fp16 = torch.where(changed, torch.zeros_like(fp16), fp16)  # unused groups: any scale gives 0
    return fp16
