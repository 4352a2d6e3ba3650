"""GPTQ: the solver on TPU-MLIR's grid, its checkpoint, and the pipeline end to end (CPU only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import make_tiny_model

from llmc_tpu.algorithms.gptq import GptqError, Hessian, gptq_quantize, handoff_grid, output_error
from llmc_tpu.config import ConfigError, parse_config
from llmc_tpu.export.gptq_checkpoint import CheckpointError, linear_tensors, pack, read_gptq_checkpoint, unpack
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.tpu.rtn import TpuWeightFormat, quantize_weight

W4 = TpuWeightFormat(4, 64)
FORMATS = {
    "W4BF16-g64": W4,
    "W4BF16-g64-sym": TpuWeightFormat(4, 64, True),
    "W8BF16-g64": TpuWeightFormat(8, 64),
    "W4F16-g64": TpuWeightFormat(4, 64, False, "float16"),
    "W4BF16-per-channel": TpuWeightFormat(4, 0),
    "W8BF16-per-channel": TpuWeightFormat(8, 0, True),
}


def correlated_inputs(k: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels of very different sizes (a Hessian far from the identity)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.8 * torch.randn(k, k, generator=g) / k ** 0.5
    return torch.randn(tokens, k, generator=g) @ mix * torch.linspace(0.1, 3.0, k)


def weight(n: int = 128, k: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_hessian_does_not_depend_on_the_batching():
    x = correlated_inputs(64, tokens=12 * 50).view(12, 50, 64)
    whole, parts = Hessian(64), Hessian(64)
    whole.add(x)
    for i in (0, 5, 6, 11):  # batches of 5, 1, 5 and 1 sequences, in order
        parts.add(x[i:i + (5 if i in (0, 6) else 1)])
    assert whole.n == parts.n == 600 and torch.equal(whole.h, parts.h)


def test_hessian_is_the_running_average_of_2_x_xT():
    x = correlated_inputs(64, tokens=300)
    h = Hessian(64)
    for part in (x[:100].view(4, 25, 64), x[100:]):
        h.add(part)
    assert h.n == 300
    torch.testing.assert_close(h.h, 2 / 300 * x.T @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_gptq_output_error_below_rtn(fmt_name):
    fmt, w, x = FORMATS[fmt_name], weight(), correlated_inputs(256)
    h = Hessian(256)
    h.add(x)
    res = gptq_quantize(w, h.h, fmt)
    rtn = quantize_weight(w, fmt).dequantize()
    err, err_rtn = output_error(w, res.dequantize(), h.h), output_error(w, rtn, h.h)
    assert err < 0.9 * err_rtn, (err, err_rtn)
    # the same through the explicit product: sum ||(W - Q) x||^2 / sum ||W x||^2
    direct = float(((x @ (w - res.dequantize()).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert err == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("order", ["natural", "actorder"])
def test_identity_hessian_gives_tpu_rtn_code_for_code(fmt_name, order):
    """No correlation, nothing to compensate: GPTQ is TPU-MLIR's RTN (codes, stored scales, zeros)."""
    fmt, w = FORMATS[fmt_name], weight()
    kw = {"actorder": True, "static_groups": True} if order == "actorder" else {}
    res = gptq_quantize(w, torch.eye(256) * 3.0, fmt, percdamp=0.5, **kw)
    rtn = quantize_weight(w, fmt)
    assert res.zero_point_fixes == 0
    if rtn.signed:  # W8 per channel: signed codes c are written as c + 128 with zero 128
        assert torch.equal(res.codes - 128, rtn.codes) and bool((res.zero == 128).all())
    else:
        assert torch.equal(res.codes, rtn.codes) and torch.equal(res.zero, rtn.zero)
    assert torch.equal(res.scale, rtn.scale)
    assert torch.equal(res.dequantize(), rtn.dequantize())


def assert_covered(res, w: torch.Tensor, g: int) -> None:
    """Every weight within half a step of its code, on the fp32 grid the codes were rounded on."""
    s = res.scale.repeat_interleave(g, dim=1)
    grid = (res.codes.float() - res.zero.float().repeat_interleave(g, dim=1)) * s
    assert bool(((grid - w).abs() <= s * (0.5 + 1e-4)).all())
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= res.fmt.qmax


