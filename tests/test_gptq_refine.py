"""Coordinate descent on GPTQ's codes (``algorithms.gptq_refine``): checked against an exhaustive search."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_gptq import FORMATS, W4, correlated_inputs, gptq_config, weight
from tiny_models import make_tiny_model

from llmc_tpu.algorithms.gptq import gptq_quantize
from llmc_tpu.algorithms.gptq_refine import default_sweeps, refine_codes
from llmc_tpu.config import ConfigError, parse_config
from llmc_tpu.pipeline import Quantizer


def damped(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    h = h.double().clone()
    h.diagonal()[h.diagonal() == 0] = 1
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    return h


def errors(w: torch.Tensor, res, h: torch.Tensor) -> torch.Tensor:
    """Per row, ``(w - w_hat) H (w - w_hat)^T`` with the damped H (float64)."""
    d = w.double() - res.dequantize().double()
    return ((d @ h) * d).sum(dim=1)


def exhaustive_sweep(w: torch.Tensor, res, h: torch.Tensor) -> torch.Tensor:
    """One sweep by brute force, from the definition alone: for each column in natural order, every code of the grid
    tried with all the other columns fixed, the one with the smallest row error kept (float64)."""
    n, k = w.shape
    g = k // res.scale.shape[1]
    d = res.scale.to(res.fmt.torch_scale_dtype).double().repeat_interleave(g, dim=1)
    z = res.zero.double().repeat_interleave(g, dim=1)
    q = res.codes.double().clone()
    grid = torch.arange(res.fmt.qmax + 1, dtype=torch.float64)
    for j in range(k):
        trials = []
        for c in grid:
            q[:, j] = c
            diff = w.double() - (q - z) * d
            trials.append(((diff @ h) * diff).sum(dim=1))
        q[:, j] = torch.stack(trials, dim=1).argmin(dim=1).double()
    return q.to(torch.int16)


def problem(n: int = 24, k: int = 128, seed: int = 1):
    x = correlated_inputs(k, tokens=1024, seed=seed)
    x[:, 5] *= 20  # an outlier channel that natural order reaches late within its group
    return weight(n, k, seed), 2 / 1024 * x.T @ x


def test_a_sweep_is_the_exhaustive_coordinate_search():
    w, h = problem()
    res = gptq_quantize(w, h, W4)
    ours = refine_codes(res, w, h, 1, blocksize=32)  # lazy updates across 4 blocks
    assert torch.equal(ours.codes, exhaustive_sweep(w, res, damped(h, res.percdamp)))


@pytest.mark.parametrize("fmt_name", ["W4BF16-g64", "W4BF16-g64-sym", "W8BF16-per-channel", "W4F16-g64"])
@pytest.mark.parametrize("actorder", [False, True])
def test_sweeps_never_raise_the_error_and_keep_the_grid(fmt_name, actorder):
    fmt = FORMATS[fmt_name]
    w, h = problem(48, 256, seed=3)
    res = gptq_quantize(w, h, fmt, actorder=actorder, static_groups=actorder)
    hd = damped(h, res.percdamp)
    before = errors(w, res, hd)
    last = before
    for sweeps in (1, 2, 3):
        out = refine_codes(res, w, h, sweeps)
        now = errors(w, out, hd)
        assert (now <= last * (1 + 1e-9) + 1e-12).all()
        last = now
        assert out.scale is res.scale and out.zero is res.zero
        assert 0 <= int(out.codes.min()) and int(out.codes.max()) <= fmt.qmax and out.codes.dtype == torch.int16
    if not actorder and fmt_name == "W4BF16-g64":  # natural order leaves room; the sweeps take a good part of it
        assert float(last.sum()) < 0.9 * float(before.sum())
    assert refine_codes(res, w, h, 0) is res


def test_rows_refined_in_chunks_are_the_rows_of_the_whole():
    w, h = problem(64, 128, seed=4)
    whole = refine_codes(gptq_quantize(w, h, W4, row_chunks=[24, 40]), w, h, 2, row_chunks=[24, 40])
    top = refine_codes(gptq_quantize(w[:24], h, W4, row_chunks=[24]), w[:24], h, 2, row_chunks=[24])
    bottom = refine_codes(gptq_quantize(w[24:], h, W4, row_chunks=[40]), w[24:], h, 2, row_chunks=[40])
    assert torch.equal(whole.codes, torch.cat([top.codes, bottom.codes]))


def test_blocksize_changes_nothing_but_the_rounding_of_the_products():
    w, h = problem(32, 256, seed=6)
    res = gptq_quantize(w, h, W4)
    a, b = refine_codes(res, w, h, 2, blocksize=128), refine_codes(res, w, h, 2, blocksize=256)
    assert (a.codes != b.codes).float().mean() < 0.002  # float32 products summed in another order: rare ties


def test_a_mismatched_result_is_refused():
    w, h = problem()
    res = gptq_quantize(w, h, W4)
    with pytest.raises(ValueError, match="codes"):
        refine_codes(dataclasses.replace(res, codes=res.codes[:, :64]), w, h, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton sweep kernel runs on CUDA only")
def test_triton_sweep_kernel_gives_the_torch_loops_codes(monkeypatch):
    from llmc_tpu.algorithms import gptq_kernel

    dev = torch.device("cuda")
    if not gptq_kernel.available(dev):
        pytest.skip("Triton is not installed")
    w, h = problem(200, 320, seed=5)  # 320 = 2 blocks of 128 and one of 64
    w, h = w.to(dev), h.to(dev)
    res = gptq_quantize(w, h, W4)
    fused = refine_codes(res, w, h, 2)
    monkeypatch.setattr(gptq_kernel, "available", lambda device: False)
    eager = refine_codes(res, w, h, 2)
    assert torch.equal(fused.codes, eager.codes)


def test_config_sweeps_default_by_order_and_are_validated():
    base = {"model": {"path": "m"}, "save": {"save_path": "s"}}
    special = parse_config({**base, "quant": {"method": "GPTQ"}}).quant.special
    assert special["refine_sweeps"] is None and default_sweeps(special["actorder"]) == 0
    assert default_sweeps(False) == 3
    assert parse_config({**base, "quant": {"method": "Awq+GPTQ", "special": {"refine_sweeps": 2}}}).quant.special[
        "refine_sweeps"] == 2
    with pytest.raises(ConfigError, match="quant.special.refine_sweeps"):
        parse_config({**base, "quant": {"method": "GPTQ", "special": {"refine_sweeps": -1}}})


def test_natural_order_runs_refine_by_default_and_lowers_each_subsets_error(tmp_path, eval_txt):
    model = make_tiny_model(tmp_path / "m", "llama")
    natural = {"actorder": False, "static_groups": False}
    reports = {}
    for sweeps in (None, 0):
        cfg = gptq_config(model, eval_txt, tmp_path / f"out{sweeps}", special={**natural, "refine_sweeps": sweeps})
        reports[sweeps] = Quantizer(parse_config(cfg), progress=False).run()
    refined, plain = ([s for b in reports[k].method["blocks"] for s in b["gptq"]] for k in (None, 0))
    assert all(s["refine_sweeps"] == 3 for s in refined) and not any("refine_sweeps" in s for s in plain)
    total = {k: sum(e for s in subsets for e in s["err"].values()) for k, subsets in (("refined", refined), ("plain", plain))}
    assert total["refined"] < total["plain"]
