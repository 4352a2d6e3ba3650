"""Chip facts that change what TPU-MLIR quantizes."""

from __future__ import annotations

# Number of NPU lanes. TPU-MLIR quantizes a W4 MatMul only over the first
# N - N % NPU_NUM output channels; the rest (all of them when N < NPU_NUM) stay in
# the float activation dtype. W8 has no such rule.
NPU_NUM: dict[str, int] = {"bm1684x": 64, "bm1688": 32, "cv186x": 32}

CHIPS: tuple[str, ...] = tuple(NPU_NUM)


def quantized_out_features(out_features: int, bits: int, chip: str) -> int:
    """How many leading output rows of a Linear TPU-MLIR turns into integer codes."""
    if chip not in NPU_NUM:
        raise ValueError(f"unknown chip {chip!r}; allowed: {', '.join(CHIPS)}")
    if bits != 4:
        return out_features
    npu = NPU_NUM[chip]
    return out_features - out_features % npu
