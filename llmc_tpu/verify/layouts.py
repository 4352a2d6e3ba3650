"""Where llm_convert stores a Linear other than under its own name: fused Linears it cuts into parts
(Phi3, ChatGLM) and MoE experts it stacks for its fused MoE op (Qwen2-MoE). Read from the registry.

- A fused Linear ``L`` with ``tpu_split`` (e.g. Phi3's ``qkv_proj``) is lowered as the Linears ``L_q``,
  ``L_k``, ``L_v`` (``L_gate``, ``L_up``), each quantized on its own: our prediction is
  ``quantize_weight`` of the part's rows.
- Experts ``<path>.<e>.<leaf>`` of a GPTQ checkpoint are stacked by TPU-MLIR's reader into
  ``<path>.expert_id.<leaf>.qweight`` ``[E, N, K/2]`` (uint8, low nibble = even in-feature), ``.scales``
  (float32) and ``.qzeros`` (uint8 nibbles, zero points with the v1 offset added back), kept in the
  block's ``*_top_f32_all_weight.npz``. gate/up scales and zeros ``[E, N, G]`` have their rows permuted
  for the NPUs (stored row ``n * (N / NPU_NUM) + j`` = row ``j * NPU_NUM + n``); down's are ``[E, G, N]``
  and ``[E, G/2, N]``. The MoE op's own lowered layout is not decoded: what is checked is that the
  compiler read our codes, scales and zeros.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from llmc_tpu.models.registry import ModelSpec, find_spec, part_rows
from llmc_tpu.tpu.chips import NPU_NUM
from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify.llm_convert import LoweredLinear

_IN_BLOCK = re.compile(r"(?:^|.*\.)layers\.\d+\.(.+)")


def model_spec(model_dir: Path) -> tuple[ModelSpec | None, SimpleNamespace]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return find_spec(cfg.get("model_type", "")), SimpleNamespace(**cfg.get("text_config", cfg))


def split_parts(spec: ModelSpec | None, config: SimpleNamespace, name: str, n: int) -> list[tuple[str, list[int]]]:
    """(suffix, rows) of each part llm_convert cuts Linear ``name`` into; empty when it keeps it whole."""
    m = _IN_BLOCK.fullmatch(name)
    fused = spec.fused_of(m.group(1)) if spec is not None and m else None
    if fused is None or not fused.tpu_split:
        return []
    return [(f"_{part}", part_rows(fused, part, n, config)) for part in fused.parts]


def expert_of(spec: ModelSpec | None, name: str) -> tuple[str, str] | None:
    """(``<prefix>.expert_id.<leaf>``, leaf) for an expert Linear of a family TPU-MLIR fuses into a MoE op."""
    if spec is None or spec.experts is None:
        return None
    m = re.fullmatch(rf"(.*\.{re.escape(spec.experts.path)})\.\d+\.([^.]+)", name)
    return (f"{m.group(1)}.expert_id.{m.group(2)}", m.group(2)) if m else None


def _nibbles(a: np.ndarray) -> np.ndarray:
    """uint8 ``[..., C]`` -> int16 ``[..., 2C]``, low nibble first."""
    a = a.astype(np.int16)
    return np.stack([a & 15, a >> 4], axis=-1).reshape(*a.shape[:-1], -1)


def read_moe_expert(top: Mapping[str, np.ndarray], stacked: str, leaf: str, e: int, spec: ModelSpec,
                    fmt: TpuWeightFormat) -> LoweredLinear | None:
    """Expert ``e`` of the stacked tensors ``stacked`` (see the module docstring), as a LoweredLinear."""
    if stacked + ".qweight" not in top or fmt.bits != 4:
        return None
    codes = _nibbles(top[stacked + ".qweight"][e])
    n, k = codes.shape
    scale, zero = top[stacked + ".scales"][e], top[stacked + ".qzeros"][e]
    if leaf == spec.experts.names[2]:  # down: [G, N] scales, [G/2, N] zero bytes
        scale = scale.T
        zero = _nibbles(np.ascontiguousarray(np.moveaxis(zero, 0, -1))).reshape(n, -1)
    else:  # gate/up: rows permuted for the NPUs
        npu = NPU_NUM[fmt.chip]
        unpermute = lambda x: x.reshape(npu, n // npu, -1).transpose(1, 0, 2).reshape(n, -1)  # noqa: E731
        scale, zero = unpermute(scale), unpermute(_nibbles(zero))
    bits = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).to(fmt.torch_scale_dtype).view(torch.int16)
    return LoweredLinear(stacked, codes, bits.numpy().view(np.uint16), zero, np.zeros((0, k), np.uint16), n, None)

