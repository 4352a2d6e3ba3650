"""Triton for the CUDA kernels, where PyTorch's CUDA builds ship it; ``triton`` is None on its CPU builds.

The kernels (``algorithms.gptq_kernel``, ``algorithms.awq_kernel``, ``tpu.rtn_kernel``) define themselves only when
it is present, and their callers fall back to PyTorch operations otherwise.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the PyTorch build
    triton = tl = libdevice = None
else:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - older Triton
        from triton.language.extra.cuda import libdevice

__all__ = ["libdevice", "tl", "triton"]
