"""The TPU-exact RTN against an independent scalar re-derivation of TPU-MLIR's formulas."""

import math

import numpy as np
import pytest
import torch

from llmc_tpu.tpu.chips import quantized_out_features
from llmc_tpu.tpu.rtn import TpuWeightFormat, fake_quantize, quantize_weight, round_half_away


def c_round(x: float) -> int:
    """std::round on a float32 value, computed exactly in double (|x| < 2**28)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def reference_group(values: np.ndarray, bits: int, symmetric: bool) -> tuple[np.float32, int, list[int]]:
    """Scale, zero and codes of one group, element by element in float32 like the C++."""
    qmax = (1 << bits) - 1
    v = values.astype(np.float32)
    if symmetric:
        s = np.float32(np.float32(2) * np.float32(np.max(np.abs(v)))) / np.float32(qmax)
        z = 1 << (bits - 1)
    else:
        s = np.float32(max(np.float32(v.max() - v.min()), np.float32(1e-5))) / np.float32(qmax)
        z = min(max(-c_round(float(np.float32(v.min() / s))), 0), qmax)
    codes = [min(max(c_round(float(np.float32(x / s))) + z, 0), qmax) for x in v]
    return np.float32(s), z, codes


def test_round_half_away_ties_and_near_ties():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 3.4999998, 7.5], dtype=torch.float32)
    assert round_half_away(x).tolist() == [1, 2, 3, -1, -3, 0, 0, 3, 8]
    assert torch.round(x).tolist()[:3] == [0, 2, 2]  # torch's half-to-even differs on exact ties


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_per_group_matches_scalar_reference(bits, symmetric, group_size):
    g = torch.Generator().manual_seed(bits * 100 + group_size + symmetric)
    w = (torch.randn(64, 256, generator=g) * 0.05).to(torch.bfloat16).float()
    w[3, :group_size] = torch.linspace(0.01, 0.3, group_size)  # an all-positive group: zero point clamps to 0
    fmt = TpuWeightFormat(bits, group_size, symmetric)
    q = quantize_weight(w, fmt)
    for row in (0, 3, 17, 63):
        for grp in range(256 // group_size):
            vals = w[row, grp * group_size:(grp + 1) * group_size].numpy()
            s, z, codes = reference_group(vals, bits, symmetric)
            assert q.scale[row, grp].item() == float(s)
            assert q.zero[row, grp].item() == z
            assert q.codes[row, grp * group_size:(grp + 1) * group_size].tolist() == codes


def test_exact_ties_round_away_from_zero():
    # group [0, 15] -> s = 1; w/s = 7.5 is an exact tie: TPU-MLIR gives 8, torch.round would give 8 too,
    # but 6.5 -> 7 (torch: 6) and 2.5 -> 3 (torch: 2).
    w = torch.zeros(64, 64)
    w[:, 0], w[:, 1] = 0.0, 15.0
    w[:, 2], w[:, 3], w[:, 4] = 6.5, 2.5, 0.5
    q = quantize_weight(w, TpuWeightFormat(4, 64, False))
    assert q.scale[0, 0].item() == 1.0 and q.zero[0, 0].item() == 0
    assert q.codes[0, :5].tolist() == [0, 15, 7, 3, 1]


def test_symmetric_grid_is_tpu_mlir_not_awq():
    w = torch.zeros(64, 64)
    w[:, 0] = 1.5  # absmax 1.5 -> s = 2 * 1.5 / 15 = 0.2 (AWQ would use 1.5 / 7)
    w[:, 1] = -1.5
    q = quantize_weight(w, TpuWeightFormat(4, 64, True))
    assert q.scale[0, 0].item() == pytest.approx(0.2)
    assert q.zero[0, 0].item() == 8
    assert q.codes[0, :3].tolist() == [15, 0, 8]  # 7.5 + 8 = 16 clamps to 15; -7.5 -> -8 + 8 = 0


def test_stored_scale_is_bf16_or_f16_round_to_nearest_even():
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.03)
    for dtype, tdtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        q = quantize_weight(w, TpuWeightFormat(4, 64, False, dtype))
        assert q.stored_scale.dtype == tdtype
        assert torch.equal(q.stored_scale.float(), q.scale.to(tdtype).float())
        # the fake weight multiplies with the stored scale, not the fp32 one
        expected = (q.codes.float() - q.zero.float().repeat_interleave(64, 1)) * q.stored_scale.float().repeat_interleave(64, 1)
        assert torch.equal(q.dequantize(), expected)
    # bf16 keeps 8 bits of mantissa: a scale of 1 + 2**-9 rounds to 1 (a tie to even), 1 + 3 * 2**-9 rounds up
    assert torch.tensor([1 + 2**-9, 1 + 3 * 2**-9]).to(torch.bfloat16).float().tolist() == [1.0, 1 + 2**-7]


def test_per_channel_w8_signed_and_w4_asymmetric():
    w = (torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * 0.1)
    q8 = quantize_weight(w, TpuWeightFormat(8, 0, True))
    assert q8.signed and q8.scale.shape == (64, 1)
    assert torch.allclose(q8.scale[:, 0], w.abs().amax(1) / 127)
    assert q8.codes.min() >= -128 and q8.codes.max() <= 127 and (q8.zero == 0).all()
    q4 = quantize_weight(w, TpuWeightFormat(4, 0, False))
    for row in (0, 40):
        s, z, codes = reference_group(w[row].numpy(), 4, False)
        assert q4.scale[row, 0].item() == float(s) and q4.zero[row, 0].item() == z
        assert q4.codes[row].tolist() == codes


def test_npu_rule_per_chip():
    assert quantized_out_features(32, 4, "bm1684x") == 0
    assert quantized_out_features(32, 4, "bm1688") == 32
    assert quantized_out_features(96, 4, "bm1684x") == 64
    assert quantized_out_features(96, 4, "cv186x") == 96
    assert quantized_out_features(96, 8, "bm1684x") == 64  # W8 follows the same rule (seen in the compiler)
    assert quantized_out_features(96, 8, "bm1684x", per_channel=True) == 0  # per channel: all rows or none
    w = torch.randn(96, 64)
    q = quantize_weight(w, TpuWeightFormat(4, 64, False, chip="bm1684x"))
    assert q.n_quantized == 64 and q.float_rows.shape == (32, 64) and not q.folded
    assert torch.equal(fake_quantize(w, q.fmt)[64:], w[64:])
    # no row keeps codes: the compiler still quantizes, then folds (q - z) * s back into a bf16 weight
    small = quantize_weight(torch.randn(32, 64), TpuWeightFormat(4, 64, False, chip="bm1684x"))
    assert small.folded and small.n_quantized == 32
    deq = small.dequantize()
    assert torch.equal(deq, deq.to(torch.bfloat16).float())


def test_k_not_multiple_of_group_is_an_error():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_weight(torch.randn(64, 96), TpuWeightFormat(4, 64, False))


def test_fake_quant_error_is_bounded_by_half_a_step():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    q = quantize_weight(w, TpuWeightFormat(4, 64, False, "float16"))
    err = (q.dequantize() - w).abs().view(128, 4, 64).amax(-1)
    assert (err <= q.scale * 0.5 * 1.01 + 1e-7).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton RTN kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,symmetric,group_size,scale_dtype",
                         [(4, False, 64, "bfloat16"), (4, True, 128, "bfloat16"), (8, False, 32, "float16"),
                          (4, False, 256, "float16")])
def test_scaled_rtn_kernel_matches_the_pytorch_operations_bit_for_bit(dtype, bits, symmetric, group_size, scale_dtype):
    from llmc_tpu.tpu import rtn_kernel

    if rtn_kernel.triton is None:
        pytest.skip("Triton is not installed")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    fmt = TpuWeightFormat(bits, group_size, symmetric, scale_dtype)
    n, k = 64 * 5 + 7, 4 * group_size  # 7 rows stay float (NPU rule), each group quantized otherwise
    w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(dtype)
    w[3, :group_size] = 0.0  # a constant group (the scale floor)
    w[5, :group_size] = torch.arange(group_size, device=dev).to(dtype) * 2 ** -8  # codes on exact ties
    s = torch.exp(torch.randn(k, device=dev, generator=gen) * 0.7)
    s[:group_size] = 1.0
    assert rtn_kernel._kernel_takes(w, fmt)
    got = rtn_kernel.scaled_fake_quantize(w, s, fmt)
    want = rtn_kernel.scaled_fake_quantize(w, s, fmt, use_kernel=False)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), int((got != want).sum())
    ref = fake_quantize(w[:, :group_size].float().to(fmt.handoff_dtype).float(), fmt).to(dtype)  # s = 1 there
    assert torch.equal(got[:, :group_size], ref)
    # unscaled, as AWQ's clip search quantizes its clamped candidates: float32 out, whatever w's dtype
    got = rtn_kernel.handed_over_fake_quantize(w, fmt)
    want = rtn_kernel.handed_over_fake_quantize(w, fmt, use_kernel=False)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), int((got != want).sum())
