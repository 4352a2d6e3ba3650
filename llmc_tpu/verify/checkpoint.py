"""Verify GPTQ's handoff: compile our GPTQ checkpoint with ``llm_convert.py -q auto`` and compare, code for code.

"Ours" is the checkpoint read back by ``export.gptq_checkpoint.read_gptq_checkpoint`` (the same
codes, stored scales and zeros the run's fake-quant used). TPU-MLIR 1.30.2 lowers a pre-quantized
Linear ``L`` into (checked for W4/W8, per group and per channel, bf16 and f16):

- ``L_weight`` uint8: W4 nibbles ``[N*K/2]`` (low nibble = even in-feature) or W8 ``[N*K]``;
- ``L.scales_bf16`` / ``L.scales_f16`` ``[N, K/G]`` per group, ``L_scale_new`` ``[N*K/128]`` per channel;
- ``L_zp`` / ``L_zp_new`` uint8, same layouts, with the v1 offset added back;
- when ``N % NPU_NUM != 0`` only ``L_dequant_bf16`` / ``_f16`` ``[K, N]``: the whole Linear folded to
  float from our codes (unlike a float model, where only the remainder rows stay float).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from llmc_tpu.export.gptq_checkpoint import CheckpointError, read_gptq_checkpoint
from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify.compare import VerifyResult, compare_linear
from llmc_tpu.verify.layouts import expert_of, model_spec, read_moe_expert
from llmc_tpu.verify.llm_convert import LoweredLinear, compile_with_llm_convert, lowered_weight_files, unpack_w4
from llmc_tpu.verify.tpu_mlir_env import TpuMlirEnv, VerifyError

_LAYER = re.compile(r"(?:^|.*\.)layers\.(\d+)\.")


def llm_convert_auto_args(model_dir: Path, fmt: TpuWeightFormat, seq_len: int, out_dir: Path) -> list[str]:
    """llm_convert.py arguments for a pre-quantized checkpoint (bits, group, dtype come from the checkpoint)."""
    return ["-m", str(model_dir), "-s", str(seq_len), "-q", "auto", "-c", fmt.chip, "-o", str(out_dir), "--debug"]


def check_checkpoint_dir(model_dir: Path, fmt: TpuWeightFormat) -> None:
    """Refuse a folder that is not a GPTQ checkpoint in ``fmt`` (llm_convert would compile something else)."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise VerifyError(f"{cfg_file} not found: give the run's gptq_tpu_model folder")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    qc = cfg.get("quantization_config") or {}
    group = -1 if fmt.per_channel else fmt.group_size
    if qc.get("quant_method") != "gptq" or qc.get("bits") != fmt.bits or qc.get("group_size") != group:
        raise VerifyError(f"{model_dir} is not a {fmt.bits}-bit GPTQ checkpoint with group_size {group} "
                          f"(quantization_config: {qc or 'none'})")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype != fmt.scale_dtype:
        raise VerifyError(f"{cfg_file} says dtype {dtype!r}, but {fmt.llm_convert_quantize} needs {fmt.scale_dtype} "
                          "(llm_convert -q auto picks w*bf16 or w*f16 from it)")


def run_llm_convert_auto(model_dir: Path, fmt: TpuWeightFormat, seq_len: int, work_dir: Path,
                         env: TpuMlirEnv | None = None, timeout_s: float | None = None) -> Path:
    """Compile the checkpoint into ``work_dir/llm_convert`` (replaced); return that folder."""
    check_checkpoint_dir(Path(model_dir).resolve(), fmt)
    return compile_with_llm_convert(model_dir, work_dir, lambda m, out: llm_convert_auto_args(m, fmt, seq_len, out),
                                    env, timeout_s)


