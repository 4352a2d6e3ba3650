"""Run TPU-MLIR's llm_convert.py on a Hugging Face folder and read back the weights it lowered.

With ``--debug`` llm_convert keeps, for every decoder layer i, ``OUT/<name>/block_{i}/
block_{i}_tpu_lowered_{chip}_{quantize}_weight.npz``: the block's weights after lowering to the
chip. For a Linear ``L`` (e.g. ``model.layers.0.self_attn.k_proj``) it holds (TPU-MLIR 1.30.2):

- integer rows, under ``L_`` (or ``L_0_`` when the Linear was split): ``uint`` (uint8, W4 nibbles
  ``[n*K/2]`` with the low nibble = even in-feature, or W8 ``[n*K]``) or ``int`` (int8, W8 per
  channel with signed codes); ``scale_bf16`` / ``scale_f16`` ``[n, K/G]`` or, per channel,
  ``scale_new`` ``[n*K/128]`` (each row's scale repeated K/128 times); ``zp`` / ``zp_new`` (uint8,
  same layout). Scales are stored as uint16 bit patterns.
- float rows left after the integer ones (N % NPU_NUM of them): ``L.weight_1_{offset}_{bf16|f16}``,
  ``[K, N - offset]``, the saved values unchanged.
- a Linear with no integer rows: ``L_dequant_{bf16|f16}`` ``[K, N]``, its quantized weight
  folded back to float.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify.tpu_mlir_env import INSTALL_HINT, TpuMlirEnv, VerifyError, find_tpu_mlir

_SCALE_KEYS = ("scale_bf16", "scale_f16", "scale_new")
_ZERO_KEYS = ("zp", "zp_new")
_TAIL_LINES = 25
_PROGRESS = re.compile(r"^local:\d|\] *\d+%")  # GNU parallel and tpuc-opt progress lines


def llm_convert_args(model_dir: Path, fmt: TpuWeightFormat, seq_len: int, out_dir: Path) -> list[str]:
    """The llm_convert.py arguments that compile ``model_dir`` in ``fmt``, keeping lowered weights."""
    args = ["-m", str(model_dir), "-s", str(seq_len), "-q", fmt.llm_convert_quantize, "-g", str(fmt.group_size),
            "-c", fmt.chip, "-o", str(out_dir), "--debug"]
    return args + ["--symmetric"] if fmt.symmetric else args


def check_model_dir(model_dir: Path, fmt: TpuWeightFormat) -> None:
    """Refuse, with a fix, what llm_convert would refuse or what this check cannot compare."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise VerifyError(f"{cfg_file} not found: give a Hugging Face model folder")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if "quantization_config" in cfg:
        raise VerifyError(f"{model_dir} is a pre-quantized checkpoint ({cfg['quantization_config'].get('quant_method')}); "
                          "verify compares TPU-MLIR's quantization of a float model with ours")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype != fmt.scale_dtype:
        raise VerifyError(f"{cfg_file} says dtype {dtype!r}, but llm_convert.py compiles {fmt.llm_convert_quantize} "
                          f"only from a {fmt.scale_dtype} model: save the model in {fmt.scale_dtype}")


def log_tail(out_dir: Path, log: Path) -> str:
    """The end of llm_convert's log, plus the end of each per-piece log that reports an error."""
    def tail(p: Path) -> list[str]:
        # progress bars redraw with \r: keep what each line shows last
        lines = [ln.rsplit("\r", 1)[-1][:300] for ln in p.read_text(encoding="utf-8", errors="replace").split("\n")]
        return [ln for ln in lines if ln.strip() and not _PROGRESS.search(ln)][-_TAIL_LINES:]

    parts = [f"--- {log}", *tail(log)] if log.is_file() else []
    failed = [p for p in sorted(out_dir.glob("*/*.log"))
              if re.search(r"error|assert|Traceback", p.read_text(encoding="utf-8", errors="replace"), re.I)]
    for p in failed[:2]:
        parts += [f"--- {p}", *tail(p)]
    return "\n".join(parts)


def run_llm_convert(model_dir: Path, fmt: TpuWeightFormat, seq_len: int, work_dir: Path,
                    env: TpuMlirEnv | None = None, timeout_s: float | None = None) -> Path:
    """Compile ``model_dir`` into ``work_dir/llm_convert`` (replaced); return that folder."""
    check_model_dir(Path(model_dir).resolve(), fmt)
    return compile_with_llm_convert(model_dir, work_dir, lambda m, out: llm_convert_args(m, fmt, seq_len, out),
                                    env, timeout_s)