def test_zero_point_zero_is_never_produced():
    """Groups whose TPU grid has z = 0 (all weights above -s/2) get z = 1 and a scale that still covers them."""
    w = weight(64, 128)
    w[:8, :64] = w[:8, :64].abs() + 0.01  # all positive: TPU RTN gives z = 0 there
    w[8:16, 64:] = w[8:16, 64:].abs()  # non-negative, minimum close to 0
    rtn = quantize_weight(w, W4)
    assert int((rtn.zero == 0).sum()) == 16
    with pytest.raises(CheckpointError, match="zero points must be in 1"):
        linear_tensors("rtn", rtn)  # RTN's z = 0 cannot be written (v1 stores z - 1)
    res = gptq_quantize(w, torch.eye(128), W4)
    assert res.zero_point_fixes == 16 and int(res.zero.min()) >= 1
    assert bool((res.zero[:8, 0] == 1).all()) and bool((res.zero[8:16, 1] == 1).all())
    # with nothing to compensate, every weight rounds to its nearest step: the group is still covered (no clipping)
    assert_covered(res, w, 64)
    # and the result round-trips through the checkpoint tensors
    t = linear_tensors("x", res.tpu_weight())
    assert torch.equal(unpack(t["x.qzeros"].T.contiguous(), 4).T.contiguous() + 1, res.zero.T)


def test_zero_point_fix_for_w8_per_channel_on_a_positive_matrix():
    w = weight(64, 128).abs() + 0.001  # TPU W8 per channel: unsigned absmax/255, z = 0
    res = gptq_quantize(w, torch.eye(128), FORMATS["W8BF16-per-channel"])
    assert bool((res.zero == 1).all())
    assert_covered(res, w, 128)


def test_actorder_with_static_groups_keeps_the_grid_of_the_original_weights():
    w, x = weight(), correlated_inputs(256, seed=3)
    h = Hessian(256)
    h.add(x)
    plain = gptq_quantize(w, h.h, W4, static_groups=True)
    act = gptq_quantize(w, h.h, W4, actorder=True, static_groups=True)
    scale, zero, _ = handoff_grid(w, W4)
    assert torch.equal(act.scale, scale) and torch.equal(act.zero, zero)  # groups stay natural: g_idx = i // G
    rtn = output_error(w, quantize_weight(w, W4).dequantize(), h.h)
    assert output_error(w, act.dequantize(), h.h) < rtn and output_error(w, plain.dequantize(), h.h) < rtn
    with pytest.raises(ValueError, match="static groups"):
        gptq_quantize(w, h.h, W4, actorder=True)
    gptq_quantize(w, h.h, FORMATS["W4BF16-per-channel"], actorder=True)  # per channel: one group, nothing to reorder


def test_a_given_column_order_generalizes_act_order():
    """``order`` = descending diag(H) is act-order and ``order`` = 0..K-1 the natural order, code for code; any other
    permutation keeps the original weights' grid; what is not a permutation, or comes without static groups, is
    refused."""
    w, x = weight(), correlated_inputs(256, seed=5)
    h = Hessian(256)
    h.add(x)
    diag = torch.diagonal(h.h)
    act = gptq_quantize(w, h.h, W4, actorder=True, static_groups=True)
    assert torch.equal(gptq_quantize(w, h.h, W4, static_groups=True, order=torch.argsort(diag, descending=True)).codes,
                       act.codes)
    plain = gptq_quantize(w, h.h, W4, static_groups=True)
    assert torch.equal(gptq_quantize(w, h.h, W4, static_groups=True, order=torch.arange(256)).codes, plain.codes)
    top = torch.argsort(diag, descending=True)[:8]  # the 8 strongest columns first, then the rest in natural order
    rest = torch.tensor([c for c in range(256) if c not in set(top.tolist())])
    mixed = gptq_quantize(w, h.h, W4, static_groups=True, order=torch.cat([top, rest]))
    scale, zero, _ = handoff_grid(w, W4)
    assert torch.equal(mixed.scale, scale) and torch.equal(mixed.zero, zero)
    assert not torch.equal(mixed.codes, plain.codes) and not torch.equal(mixed.codes, act.codes)
    assert output_error(w, mixed.dequantize(), h.h) < output_error(w, quantize_weight(w, W4).dequantize(), h.h)
    with pytest.raises(ValueError, match="not a permutation"):
        gptq_quantize(w, h.h, W4, static_groups=True, order=torch.zeros(256, dtype=torch.long))
    with pytest.raises(ValueError, match="static groups"):
        gptq_quantize(w, h.h, W4, order=torch.arange(256))


