"""Which serving engines and kernels can load a written GPU export, and why not when they cannot.

The rules are the kernels' own checks as formats.md (shared/reference) records them, read
from vLLM's sources (``awq_marlin``, ``gptq_marlin``, ``marlin_utils``, ``machete_utils``,
the mixed-precision ``exllama`` kernel): bit widths, symmetric or with zero points, group
sizes, ``in``/``out`` divisibility (tensor parallel 1), activation dtypes, GPU generation.
SGLang serves these formats with the same kernels. A kernel that is not listed is not claimed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from llmc_tpu.export.formats.spec import ExportOptions

MARLIN_GROUPS = (-1, 32, 64, 128)
MACHETE_GROUPS = (-1, 64, 128)


@dataclass(frozen=True)
class Kernel:
    """One kernel's constraints."""

    engine: str
    name: str
    bits: tuple[int, ...]
    zero_points: bool  # can it apply per-group zero points (asymmetric codes)
    zero_point_bits: tuple[int, ...] = (4, 8)  # bit widths it takes with zero points
    groups: tuple[int, ...] | None = None  # None: any positive group size or -1
    positive_group: bool = False  # -1 (per channel) not accepted
    out_multiple: int = 1
    in_multiple: int = 1
    act_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    hardware: str = ""
    gptq_v2: bool = True  # reads gptq_v2 zero points (or ignores zero points)
    note: str = ""


# Kernels by folder format. Order: what vLLM tries first.
KERNELS: dict[str, tuple[Kernel, ...]] = {
    "autoawq": (
        Kernel("vLLM / SGLang", "awq_marlin", bits=(4,), zero_points=True, zero_point_bits=(4,), groups=MARLIN_GROUPS,
               out_multiple=64, in_multiple=128, hardware="NVIDIA SM80+ (Ampere or newer)"),
        Kernel("vLLM", "awq (GEMM)", bits=(4,), zero_points=True, zero_point_bits=(4,), positive_group=True,
               out_multiple=8, act_dtypes=(torch.float16,), hardware="NVIDIA SM75+"),
        Kernel("transformers", "AutoAWQ / GPTQModel backend", bits=(4,), zero_points=True, zero_point_bits=(4,),
               note="the reference GEMM layout"),
    ),
    "gptq": (
        Kernel("vLLM / SGLang", "gptq_marlin", bits=(4, 8), zero_points=False, groups=MARLIN_GROUPS,
               out_multiple=64, in_multiple=128, hardware="NVIDIA SM80+ (Ampere or newer)"),
        Kernel("vLLM", "gptq (exllama)", bits=(4, 8), zero_points=True, act_dtypes=(torch.float16,),
               hardware="NVIDIA SM60+", gptq_v2=False),
        Kernel("transformers", "GPTQModel backend", bits=(4, 8), zero_points=True, note="v1 and v2"),
    ),
    "compressed-tensors": (
        Kernel("vLLM / SGLang", "Machete", bits=(4, 8), zero_points=True, groups=MACHETE_GROUPS,
               out_multiple=128, in_multiple=64, hardware="NVIDIA SM90 (Hopper) only"),
        Kernel("vLLM / SGLang", "Marlin", bits=(4, 8), zero_points=True, zero_point_bits=(4,), groups=MARLIN_GROUPS,
               out_multiple=64, in_multiple=128, hardware="NVIDIA SM80+ (Ampere or newer)"),
        Kernel("vLLM", "Exllama", bits=(4, 8), zero_points=False, act_dtypes=(torch.float16,), hardware="NVIDIA SM60+"),
    ),
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_misfits(shapes: Iterable[tuple[str, int, int]], out_multiple: int, in_multiple: int) -> list[str]:
    bad = []
    for name, out_f, in_f in shapes:
        why = []
        if out_f % out_multiple:
            why.append(f"out {out_f} % {out_multiple}")
        if in_f % in_multiple:
            why.append(f"in {in_f} % {in_multiple}")
        if why:
            bad.append(f"{name} ({', '.join(why)} != 0)")
    return bad


def check_kernel(kernel: Kernel, opts: ExportOptions, shapes: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Whether ``kernel`` can serve an export with these options and Linear shapes (name, out, in)."""
    group = -1 if opts.per_channel else opts.group_size
    problems = []
    if opts.bits not in kernel.bits:
        problems.append(f"{opts.bits}-bit weights (takes {'/'.join(map(str, kernel.bits))})")
    if not opts.symmetric:
        if not kernel.zero_points:
            problems.append("asymmetric codes need zero points; this kernel is symmetric only")
        elif opts.bits not in kernel.zero_point_bits:
            problems.append(f"{opts.bits}-bit with zero points (takes {'/'.join(map(str, kernel.zero_point_bits))})")
    if opts.gptq_checkpoint_format == "gptq_v2" and not kernel.gptq_v2:
        problems.append("gptq_v2 zero points: only vLLM releases with gptq_v2 support read them, older ones "
                        "read them as v1 (wrong weights); write v1 for this kernel")
    if kernel.groups is not None and group not in kernel.groups:
        problems.append(f"group size {group} (takes {', '.join(map(str, kernel.groups))})")
    if kernel.positive_group and group == -1:
        problems.append("per-channel (group_size -1); needs a positive group size")
    misfits = _shape_misfits(shapes, kernel.out_multiple, kernel.in_multiple)
    if misfits:
        more = f" and {len(misfits) - 2} more" if len(misfits) > 2 else ""
        problems.append(f"{len(misfits)} Linear(s) off the tile sizes: {'; '.join(misfits[:2])}{more}")
    notes = [n for n in (kernel.hardware, kernel.note) if n]
    if not problems and opts.dtype not in kernel.act_dtypes:
        notes.append(f"float16 activations only: the folder is {_dtype_name(opts.dtype)}, start the engine with --dtype float16")
    return {"engine": kernel.engine, "kernel": kernel.name, "ok": not problems,
            "why": "; ".join(problems) if problems else "; ".join(notes) or "supported"}


def serving(fmt: str, opts: ExportOptions, shapes: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """One line per known kernel of a folder format (``autoawq``, ``gptq``, ``compressed-tensors``)."""
    return [check_kernel(k, opts, shapes) for k in KERNELS[fmt]]
