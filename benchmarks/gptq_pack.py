#!/usr/bin/env python3
"""GPTQ checkpoint packing speed: ``gptq_checkpoint.pack`` (4/8-bit fields through bytes) vs int32 shift-and-sum.

A 7B GPTQ run's save stage is mostly packing 6.5 G codes into ``qweight`` words (the file is written and hashed
while the next Linear is packed). The peer is the previous arithmetic (each code widened to int32, shifted into its
field, the fields summed), run in the same process on the same codes; the words are checked equal bit for bit.
Each row packs one Linear's codes along the in-features and transposes them as the checkpoint stores them.

    python benchmarks/gptq_pack.py            # Llama-2-7B and SmolLM2 Linear shapes, W4 and W8, CPU or CUDA
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from _common import git_commit, median_s, write_result  # noqa: E402

from llmc_tpu.export.gptq_checkpoint import pack  # noqa: E402

SHAPES = {"smollm2 down_proj": (576, 1536), "llama2-7b q_proj": (4096, 4096), "llama2-7b down_proj": (4096, 11008)}


def shift_and_sum(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The peer: fields widened to int32, shifted, summed along the in-features."""
    per = 32 // bits
    v = values.reshape(values.shape[0], values.shape[1] // per, per).to(torch.int32)
    v <<= torch.arange(0, 32, bits, dtype=torch.int32, device=values.device)
    return v.sum(dim=2, dtype=torch.int32)


def qweight(fn, codes: torch.Tensor, bits: int) -> torch.Tensor:
    return fn(codes, bits).T.contiguous()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gptq_pack.json")
    args = ap.parse_args(argv)
    rows = {}
    print("| shape | bits | pack ms | shift-and-sum ms | speed-up |\n|---|---|---|---|---|")
    ours_fn = lambda v, b: pack(v, b, dim=1)  # noqa: E731
    for bits in (4, 8):
        for name, (n, k) in SHAPES.items():
            codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.int16,
                                  generator=torch.Generator().manual_seed(bits)).to(args.device)
            assert torch.equal(qweight(ours_fn, codes, bits), qweight(shift_and_sum, codes, bits)), name
            for _ in range(2):  # warm-up, interleaved so that both see the same machine state
                qweight(ours_fn, codes, bits), qweight(shift_and_sum, codes, bits)
            ours = median_s(qweight, ours_fn, codes, bits, repeats=args.repeats)
            peer = median_s(qweight, shift_and_sum, codes, bits, repeats=args.repeats)
            rows[f"{name} W{bits}"] = {"shape": [n, k], "bits": bits, "pack_ms": round(ours * 1e3, 3),
                                       "shift_and_sum_ms": round(peer * 1e3, 3), "speedup": round(peer / ours, 2)}
            print(f"| {name} [{n}, {k}] | {bits} | {ours * 1e3:.2f} | {peer * 1e3:.2f} | {peer / ours:.2f}x |")
    write_result({"benchmark": "gptq_pack", "device": args.device, "threads": torch.get_num_threads(),
                  "note": "each row: pack along the in-features + the transposed copy the checkpoint stores; median of "
                          "--repeats; the peer's words checked equal", "rows": rows,
                  "commit": git_commit(Path(__file__).resolve().parent.parent, "llmc_tpu")}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
