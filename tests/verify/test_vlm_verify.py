"""A Qwen2-VL handoff compiled by TPU-MLIR's llm_convert.py: the language blocks' codes are ours (needs TPU-MLIR).

The tiny model has a 2-head vision tower of head size 80 (the size TPU-MLIR's Qwen2-VL converter assumes)
and a config in the published layout; transformed_model (AWQ) and gptq_tpu_model (GPTQ, ``-q auto``) are
compiled as users would, with the vision tower at 112x112.
"""

from __future__ import annotations

import pytest
from tiny_vlm import make_samples, make_tiny_qwen2_vl

from llmc_tpu.config import parse_config
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify import format_verify_table, verify
from llmc_tpu.verify.checkpoint import verify_checkpoint

pytestmark = pytest.mark.tpu_mlir
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"), vision_dim=160)


def run(model, tmp_path, method: str):
    data = make_samples(tmp_path / "data", 3)
    cfg = {"model": {"path": str(model), "torch_dtype": "float32"},
           "calib": {"name": "custom_mm", "path": str(data), "n_samples": 4, "bs": 1},
           "eval": {"eval_pos": []}, "quant": {"method": method},
           "save": {"save_path": str(tmp_path / "out")}, "run": {"task_type": "VLM", "device": "cpu"}}
    report = Quantizer(parse_config(cfg), progress=False).run()
    return tmp_path / "out", report


def check(result) -> None:
    table = format_verify_table(result)
    assert result.ok, table
    assert {r.name.rsplit(".", 1)[-1] for r in result.rows} == LINEARS, table
    assert len(result.rows) == 2 * len(LINEARS) and all(r.name.startswith("model.layers.") for r in result.rows), table


def test_awq_transformed_model_compiles_to_our_codes(qwen2_vl, tmp_path):
    out, report = run(qwen2_vl, tmp_path, "Awq")
    assert any(s.startswith("llm_convert.py") and s.endswith("--max_pixels 448,448") for s in report.next_steps)
    check(verify(out / "transformed_model", TpuWeightFormat(), 64, tmp_path / "verify"))


def test_gptq_checkpoint_compiles_to_our_codes(qwen2_vl, tmp_path):
    out, _ = run(qwen2_vl, tmp_path, "GPTQ")
    check(verify_checkpoint(out / "gptq_tpu_model", TpuWeightFormat(), 64, tmp_path / "verify"))
