"""Chip facts that change what TPU-MLIR quantizes."""

from __future__ import annotations

# Number of NPU lanes. TPU-MLIR 1.30.2 keeps integer codes (W4 and W8 alike) only for
# whole multiples of NPU_NUM output channels; see quantized_out_features.
NPU_NUM: dict[str, int] = {"bm1684x": 64, "bm1688": 32, "cv186x": 32}

CHIPS: tuple[str, ...] = tuple(NPU_NUM)


def quantized_out_features(out_features: int, bits: int, chip: str, per_channel: bool = False) -> int:
    """How many leading output rows of a Linear TPU-MLIR keeps as integer codes.

    Checked against the compiler (tests/verify): per group, the first
    ``N - N % NPU_NUM`` rows (the rest stay float); per channel, all rows or none.
    ``bits`` is accepted for symmetry: W8 follows the same rule as W4. A Linear with
    0 integer rows is still quantized, then folded back to a float weight
    (see ``rtn.TpuQuantizedWeight.folded``).
    """
    if chip not in NPU_NUM:
        raise ValueError(f"unknown chip {chip!r}; allowed: {', '.join(CHIPS)}")
    npu = NPU_NUM[chip]
    rest = out_features % npu
    if per_channel and rest:
        return 0
    return out_features - rest
