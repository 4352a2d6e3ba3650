"""AWQ: function preserved without quantization, batch-size independent, searches scored exactly."""

import copy

import pytest
import torch
from tiny_models import make_tiny_model

from llmc_tpu.algorithms.awq import ClipSearch, apply_clip, group_gram, search_clip
from llmc_tpu.algorithms.awq_kernel import sample_squared_errors
from llmc_tpu.config import parse_config
from llmc_tpu.engine.blockwise import blocks_of, capture_block_inputs
from llmc_tpu.methods.awq import AwqMethod, tpu_quantizer
from llmc_tpu.methods.base import BlockContext
from llmc_tpu.models.loading import load_model
from llmc_tpu.tpu.rtn import TpuWeightFormat


def run_awq_on_model(model, spec, batches, special, fmt=None):
    """Run AWQ block by block like the pipeline (without quant_out); return the per-block reports."""
    fmt = fmt or TpuWeightFormat()
    from llmc_tpu.engine.blockwise import run_block

    method = AwqMethod(special)
    inputs = capture_block_inputs(model, spec, batches)
    reports = []
    for i, block in enumerate(blocks_of(model, spec)):
        ctx = BlockContext(i, block, spec, fmt, torch.device("cpu"), inputs, head_dim=model.config.head_dim)
        method.process_block(ctx)
        reports.append(ctx.report)
        inputs = run_block(block, inputs, torch.device("cpu"))
    return reports


def awq_special(**kw):
    cfg = parse_config({"model": {"path": "m"}, "quant": {"method": "Awq", "special": kw}, "save": {"save_path": "s"}})
    return cfg.quant.special


@pytest.mark.parametrize("gqa", ["skip", "repeat"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_transform_without_clipping_preserves_logits(tmp_path, gqa, version):
    loaded = load_model(str(make_tiny_model(tmp_path, "llama", heads=4, kv_heads=2, hidden=128)), torch_dtype="float32")
    model, spec = loaded.model, loaded.spec
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    reports = run_awq_on_model(model, spec, [ids], awq_special(weight_clip=False, gqa_o_proj=gqa, trans_version=version))
    after = model(input_ids=ids).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    scaled = {tuple(s["layers"]) for s in reports[0]["scaled"]}
    assert (("self_attn.o_proj",) in scaled) == (gqa == "repeat")
    if gqa == "skip":
        assert "grouped-query attention" in reports[0]["skipped"][0]["reason"]
    # the scales really changed the weights (a no-op transform would pass the first assert too)
    fresh = load_model(str(tmp_path), torch_dtype="float32").model
    assert not torch.equal(fresh.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)


def test_result_does_not_depend_on_calib_bs(tmp_path):
    folder = make_tiny_model(tmp_path, "qwen2")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    weights = []
    for batches in ([ids], list(ids.split(1))):
        loaded = load_model(str(folder), torch_dtype="float32")
        run_awq_on_model(loaded.model, loaded.spec, batches, awq_special())
        weights.append({k: v.clone() for k, v in loaded.model.state_dict().items()})
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6), k


def test_chunking_does_not_change_the_result(tmp_path):
    folder = make_tiny_model(tmp_path, "llama")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    states = []
    for chunk in (16384, 32):  # 32 tokens: one sample per forward
        loaded = load_model(str(folder), torch_dtype="float32")
        run_awq_on_model(loaded.model, loaded.spec, [ids], awq_special(chunk_tokens=chunk))
        states.append(copy.deepcopy(loaded.model.state_dict()))
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], rtol=1e-4, atol=1e-6), k