def test_blocksize_does_not_change_the_result():
    """Lazy block updates are exact, group starts inside a block included (blocksize 48 vs G 64)."""
    w, x = weight(), correlated_inputs(256, seed=4)
    h = Hessian(256)
    h.add(x)
    ref = gptq_quantize(w, h.h, W4, blocksize=256)
    for bs in (16, 48, 128):
        other = gptq_quantize(w, h.h, W4, blocksize=bs)
        assert float((other.codes == ref.codes).float().mean()) > 0.999


@pytest.mark.parametrize("kw", [{}, {"static_groups": True}, {"actorder": True, "static_groups": True}])
def test_rows_solved_in_pieces_are_the_rows_of_the_whole(kw):
    """What lets torchrun's processes split a solve: any whole row chunks give exactly those rows of the call
    on all of them (blocksize 48: group starts inside a block, with the pending-update product per chunk)."""
    w, x = weight(n=100), correlated_inputs(256, seed=5)
    h = Hessian(256)
    h.add(x)
    chunks = [13, 12, 13, 12, 13, 12, 13, 12]  # engine.distributed's parts of 100 rows
    whole = gptq_quantize(w, h.h, W4, blocksize=48, row_chunks=chunks, **kw)
    assert torch.equal(whole.codes, gptq_quantize(w, h.h, W4, blocksize=48, **kw).codes)  # the default chunks
    for first, last in ((0, 4), (4, 8), (2, 3), (6, 8)):
        a, b = sum(chunks[:first]), sum(chunks[:last])
        part = gptq_quantize(w[a:b], h.h, W4, blocksize=48, row_chunks=chunks[first:last], **kw)
        for got, ref in ((part.codes, whole.codes), (part.scale, whole.scale), (part.zero, whole.zero)):
            assert torch.equal(got, ref[a:b])
    with pytest.raises(ValueError, match="add up"):
        gptq_quantize(w, h.h, W4, row_chunks=[50, 49])


@pytest.mark.parametrize("actorder", [False, True])
def test_a_failed_factor_of_the_inverse_retries_from_the_hessian(actorder, monkeypatch):
    """The inverse overwrites the working Hessian: a retry after the second factorization fails rebuilds it
    (dead columns and act-order included) and gets what a run with the higher damping gets."""
    w, x = weight(), correlated_inputs(256, seed=6)
    x[:, 7] = 0  # a dead column
    h = Hessian(256)
    h.add(x)
    kw = {"actorder": actorder, "static_groups": actorder}
    direct = gptq_quantize(w, h.h, W4, percdamp=0.1, **kw)
    real, calls = torch.linalg.cholesky_ex, []

    def first_upper_fails(a, *, upper=False, **rest):
        out = real(a, upper=upper, **rest)
        calls.append(upper)
        if upper and calls.count(True) == 1:
            out[1].fill_(1)
        return out

    monkeypatch.setattr(torch.linalg, "cholesky_ex", first_upper_fails)
    retried = gptq_quantize(w, h.h, W4, percdamp=0.01, **kw)
    assert calls == [False, True, False, True]
    assert retried.percdamp == direct.percdamp == 0.1 and "percdamp 0.01" in retried.warnings[0]
    assert torch.equal(retried.codes, direct.codes) and retried.dead_columns == 1


def test_singular_hessian_recovers_with_a_warning():
    x = torch.randn(500, 1) @ torch.randn(1, 128) * 10  # rank 1
    h = Hessian(128)
    h.add(x)
    res = gptq_quantize(weight(64, 128), h.h, W4, percdamp=1e-9)
    assert res.percdamp > 1e-9 and res.warnings and "Cholesky failed with percdamp 1e-09" in res.warnings[0]
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 15
    with pytest.raises(GptqError, match="Cholesky failed even with percdamp"):
        gptq_quantize(weight(64, 128), -torch.eye(128), W4)
    with pytest.raises(GptqError, match="NaN"):
        gptq_quantize(weight(64, 128), torch.full((128, 128), float("nan")), W4)


