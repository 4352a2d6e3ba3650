"""GPTQ's handoff to TPU-MLIR: a GPTQ-format Hugging Face folder that ``llm_convert.py -q auto`` compiles code for code.

Written from the canonical per-Linear results (``TpuQuantizedWeight``), never from recomputed
scales. Per quantized Linear ``L`` (weight ``[N, K]``, G = group size, K for per channel):

- ``L.qweight`` int32 ``[K*bits/32, N]``: packed along the input; element p of word i is in-feature
  ``(32/bits)*i + p``, at bits ``bits*p`` (low bits first).
- ``L.qzeros`` int32 ``[K/G, N*bits/32]``: packed along the output the same way, **v1 convention**:
  the file holds ``z - 1`` and readers (TPU-MLIR included) add the 1 back, so ``z`` must be >= 1
  (the solver guarantees it, see ``algorithms/gptq.py``).
- ``L.scales`` fp16 ``[K/G, N]``: our stored scale, written exactly. For W*BF16 it is a bf16 value
  that fp16 holds exactly, so TPU-MLIR's cast of the file's fp16 to bf16 gives back the very
  scale our fake-quant multiplied with.
- ``L.g_idx`` int32 ``[K]`` = ``i // G``: act-order runs only with static groups, codes stay in
  natural column order (TPU-MLIR reads no g_idx).

Everything else (embeddings, norms, lm_head, biases) is written in the activation dtype (bf16 or
f16, which also selects -q auto's w4bf16/w4f16), with config.json's ``quantization_config``
(``quant_method: gptq``, ``checkpoint_format: gptq``, ``desc_act: false``) and the tokenizer files.

``save.save_trans`` is refused for GPTQ (config check): float weights would be re-gridded by
TPU-MLIR's RTN and GPTQ's codes lost; this folder is the handoff.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from llmc_tpu.engine.host_memory import release_file_pages
from llmc_tpu.export.hf_folder import copy_side_files, set_dtype_fields
from llmc_tpu.export.safetensors_stream import Deferred, save_file
from llmc_tpu.tpu.chips import quantized_out_features
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat

FOLDER = "gptq_tpu_model"


class CheckpointError(ValueError):
    """A result that a GPTQ checkpoint cannot carry exactly, or a folder that is not ours."""


def pack(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Unsigned ``[R, C]`` values -> int32 words packed along ``dim`` (``[R*bits/32, C]`` for 0, ``[R, C*bits/32]``
    for 1), low bits first. int32 arithmetic: the fields are disjoint, so their sum is their bitwise OR, and the
    top field's sign bit makes the word negative as two's complement has it (a 7B's 6.5 G codes in seconds)."""
    per = 32 // bits
    if values.dim() != 2 or dim not in (0, 1, -1):
        raise ValueError(f"pack takes a 2-D tensor and dim 0 or 1, not {tuple(values.shape)} and {dim}")
    dim = dim % 2
    r = values.shape[dim]
    if r % per:
        raise CheckpointError(f"{r} values along the packed dimension are not a multiple of {per} ({bits}-bit into int32)")
    if values.numel():
        lo, hi = torch.aminmax(values)
        if int(lo) < 0 or int(hi) >= 1 << bits:
            raise ValueError(f"values {int(lo)}..{int(hi)} cannot be packed in {bits} bits (0..{(1 << bits) - 1})")
    if dim == 1 and bits in (4, 8) and sys.byteorder == "little":
        return _pack_bytes(values, bits)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=values.device)
    if dim == 0:
        v = values.reshape(r // per, per, values.shape[1]).to(torch.int32)
        v <<= shifts.view(1, per, 1)
        return v.sum(dim=1, dtype=torch.int32)
    v = values.reshape(values.shape[0], r // per, per).to(torch.int32)
    v <<= shifts
    return v.sum(dim=2, dtype=torch.int32)


def _pack_bytes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack`` along the rows for 4 and 8 bits through bytes: a little-endian int32 word is its 4 bytes, lowest
    first, so two 4-bit fields per byte (the even column low) viewed as int32 are the words. A quarter of the
    memory traffic of shifting and summing int32 fields (a 7B's codes were most of its GPTQ save)."""
    b = values.to(torch.uint8)
    if bits == 4:
        b = b[:, 0::2] | (b[:, 1::2] << 4)
    # flat first: a single row may carry any stride on its size-1 dimension
    return b.contiguous().reshape(-1).view(torch.int32).reshape(values.shape[0], values.shape[1] * bits // 32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: int32 ``[R', C]`` -> int16 ``[R'*32/bits, C]``."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    v = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(-1, words.shape[1]).to(torch.int16)


def file_scale(q: TpuQuantizedWeight) -> torch.Tensor:
    """The fp16 the file stores: our stored scale, exactly, checked to survive TPU-MLIR's cast back."""
    stored = q.stored_scale
    f16 = stored.to(torch.float16)
    if not torch.isfinite(f16).all() or not torch.equal(f16.to(stored.dtype), stored):
        raise CheckpointError("a scale is not exactly representable in fp16 (the GPTQ checkpoint's scale type); "
                              "such results come from TPU RTN, not from the GPTQ solver")
    return f16


def check_writable(name: str, q: TpuQuantizedWeight) -> None:
    """A result the checkpoint can carry exactly: integer codes only, zero points v1 can store."""
    if q.float_rows.shape[0] or q.signed:
        raise CheckpointError(f"{name}: {'float rows' if q.float_rows.shape[0] else 'signed codes'} cannot be written "
                              "in a GPTQ checkpoint (the GPTQ solver produces neither)")
    if q.n_quantized and (int(q.zero.min()) < 1 or int(q.zero.max()) > q.fmt.qmax + 1):
        raise CheckpointError(f"{name}: zero points must be in 1..{q.fmt.qmax + 1} (v1 stores z - 1)")
    per = 32 // q.fmt.bits
    if any(d % per for d in q.codes.shape):  # said before any file is written, not by pack() halfway through
        raise CheckpointError(f"{name}: {tuple(q.codes.shape)} are not multiples of {per} ({q.fmt.bits}-bit into int32)")


def _linear_parts(q: TpuQuantizedWeight) -> dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """Per tensor of one Linear (qweight, qzeros, scales, g_idx): its dtype, shape and how to build it."""
    bits = q.fmt.bits
    n, k = q.codes.shape
    per, groups = 32 // bits, k // q.group_size

    def qweight() -> torch.Tensor:
        words = pack(q.codes, bits, dim=1).T.contiguous()  # along the in-features, then [K/per, N]
        release_file_pages([q.codes])  # packed now; codes read from a file mapping (a run's checkpoints) go back
        return words

    return {
        "qweight": (torch.int32, (k // per, n), qweight),
        "qzeros": (torch.int32, (groups, n // per), lambda: pack((q.zero.to(torch.int32) - 1).contiguous(), bits).T.contiguous()),
        "scales": (torch.float16, (groups, n), lambda: file_scale(q).T.contiguous()),
        "g_idx": (torch.int32, (k,), lambda: torch.arange(k, dtype=torch.int32) // q.group_size),
    }


def linear_tensors(name: str, q: TpuQuantizedWeight) -> dict[str, torch.Tensor]:
    """The qweight/qzeros/scales/g_idx tensors of one Linear."""
    check_writable(name, q)
    return {f"{name}.{key}": make() for key, (_, _, make) in _linear_parts(q).items()}


def deferred_linear_tensors(name: str, q: TpuQuantizedWeight) -> dict[str, Deferred]:
    """``linear_tensors`` announced by dtype and shape, each built only when the writer reaches it."""
    check_writable(name, q)
    return {f"{name}.{key}": Deferred(dtype, shape, make) for key, (dtype, shape, make) in _linear_parts(q).items()}


def _built(entry: torch.Tensor | Deferred) -> torch.Tensor:
    return entry.make() if isinstance(entry, Deferred) else entry


def quantization_config(fmt: TpuWeightFormat, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json's ``quantization_config`` for our checkpoint."""
    from llmc_tpu import __version__

    return {"quant_method": "gptq", "bits": fmt.bits, "group_size": -1 if fmt.per_channel else fmt.group_size,
            "desc_act": False, "sym": fmt.symmetric, "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False,
            "meta": {"quantizer": [f"llmc_tpu:{__version__}"], "tpu_format": fmt.llm_convert_quantize.upper(),
                     "chip": fmt.chip, **(meta or {})}}


def _float_state(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor but the quantized weights, tied duplicates written once, floats in ``dtype``."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        ident = (t.data_ptr(), tuple(t.shape))
        if t.numel() and ident in seen:  # tied (lm_head = embeddings): readers re-tie from config.json
            continue
        seen.add(ident)
        t = t.detach().cpu()
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def save_gptq_checkpoint(model: nn.Module, tokenizer, source: Path, dest: Path, results: dict[str, TpuQuantizedWeight],
                         fmt: TpuWeightFormat, meta: dict[str, Any] | None = None, original_keys: bool = False) -> Path:
    """Write ``dest``: ``results`` (keyed by Linear name) as GPTQ tensors, every other tensor in fmt's activation dtype.

    ``original_keys``: name the tensors as the published checkpoint does (VLMs: transformers 5 renames
    ``model.layers`` to ``model.language_model.layers`` on load; TPU-MLIR reads the original names).
    """
    tensors: dict[str, torch.Tensor | Deferred] = {}
    for name, q in results.items():
        if q.fmt != fmt:
            raise CheckpointError(f"{name}: quantized as {q.fmt}, checkpoint format {fmt}")
        tensors.update(deferred_linear_tensors(name, q))
    tensors.update(_float_state(model, {f"{n}.weight" for n in results}, fmt.torch_scale_dtype))
    if original_keys:  # renamed as one dict (VLMs, small language models): built now
        from transformers.core_model_loading import revert_weight_conversion

        tensors = dict(revert_weight_conversion(model, {k: _built(v) for k, v in tensors.items()}))
    dest.mkdir(parents=True, exist_ok=False)
    copy_side_files(Path(source), dest)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})  # one Linear's codes packed at a time
    model.config.save_pretrained(dest)
    if original_keys:  # the published config too (see hf_folder.save_hf_folder's source_config)
        shutil.copy2(Path(source) / "config.json", dest / "config.json")
    cfg_file = dest / "config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    set_dtype_fields(cfg, fmt.scale_dtype)  # llm_convert -q auto picks w*bf16 / w*f16 from it (VLMs: text_config's)
    cfg["quantization_config"] = quantization_config(fmt, meta)
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    return dest


def read_gptq_checkpoint(folder: Path, fmt: TpuWeightFormat) -> dict[str, TpuQuantizedWeight]:
    """Our reading of a GPTQ checkpoint: every quantized Linear as TPU-MLIR will lower it for ``fmt.chip``."""
    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    qc = cfg.get("quantization_config") or {}
    group = -1 if fmt.per_channel else fmt.group_size
    if qc.get("quant_method") != "gptq" or qc.get("bits") != fmt.bits or qc.get("group_size") != group:
        raise CheckpointError(f"{folder}: quantization_config {qc} is not a {fmt.bits}-bit gptq checkpoint with group_size {group}")
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if not key.endswith(".qweight"):
                    continue
                name = key[: -len(".qweight")]
                codes = unpack(st.get_tensor(key), fmt.bits).T.contiguous()
                zero = unpack(st.get_tensor(f"{name}.qzeros").T.contiguous(), fmt.bits) + 1  # v1: the file holds z - 1
                scale = st.get_tensor(f"{name}.scales").to(fmt.torch_scale_dtype).float().T.contiguous()
                n, k = codes.shape
                folded = quantized_out_features(n, fmt.bits, fmt.chip, per_channel=True) == 0
                out[name] = TpuQuantizedWeight(fmt, codes, scale, zero, torch.zeros(0, k), folded=folded)
    return out


def llm_convert_auto_command(model_dir: Path, fmt: TpuWeightFormat, seq_length: int, out_dir: Path) -> str:
    """The TPU-MLIR command that compiles our GPTQ checkpoint (bits, group and dtype come from the checkpoint)."""
    return shlex.join(["llm_convert.py", "-m", str(model_dir), "-s", str(seq_length), "-q", "auto",
                       "-c", fmt.chip, "-o", str(out_dir)])
