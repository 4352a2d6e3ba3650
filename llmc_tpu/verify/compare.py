"""Compare TPU-MLIR's lowered weights with our prediction (``rtn.quantize_weight``), Linear by Linear."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat, quantize_weight
from llmc_tpu.verify.layouts import model_spec, split_parts
from llmc_tpu.verify.llm_convert import LoweredLinear, lowered_weight_files, read_lowered_linear, run_llm_convert
from llmc_tpu.verify.tpu_mlir_env import TpuMlirEnv, VerifyError

# a decoder-block Linear's weight: "...layers.<i>.<module path>.weight", 2-D
_BLOCK_WEIGHT = re.compile(r"(?:^|.*\.)layers\.(\d+)\..+\.weight")


@dataclass
class LinearCheck:
    """One Linear: what we predict against what TPU-MLIR made of it."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    n_quantized: int  # rows quantized with the TPU grid (ours; the compiler agreed unless `problems` says so)
    folded: bool  # no integer rows kept: the quantized weight is folded back to float
    code_mismatches: int = 0
    scale_mismatches: int = 0  # per (row, group) of our stored scales
    zero_mismatches: int = 0
    float_mismatches: int = 0  # elements of float-stored rows (left float, or folded) that differ
    problems: list[str] = field(default_factory=list)  # layout disagreements

    @property
    def ok(self) -> bool:
        return not self.problems and not (self.code_mismatches or self.scale_mismatches
                                          or self.zero_mismatches or self.float_mismatches)


@dataclass
class VerifyResult:
    """The per-Linear table of one compile."""

    model_dir: Path
    fmt: TpuWeightFormat
    out_dir: Path
    rows: list[LinearCheck]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)


