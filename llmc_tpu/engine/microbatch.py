"""How many calibration samples one block forward may take at once, from the device's free memory.

``calib.bs: -1`` asks for batches as large as the device allows: a large model's block over 128 x 2048
tokens materializes gigabytes of attention and MLP intermediates, so the samples are split into
micro-batches that fit (and, in the pipeline, never larger than one part of ``engine.distributed``'s fixed
summing order). The statistics the methods collect (GPTQ's Hessians, AWQ's losses, SignRound's samples)
are accumulated per sample, so the split does not change what they compute. An explicit ``calib.bs`` is
used as given (within the parts).
"""

from __future__ import annotations

import os
from typing import Any

import torch

BUDGET_SHARE = 0.25  # of the free memory, for one micro-batch's intermediates (the rest: weights, stored inputs)


def free_bytes(device: torch.device, cap: int | None = None) -> int:
    """Free memory of the device: CUDA's own count (within ``cap`` bytes for this process, when given: what is
    left of the cap after what PyTorch has reserved), else the host's available memory (Linux)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if cap is not None:
            free = min(free, cap - torch.cuda.memory_reserved(device))
        return max(0, int(free))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _sizes(config: Any) -> tuple[int, int, int]:
    """(hidden, intermediate, heads) of the language model (a VLM's text config), under the common names."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 4096)
    inter = int(getattr(config, "intermediate_size", 0) or getattr(config, "ffn_dim", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 32)
    return hidden, inter, heads


def bytes_per_token(config: Any, seq_len: int, dtype_bytes: int = 4) -> int:
    """A generous estimate of one token's intermediates in one decoder block's forward: the residual stream
    and norms, q/k/v/o, the MLP's gate/up/act products, and a row of attention scores per head."""
    hidden, inter, heads = _sizes(config)
    return dtype_bytes * (12 * hidden + 4 * inter + 2 * heads * seq_len)


def micro_batch_size(n_samples: int, seq_len: int, config: Any, device: torch.device, dtype_bytes: int = 4,
                     free: int | None = None) -> int:
    """Samples per block forward: all of them when they fit in ``BUDGET_SHARE`` of the free memory, else fewer."""
    budget = BUDGET_SHARE * (free_bytes(device) if free is None else free)
    per_sample = bytes_per_token(config, seq_len, dtype_bytes) * seq_len
    return max(1, min(n_samples, int(budget // per_sample)))


def inputs_device(n_samples: int, seq_len: int, config: Any, device: torch.device, dtype_bytes: int = 2,
                  free: int | None = None) -> torch.device:
    """Where the calibration samples' block inputs live between blocks: on the device while they (and the next
    block's outputs, as many again) fit in ``BUDGET_SHARE`` of its free memory, else in the host's memory."""
    if device.type != "cuda":
        return device
    needed = 2 * n_samples * seq_len * _sizes(config)[0] * dtype_bytes
    return device if needed <= BUDGET_SHARE * (free_bytes(device) if free is None else free) else torch.device("cpu")


def limit_device_memory(device: torch.device, gib: float | None) -> int | None:
    """Cap what PyTorch's allocator may hold on a CUDA device at ``gib`` GiB (``run.device_memory_gib``): an
    allocation past it fails as out of memory. Returns the cap in bytes (None: no cap, or not a CUDA device)."""
    if gib is None or device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index  # the call wants an index
    total = torch.cuda.get_device_properties(index).total_memory
    cap = int(gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    return min(cap, total)
