"""SignRound: its starting point is TPU-MLIR's RTN, its fake-quant is its integer result, and on a tiny Llama
block it beats RTN (calibration and held-out inputs) without touching the float weights (CPU only)."""

from __future__ import annotations

import pytest
import torch
from test_gptq import FORMATS as GPTQ_FORMATS
from test_gptq import W4
from torch.func import functional_call

from llmc_tpu.algorithms.gptq import handoff_grid
from llmc_tpu.algorithms.signround import fake_quantize, final_result, init_params
from llmc_tpu.engine.blockwise import BlockInput
from llmc_tpu.engine.samples import CalibrationSamples
from llmc_tpu.fake_quant import handoff_weight
from llmc_tpu.methods.base import BlockContext
from llmc_tpu.methods.signround import SignRoundMethod
from llmc_tpu.models.registry import find_spec
from llmc_tpu.tpu.rtn import TpuWeightFormat, quantize_codes, quantize_weight

# GPTQ's formats but W8 per channel (signed codes with zero 0), which SignRound refuses
FORMATS = {name: fmt for name, fmt in GPTQ_FORMATS.items() if name != "W8BF16-per-channel"}


def weight(n: int = 128, k: int = 256, seed: int = 1, positive_groups: bool = True) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    if positive_groups:  # TPU RTN gives these groups (rows, for per channel) zero point 0: the handoff moves them
        w[:8] = w[:8].abs() + 0.01
        w[8:16, 64:128] = w[8:16, 64:128].abs()
    return w


