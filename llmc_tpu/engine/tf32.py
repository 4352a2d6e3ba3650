"""TF32 matrix products on CUDA for one piece of code, PyTorch's global setting restored after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """Let float32 matrix products use TF32 tensor cores inside the block (no effect off CUDA, or if not ``enabled``;
    a setting the user turned on stays on)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = old or enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
