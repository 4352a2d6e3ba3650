#!/usr/bin/env python3
"""Coordinate descent on GPTQ's codes (``algorithms.gptq_refine``) on a GPU, one Llama-2-7B block's matrices.

For each matrix ``GptqMethod`` solves per 7B block (``gptq_solver.py``'s shapes, random weights, Hessians of
correlated activations), in one process: the natural-order solve (``gptq_quantize``, dynamic groups), then
``refine_codes`` with ``--sweeps`` sweeps through the Triton kernel, then through the PyTorch column loop
(fewer repeats: it launches a dozen tiny kernels per column). Prints median seconds, the refinement's cost
against the solve's, the output error before and after, and how many codes the kernel and the loop chose
differently (the kernel does the loop's float32 arithmetic: 0 is expected). Writes JSON.

    python benchmarks/gptq_refine.py --out /tmp/gptq_refine.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import git_commit, require_cuda, write_result  # noqa: E402
from gptq_solver import MATRICES, hessian  # noqa: E402

from llmc_tpu.algorithms import gptq_kernel  # noqa: E402
from llmc_tpu.algorithms.gptq import gptq_quantize, output_error  # noqa: E402
from llmc_tpu.algorithms.gptq_refine import refine_codes  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gptq_refine_speed.json"


def timed(fn, *args):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweeps", type=int, default=3, help="sweeps per refinement (natural order's default: 3)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the solve and the kernel (after a warm-up)")
    ap.add_argument("--loop-repeats", type=int, default=1, help="timed runs of the PyTorch loop (0: skip it)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    dev = require_cuda()
    if not gptq_kernel.available(dev):
        raise SystemExit("Triton is not installed: the sweep kernel cannot run")
    gen = torch.Generator(device=dev).manual_seed(0)
    fmt = TpuWeightFormat(4, 64)
    available = gptq_kernel.available
    rows = []
    for name, (n, k) in MATRICES.items():
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        h = hessian(k, 2 * k, dev, gen)
        solves = [timed(gptq_quantize, w, h, fmt) for _ in range(args.repeats + 1)][1:]
        res = solves[-1][1]
        kernel_runs = [timed(refine_codes, res, w, h, args.sweeps) for _ in range(args.repeats + 1)][1:]
        refined = kernel_runs[-1][1]
        row = {"matrix": name, "shape": [n, k], "solve_s": statistics.median(t for t, _ in solves),
               "refine_kernel_s": statistics.median(t for t, _ in kernel_runs),
               "err_solve": output_error(w, res.dequantize(), h), "err_refined": output_error(w, refined.dequantize(), h)}
        if args.loop_repeats:
            gptq_kernel.available = lambda device: False
            try:
                loop_runs = [timed(refine_codes, res, w, h, args.sweeps) for _ in range(args.loop_repeats)]
            finally:
                gptq_kernel.available = available
            row["refine_loop_s"] = statistics.median(t for t, _ in loop_runs)
            row["codes_differing"] = int((loop_runs[-1][1].codes != refined.codes).sum())
        rows.append(row)
        print(f"{name:8s} {n:6d} x {k:5d}: solve {row['solve_s']:.3f} s, refine x{args.sweeps} {row['refine_kernel_s']:.3f} s "
              f"(loop {row.get('refine_loop_s', float('nan')):.1f} s), error {row['err_solve']:.4g} -> {row['err_refined']:.4g}",
              flush=True)
    lines = ["| matrix | shape | solve s | refine (kernel) s | refine / solve | refine (PyTorch loop) s | error: solve -> refined "
             "| codes differing |", "|---|---|---:|---:|---:|---:|---|---:|"]
    lines += [f"| {r['matrix']} | {r['shape'][0]} x {r['shape'][1]} | {r['solve_s']:.3f} | {r['refine_kernel_s']:.3f} | "
              f"{r['refine_kernel_s'] / r['solve_s']:.1f}x | {r.get('refine_loop_s', float('nan')):.1f} | "
              f"{r['err_solve']:.4g} -> {r['err_refined']:.4g} | {r.get('codes_differing', '-')} |" for r in rows]
    table = "\n".join(lines)
    print()
    print(table)
    import triton

    result = {"benchmark": f"GPTQ natural-order solve vs {args.sweeps} sweeps of coordinate descent on its codes, per 7B "
                           "block matrix (medians, same process)",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "llmc_tpu_commit": git_commit(ROOT, "llmc_tpu"), "args": vars(args), "rows": rows, "table": table}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