def test_dead_columns_keep_their_weights():
    x = correlated_inputs(128)
    x[:, 5] = 0
    x[:, 70:72] = 0
    h = Hessian(128)
    h.add(x)
    w = weight(64, 128)
    res = gptq_quantize(w, h.h, W4)
    assert res.dead_columns == 3
    # a dead column is decoupled: no error reaches it, and its group (the first) keeps RTN's grid
    assert torch.equal(res.codes[:, 5], quantize_weight(w, W4).codes[:, 5])


def test_tiny_scales_survive_the_fp16_checkpoint():
    """Below 2^-14 fp16 cannot hold every bf16 value: the scale used is one both hold, so file == TPU == fake-quant."""
    w = weight(64, 128) * 1e-4
    res = gptq_quantize(w, torch.eye(128), W4)
    stored = res.scale.to(torch.bfloat16)
    assert float(stored.float().min()) < 2 ** -14
    assert torch.equal(stored.to(torch.float16).to(torch.bfloat16), stored)
    file = linear_tensors("x", res.tpu_weight())["x.scales"]
    assert file.dtype == torch.float16 and torch.equal(file.to(torch.bfloat16).T, stored)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 1 << bits, (64, 24), generator=g, dtype=torch.int16)
    v[-1] = (1 << bits) - 1  # top bits set: negative int32 words
    words = pack(v, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 24) and int(words.min()) < 0
    assert torch.equal(unpack(words, bits), v)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_matches_word_by_word_reference(bits, dim):
    """Each word re-derived with Python integers: element p of a word at bits ``bits * p``, read as signed int32."""
    per = 32 // bits
    g = torch.Generator().manual_seed(10 * bits + dim)
    v = torch.randint(0, 1 << bits, (2 * per, 3 * per), generator=g, dtype=torch.int16)
    v[:, 0] = (1 << bits) - 1
    words = pack(v, bits, dim)
    lines = v.tolist() if dim == 1 else v.T.tolist()  # the values along the packed dimension, line by line
    expected = []
    for line in lines:
        row = []
        for i in range(0, len(line), per):
            word = sum(x << (bits * p) for p, x in enumerate(line[i:i + per]))
            row.append(word - (1 << 32) if word >= 1 << 31 else word)
        expected.append(row)
    expected = torch.tensor(expected, dtype=torch.int32)
    assert torch.equal(words, expected if dim == 1 else expected.T)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_pack_along_the_rows_of_one_or_no_row(bits, rows):
    """The byte path with a single row (any stride on its size-1 dimension) or none, against the int32 fields."""
    per = 32 // bits
    v = torch.randint(0, 1 << bits, (rows, 4 * per), generator=torch.Generator().manual_seed(rows), dtype=torch.int16)
    fields = (v.reshape(rows, 4, per).to(torch.int64) << torch.arange(0, 32, bits)).sum(-1)
    expected = torch.where(fields >= 1 << 31, fields - (1 << 32), fields).to(torch.int32)
    column_major = torch.empty(v.shape[1], rows, dtype=v.dtype).copy_(v.T).T  # one row: strides (1, 1)
    assert torch.equal(pack(v, bits, 1), expected) and torch.equal(pack(column_major, bits, 1), expected)


def gptq_config(model: Path, calib: Path, save: Path, **quant) -> dict:
    return {
        "model": {"path": str(model), "torch_dtype": "float32"},
        "calib": {"name": "custom_txt", "path": str(calib), "n_samples": 8, "seq_len": 32},
        "eval": {"name": "custom_ppl", "path": str(calib), "seq_len": 32, "bs": 4, "eval_pos": ["pretrain", "fake_quant"]},
        "quant": {"method": "GPTQ", "quant_out": True, **quant},
        "save": {"save_path": str(save), "save_fake": True},
    }


