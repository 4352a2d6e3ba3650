"""The verify stage's parsing and comparison on synthetic TPU-MLIR output (no compiler needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat, quantize_weight
from llmc_tpu.verify import VerifyError, find_tpu_mlir, format_verify_table
from llmc_tpu.verify.compare import VerifyResult, compare_linear
from llmc_tpu.verify.llm_convert import check_model_dir, llm_convert_args, read_lowered_linear, unpack_w4

NAME = "model.layers.0.mlp.up_proj"


def bits(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.to(dtype).view(torch.int16).numpy().view(np.uint16)


def lowered_npz(q: TpuQuantizedWeight, name: str = NAME) -> dict[str, np.ndarray]:
    """Write ``q`` the way TPU-MLIR 1.30.2's lowered-weight npz holds it (see llm_convert.py's docstring)."""
    dt = q.fmt.torch_scale_dtype
    suffix = "bf16" if dt == torch.bfloat16 else "f16"
    k = q.codes.shape[1]
    if q.folded:
        return {f"{name}_dequant_{suffix}": bits(q.dequantize(), dt).T.copy()}
    split = q.float_rows.shape[0] > 0
    p = f"{name}_0_" if split else f"{name}_"
    codes = q.codes.numpy()
    if q.fmt.bits == 4:
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        out = {p + "uint": packed}
    else:
        out = {p + ("int" if q.signed else "uint"): codes.astype(np.int8 if q.signed else np.uint8).reshape(-1)}
    scale, zero = bits(q.scale, dt), q.zero.numpy().astype(np.uint8)
    if q.fmt.per_channel:  # re-tiled to groups of 128
        tile = k // 128
        out[p + "scale_new"], out[p + "zp_new"] = np.repeat(scale, tile, 1).reshape(-1), np.repeat(zero, tile, 1).reshape(-1)
    else:
        out[p + f"scale_{suffix}"], out[p + "zp"] = scale, zero.reshape(-1)
    if split:
        out[f"{name}.weight_1_{q.n_quantized}_{suffix}"] = bits(q.float_rows, dt).T.copy()
    return out


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(torch.bfloat16).float()


CASES = {
    "w4-g64": (TpuWeightFormat(4, 64), 128, 128),
    "w4-split": (TpuWeightFormat(4, 64), 96, 128),  # bm1684x: 64 integer rows + 32 float rows
    "w4-folded": (TpuWeightFormat(4, 64), 32, 128),  # < NPU_NUM: folded back to bf16
    "w4f16-sym": (TpuWeightFormat(4, 32, True, "float16"), 64, 128),
    "w8-g64": (TpuWeightFormat(8, 64), 64, 256),
    "w8-per-channel": (TpuWeightFormat(8, 0), 64, 256),
    "w8-per-channel-folded": (TpuWeightFormat(8, 0), 96, 256),  # all or nothing per channel
    "w4-per-channel-bm1688": (TpuWeightFormat(4, 0, chip="bm1688"), 96, 128),
}


@pytest.mark.parametrize("case", list(CASES))
def test_our_own_prediction_round_trips(case):
    fmt, n, k = CASES[case]
    q = quantize_weight(weight(n, k), fmt)
    lowered = read_lowered_linear(lowered_npz(q), NAME, k, fmt.bits)
    check = compare_linear(NAME, q, lowered)
    assert check.ok, (check, format_verify_table(VerifyResult(Path("m"), fmt, Path("o"), [check])))
    assert check.shape == (n, k)


def test_npu_rule_layouts():
    fmt = TpuWeightFormat(4, 64)
    assert (quantize_weight(weight(96, 128), fmt).n_quantized, quantize_weight(weight(96, 128), fmt).folded) == (64, False)
    folded = quantize_weight(weight(32, 128), fmt)
    assert folded.folded and folded.n_quantized == 32 and folded.float_rows.shape[0] == 0
    # what the TPU multiplies with is stored in bf16
    assert torch.equal(folded.dequantize(), folded.dequantize().to(torch.bfloat16).float())
    assert quantize_weight(weight(96, 128), TpuWeightFormat(8, 64)).n_quantized == 64  # W8 follows the rule too
    assert quantize_weight(weight(96, 256), TpuWeightFormat(8, 0)).folded  # per channel: all or nothing


def test_folded_w8_per_channel_reads_signed_codes_as_unsigned():
    q = quantize_weight(weight(96, 256), TpuWeightFormat(8, 0))
    assert q.signed and q.folded and (q.codes < 0).any()
    neg = q.codes < 0
    s = q.stored_scale.float().expand_as(q.codes)
    expected = ((q.codes.float() + 256) * s).to(torch.bfloat16).float()  # TPU-MLIR 1.30.2 bug, reproduced
    assert torch.equal(q.dequantize()[neg], expected[neg])


def test_unpack_w4_low_nibble_is_the_even_feature():
    assert unpack_w4(np.array([0x21, 0xF0], np.uint8), 4).tolist() == [[1, 2, 0, 15]]


@pytest.mark.parametrize("what", ["code", "scale", "zero", "float", "folded", "layout"])
def test_each_kind_of_difference_is_reported(what):
    fmt = TpuWeightFormat(4, 64)
    q = quantize_weight(weight(32 if what == "folded" else 96, 128), fmt)
    npz = lowered_npz(q)
    key = {"code": f"{NAME}_0_uint", "scale": f"{NAME}_0_scale_bf16", "zero": f"{NAME}_0_zp",
           "float": f"{NAME}.weight_1_64_bf16", "folded": f"{NAME}_dequant_bf16"}.get(what)
    if key:
        npz[key] = npz[key].copy()
        npz[key].reshape(-1)[5] += 1
    else:  # the compiler keeping all 96 rows as integers while we predict 64
        npz = lowered_npz(quantize_weight(weight(96, 128), TpuWeightFormat(4, 64, chip="bm1688")))
    check = compare_linear(NAME, q, read_lowered_linear(npz, NAME, 128, 4))
    assert not check.ok
    counts = {"code": check.code_mismatches, "scale": check.scale_mismatches, "zero": check.zero_mismatches,
              "float": check.float_mismatches, "folded": check.float_mismatches, "layout": len(check.problems)}
    assert counts[what] == 1, check
    table = format_verify_table(VerifyResult(Path("m"), fmt, Path("o"), [check]))
    assert "1 of 1 Linears differ" in table


def test_missing_linear_is_a_problem():
    q = quantize_weight(weight(64, 128), TpuWeightFormat())
    assert read_lowered_linear({}, NAME, 128, 4) is None
    assert compare_linear(NAME, q, None).problems == ["not found in TPU-MLIR's lowered weights"]


def test_table_lists_every_linear():
    fmt = TpuWeightFormat(4, 64)
    rows = [compare_linear(f"model.layers.0.{n}", q, read_lowered_linear(lowered_npz(q, f"model.layers.0.{n}"),
                                                                         f"model.layers.0.{n}", 128, 4))
            for n, q in (("k_proj", quantize_weight(weight(32, 128), fmt)), ("up_proj", quantize_weight(weight(96, 128), fmt)))]
    table = format_verify_table(VerifyResult(Path("m"), fmt, Path("o"), rows))
    lines = table.splitlines()
    assert lines[0].startswith("TPU-MLIR check of m: W4BF16 g64 on bm1684x")
    assert lines[1].split()[:3] == ["Linear", "shape", "quantized"]
    assert "model.layers.0.self_attn" not in table and "32/32 folded" in table and "64/96" in table
    assert "all 2 Linears match TPU-MLIR" in table


def test_llm_convert_arguments():
    args = llm_convert_args(Path("/m"), TpuWeightFormat(4, 128, True, "float16", "bm1688"), 256, Path("/o"))
    assert args == ["-m", "/m", "-s", "256", "-q", "w4f16", "-g", "128", "-c", "bm1688", "-o", "/o", "--debug",
                    "--symmetric"]


def test_missing_tpu_mlir_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_TPU_MLIR_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(VerifyError, match="tools/install_tpu_mlir.sh"):
        find_tpu_mlir()


def test_model_dtype_must_match_the_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    check_model_dir(tmp_path, TpuWeightFormat(scale_dtype="bfloat16"))
    with pytest.raises(VerifyError, match="save the model in float16"):
        check_model_dir(tmp_path, TpuWeightFormat(scale_dtype="float16"))
