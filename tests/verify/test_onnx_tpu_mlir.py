"""The ONNX path against the real compiler: block_0 through model_transform.py + model_deploy.py (compile.sh's
commands), codes compared with ours, and block_0 run on TPU-MLIR's CPU simulator (needs TPU-MLIR)."""

from __future__ import annotations

import shutil

import pytest
from tiny_models import make_tiny_model

from llmc_tpu.models.loading import load_model
from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify import format_verify_table
from llmc_tpu.verify.onnx_path import COSINE_MIN, compare_piece, format_sim, torch_fake_quant_reference, verify_onnx

pytest.importorskip("onnx")
pytestmark = pytest.mark.tpu_mlir

SEQ = 64
W4_G64 = TpuWeightFormat(4, 64)


def _export(folder, fmt, **model):
    from llmc_tpu.export.onnx import save_onnx

    loaded = load_model(str(make_tiny_model(folder / "m", **model)))
    save_onnx(loaded.model, loaded.spec, folder / "onnx", fmt, SEQ, loaded.model_type)
    return loaded, folder / "onnx"


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A GQA Llama's block_0 compiled W4BF16 g64 and simulated against our fake-quant torch block."""
    folder = tmp_path_factory.mktemp("onnx_gqa")
    loaded, onnx_dir = _export(folder, W4_G64, family="llama", heads=4, kv_heads=2)
    reference = torch_fake_quant_reference(loaded.model, loaded.spec, W4_G64)
    return onnx_dir, verify_onnx(onnx_dir, W4_G64, folder / "work", ("block_0",), reference=reference)


def test_block_0_codes_match_and_the_simulator_matches_our_fake_quant_block(gqa):
    _, result = gqa
    table = format_verify_table(result.weights)
    assert result.weights.ok, table
    assert len(result.weights.rows) == 7 and all(r.n_quantized == r.shape[0] and not r.folded for r in result.weights.rows)
    assert sum(r.code_mismatches + r.scale_mismatches + r.zero_mismatches for r in result.weights.rows) == 0
    assert result.sim.reference == "fake-quant torch block"
    assert min(result.sim.cosine.values()) >= COSINE_MIN, format_sim(result.sim)
    assert result.ok


def test_a_changed_onnx_weight_is_caught(gqa, tmp_path):
    import onnx
    from onnx import numpy_helper

    onnx_dir, result = gqa
    model = onnx.load(str(onnx_dir / "block_0.onnx"))
    name = "model.layers.0.mlp.up_proj"
    t = next(t for t in model.graph.initializer if t.name == name + ".weight")
    w = numpy_helper.to_array(t).copy()
    w[0, 3] = 1.0  # [K, N]: in-feature 0 of output row 3
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save_model(model, str(tmp_path / "block_0.onnx"))
    rows, _, _ = compare_piece(tmp_path / "block_0.onnx", result.files["block_0"], W4_G64)  # TPU-MLIR's codes of the original
    wrong = {r.name: r for r in rows if not r.ok}
    assert set(wrong) == {name}
    assert wrong[name].scale_mismatches == 1 and wrong[name].code_mismatches >= 1


def test_npu_rule_and_fold_are_the_same_on_this_path(tmp_path):
    # k/v_proj have 32 rows (< 64 NPUs on bm1684x): quantized, then folded to bf16; gate/up keep 256 of 288 rows
    fmt = TpuWeightFormat(4, 32, False, "bfloat16", "bm1684x")
    _, onnx_dir = _export(tmp_path, fmt, family="llama", heads=4, kv_heads=1, intermediate=288, seed=1)
    result = verify_onnx(onnx_dir, fmt, tmp_path / "work", ("block_0",), simulate_block=False)
    assert result.weights.ok, format_verify_table(result.weights)
    rows = {r.name.rsplit(".", 1)[-1]: (r.n_quantized, r.folded) for r in result.weights.rows}
    assert rows["k_proj"] == rows["v_proj"] == (32, True)
    assert rows["gate_proj"] == rows["up_proj"] == (256, False)
    assert rows["q_proj"] == (128, False)
    shutil.rmtree(tmp_path / "work")


def test_w8_per_channel_computes_with_its_signed_codes_read_as_unsigned(tmp_path):
    """TPU-MLIR 1.30.2 stores W8 per-channel codes as signed int8 (they match ours) but the simulated block computes
    with them read as uint8 (-3 -> 253): llm_convert.py's block_0 does the same. Pinned here so a fixed release shows."""
    import dataclasses

    from llmc_tpu.verify.onnx_path import onnx_fake_quant_reference, prefill_inputs, simulate
    from llmc_tpu.verify.tpu_mlir_env import find_tpu_mlir

    fmt = TpuWeightFormat(8, 0, True, "bfloat16")
    _, onnx_dir = _export(tmp_path, fmt, family="llama", heads=2, kv_heads=2)
    result = verify_onnx(onnx_dir, fmt, tmp_path / "work", ("block_0",))
    assert result.weights.ok, format_verify_table(result.weights)  # the stored codes and scales are ours
    assert result.sim.cosine["hidden_states"] < 0.5, format_sim(result.sim)  # but the block computes something else
    rows, quantized, weights = compare_piece(onnx_dir / "block_0.onnx", result.files["block_0"], fmt)
    unsigned = {n: dataclasses.replace(q, codes=q.codes & 0xFF) for n, q in quantized.items()}
    inputs = prefill_inputs(onnx_dir / "block_0.onnx")
    ref = onnx_fake_quant_reference(onnx_dir / "block_0.onnx", tmp_path / "work")(inputs, unsigned, weights)
    sim = simulate(find_tpu_mlir(), "block_0", tmp_path / "work" / "block_0.bmodel", inputs, ref, tmp_path / "work", "unsigned")
    assert min(sim.cosine.values()) >= COSINE_MIN, format_sim(sim)