def _bits(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """bf16/f16 bit patterns (uint16) of ``t`` rounded to ``dtype``."""
    return t.to(dtype).contiguous().view(torch.int16).numpy().view(np.uint16)


def _grouped_mismatches(theirs: np.ndarray, ours: np.ndarray) -> int | None:
    """Differing (row, group) entries; TPU-MLIR may repeat each entry (per channel: K/128 times)."""
    n, cols = ours.shape
    if theirs.shape[0] != n or cols == 0 or theirs.shape[1] % cols:
        return None
    rep = theirs.shape[1] // cols
    return int((theirs.reshape(n, cols, rep) != ours[:, :, None]).any(axis=2).sum())


def compare_linear(name: str, ours: TpuQuantizedWeight, theirs: LoweredLinear | None) -> LinearCheck:
    """Code-for-code comparison of one Linear."""
    n = ours.n_quantized + ours.float_rows.shape[0]
    k = ours.codes.shape[1]
    check = LinearCheck(name, (n, k), ours.n_quantized, ours.folded)
    if theirs is None:
        check.problems.append("not found in TPU-MLIR's lowered weights")
        return check
    dtype = ours.fmt.torch_scale_dtype
    if ours.folded or theirs.folded is not None:
        if theirs.folded is None or not ours.folded:
            side = "TPU-MLIR" if theirs.folded is not None else "we"
            check.problems.append(f"{side} fold the whole Linear back to float, the other side does not")
            return check
        check.float_mismatches = int((theirs.folded != _bits(ours.dequantize(), dtype)).sum())
        return check
    n_int = ours.n_quantized
    if theirs.n_int != n_int or theirs.float_rows.shape[0] != n - n_int or (n > n_int and theirs.float_offset != n_int):
        check.problems.append(f"TPU-MLIR keeps {theirs.n_int} integer rows and {theirs.float_rows.shape[0]} float rows "
                              f"(from row {theirs.float_offset}), we predict {n_int} and {n - n_int}")
        return check
    check.code_mismatches = int((theirs.codes != ours.codes.numpy()).sum())
    ours_scale = _bits(ours.scale, dtype).reshape(n_int, -1)
    ours_zero = ours.zero.numpy().astype(np.int16).reshape(n_int, -1)
    scale_mm, zero_mm = _grouped_mismatches(theirs.scale, ours_scale), _grouped_mismatches(theirs.zero, ours_zero)
    if n_int and (scale_mm is None or zero_mm is None):
        check.problems.append(f"scale/zero layout {theirs.scale.shape}/{theirs.zero.shape}, we have {ours_scale.shape}")
        return check
    check.scale_mismatches, check.zero_mismatches = scale_mm or 0, zero_mm or 0
    if n > n_int:
        check.float_mismatches = int((theirs.float_rows != _bits(ours.float_rows, dtype)).sum())
    return check


def saved_block_linears(model_dir: Path) -> dict[str, tuple[int, torch.Tensor]]:
    """Every 2-D decoder-block weight of the saved model: Linear name -> (layer index, weight)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise VerifyError(f"no *.safetensors in {model_dir}")
    found = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                m = _BLOCK_WEIGHT.fullmatch(key)
                if m and len(st.get_slice(key).get_shape()) == 2:
                    found[key[: -len(".weight")]] = (int(m.group(1)), st.get_tensor(key))
    return dict(sorted(found.items(), key=lambda kv: (kv[1][0], kv[0])))


def compare_lowered(model_dir: Path, fmt: TpuWeightFormat, out_dir: Path) -> VerifyResult:
    """Compare llm_convert's lowered weights in ``out_dir`` with ``quantize_weight`` of the saved weights."""
    npz_files = lowered_weight_files(out_dir)
    spec, config = model_spec(model_dir)
    rows, loaded = [], {}
    for name, (layer, weight) in saved_block_linears(model_dir).items():
        # a fused Linear llm_convert cuts into parts (Phi3's qkv_proj) is compared part by part
        for suffix, part in split_parts(spec, config, name, weight.shape[0]) or [("", None)]:
            ours = quantize_weight((weight if part is None else weight[part]).float(), fmt)
            if layer not in npz_files:
                rows.append(compare_linear(name + suffix, ours, None))
                continue
            if layer not in loaded:
                with np.load(npz_files[layer]) as npz:
                    loaded = {layer: dict(npz)}  # one block at a time
            rows.append(compare_linear(name + suffix, ours,
                                       read_lowered_linear(loaded[layer], name + suffix, weight.shape[1], fmt.bits)))
    return VerifyResult(Path(model_dir), fmt, Path(out_dir), rows)


def verify(model_dir: Path, fmt: TpuWeightFormat, seq_len: int, work_dir: Path,
           env: TpuMlirEnv | None = None, timeout_s: float | None = None) -> VerifyResult:
    """Compile ``model_dir`` with TPU-MLIR in ``fmt`` and compare every decoder-block Linear with ours."""
    out_dir = run_llm_convert(Path(model_dir), fmt, seq_len, Path(work_dir), env=env, timeout_s=timeout_s)
    return compare_lowered(Path(model_dir), fmt, out_dir)


def format_verify_table(result: VerifyResult) -> str:
    """A plain-text table: Linear, shape, quantized rows, code/scale/zero/float mismatches."""
    head = ("Linear", "shape", "quantized rows", "codes", "scales", "zeros", "float", "result")
    lines = []
    for r in result.rows:
        n = r.shape[0]
        rows = f"{r.n_quantized}/{n}" + (" folded" if r.folded else "")
        ints = ("-", "-", "-") if r.folded else (str(r.code_mismatches), str(r.scale_mismatches), str(r.zero_mismatches))
        floats = str(r.float_mismatches) if r.folded or r.n_quantized < n else "-"
        status = "ok" if r.ok else "; ".join(r.problems) or "MISMATCH"
        lines.append((r.name, f"{n}x{r.shape[1]}", rows, *ints, floats, status))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    f = result.fmt
    title = (f"TPU-MLIR check of {result.model_dir}: {f.llm_convert_quantize.upper()} "
             f"{'per channel' if f.per_channel else f'g{f.group_size}'}{' symmetric' if f.symmetric else ''} on {f.chip}")
    bad = sum(not r.ok for r in result.rows)
    summary = (f"all {len(result.rows)} Linears match TPU-MLIR" if result.ok else
               f"{bad} of {len(result.rows)} Linears differ from TPU-MLIR" if result.rows else "no Linears compared")
    legend = ("(codes/scales/zeros/float: mismatching entries; folded: TPU-MLIR keeps no integer codes for this "
              "Linear but its dequantized weight, compared as float)")
    return "\n".join([title, fmt_row(head), fmt_row(["-" * w for w in widths]), *map(fmt_row, lines), summary, legend])