def test_config_refuses_what_the_checkpoint_cannot_carry():
    base = {"model": {"path": "m"}, "save": {"save_path": "s"}}
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "quant": {"method": "GPTQ", "special": {"actorder": True, "static_groups": False}}})
    msg = str(info.value)
    assert "quant.special.actorder" in msg and "static_groups: True" in msg
    special = parse_config({**base, "quant": {"method": "GPTQ"}}).quant.special
    assert special["actorder"] is True and special["static_groups"] is True  # the default: act-order, static groups
    special = parse_config({**base, "quant": {"method": "GPTQ", "special": {"static_groups": False}}}).quant.special
    assert special["actorder"] is False  # dynamic groups asked for: the natural order
    parse_config({**base, "quant": {"method": "GPTQ", "special": {"actorder": True},
                                    "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}}})
    with pytest.raises(ConfigError, match="save.save_trans.*gptq_tpu_model"):
        parse_config({**base, "quant": {"method": "GPTQ"}, "save": {"save_path": "s", "save_trans": True}})
    assert parse_config({**base, "quant": {"method": "GPTQ"}}).save.save_trans is False
    assert parse_config({**base, "quant": {"method": "RTN"}}).save.save_trans is True


def independent_dequant(folder: Path, name: str, npu_num: int = 64) -> torch.Tensor:
    """Re-read one Linear from the GPTQ files by the format description alone; the weight the TPU uses (fp32)."""
    cfg = json.loads((folder / "config.json").read_text())
    bits, group = cfg["quantization_config"]["bits"], cfg["quantization_config"]["group_size"]
    per, mask = 32 // bits, (1 << bits) - 1
    with safe_open(str(folder / "model.safetensors"), framework="np") as st:
        qweight = st.get_tensor(f"{name}.qweight").view(np.uint32)  # [K/per, N]
        qzeros = st.get_tensor(f"{name}.qzeros").view(np.uint32)  # [G, N/per]
        scales = st.get_tensor(f"{name}.scales")  # fp16 [G, N]
        g_idx = st.get_tensor(f"{name}.g_idx")
    k, n = qweight.shape[0] * per, qweight.shape[1]
    q = np.zeros((k, n), np.int64)
    for p in range(per):  # element p of word i: in-feature per * i + p, bits p*bits..
        q[p::per] = (qweight >> np.uint32(bits * p)) & mask
    z = np.zeros((qzeros.shape[0], n), np.int64)
    for p in range(per):  # along the outputs the same way; v1 stores zero - 1
        z[:, p::per] = (qzeros >> np.uint32(bits * p)) & mask
    z += 1
    assert np.array_equal(g_idx, np.arange(k) // (k if group == -1 else group))
    tpu_scale = torch.from_numpy(scales.astype(np.float32)).to(torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float16)
    rows = torch.from_numpy((q - z[g_idx]).astype(np.float32)) * tpu_scale.float()[torch.from_numpy(g_idx).long()]
    w = rows.T.contiguous()  # [N, K]
    if n % npu_num:  # TPU-MLIR folds such a Linear to bf16/f16 from the codes
        w = w.to(tpu_scale.dtype).float()
    return w


@pytest.mark.parametrize("case", ["w4-g64", "w8-per-channel-sym-actorder", "w4-g32-folded"])
def test_pipeline_end_to_end_checkpoint_equals_fake_quant(case, tmp_path, eval_txt):
    kw: dict = {"heads": 4, "kv_heads": 1} if case == "w4-g32-folded" else {}
    model = make_tiny_model(tmp_path / "m", "llama", **kw)  # folded: k/v have 32 outputs < NPU_NUM 64
    quant = {"w4-g64": {},
             "w8-per-channel-sym-actorder": {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"},
                                             "special": {"actorder": True, "true_sequential": False}},
             "w4-g32-folded": {"weight": {"group_size": 32}}}[case]
    save = tmp_path / "out"
    report = Quantizer(parse_config(gptq_config(model, eval_txt, save, **quant)), progress=False).run()
    ckpt = save / "gptq_tpu_model"
    outputs = {p.name for p in save.iterdir()}
    assert {"fake_quant_model", "gptq_tpu_model", "report.json"} <= outputs and "transformed_model" not in outputs
    assert "-q auto" in report.next_steps[0] and str(ckpt) in report.next_steps[0]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["quantization_config"]["quant_method"] == "gptq"
    assert cfg["quantization_config"]["desc_act"] is False and cfg["quantization_config"]["checkpoint_format"] == "gptq"
    assert (ckpt / "tokenizer.json").exists()
    floats = load_file(ckpt / "model.safetensors")
    assert floats["model.embed_tokens.weight"].dtype == torch.bfloat16 and "model.layers.0.mlp.up_proj.weight" not in floats
    fake = load_file(save / "fake_quant_model" / "model.safetensors")
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    for name in names:  # the fake-quant model (saved in bf16) holds exactly what the checkpoint gives the TPU
        ours = independent_dequant(ckpt, name)
        assert torch.equal(fake[f"{name}.weight"], ours.to(torch.bfloat16)), name
    read = read_gptq_checkpoint(ckpt, TpuWeightFormat(**{k: report.tpu_format[k] for k in ("bits", "group_size", "symmetric", "scale_dtype", "chip")}))
    assert sorted(read) == sorted(names)
    folded = sorted(n for n, q in read.items() if q.folded)
    assert folded == report.quantized["folded_to_float"]
    if case == "w4-g32-folded":
        assert folded == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"]
    for block in report.method["blocks"]:  # GPTQ's output error is below RTN's on every Linear
        for subset in block["gptq"]:
            for name, err in subset["err"].items():
                assert err < subset["err_rtn"][name], (block["block"], name)


def sink_inputs(k: int = 128, seqs: int = 16, seq: int = 64, seed: int = 0) -> torch.Tensor:
    """Tokens with a decaying spectrum, plus one attention-sink token per sequence (position 0) whose activation
    is massive in a few channels, as at the input of an LLM's down_proj."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.8 * torch.randn(k, k, generator=g) / k ** 0.5
    x = (torch.randn(seqs * seq, k, generator=g) @ mix * torch.logspace(-2, 0.5, k)).view(seqs, seq, k)
    x[:, 0, :4] += 1000.0 * torch.randn(4, generator=g).sign()
    return x


def test_token_clip_caps_outlier_tokens_per_sequence():
    from llmc_tpu.algorithms.gptq import clip_outlier_tokens

    x = sink_inputs()
    clipped = clip_outlier_tokens(x, 10.0)
    sq, sq_c = x.square().sum(-1), clipped.square().sum(-1)
    median = sq.median(dim=1, keepdim=True).values
    assert torch.equal(clipped[:, 1:], x[:, 1:])  # ordinary tokens untouched
    torch.testing.assert_close(sq_c[:, 0], 10.0 * median[:, 0])  # sinks capped at 10x their sequence's median
    cos = torch.nn.functional.cosine_similarity(clipped[:, 0], x[:, 0], dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))  # direction kept
    assert torch.equal(clip_outlier_tokens(x, 0.0), x)
    whole, parts = Hessian(128, token_clip=10.0), Hessian(128, token_clip=10.0)  # independent of the batching
    whole.add(x)
    for i in range(0, 16, 4):
        parts.add(x[i:i + 4])
    torch.testing.assert_close(whole.h, parts.h, rtol=1e-5, atol=1e-4)


def test_token_clip_keeps_sink_tokens_from_deciding_the_codes():
    """Without the clip, H is mostly the sinks' and GPTQ fits them at the expense of ordinary tokens."""
    w, fmt = weight(n=128, k=128), W4
    x = sink_inputs(seqs=32)
    calib, held_out = x[:16], x[16:]
    ordinary = Hessian(128)
    ordinary.add(held_out[:, 1:])
    errs = {}
    for clip in (0.0, 10.0):
        h = Hessian(128, token_clip=clip)
        h.add(calib)
        errs[clip] = output_error(w, gptq_quantize(w, h.h, fmt).dequantize(), ordinary.h)
    err_rtn = output_error(w, quantize_weight(w, fmt).dequantize(), ordinary.h)
    assert errs[10.0] < 0.8 * errs[0.0], errs
    assert errs[0.0] > err_rtn > errs[10.0], (errs, err_rtn)  # unclipped GPTQ is even worse than RTN here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton column kernel runs on CUDA only")
@pytest.mark.parametrize("static", [True, False])
def test_triton_column_kernel_gives_the_torch_loops_codes(static, monkeypatch):
    """The fused kernel against the column loop run op by op on the same device: the same codes, scales, zeros."""
    from llmc_tpu.algorithms import gptq, gptq_kernel

    dev = torch.device("cuda")
    if not gptq_kernel.available(dev):
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(200, 320, generator=g) * 0.02).to(dev)  # 320 = 2 blocks of 128 and one of 64
    x = torch.randn(1000, 320, generator=g) @ (torch.randn(320, 320, generator=g) / 18 + torch.eye(320))
    h = (2 / 1000 * x.T @ x).to(dev)
    results = {}
    for kernel in ("auto", "eager"):
        monkeypatch.setattr(gptq, "COLUMN_KERNEL", kernel)
        if kernel == "eager":  # the PyTorch loop launched op by op: the reference arithmetic
            monkeypatch.setattr(gptq._Block, "run", lambda self, a, b, qmax: gptq._columns(self, a, b, qmax))
        results[kernel] = gptq_quantize(w, h, W4, actorder=static, static_groups=static)
    fused, eager = results["auto"], results["eager"]
    assert torch.equal(fused.codes, eager.codes)
    assert torch.equal(fused.scale, eager.scale) and torch.equal(fused.zero, eager.zero)
    assert float(output_error(w, fused.dequantize(), h)) < float(output_error(w, quantize_weight(w, W4).dequantize(), h))


def test_sink_weight_counts_each_sequences_first_token_as_clipped():
    """H with sink_weight w: the plain sum plus (w - 1) x0 x0^T of each sequence's first token as the token clip
    left it; the same however the sequences are batched; an MoE expert's rows (2-D, no sequence) get no weight."""
    from llmc_tpu.algorithms.gptq import clip_outlier_tokens

    x = sink_inputs()  # the first tokens carry massive activations: the clip scales them down
    clipped = clip_outlier_tokens(x, 10.0).reshape(-1, 128)
    first = clip_outlier_tokens(x, 10.0)[:, 0]
    whole, parts = Hessian(128, token_clip=10.0, sink_weight=16), Hessian(128, token_clip=10.0, sink_weight=16)
    whole.add(x)
    for i in range(0, 16, 4):
        parts.add(x[i:i + 4])
    expected = 2 / clipped.shape[0] * (clipped.T @ clipped + 15 * first.T @ first)
    torch.testing.assert_close(whole.h, expected, rtol=1e-4, atol=1e-2)
    assert torch.equal(whole.h, parts.h) and whole.n == x.shape[0] * x.shape[1]
    rows, plain = Hessian(128, sink_weight=16), Hessian(128)
    rows.add(x[0])
    plain.add(x[0])
    assert torch.equal(rows.h, plain.h)


def rare_sink_inputs(seqs: int = 16, seq: int = 512, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose first one is an attention sink as the q/k/v input of SmolLM2's layers has it: nearly the
    same vector in every sequence, a quarter of the median token's norm, in the directions other tokens seldom
    take (as 1 token of 512 it is 1e-4 of the plain Hessian)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.8 * torch.randn(k, k, generator=g) / k ** 0.5
    x = (torch.randn(seqs * seq, k, generator=g) @ mix * torch.logspace(-2, 0.5, k)).view(seqs, seq, k)
    sink = torch.randn(k, generator=g) * torch.logspace(0.5, -2, k)
    sink = sink / sink.norm() * 0.25 * x.norm(dim=-1).median()
    x[:, 0] = sink + 0.01 * sink.norm() * torch.randn(seqs, k, generator=g)
    return x, sink


@pytest.mark.parametrize("actorder", [False, True])
def test_sink_weight_keeps_the_sink_tokens_outputs_accurate(actorder):
    """Counted once, the sink's error is what GPTQ trades away (above half of RTN's here, 10x RTN's in SmolLM2's
    q/k/v); counted 16 times it falls several times over while ordinary held-out tokens lose next to nothing."""
    w = weight(n=128, k=128, seed=10)
    x, sink = rare_sink_inputs()
    ordinary = Hessian(128)
    ordinary.add(x[8:, 1:])
    at_sink = 2 * torch.outer(sink, sink)
    errs = {}
    for sink_weight in (1, 16):
        h = Hessian(128, sink_weight=sink_weight)
        h.add(x[:8])
        q = gptq_quantize(w, h.h, W4, actorder=actorder, static_groups=actorder).dequantize()
        errs[sink_weight] = output_error(w, q, at_sink), output_error(w, q, ordinary.h)
    rtn_at_sink = output_error(w, quantize_weight(w, W4).dequantize(), at_sink)
    assert errs[1][0] > 0.3 * rtn_at_sink and errs[16][0] < 0.25 * errs[1][0], (errs, rtn_at_sink)
    assert errs[16][1] < 1.02 * errs[1][1], errs