def random_params(w: torch.Tensor, fmt: TpuWeightFormat, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    v, alpha, beta = init_params(w, fmt)
    v = torch.rand(v.shape, generator=g) - 0.5
    alpha = 0.5 + 0.5 * torch.rand(alpha.shape, generator=g)
    beta = 0.5 + 0.5 * torch.rand(beta.shape, generator=g)
    return v, alpha, beta


# -- the grid ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_starting_point_is_tpu_rtn_code_for_code(fmt_name):
    fmt, w = FORMATS[fmt_name], weight()
    res = final_result(w, *init_params(w, fmt), fmt)
    scale, zero, fixes = handoff_grid(w, fmt)
    assert torch.equal(res.codes, quantize_codes(w, scale, zero, fmt))
    assert torch.equal(res.scale, scale) and torch.equal(res.zero, zero)
    assert res.zero_point_fixes == fixes
    if not fmt.symmetric:
        assert fixes > 0  # the positive groups were moved off zero point 0, as handoff_grid moves them
    # where no group needs moving, that is TPU-MLIR's RTN itself
    w = weight(positive_groups=False)
    res, rtn = final_result(w, *init_params(w, fmt), fmt), quantize_weight(w, fmt)
    assert res.zero_point_fixes == 0
    assert torch.equal(res.codes, rtn.codes) and torch.equal(res.scale, rtn.scale) and torch.equal(res.zero, rtn.zero)
    assert torch.equal(res.dequantize(), rtn.dequantize())


def test_w8_per_channel_is_refused():
    fmt = TpuWeightFormat(8, 0)
    w = weight()
    with pytest.raises(ValueError, match="W8 per channel"):
        init_params(w, fmt)
    with pytest.raises(ValueError, match="W8 per channel"):
        final_result(w, torch.zeros_like(w), torch.ones(128, 1), torch.ones(128, 1), fmt)


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_fake_quant_forward_is_the_integer_result(fmt_name):
    """What the optimizer sees is bit for bit what the TPU multiplies with; every parameter gets a gradient."""
    fmt, w = FORMATS[fmt_name], weight()
    v, alpha, beta = (t.requires_grad_(True) for t in random_params(w, fmt))
    fq = fake_quantize(w, v, alpha, beta, fmt)
    res = final_result(w, v, alpha, beta, fmt)
    assert torch.equal(fq.detach(), res.dequantize())
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= fmt.qmax and int(res.zero.min()) >= 1
    rtn = final_result(w, *init_params(w, fmt), fmt)
    assert float((res.codes != rtn.codes).float().mean()) > 0.1  # the parameters really move the codes
    (fq * torch.randn(fq.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    assert float(v.grad.abs().sum()) > 0 and float(beta.grad.abs().sum()) > 0
    if not fmt.symmetric or fmt.per_channel:
        assert float(alpha.grad.abs().sum()) > 0
    # a Linear the compiler folds back to a float weight (32 rows < NPU_NUM): the fake-quant folds too
    w32 = w[:32]
    params = [t.detach()[:32] for t in (v, alpha, beta)]
    q = final_result(w32, *params, fmt).tpu_weight()
    assert q.folded
    assert torch.equal(fake_quantize(w32, *params, fmt, folded=True), q.dequantize())


# -- a tiny Llama block --------------------------------------------------------------------------
SEQ, HIDDEN = 64, 128


@pytest.fixture(scope="module")
def tiny():
    """A Llama decoder block with heavy-tailed random weights, and correlated calibration / held-out inputs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, num_hidden_layers=1, vocab_size=64)
    cfg._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() >= 2:
                p.copy_(torch.distributions.StudentT(4.0).sample(p.shape) * 0.05)
    rotary = LlamaRotaryEmbedding(cfg)
    mix = torch.eye(HIDDEN) + 0.8 * torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(0)) / HIDDEN ** 0.5
    pos = torch.arange(SEQ)[None]

    def batches(n: int, bs: int, seed: int) -> list[BlockInput]:
        x = torch.randn(n, SEQ, HIDDEN, generator=torch.Generator().manual_seed(seed)) @ mix
        x = x * torch.linspace(0.1, 3.0, HIDDEN)
        cos, sin = rotary(x, pos)
        kw = {"attention_mask": None, "position_embeddings": (cos, sin), "position_ids": pos, "use_cache": False}
        return [BlockInput(x[i:i + bs], dict(kw)) for i in range(0, n, bs)]

    return block, cfg, batches(64, 8, 1), batches(32, 8, 2)


def run_signround(block, cfg, inputs, fmt=W4, **special) -> BlockContext:
    ctx = BlockContext(0, block, find_spec("llama"), fmt, torch.device("cpu"), inputs, head_dim=32, config=cfg)
    SignRoundMethod(special).process_block(ctx)
    return ctx


@torch.no_grad()
def block_mse(block, inputs, weights: dict[str, torch.Tensor]) -> float:
    """Mean squared error of the block's output with ``weights`` against its float output."""
    total, n = 0.0, 0
    for inp in inputs:
        ref = block(inp.hidden, **inp.kwargs)
        out = functional_call(block, weights, (inp.hidden,), inp.kwargs)
        ref, out = (o[0] if isinstance(o, tuple) else o for o in (ref, out))
        total += float((out.double() - ref.double()).pow(2).sum())
        n += ref.numel()
    return total / n


def test_block_error_below_rtn_on_calibration_and_held_out_inputs(tiny):
    block, cfg, train, held = tiny
    ctx = run_signround(block, cfg, train)  # the defaults: 200 iterations, lr 1/200 decaying, 8 samples a step
    names = find_spec("llama").block_linear_names(block)
    assert sorted(ctx.results) == sorted(names)
    tuned = {f"{n}.weight": ctx.results[n].dequantize() for n in names}
    rtn = {f"{n}.weight": quantize_weight(handoff_weight(block.get_submodule(n), W4), W4).dequantize() for n in names}
    for inputs in (train, held):
        err, err_rtn = block_mse(block, inputs, tuned), block_mse(block, inputs, rtn)
        assert err < 0.93 * err_rtn, (err, err_rtn)
    note = ctx.report["signround"]
    assert note["kept"] != "rtn" and note["loss"] < 0.9 * note["loss_rtn"]
    assert note["loss"] == pytest.approx(block_mse(block, train, tuned), rel=1e-4)
    for n in names:  # results a GPTQ checkpoint can carry: unsigned codes, zero points 1..qmax
        r = ctx.results[n]
        assert r.codes.shape == block.get_submodule(n).weight.shape and int(r.zero.min()) >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_weights_are_left_bit_identical(tiny, dtype):
    block, cfg, train, _ = tiny
    if dtype != torch.float32:
        import copy

        block = copy.deepcopy(block).to(dtype)
        train = [BlockInput(b.hidden.to(dtype), {**b.kwargs, "position_embeddings": tuple(
            t.to(dtype) for t in b.kwargs["position_embeddings"])}) for b in train]
    params = dict(block.named_parameters())
    before = {k: (p.detach().clone(), p.requires_grad) for k, p in params.items()}
    ctx = run_signround(block, cfg, train, iters=10)
    assert ctx.report["signround"]["iters"] == 10 and ctx.results
    after = dict(block.named_parameters())
    assert after.keys() == before.keys()
    for k, (value, requires_grad) in before.items():
        p = after[k]
        assert p is params[k] and p.dtype == dtype and torch.equal(p.detach(), value), k
        assert p.requires_grad == requires_grad and p.grad is None, k


def test_same_seed_same_result(tiny):
    block, cfg, train, _ = tiny
    runs = [run_signround(block, cfg, train, iters=30, lr=0.005, batch_size=4, seed=s) for s in (3, 3, 4)]
    first, again, other = (r.results for r in runs)
    for n, r in first.items():
        assert torch.equal(r.codes, again[n].codes) and torch.equal(r.scale, again[n].scale)
        assert torch.equal(r.zero, again[n].zero)
    # another seed draws other samples: other codes (so the check above can fail)
    assert any(not torch.equal(r.codes, other[n].codes) for n, r in first.items())
    assert runs[0].report["signround"]["loss"] == runs[1].report["signround"]["loss"]


def test_samples_of_several_batches_run_as_one_call():
    """Per-sample arguments (masks) follow their samples; shared ones (position embeddings [1, ...]) stay as they are."""
    def batch(bs: int, seed: int, mask: bool = True) -> BlockInput:
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(bs, 1, 4, 4, generator=g) if mask else None
        cos = torch.ones(1, 4, 8)
        return BlockInput(torch.randn(bs, 4, 8, generator=g), {"attention_mask": m, "position_embeddings": (cos, cos),
                                                                "use_cache": False, "cache_position": torch.arange(4)})

    inputs = [batch(3, 0), batch(1, 1), batch(2, 2)]
    samples = CalibrationSamples(inputs, torch.device("cpu"))
    samples.targets = [inp.hidden * 2 for inp in inputs]
    assert samples.mergeable and len(samples) == 6
    (hidden, args, kwargs, target), = samples.calls([5, 0, 3, 2])  # batch 2 #1, batch 0 #0 and #2, batch 1 #0
    picks = [(0, 0), (0, 2), (1, 0), (2, 1)]  # grouped by batch, in batch order
    assert torch.equal(hidden, torch.stack([inputs[p].hidden[i] for p, i in picks]))
    assert torch.equal(target, 2 * hidden) and args == ()
    assert torch.equal(kwargs["attention_mask"], torch.stack([inputs[p].kwargs["attention_mask"][i] for p, i in picks]))
    assert kwargs["position_embeddings"][0].shape == (1, 4, 8) and torch.equal(kwargs["cache_position"], torch.arange(4))
    assert kwargs["use_cache"] is False
    # a batch without a mask cannot share a call with batches that have one: one call per batch
    mixed = CalibrationSamples([batch(2, 0), batch(2, 1, mask=False)], torch.device("cpu"))
    mixed.targets = [torch.zeros(2, 4, 8)] * 2
    assert not mixed.mergeable
    calls = mixed.calls([0, 3])
    assert len(calls) == 2 and calls[0][2]["attention_mask"].shape == (1, 1, 4, 4) and calls[1][2]["attention_mask"] is None
