"""benchmarks/gptq_order_study.py: its column orders are the ones its rows name."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gptq_order_study import Study  # noqa: E402

from llmc_tpu.algorithms.gptq import Hessian, gptq_quantize  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat  # noqa: E402

W4 = TpuWeightFormat(4, 64)
KW = {"blocksize": 128, "percdamp": 0.01, "row_chunks": None}


def problem(k: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(k, generator=g) * 3 + 0.1
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k ** 0.5
    h = Hessian(k)
    h.add(torch.randn(2048, k, generator=g) @ mix * scales)
    return torch.randn(64, k, generator=g) * 0.05, h.h


def solve(row: str, w: torch.Tensor, h: torch.Tensor, subset: str = "", **kw) -> torch.Tensor:
    study = Study()
    study.row, study.subset = row, subset
    return study.solve(w, h, W4, **{**KW, "actorder": False, "static_groups": False, **kw}).codes


def test_act_order_at_one_kind_of_linear_only():
    w, h = problem()
    act = gptq_quantize(w, h, W4, actorder=True, static_groups=True).codes
    natural = gptq_quantize(w, h, W4).codes
    assert torch.equal(solve("GPTQ natural, act@qkv", w, h, subset="qkv"), act)
    assert torch.equal(solve("GPTQ natural, act@qkv", w, h, subset="o"), natural)
    assert not torch.equal(act, natural)


def test_strongest_columns_first():
    w, h = problem(seed=1)
    act = gptq_quantize(w, h, W4, actorder=True, static_groups=True).codes
    assert torch.equal(solve("GPTQ outliers-first 100%", w, h, static_groups=True), act)
    strongest = int(torch.diagonal(h).argmax())  # 0.5% of 256 columns: the strongest one alone, then 0..255
    order = torch.tensor([strongest] + [c for c in range(256) if c != strongest])
    expected = gptq_quantize(w, h, W4, static_groups=True, order=order).codes
    assert torch.equal(solve("GPTQ outliers-first 0.5%", w, h, static_groups=True), expected)


def test_group_local_order_follows_the_columns_it_reorders():
    """Columns already strongest-first inside each group: the natural order itself. Shuffling the columns inside
    their groups shuffles the codes the same way (the order goes with the columns)."""
    w, h = problem(seed=2)
    inside = torch.argsort(torch.diagonal(h).view(4, 64), dim=1, descending=True)
    sort = (inside + torch.arange(0, 256, 64)[:, None]).reshape(-1)  # each group's columns, strongest first
    w, h = w[:, sort], h[sort][:, sort]
    assert torch.equal(solve("GPTQ group-local", w, h), gptq_quantize(w, h, W4).codes)
    w, h = problem(seed=3)
    shuffle = torch.cat([torch.randperm(64, generator=torch.Generator().manual_seed(i)) + 64 * i for i in range(4)])
    codes = solve("GPTQ group-local", w, h)
    shuffled = solve("GPTQ group-local", w[:, shuffle], h[shuffle][:, shuffle])
    assert torch.equal(shuffled, codes[:, shuffle])
    assert not torch.equal(codes, gptq_quantize(w, h, W4).codes)
