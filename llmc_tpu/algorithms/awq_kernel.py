"""AWQ's output error per calibration sample, read once (a Triton kernel, CUDA only; PyTorch elsewhere).

Every candidate scale is scored by ``sum((out - target)^2)`` per sample, in float32, over the replayed
module's output (``[samples, tokens, hidden]``). With PyTorch operations that is a widened copy, a
difference, a square and a sum: about six times the output's bytes through memory for every
chunk of every candidate. The kernel reads the two bf16/f16 tensors once and writes one partial sum
per (sample, slice); the slices are added in a fixed order, so the result does not depend on the
run. It rounds as the PyTorch path does elementwise (float32 difference, then square), but adds in
another order: the sums agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import torch

from llmc_tpu.engine.triton_import import tl, triton

BLOCK = 1024
SLICES = 16  # per sample: enough programs to fill a GPU with a few dozen samples per chunk

if triton is not None:

    @triton.jit
    def _squared_error_kernel(a_ptr, b_ptr, partial_ptr, per_sample, slice_len, BLOCK: tl.constexpr,
                              SLICES: tl.constexpr):
        sample = tl.program_id(0)
        part = tl.program_id(1)
        base = sample.to(tl.int64) * per_sample
        start = part * slice_len
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, start + slice_len, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            inside = idx < per_sample
            a = tl.load(a_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + base + idx, mask=inside, other=0.0).to(tl.float32)
            d = a - b
            acc += d * d
        tl.store(partial_ptr + sample * SLICES + part, tl.sum(acc, axis=0))


def sample_squared_errors(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Float32 ``sum((out - target)^2)`` per sample: ``[bs]`` for ``[bs, ...]`` outputs; one sum for a 2-D output
    (an MoE expert's routed rows, not whole samples)."""
    if (out.dim() >= 3 and triton is not None and out.is_cuda and out.shape == target.shape and out.is_contiguous()
            and target.is_contiguous() and out.numel()):
        bs = out.shape[0]
        per_sample = out.numel() // bs
        slice_len = triton.cdiv(triton.cdiv(per_sample, SLICES), BLOCK) * BLOCK
        partial = torch.empty(bs, SLICES, dtype=torch.float32, device=out.device)
        _squared_error_kernel[(bs, SLICES)](out, target, partial, per_sample, slice_len, BLOCK=BLOCK, SLICES=SLICES,
                                            enable_fp_fusion=False)  # the square rounded before it is added
        return partial.sum(dim=1)
    err = out.float() - target  # float32 math; target widened as it is read
    err.mul_(err)
    return err.reshape(err.shape[0], -1).sum(dim=1) if err.dim() >= 3 else err.sum().reshape(1)
