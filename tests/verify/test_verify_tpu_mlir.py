"""Our RTN against the real compiler: llm_convert.py's lowered weights, code for code (needs TPU-MLIR)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_model

from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify import VerifyError, compare_lowered, format_verify_table, verify

pytestmark = pytest.mark.tpu_mlir

FORMATS = {
    "W4BF16-g64": TpuWeightFormat(4, 64, False, "bfloat16"),
    "W4BF16-g64-sym": TpuWeightFormat(4, 64, True, "bfloat16"),
    "W4BF16-g128": TpuWeightFormat(4, 128, False, "bfloat16"),
    "W8BF16-g64": TpuWeightFormat(8, 64, False, "bfloat16"),  # -g applies to w8 too: 8-bit asymmetric groups
    "W4F16-g64": TpuWeightFormat(4, 64, False, "float16"),  # llm_convert wants a float16 model for it
}
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def assert_all_match(result) -> None:
    table = format_verify_table(result)
    assert result.ok, table
    assert {r.name.rsplit(".", 1)[-1] for r in result.rows} == LINEARS, table
    assert len(result.rows) == 2 * len(LINEARS), table


@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("model", ["llama", "qwen2", "qwen3"])
def test_every_linear_matches(compiled, model, fmt_name):
    _, result = compiled(model, FORMATS[fmt_name])
    assert_all_match(result)
    assert all(r.n_quantized == r.shape[0] and not r.folded for r in result.rows)


def test_w8_per_channel_matches(compiled):
    # -g 0: signed int8 per output row, scale absmax/127, stored as groups of 128 with the scale repeated
    _, result = compiled("qwen2", TpuWeightFormat(8, 0, False, "bfloat16"))
    assert_all_match(result)


def test_npu_rule_differs_per_chip_as_predicted(compiled):
    # compare_linear reports a problem whenever the compiler keeps other rows than we predict,
    # so `ok` here means: same integer rows, same float rows, same folded Linears, same values
    rows = {}
    for chip in ("bm1684x", "bm1688"):
        _, result = compiled("npu", TpuWeightFormat(4, 32, False, "bfloat16", chip))
        assert_all_match(result)
        rows[chip] = {r.name: (r.n_quantized, r.folded) for r in result.rows}
    big, small = rows["bm1684x"], rows["bm1688"]
    assert big["model.layers.0.mlp.gate_proj"] == (256, False)  # 288 = 4 * 64 + 32 float rows
    assert big["model.layers.0.self_attn.k_proj"] == (32, True)  # 32 < 64: quantized, folded back to bf16
    assert small["model.layers.0.mlp.gate_proj"] == (288, False)
    assert small["model.layers.0.self_attn.k_proj"] == (32, False)
    assert big["model.layers.0.self_attn.q_proj"] == small["model.layers.0.self_attn.q_proj"] == (128, False)


def _perturbed_copy(model: Path, dest: Path, name: str, row: int, value: float) -> Path:
    shutil.copytree(model, dest)
    weights = load_file(dest / "model.safetensors")
    weights[name][row, 0] = value
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_a_changed_weight_is_caught(compiled, tmp_path):
    fmt = FORMATS["W4BF16-g64"]
    model, result = compiled("llama", fmt)
    bad = _perturbed_copy(model, tmp_path / "bad", "model.layers.1.mlp.up_proj.weight", 3, 1.0)
    checked = compare_lowered(bad, fmt, result.out_dir)  # TPU-MLIR's codes of the unchanged model
    assert not checked.ok
    wrong = {r.name: r for r in checked.rows if not r.ok}
    assert set(wrong) == {"model.layers.1.mlp.up_proj"}, format_verify_table(checked)
    r = wrong["model.layers.1.mlp.up_proj"]
    assert r.scale_mismatches == 1 and r.code_mismatches >= 1, format_verify_table(checked)
    assert "1 of 14 Linears differ" in format_verify_table(checked)


def test_a_changed_float_row_and_folded_weight_are_caught(compiled, tmp_path):
    fmt = TpuWeightFormat(4, 32, False, "bfloat16", "bm1684x")
    model, result = compiled("npu", fmt)
    bad = _perturbed_copy(model, tmp_path / "bad", "model.layers.0.mlp.gate_proj.weight", 287, 0.5)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.0.self_attn.v_proj.weight"][0, 0] = 0.5
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    checked = compare_lowered(bad, fmt, result.out_dir)
    wrong = {r.name: r for r in checked.rows if not r.ok}
    assert set(wrong) == {"model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.v_proj"}
    assert wrong["model.layers.0.mlp.gate_proj"].float_mismatches == 1  # row 287 is left in bf16
    assert wrong["model.layers.0.mlp.gate_proj"].code_mismatches == 0
    assert wrong["model.layers.0.self_attn.v_proj"].float_mismatches >= 1  # folded: compared as bf16 values


def test_llm_convert_failure_is_a_verify_error_with_the_log(tmp_path):
    model = make_tiny_model(tmp_path / "mistral", "mistral")  # a model_type llm_convert.py does not know
    with pytest.raises(VerifyError, match="Unsupported model type: mistral") as err:
        verify(model, FORMATS["W4BF16-g64"], 64, tmp_path / "work")
    assert "llm_convert.py failed" in str(err.value) and "llm_convert.log" in str(err.value)
