#!/usr/bin/env python3
"""GPTQ checkpoint writing speed: each Linear packed while the previous one is written (``build_ahead``) vs in turn.

A 7B GPTQ run's save stage writes ``gptq_tpu_model/model.safetensors``: per quantized Linear, its int16 codes (read
from the run's block checkpoints, file mappings) are packed into ``qweight`` words, then written and hashed. The
peer is the same writer with ``build_ahead=False`` (each Linear packed only once the previous one is on disk), run in
the same process on the same codes, turn about; both files are checked equal byte for byte.

    python benchmarks/gptq_save.py                 # 4 Llama-2-7B-shaped layers, W4 g64
    python benchmarks/gptq_save.py --layers 8 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as library_save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from _common import git_commit, write_result  # noqa: E402

from llmc_tpu.export.gptq_checkpoint import deferred_linear_tensors  # noqa: E402
from llmc_tpu.export.safetensors_stream import save_file  # noqa: E402
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat  # noqa: E402

LLAMA2_7B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
             "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
             "mlp.down_proj": (4096, 11008)}


def mapped_results(layers: int, fmt: TpuWeightFormat, scratch: Path) -> dict[str, TpuQuantizedWeight]:
    """Random W4 results whose codes are views of a safetensors file's mapping, as a run's block checkpoints are."""
    g = torch.Generator().manual_seed(0)
    codes, grids = {}, {}
    for layer in range(layers):
        for name, (n, k) in LLAMA2_7B.items():
            key = f"model.layers.{layer}.{name}"
            codes[key] = torch.randint(0, fmt.qmax + 1, (n, k), dtype=torch.int16, generator=g)
            scale = (torch.rand(n, k // fmt.group_size, generator=g) * 0.01 + 1e-3).to(torch.float16).float()
            grids[key] = (scale, torch.randint(1, fmt.qmax + 2, (n, k // fmt.group_size), dtype=torch.int16, generator=g))
    library_save_file(codes, str(scratch / "codes.safetensors"))
    del codes
    mapped = load_file(str(scratch / "codes.safetensors"))
    return {key: TpuQuantizedWeight(fmt, mapped[key], scale, zero, torch.zeros(0, mapped[key].shape[1]))
            for key, (scale, zero) in grids.items()}


def write_once(results: dict[str, TpuQuantizedWeight], path: Path, build_ahead: bool) -> float:
    entries = {}
    for name, q in results.items():
        entries.update(deferred_linear_tensors(name, q))
    start = time.perf_counter()
    save_file(entries, path, metadata={"format": "pt"}, build_ahead=build_ahead)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="Llama-2-7B-shaped layers (32 in the model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where the scratch files go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gptq_save.json")
    args = ap.parse_args(argv)
    fmt = TpuWeightFormat(bits=4, group_size=64)
    scratch = Path(tempfile.mkdtemp(prefix="gptq_save-", dir=args.workdir))
    try:
        results = mapped_results(args.layers, fmt, scratch)
        n_codes = sum(q.codes.numel() for q in results.values())
        times: dict[str, list[float]] = {"build_ahead": [], "in_turn": []}
        digests = set()
        for _ in range(args.repeats):  # turn about, so that both see the same machine state
            for mode, ahead in (("in_turn", False), ("build_ahead", True)):
                path = scratch / f"{mode}.safetensors"
                times[mode].append(write_once(results, path, ahead))
                digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
                size = path.stat().st_size
                path.unlink()
        assert len(digests) == 1, "the two writers gave different bytes"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print("| writer | median s | runs s |\n|---|---|---|")
    for mode, runs in times.items():
        print(f"| {mode} | {med[mode]:.2f} | {', '.join(f'{t:.2f}' for t in runs)} |")
    speedup = med["in_turn"] / med["build_ahead"]
    print(f"\n{args.layers} layers, {n_codes / 1e9:.2f} G codes, file {size / 1e9:.2f} GB: build_ahead {speedup:.2f}x, "
          f"{torch.get_num_threads()} CPU threads")
    write_result({"benchmark": "gptq_save", "layers": args.layers, "codes": n_codes, "file_bytes": size,
                  "threads": torch.get_num_threads(), "median_s": {k: round(v, 3) for k, v in med.items()},
                  "runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()}, "speedup": round(speedup, 2),
                  "note": "save_file of a GPTQ checkpoint's Linears (codes mapped from a file, W4 g64), build_ahead "
                          "against in_turn, turn about; the bytes checked equal",
                  "commit": git_commit(Path(__file__).resolve().parent.parent, "llmc_tpu")}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
