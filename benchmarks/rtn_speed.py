#!/usr/bin/env python3
"""TPU RTN (``llmc_tpu.tpu.rtn.fake_quantize``) speed: scales broadcast over each group vs repeated per column.

AWQ scores every candidate scale and clip with TPU-MLIR's RTN, so its cost is a large share of AWQ's search
time. The peer is the previous implementation (scales and zeros ``repeat_interleave``d to ``[N, K]``), run
in the same process on the same weights; the two results are checked equal bit for bit.

    python benchmarks/rtn_speed.py            # Llama-2-7B and SmolLM2 Linear shapes, W4 g64, CPU or CUDA
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from _common import git_commit, median_s, write_result  # noqa: E402

from llmc_tpu.tpu.rtn import TpuWeightFormat, fake_quantize, round_half_away, tpu_grid  # noqa: E402

SHAPES = {"smollm2 down_proj": (576, 1536), "smollm2 gate_proj": (1536, 576), "llama2-7b q_proj": (4096, 4096),
          "llama2-7b down_proj": (4096, 11008)}


def repeated(w: torch.Tensor, fmt: TpuWeightFormat) -> torch.Tensor:
    """The peer: the same grid and rounding with scales and zeros repeated to the weight's shape."""
    scale, zero, _ = tpu_grid(w, fmt)
    g = w.shape[1] // scale.shape[1]
    s, z = scale.repeat_interleave(g, dim=1), zero.float().repeat_interleave(g, dim=1)
    codes = (round_half_away(w / s) + z).clamp(0, fmt.qmax)
    return (codes - z) * scale.to(fmt.torch_scale_dtype).float().repeat_interleave(g, dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rtn_speed.json")
    args = ap.parse_args(argv)
    fmt, rows = TpuWeightFormat(4, 64), {}
    print("| shape | broadcast ms | repeated ms | speed-up |\n|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).to(args.device)
        assert torch.equal(fake_quantize(w, fmt), repeated(w, fmt)), name
        for _ in range(2):  # warm-up, interleaved so that both see the same machine state
            fake_quantize(w, fmt), repeated(w, fmt)
        ours, peer = median_s(fake_quantize, w, fmt, repeats=args.repeats), median_s(repeated, w, fmt, repeats=args.repeats)
        rows[name] = {"shape": [n, k], "broadcast_ms": round(ours * 1e3, 3), "repeated_ms": round(peer * 1e3, 3),
                      "speedup": round(peer / ours, 2)}
        print(f"| {name} [{n}, {k}] | {ours * 1e3:.2f} | {peer * 1e3:.2f} | {peer / ours:.2f}x |")
    write_result({"benchmark": "rtn_speed", "device": args.device, "threads": torch.get_num_threads(), "format": "W4 g64",
                  "rows": rows, "commit": git_commit(Path(__file__).resolve().parent.parent, "llmc_tpu")}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
