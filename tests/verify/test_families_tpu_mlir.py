"""Families beyond the Llama layout against the real compiler (needs TPU-MLIR): one format each.

- Phi3 (fused ``qkv_proj`` / ``gate_up_proj``, which llm_convert cuts into q/k/v and gate/up): an AWQ run's
  transformed_model compiles to exactly our codes, part by part.
- Qwen2-MoE (experts, shared expert, router): TPU-MLIR 1.30.2 quantizes MoE only from a checkpoint, so a
  GPTQ run's gptq_tpu_model; every expert's codes, scales and zeros are what the compiler read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TEXT, make_tiny_model

from llmc_tpu.config import parse_config
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify import format_verify_table, verify
from llmc_tpu.verify.checkpoint import compare_checkpoint_lowered, verify_checkpoint

pytestmark = pytest.mark.tpu_mlir

FMT = TpuWeightFormat(4, 64, False, "bfloat16")
SEQ_LEN = 64


def quantize(tmp_path: Path, family: str, method: str, **model_kw) -> Path:
    text = tmp_path / "eval.txt"
    text.write_text(TEXT[:1200], encoding="utf-8")
    model = make_tiny_model(tmp_path / "m", family, **model_kw)
    cfg = {"model": {"path": str(model)}, "calib": {"name": "custom_txt", "path": str(text), "n_samples": 4, "seq_len": 32},
           "eval": {"eval_pos": []}, "quant": {"method": method, "special": {"n_grid": 4} if method == "Awq" else {}},
           "save": {"save_path": str(tmp_path / "out")}}
    Quantizer(parse_config(cfg), progress=False).run()
    return tmp_path / "out"


def test_phi3_fused_linears_match_part_by_part(tmp_path):
    out = quantize(tmp_path, "phi3", "Awq")
    result = verify(out / "transformed_model", FMT, SEQ_LEN, tmp_path / "work")
    table = format_verify_table(result)
    assert result.ok, table
    names = {r.name.split("layers.0.", 1)[1] for r in result.rows if ".layers.0." in r.name}
    assert names == {"self_attn.qkv_proj_q", "self_attn.qkv_proj_k", "self_attn.qkv_proj_v", "self_attn.o_proj",
                     "mlp.gate_up_proj_gate", "mlp.gate_up_proj_up", "mlp.down_proj"}, table


def test_qwen2_moe_gptq_checkpoint_matches_every_expert(tmp_path):
    # moe_intermediate_size 128: with 64 TPU-MLIR 1.30.2's MoE kernel fails to generate code on bm1684x
    out = quantize(tmp_path, "qwen2_moe", "GPTQ", moe_intermediate_size=128)
    ckpt = out / "gptq_tpu_model"
    result = verify_checkpoint(ckpt, FMT, SEQ_LEN, tmp_path / "work")
    table = format_verify_table(result)
    assert result.ok, table
    experts = [r for r in result.rows if ".mlp.experts." in r.name]
    assert len(experts) == 2 * 4 * 3 and len(result.rows) == 2 * (4 + 4 * 3 + 3), table  # attention, experts, shared
    # a changed code of one expert is caught (compared with what the compiler read from the original)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.experts.2.up_proj.qweight"
    tensors[key] = tensors[key] ^ torch.ones_like(tensors[key])  # flips the low bit of the first code of each word
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    checked = compare_checkpoint_lowered(bad, FMT, result.out_dir)
    assert {r.name for r in checked.rows if not r.ok} == {"model.layers.1.mlp.experts.2.up_proj"}
