#!/usr/bin/env python3
"""GPTQ on a GPU, Llama-2-7B shapes with random weights: wall time and peak GPU memory per decoder block.

Runs the real per-block code path of ``llmc-tpu quantize`` for method GPTQ (W4 asymmetric g64,
true_sequential, quant_out): ``GptqMethod.process_block`` (Hessians through forward hooks, the
solver on every subset), ``fake_quant.quantize_block``, and the quant_out forward pass that
produces the next block's inputs, on a minimal Llama decoder block (RMSNorm, MHA with RoPE-free
causal SDPA, SwiGLU; hidden 4096, 32 heads, intermediate 11008) fed 128 x 2048 calibration
tokens kept on the GPU, as the pipeline keeps them. No transformers needed. Every block of
Llama-2-7B is the same work, so the model estimate is ``32 x`` the time of a warm block (plus
the first block's warm-up); the model's loading and evaluation are not included.

    python benchmarks/gptq_gpu.py                       # 2 blocks measured, estimate for 32
    python benchmarks/gptq_gpu.py --blocks 1 --samples 16 --out /tmp/gptq_gpu.json   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import require_cuda, write_result  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from llmc_tpu.engine.blockwise import BlockInput, run_block  # noqa: E402
from llmc_tpu.fake_quant import fake_quantized, quantize_block  # noqa: E402
from llmc_tpu.methods.base import BlockContext  # noqa: E402
from llmc_tpu.methods.gptq import GptqMethod  # noqa: E402
from llmc_tpu.models.registry import REGISTRY  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gptq_gpu.json"


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + 1e-5)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class Mlp(nn.Module):
    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """A Llama decoder block with the module names of transformers' LlamaDecoderLayer."""

    def __init__(self, d: int, heads: int, inter: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.self_attn, self.mlp = Attention(d, heads), Mlp(d, inter)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        return h + self.mlp(self.post_attention_layernorm(h))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=2, help="blocks to run (the first one includes warm-up)")
    ap.add_argument("--model-blocks", type=int, default=32, help="blocks of the model the estimate is for")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="print the top operations (CUDA and CPU time) of the last block")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    dev = require_cuda()
    torch.manual_seed(0)
    fmt = TpuWeightFormat(4, args.group_size)
    spec = REGISTRY["llama"]
    method = GptqMethod({"actorder": True, "static_groups": True, "percdamp": 0.01, "blocksize": 128,
                         "true_sequential": True, "token_clip": 10.0})  # configs/LLM/GPTQ.yml's
    inputs = [BlockInput(torch.randn(1, args.seq_len, args.hidden, device=dev, dtype=torch.bfloat16))
              for _ in range(args.samples)]
    rows = []
    for i in range(args.blocks):
        block = Block(args.hidden, args.heads, args.intermediate)
        with torch.no_grad():
            for p in block.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        block = block.to(dev, torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ctx = BlockContext(i, block, spec, fmt, dev, inputs, head_dim=args.hidden // args.heads)
        if args.profile and i == args.blocks - 1:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                method.process_block(ctx)
            for key in ("cuda_time_total", "cpu_time_total"):
                print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
        else:
            method.process_block(ctx)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        results = quantize_block(block, spec, fmt, f"model.layers.{i}", ctx.results)
        with fake_quantized(block, results, f"model.layers.{i}"):
            inputs = run_block(block, inputs, dev)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        errs = {n: (e, s["err_rtn"][n]) for s in ctx.report["gptq"] for n, e in s["err"].items()}
        rows.append({"block": i, "seconds": t2 - t0, "gptq_s": t1 - t0, "quant_out_s": t2 - t1,
                     "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "rel_output_error": {n: round(e, 6) for n, (e, _) in errs.items()},
                     "rel_output_error_rtn": {n: round(r, 6) for n, (_, r) in errs.items()}})
        print(f"block {i}: {t2 - t0:.2f} s (GPTQ {t1 - t0:.2f} s, quant_out pass {t2 - t1:.2f} s), "
              f"peak {rows[-1]['peak_gpu_mem_gib']:.2f} GiB", flush=True)
        del block, ctx, results
    warm = rows[-1]["seconds"]
    estimate = rows[0]["seconds"] + warm * (args.model_blocks - 1)
    peak = max(r["peak_gpu_mem_gib"] for r in rows)
    table = "\n".join([
        "| what | value |", "|---|---:|",
        f"| device | {torch.cuda.get_device_name()} |",
        f"| shapes | hidden {args.hidden}, heads {args.heads}, intermediate {args.intermediate}, W4 asym g{args.group_size} |",
        f"| calibration | {args.samples} x {args.seq_len} tokens (bf16, on the GPU) |",
        *[f"| block {r['block']} wall time | {r['seconds']:.2f} s (GPTQ {r['gptq_s']:.2f}, quant_out {r['quant_out_s']:.2f}) |"
          for r in rows],
        f"| estimate for {args.model_blocks} blocks | {estimate:.1f} s ({estimate / 60:.2f} min) |",
        f"| peak GPU memory | {peak:.2f} GiB |",
    ])
    print()
    print(table)
    result = {"benchmark": "GPTQ per decoder block on a GPU, Llama-2-7B shapes, random weights",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": platform.python_version(), "args": vars(args), "blocks": rows,
              "estimate_model_s": estimate, "peak_gpu_mem_gib": peak, "table": table,
              "note": "estimate = first block + (model_blocks - 1) x last block; loading and evaluation excluded"}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