def read_prequantized_linear(npz: Mapping[str, np.ndarray], name: str, k: int, bits: int) -> LoweredLinear | None:
    """Collect pre-quantized Linear ``name`` (in-features ``k``) from a lowered-weight npz; None when absent."""
    keys = set(npz.keys())
    folded = next((npz[name + s].astype(np.uint16).reshape(k, -1).T for s in ("_dequant_bf16", "_dequant_f16")
                   if name + s in keys), None)
    codes = np.zeros((0, k), np.int16)
    scale, zero = np.zeros((0, 1), np.uint16), np.zeros((0, 1), np.int16)
    if name + "_weight" in keys:
        raw = npz[name + "_weight"]
        codes = unpack_w4(raw, k) if bits == 4 else np.asarray(raw).astype(np.int16).reshape(-1, k)
        n = codes.shape[0]
        s_key = next((key for key in (f"{name}.scales_bf16", f"{name}.scales_f16", f"{name}_scale_new") if key in keys), None)
        z_key = next((key for key in (f"{name}_zp", f"{name}_zp_new") if key in keys), None)
        scale = npz[s_key].astype(np.uint16).reshape(n, -1) if s_key else np.zeros((n, 0), np.uint16)
        zero = npz[z_key].astype(np.int16).reshape(n, -1) if z_key else np.zeros((n, 0), np.int16)
    elif folded is None:
        return None
    return LoweredLinear(name, codes, scale, zero, np.zeros((0, k), np.uint16), codes.shape[0], folded)


def compare_checkpoint_lowered(model_dir: Path, fmt: TpuWeightFormat, out_dir: Path) -> VerifyResult:
    """Compare llm_convert's lowered weights in ``out_dir`` with our reading of the checkpoint ``model_dir``."""
    try:
        ours = read_gptq_checkpoint(Path(model_dir), fmt)
    except CheckpointError as exc:
        raise VerifyError(str(exc)) from None
    if not ours:
        raise VerifyError(f"no *.qweight tensors in {model_dir}")
    npz_files = lowered_weight_files(out_dir)
    spec, _ = model_spec(model_dir)
    layer_of = {name: int(m.group(1)) for name in ours if (m := _LAYER.match(name))}
    rows, loaded = [], {}
    for name in sorted(ours, key=lambda n: (layer_of.get(n, -1), n)):
        q, layer = ours[name], layer_of.get(name)
        if layer not in npz_files:
            rows.append(compare_linear(name, q, None))
            continue
        if layer not in loaded:
            top = npz_files[layer].parent / f"block_{layer}_top_f32_all_weight.npz"
            with np.load(npz_files[layer]) as npz:
                loaded = {layer: dict(npz)}  # one block at a time
            if top.is_file():  # MoE experts: as TPU-MLIR's reader stacked them for its fused MoE op
                with np.load(top) as npz:
                    loaded[layer].update({f"top:{k}": v for k, v in npz.items() if ".expert_id." in k})
        if (expert := expert_of(spec, name)) is not None:
            stacked, leaf = expert
            e = int(name[: -len(leaf) - 1].rsplit(".", 1)[1])
            top_npz = {k[4:]: v for k, v in loaded[layer].items() if k.startswith("top:")}
            rows.append(compare_linear(name, q, read_moe_expert(top_npz, stacked, leaf, e, spec, fmt)))
            continue
        rows.append(compare_linear(name, q, read_prequantized_linear(loaded[layer], name, q.codes.shape[1], fmt.bits)))
    return VerifyResult(Path(model_dir), fmt, Path(out_dir), rows)


def verify_checkpoint(model_dir: Path, fmt: TpuWeightFormat, seq_len: int, work_dir: Path,
                      env: TpuMlirEnv | None = None, timeout_s: float | None = None) -> VerifyResult:
    """Compile the GPTQ checkpoint ``model_dir`` with ``-q auto`` and compare every quantized Linear with ours."""
    out_dir = run_llm_convert_auto(Path(model_dir), fmt, seq_len, Path(work_dir), env=env, timeout_s=timeout_s)
    return compare_checkpoint_lowered(Path(model_dir), fmt, out_dir)
