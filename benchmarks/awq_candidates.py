#!/usr/bin/env python3
"""The cost of scoring one AWQ candidate scale on a GPU, one Llama-2-7B block: what besides the forwards.

For every candidate scale ``s`` the search (``methods.awq``) fake-quantizes the group's weights as
the TPU will, ``fake_quantize(w * s) / s``, replays the module and sums the squared output error
per sample. This times the two parts that are not the module's own forward, on a 7B block's
shapes (bf16 weights, W4 asym g64, 16384-token chunks as ``chunk_tokens`` sets them):

- weights: ``rtn_kernel.scaled_fake_quantize`` through the PyTorch operations against the Triton
  kernel, for the four groups' matrices (q/k/v, gate/up, o, down); and how many weights differ
  (the kernel does the same float32 arithmetic: 0 is expected);
- clip: the same for the clip search's candidates (float32 clamped weights, ``handed_over_fake_quantize``);
- error: ``(out.float() - target.float()).pow(2)`` then per-sample sums, the PyTorch way, against
  ``awq_kernel.sample_squared_errors`` (one read of both tensors); the largest relative difference
  of the per-sample sums (another order of additions: float32 rounding, not 0).

Medians over repeats in one process; the per-block figure counts 21 candidates (``n_grid`` 20 and
the identity) for each group and 4 chunks per replay (128 x 512 calibration tokens). Writes JSON.

    python benchmarks/awq_candidates.py --out /tmp/awq_candidates.json
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

from llmc_tpu.algorithms import awq_kernel  # noqa: E402
from llmc_tpu.tpu import rtn_kernel  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "awq_candidates.json"
GROUPS = {"q/k/v": [(4096, 4096)] * 3, "gate/up": [(11008, 4096)] * 2, "o": [(4096, 4096)], "down": [(4096, 11008)]}
HIDDEN = 4096  # what every replayed module (attention, MLP, o_proj, down_proj) returns
CANDIDATES, CHUNKS, CHUNK_TOKENS, SEQ = 21, 4, 16384, 512


def timed(repeats: int, fn, *args, **kwargs) -> tuple[float, object]:
    fn(*args, **kwargs)  # warm-up (Triton compiles here)
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def fake_quantize_all(ws: list[torch.Tensor], s: torch.Tensor, fmt: TpuWeightFormat, use_kernel: bool):
    return [rtn_kernel.scaled_fake_quantize(w, s, fmt, use_kernel) for w in ws]


def error_torch(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    err = (out.float() - target.float()).pow(2)
    return err.reshape(err.shape[0], -1).sum(dim=1)


def quantize_clipped_all(ws: list[torch.Tensor], fmt: TpuWeightFormat, use_kernel: bool):
    return [rtn_kernel.handed_over_fake_quantize(w, fmt, use_kernel) for w in ws]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per part (after one warm-up)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    dev = require_cuda()
    if rtn_kernel.triton is None:
        raise SystemExit("Triton is not installed: nothing to compare the PyTorch operations with")
    gen = torch.Generator(device=dev).manual_seed(0)
    fmt = TpuWeightFormat(4, 64)
    rows = []
    for name, shapes in GROUPS.items():
        ws = [(torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16) for n, k in shapes]
        s = torch.exp(torch.randn(shapes[0][1], device=dev, generator=gen) * 0.7)
        t_torch, want = timed(args.repeats, fake_quantize_all, ws, s, fmt, False)
        t_kernel, got = timed(args.repeats, fake_quantize_all, ws, s, fmt, True)
        differ = sum(int((a.view(torch.int16) != b.view(torch.int16)).sum()) for a, b in zip(got, want))
        ws32 = [w.float() for w in ws]
        t_clip_torch, want = timed(args.repeats, quantize_clipped_all, ws32, fmt, False)
        t_clip_kernel, got = timed(args.repeats, quantize_clipped_all, ws32, fmt, True)
        differ += sum(int((a.view(torch.int32) != b.view(torch.int32)).sum()) for a, b in zip(got, want))
        del ws32, got, want
        out = torch.randn(CHUNK_TOKENS // SEQ, SEQ, HIDDEN, device=dev, generator=gen).to(torch.bfloat16)
        target = out + (torch.randn(out.shape, device=dev, generator=gen) * 0.01).to(torch.bfloat16)
        t_err_torch, sums_torch = timed(args.repeats, error_torch, out, target)
        t_err_kernel, sums_kernel = timed(args.repeats, awq_kernel.sample_squared_errors, out, target)
        rel = float(((sums_kernel.double() - sums_torch.double()).abs() / sums_torch.double()).max())
        rows.append({"group": name, "weights": [list(x) for x in shapes], "weights_torch_s": t_torch,
                     "weights_kernel_s": t_kernel, "clip_torch_s": t_clip_torch, "clip_kernel_s": t_clip_kernel,
                     "weights_differing": differ,
                     "weights_total": sum(n * k for n, k in shapes), "error_torch_s": t_err_torch,
                     "error_kernel_s": t_err_kernel, "error_sums_max_rel_diff": rel})
        print(f"{name:8s} weights: torch {t_torch * 1e3:.2f} ms, kernel {t_kernel * 1e3:.2f} ms; clip: torch "
              f"{t_clip_torch * 1e3:.2f} ms, kernel {t_clip_kernel * 1e3:.2f} ms; differing {differ}; error per chunk: "
              f"torch {t_err_torch * 1e3:.2f} ms, kernel {t_err_kernel * 1e3:.2f} ms, sums within {rel:.1e}", flush=True)
    torch_s = sum(CANDIDATES * (r["weights_torch_s"] + CHUNKS * r["error_torch_s"]) for r in rows)
    kernels_s = sum(CANDIDATES * (r["weights_kernel_s"] + CHUNKS * r["error_kernel_s"]) for r in rows)
    lines = ["| group | weights: PyTorch ms | weights: kernel ms | clip: PyTorch ms | clip: kernel ms | values differing "
             "| error/chunk: PyTorch ms | error/chunk: kernel ms | sums: max rel. diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['group']} | {r['weights_torch_s'] * 1e3:.2f} | {r['weights_kernel_s'] * 1e3:.2f} | "
              f"{r['clip_torch_s'] * 1e3:.2f} | {r['clip_kernel_s'] * 1e3:.2f} | "
              f"{r['weights_differing']} of {2 * r['weights_total']} | {r['error_torch_s'] * 1e3:.2f} | "
              f"{r['error_kernel_s'] * 1e3:.2f} | {r['error_sums_max_rel_diff']:.1e} |" for r in rows]
    lines.append(f"| scale search, one 7B block ({CANDIDATES} candidates x 4 groups, {CHUNKS} chunks) | | | | | | "
                 f"{torch_s:.3f} s PyTorch | {kernels_s:.3f} s kernels | |")
    table = "\n".join(lines)
    print()
    print(table)
    import triton

    write_result({"benchmark": "AWQ candidate scoring per 7B block besides the forwards: weights' TPU RTN and the "
                               "output error, PyTorch operations vs Triton kernels (medians, same process)",
                  "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                  "llmc_tpu_commit": git_commit(ROOT, "llmc_tpu"), "args": vars(args), "rows": rows, "table": table,
                  "per_block_s": {"torch": torch_s, "kernels": kernels_s}, "per_32_blocks_s": {"torch": 32 * torch_s,
                                                                                      "kernels": 32 * kernels_s}}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
