#!/usr/bin/env python3
"""GPTQ's solver alone on a GPU, one Llama-2-7B block's matrices: the Triton column kernel against CUDA graphs.

Solves the four matrices that ``GptqMethod`` hands ``gptq_quantize`` per 7B block (q/k/v as one
12288 x 4096 matrix, o 4096 x 4096, gate/up 22016 x 4096, down 4096 x 11008; W4 asym g64) with
random weights and Hessians of correlated random activations, once per column kernel of
``algorithms.gptq`` (``COLUMN_KERNEL``: ``graphs`` = the captured PyTorch column loop, ``auto`` =
``algorithms.gptq_kernel`` where Triton is installed), in the same process. Prints median seconds
per matrix and per block, the speed-up, and how many codes the two kernels chose differently
(the kernel is written to do the same float32 arithmetic; 0 is expected). Writes JSON.

    python benchmarks/gptq_solver.py --out /tmp/gptq_solver.json
    python benchmarks/gptq_solver.py --natural-order     # dynamic groups (actorder off), the other code path
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

from _common import git_commit, require_cuda, write_result  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from llmc_tpu.algorithms import gptq  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gptq_solver.json"
MATRICES = {"q/k/v": (3 * 4096, 4096), "o": (4096, 4096), "gate/up": (2 * 11008, 4096), "down": (4096, 11008)}


def hessian(k: int, tokens: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``2/n X^T X`` of activations with correlated channels and a few large ones, as real inputs have."""
    mix = torch.randn(k, k, device=device, generator=gen) / k ** 0.5 + torch.eye(k, device=device)
    x = torch.randn(tokens, k, device=device, generator=gen) @ mix
    x[:, torch.randperm(k, device=device, generator=gen)[: k // 100]] *= 20
    return (2 / tokens) * (x.T @ x)


def solve(w: torch.Tensor, h: torch.Tensor, fmt: TpuWeightFormat, kernel: str, natural: bool) -> tuple[float, torch.Tensor]:
    gptq.COLUMN_KERNEL = kernel
    torch.cuda.synchronize()
    t = time.perf_counter()
    res = gptq.gptq_quantize(w, h, fmt, actorder=not natural, static_groups=not natural)
    torch.cuda.synchronize()
    return time.perf_counter() - t, res.codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed solves per matrix and kernel (after one warm-up)")
    ap.add_argument("--natural-order", action="store_true", help="actorder off, dynamic groups")
    ap.add_argument("--profile", action="store_true", help="also print the CUDA time per operation of one solve per matrix")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    dev = require_cuda()
    gen = torch.Generator(device=dev).manual_seed(0)
    fmt = TpuWeightFormat(4, 64)
    kernels = ["graphs", "auto"]
    if not gptq.gptq_kernel.available(dev):
        raise SystemExit("Triton is not installed: nothing to compare the CUDA graphs with")
    rows = []
    for name, (n, k) in MATRICES.items():
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        h = hessian(k, 2 * k, dev, gen)
        times, codes = {}, {}
        for kernel in kernels:
            solve(w, h, fmt, kernel, args.natural_order)  # warm-up: graph capture, Triton compilation
            runs = [solve(w, h, fmt, kernel, args.natural_order) for _ in range(args.repeats)]
            times[kernel] = statistics.median(t for t, _ in runs)
            codes[kernel] = runs[-1][1]
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                solve(w, h, fmt, "auto", args.natural_order)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
        differ = int((codes["graphs"] != codes["auto"]).sum())
        rows.append({"matrix": name, "shape": [n, k], "graphs_s": times["graphs"], "triton_s": times["auto"],
                     "speedup": times["graphs"] / times["auto"], "codes_differing": differ, "codes": n * k})
        print(f"{name:8s} {n:6d} x {k:5d}: graphs {times['graphs']:.3f} s, triton {times['auto']:.3f} s, "
              f"{times['graphs'] / times['auto']:.1f}x, codes differing {differ} of {n * k}", flush=True)
    total = {key: sum(r[key] for r in rows) for key in ("graphs_s", "triton_s")}
    lines = ["| matrix | shape | CUDA graphs s | Triton kernel s | speed-up | codes differing |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['matrix']} | {r['shape'][0]} x {r['shape'][1]} | {r['graphs_s']:.3f} | {r['triton_s']:.3f} | "
              f"{r['speedup']:.1f}x | {r['codes_differing']} of {r['codes']} |" for r in rows]
    lines.append(f"| one 7B block | | {total['graphs_s']:.3f} | {total['triton_s']:.3f} | "
                 f"{total['graphs_s'] / total['triton_s']:.1f}x | {sum(r['codes_differing'] for r in rows)} |")
    table = "\n".join(lines)
    print()
    print(table)
    import triton

    result = {"benchmark": "GPTQ solver per 7B block: Triton column kernel vs CUDA graphs (medians, same process)",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "llmc_tpu_commit": git_commit(ROOT, "llmc_tpu"), "args": vars(args), "rows": rows, "table": table,
              "per_block_s": total, "per_32_blocks_s": {k: 32 * v for k, v in total.items()}}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
