#!/usr/bin/env python3
"""Where GPTQ's natural column order loses to act-order, on SmolLM2-135M (a study, not a method).

Runs ``accuracy_smollm2.py``'s pipeline (same model, windows, scoring; ``--seed`` picks the calibration windows) on
GPTQ variants that the config cannot express. The study wraps three points of llmc_tpu for its rows, and
leaves every other row as ``accuracy_smollm2.py`` runs it:

- ``methods.gptq.gptq_quantize``: the column order of one subset (``act@qkv``: act-order with static groups at
  q/k/v only, natural order with dynamic groups elsewhere), or of all (``outliers-first P%``: the top P% of the
  columns by ``diag(H)`` first, strongest first, then the rest in natural order, through
  ``gptq_quantize(order=...)``; ``group-local``: groups in natural order, the columns inside each group strongest
  first, dynamic groups);
- ``GptqMethod._solve``: which subset is being solved;
- ``methods.gptq.collect_hessians``: ``qkv sink W``, the attention sink counted W times at the q/k/v input and
  ``sink_weight`` (16) times elsewhere.

The study's natural-order rows leave out the coordinate descent on the codes that natural order runs by default
(``refine_sweeps: 0``), so that they show what the order alone does; ``refine N`` rows add N sweeps of it.

Without ``--rows`` it runs RTN, GPTQ in natural order (no refine) and act-order, and every study row; ``--out`` defaults to
``results/gptq_order_study.json``; our rows only (``--only ours``), so llm-compressor need not be importable.

    python benchmarks/gptq_order_study.py --model models/SmolLM2-135M-Instruct --seed 1 \\
        --rows "GPTQ natural, act@qkv" "GPTQ outliers-first 2%" --out /tmp/order_seed1.json
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import accuracy_smollm2 as bench  # noqa: E402

import llmc_tpu.methods.gptq as gptq_method  # noqa: E402
from llmc_tpu.algorithms.gptq import gptq_quantize  # noqa: E402

SUBSET_OF = {"q_proj": "qkv", "o_proj": "o", "gate_proj": "gateup", "down_proj": "down"}  # by the first Linear's name
# the order rows solve without refine_sweeps (natural order's default since): what the order alone does
NATURAL = {"actorder": False, "static_groups": False, "refine_sweeps": 0}
STATIC = {"actorder": False, "static_groups": True, "refine_sweeps": 0}


def study_rows() -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for subset in ("qkv", "o", "gateup", "down"):
        rows[f"GPTQ natural, act@{subset}"] = {"method": "GPTQ", "special": NATURAL}
    for share in ("0.5", "2", "5", "100"):  # 100%: act-order itself, a check of the wrapping
        rows[f"GPTQ outliers-first {share}%"] = {"method": "GPTQ", "special": STATIC}
    for weight in (64, 128, 256):
        rows[f"GPTQ natural, qkv sink {weight}"] = {"method": "GPTQ", "special": NATURAL}
    rows["GPTQ natural, static groups"] = {"method": "GPTQ", "special": STATIC}
    rows["GPTQ natural order, sink 64"] = {"method": "GPTQ", "special": {**NATURAL, "sink_weight": 64}}
    rows["GPTQ natural order, damp 0.001"] = {"method": "GPTQ", "special": {**NATURAL, "percdamp": 0.001}}
    rows["GPTQ natural order, token_clip 0"] = {"method": "GPTQ", "special": {**NATURAL, "token_clip": 0}}
    rows["GPTQ group-local"] = {"method": "GPTQ", "special": NATURAL}
    rows["GPTQ group-local, sink 64"] = {"method": "GPTQ", "special": {**NATURAL, "sink_weight": 64}}
    for sweeps in (1, 3):  # coordinate descent on the codes after the solve (gptq_refine)
        rows[f"GPTQ natural order, refine {sweeps}"] = {"method": "GPTQ", "special": {**NATURAL, "refine_sweeps": sweeps}}
    rows["GPTQ act-order, refine 3"] = {"method": "GPTQ", "special": {"refine_sweeps": 3}}
    awq = {"method": ["Awq", "GPTQ"], "special": {**bench.AWQ, **NATURAL}}
    rows["Awq+GPTQ natural order, sink 64"] = {**awq, "special": {**awq["special"], "sink_weight": 64}}
    rows["Awq+GPTQ group-local"] = awq
    rows["Awq+GPTQ group-local, sink 64"] = {**awq, "special": {**awq["special"], "sink_weight": 64}}
    return rows


class Study:
    """The row being run and the subset being solved, read by the wrapped functions."""

    def __init__(self) -> None:
        self.row = ""
        self.subset = ""

    def solve(self, w: torch.Tensor, h: torch.Tensor, fmt, **kw) -> Any:
        g, k = fmt.group_size, w.shape[1]
        act_at = re.search(r"act@(\w+)", self.row)
        if act_at and act_at.group(1) == self.subset:
            return gptq_quantize(w, h, fmt, **{**kw, "actorder": True, "static_groups": True})
        share = re.search(r"outliers-first ([\d.]+)%", self.row)
        if share:
            strongest = torch.argsort(torch.diagonal(h), descending=True)[:max(1, round(float(share.group(1)) / 100 * k))]
            rest = torch.ones(k, dtype=torch.bool, device=h.device)
            rest[strongest] = False
            order = torch.cat([strongest, torch.arange(k, device=h.device)[rest]])
            return gptq_quantize(w, h, fmt, **{**kw, "order": order})
        if "group-local" in self.row:  # a permutation inside each group keeps the groups whole: dynamic groups work
            inside = torch.argsort(torch.diagonal(h).view(k // g, g), dim=1, descending=True)
            order = (inside + torch.arange(0, k, g, device=h.device)[:, None]).reshape(-1)
            res = gptq_quantize(w[:, order.to(w.device)], h[order][:, order], fmt, **kw)
            res.codes = res.codes[:, torch.argsort(order).to(res.codes.device)]
            return res
        return gptq_quantize(w, h, fmt, **kw)

    def install(self) -> None:
        solve_subset, collect = gptq_method.GptqMethod._solve, gptq_method.collect_hessians

        def solve(method, ctx, subset, hessian, notes):
            self.subset = next((v for k, v in SUBSET_OF.items() if subset.layers[0].endswith(k)), "")
            return solve_subset(method, ctx, subset, hessian, notes)

        def hessians(block, subsets, *args, **kw):
            weight = re.search(r"qkv sink (\d+)", self.row)
            if weight and subsets[0].layers[0].endswith("q_proj"):
                kw["sink_weight"] = float(weight.group(1))
            return collect(block, subsets, *args, **kw)

        gptq_method.GptqMethod._solve = solve
        gptq_method.collect_hessians = hessians
        gptq_method.gptq_quantize = self.solve  # GptqMethod passes everything after the format by keyword
        ours = bench.ours

        def run_row(row, *args, **kw):
            self.row = row
            return ours(row, *args, **kw)

        bench.ours = run_row


def main(argv: list[str] | None = None) -> int:
    rows = study_rows()
    bench.ROWS.update(rows)
    Study().install()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--rows" not in argv:
        argv += ["--rows", "GPTQ natural order, no refine", "GPTQ", *rows]
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).parent / "results" / "gptq_order_study.json")]
    return bench.main(["--only", "ours", *argv], description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