def _model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def compile_with_llm_convert(model_dir: Path, work_dir: Path, make_args, env: TpuMlirEnv | None = None,
                             timeout_s: float | None = None) -> Path:
    """Run llm_convert.py with ``make_args(model_dir, out_dir)`` into ``work_dir/llm_convert`` (replaced)."""
    model_dir, work_dir = Path(model_dir).resolve(), Path(work_dir).resolve()
    if work_dir.is_relative_to(model_dir):
        raise VerifyError(f"work dir {work_dir} is inside the model folder; llm_convert.py refuses that")
    env = env or find_tpu_mlir()
    out_dir, log = work_dir / "llm_convert", work_dir / "llm_convert.log"
    if out_dir.exists():  # llm_convert would reuse stale pieces from an earlier run
        shutil.rmtree(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    args = [str(env.tool("llm_convert.py")), *make_args(model_dir, out_dir)]
    if "--max_pixels" not in args and _model_type(model_dir) in ("qwen2_vl", "qwen2_5_vl"):
        args += ["--max_pixels", "112,112"]  # Qwen-VL: a small vision tower shape; only the language blocks are compared
    rc = env.run(args, cwd=work_dir, log=log, timeout_s=timeout_s)
    if rc != 0:
        raise VerifyError(f"llm_convert.py failed (exit {rc}): {' '.join(args)}\n"
                          f"(if TPU-MLIR itself is broken, {INSTALL_HINT})\n{log_tail(out_dir, log)}")
    if not lowered_weight_files(out_dir):
        raise VerifyError(f"llm_convert.py left no *_tpu_lowered_*_weight.npz in {out_dir}\n{log_tail(out_dir, log)}")
    return out_dir


def lowered_weight_files(out_dir: Path) -> dict[int, Path]:
    """Decoder layer index -> its block's lowered-weight npz (the prefill block; block_cache shares it)."""
    files = {}
    for p in Path(out_dir).glob("*/block_*/block_*_tpu_lowered_*_weight.npz"):
        m = re.fullmatch(r"block_(\d+)", p.parent.name)
        if m and p.name.startswith(p.parent.name + "_tpu_lowered_"):
            files[int(m.group(1))] = p
    return files


@dataclass
class LoweredLinear:
    """One Linear as TPU-MLIR lowered it; bf16/f16 values as uint16 bit patterns, rows = out-features."""

    name: str
    codes: np.ndarray  # int16 [n_int, K]
    scale: np.ndarray  # uint16 [n_int, n_cols]
    zero: np.ndarray  # int16 [n_int, n_cols]
    float_rows: np.ndarray  # uint16 [n_float, K]: rows left float after the integer ones
    float_offset: int  # first row of float_rows
    folded: np.ndarray | None  # uint16 [N, K]: the whole weight folded back to float

    @property
    def n_int(self) -> int:
        return self.codes.shape[0]


def unpack_w4(packed: np.ndarray, k: int) -> np.ndarray:
    """uint8 nibbles -> int16 ``[n, K]``; the low nibble holds the even in-feature."""
    flat = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(flat.size * 2, dtype=np.int16)
    out[0::2], out[1::2] = flat & 0x0F, flat >> 4
    return out.reshape(-1, k)


def read_lowered_linear(npz: Mapping[str, np.ndarray], name: str, k: int, bits: int) -> LoweredLinear | None:
    """Collect Linear ``name`` (in-features ``k``) from a lowered-weight npz; None when absent."""
    keys = set(npz.keys())
    prefix = f"{name}_0_" if any(x.startswith(f"{name}_0_") for x in keys) else f"{name}_"
    codes = np.zeros((0, k), np.int16)
    scale, zero = np.zeros((0, 1), np.uint16), np.zeros((0, 1), np.int16)
    found = False
    if prefix + "uint" in keys or prefix + "int" in keys:
        raw = npz[prefix + "uint"] if prefix + "uint" in keys else npz[prefix + "int"]
        codes = unpack_w4(raw, k) if bits == 4 else np.asarray(raw).astype(np.int16).reshape(-1, k)
        n = codes.shape[0]
        s_key = next((prefix + s for s in _SCALE_KEYS if prefix + s in keys), None)
        z_key = next((prefix + z for z in _ZERO_KEYS if prefix + z in keys), None)
        scale = npz[s_key].astype(np.uint16).reshape(n, -1) if s_key else np.zeros((n, 0), np.uint16)
        zero = npz[z_key].astype(np.int16).reshape(n, -1) if z_key else np.zeros((n, 0), np.int16)
        found = True
    float_rows, offset = np.zeros((0, k), np.uint16), codes.shape[0]
    pattern = re.compile(re.escape(name) + r"\.weight(?:_1_(\d+))?_(?:bf16|f16)")
    for key in keys:
        m = pattern.fullmatch(key)
        if m:
            float_rows, offset, found = npz[key].astype(np.uint16).reshape(k, -1).T, int(m.group(1) or 0), True
    folded = next((npz[name + s].astype(np.uint16).reshape(k, -1).T for s in ("_dequant_bf16", "_dequant_f16")
                   if name + s in keys), None)
    if not found and folded is None:
        return None
    return LoweredLinear(name, codes, scale, zero, float_rows, offset, folded)