def test_gram_error_equals_per_token_sum():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 128, generator=g)
    d = torch.randn(8, 128, generator=g)
    gram = group_gram(x, 64)
    via_gram = torch.einsum("ngi,gij,ngj->ng", d.view(8, 2, 64), gram, d.view(8, 2, 64))
    explicit = torch.stack([((x[:, gi * 64:(gi + 1) * 64] @ d[:, gi * 64:(gi + 1) * 64].T) ** 2).sum(0) for gi in range(2)], 1)
    assert torch.allclose(via_gram, explicit, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the bf16 products with float32 results run on CUDA only"))])
def test_grams_are_the_float64_sums_over_every_row(device):
    """``gram`` and ``group_gram`` of bf16 rows ``[samples, seq, K]`` equal float64 sums to float32 rounding (on CUDA
    the products run in bf16 with float32 results: exact products, float32 sums)."""
    from llmc_tpu.algorithms.awq import gram

    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 40, 128, generator=g) * torch.rand(128, generator=g) * 3).to(torch.bfloat16)
    rows = x.reshape(-1, 128).double()
    full = gram(x.to(device))
    assert full.dtype == torch.float32 and torch.allclose(full.cpu().double(), rows.T @ rows, rtol=1e-5, atol=1e-3)
    grouped = group_gram(x.to(device), 32)
    assert grouped.shape == (4, 32, 32)
    for j in range(4):
        block = rows[:, 32 * j:32 * (j + 1)]
        assert torch.allclose(grouped[j].cpu().double(), block.T @ block, rtol=1e-5, atol=1e-3)


def test_clip_search_does_not_depend_on_its_row_chunks():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 128, generator=g) * 0.02
    w[:, 9] *= 10
    gram = group_gram(torch.randn(300, 128, generator=g), 64)
    quantize = tpu_quantizer(TpuWeightFormat(4, 64, False))
    whole = search_clip(w, gram, quantize, symmetric=False)
    for rows in (1, 7):
        chunked = search_clip(w, gram, quantize, symmetric=False, row_chunk=rows)
        assert torch.equal(chunked.factor, whole.factor) and chunked.err_after == pytest.approx(whole.err_after, rel=1e-6)


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_never_worse_and_scored_with_tpu_grid(sym):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 128, generator=g) * 0.02
    w[:, 5] *= 12  # outliers make clipping worth it
    x = torch.randn(256, 128, generator=g)
    fmt = TpuWeightFormat(4, 64, False)
    quantize = tpu_quantizer(fmt)
    gram = group_gram(x, 64)
    clip = search_clip(w, gram, quantize, symmetric=sym)
    assert clip.err_after <= clip.err_before and clip.err_after < 0.95 * clip.err_before
    clipped = apply_clip(w, clip)
    # the reported error is exactly the per-group output error of the TPU-quantized clipped weight
    d = quantize(clipped) - w
    err = sum(((x[:, i:i + 64] @ d[:, i:i + 64].T) ** 2).sum() for i in (0, 64))
    assert float(err) == pytest.approx(clip.err_after, rel=1e-3)
    none = ClipSearch(clip.lo * 0 - 1e9, clip.hi * 0 + 1e9, clip.factor, 0, 0)
    assert torch.equal(apply_clip(w, none), w)


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16)])
def test_sample_squared_errors_is_the_widened_squared_difference_summed_per_sample(shape):
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    target = (out.float() + torch.randn(*shape, generator=gen) * 0.1).to(torch.bfloat16)
    err = (out.float() - target.float()).pow(2)
    want = err.reshape(shape[0], -1).sum(dim=1) if len(shape) == 3 else err.sum().reshape(1)
    assert torch.equal(sample_squared_errors(out, target), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton error kernel runs on CUDA only")
def test_sample_squared_errors_kernel_against_float64():
    from llmc_tpu.algorithms import awq_kernel

    if awq_kernel.triton is None:
        pytest.skip("Triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = torch.randn(5, 300, 1000, device="cuda", generator=gen).to(torch.bfloat16)  # not a multiple of the block
    target = (out.float() + torch.randn(out.shape, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    got = sample_squared_errors(out, target)
    want = (out.double() - target.double()).pow(2).reshape(5, -1).sum(dim=1)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=0)
    assert torch.equal(got, sample_squared_errors(out, target))  # the same order of additions every time


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_loss_is_the_mean_squared_output_error(dtype):
    """A lone Linear's candidate loss through its input's Gram matrix equals the mean squared error of its
    outputs recomputed per token in float64 (the TPU's fake quant of the scaled weight, divided back)."""
    from llmc_tpu.methods.awq import Call, ScaleMap, _gram_loss
    from llmc_tpu.tpu.rtn_kernel import scaled_fake_quantize

    g = torch.Generator().manual_seed(3)
    n, k = 24, 128
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    xs = [(torch.randn(3, 16, k, generator=g) * torch.rand(k, generator=g) * 4).to(dtype),
          torch.randn(2, 16, k, generator=g).to(dtype)]
    calls = [Call(x, (), {}, None) for x in xs]
    fmt = TpuWeightFormat()
    loss_fn = _gram_loss(w, calls, 5 * 16, ScaleMap(k), fmt, None)
    for s in [torch.ones(k), torch.rand(k, generator=g) + 0.5, torch.rand(k, generator=g) * 3 + 0.1]:
        e = scaled_fake_quantize(w, s, fmt).double() - w.double()
        x = torch.cat([x.reshape(-1, k) for x in xs]).double()
        expected = float(((x @ e.T) ** 2).sum()) / (x.shape[0] * n)
        got = loss_fn(s)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        assert float(got) == pytest.approx(expected, rel=1e-5)


def test_gram_loss_applies_to_a_lone_linear_on_cuda_only(tmp_path):
    """o_proj and down_proj (their own inspected module) on CUDA; never the attention or MLP groups, never on the CPU."""
    from llmc_tpu.methods.awq import gram_loss_applies, scale_groups

    loaded = load_model(str(make_tiny_model(tmp_path, "llama", heads=4, kv_heads=4, hidden=128)), torch_dtype="float32")
    block = blocks_of(loaded.model, loaded.spec)[0]
    groups = scale_groups(loaded.spec.block_subsets(block))
    cuda = torch.device("cuda")
    on_cuda = {g[0].layers: gram_loss_applies(cuda, g, block, 4 * 1024) for g in groups}
    assert on_cuda == {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): False,
                       ("self_attn.o_proj",): True, ("mlp.gate_proj", "mlp.up_proj"): False, ("mlp.down_proj",): True}
    assert not any(gram_loss_applies(torch.device("cpu"), g, block, 4 * 1024) for g in groups)
    # with fewer tokens than 4x its input width, a Linear keeps the forwards
    widths = {g[0].layers: block.get_submodule(g[0].inspect).in_features for g in groups if on_cuda[g[0].layers]}
    for g in groups:
        if on_cuda[g[0].layers]:
            enough = 4 * widths[g[0].layers]
            assert gram_loss_applies(cuda, g, block, enough) and not gram_loss_applies(cuda, g, block, enough - 1)


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention, o_proj's scales repeated over the v heads
def test_gram_loss_picks_the_scales_the_forwards_pick(tmp_path, monkeypatch, kv_heads):
    """Run with the Gram loss forced on the CPU, a float32 model picks the same ratio for every group as with the
    forwards, with losses equal to float rounding."""
    from llmc_tpu.methods import awq as awq_method

    folder = make_tiny_model(tmp_path, "llama", heads=4, kv_heads=kv_heads, hidden=128)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    special = awq_special(weight_clip=False, trans_version="v1", gqa_o_proj="repeat")
    reports = {}
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(awq_method, "gram_loss_applies", lambda device, group, block, tokens:
                                len(group) == 1 and group[0].layers == (group[0].inspect,))
        loaded = load_model(str(folder), torch_dtype="float32")
        reports[forced] = run_awq_on_model(loaded.model, loaded.spec, [ids], special)
    for plain, gram in zip(reports[False], reports[True]):
        assert [s["layers"] for s in plain["scaled"]] == [s["layers"] for s in gram["scaled"]]
        assert ["self_attn.o_proj"] in [s["layers"] for s in gram["scaled"]]
        for a, b in zip(plain["scaled"], gram["scaled"]):
            assert a["ratio"] == b["ratio"] or (a["ratio"] != a["ratio"] and b["ratio"] != b["ratio"]), (a, b)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["loss_rtn"] == pytest.approx(a["loss_rtn"], rel=1e-4)
