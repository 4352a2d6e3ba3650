"""GPU checkpoint exports (AutoAWQ GEMM, GPTQ, compressed-tensors for vLLM and SGLang) of one run.

Every export derives from the canonical per-Linear result (``canonical.gpu_weight`` of the
run's ``QuantResults``) plus the model's float tensors at save time (embeddings, norms
with folded AWQ scales, lm_head). A format that cannot represent the result fails alone,
with its reason in the report; the other exports and the TPU outputs are still written.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from llmc_tpu.export.formats import autoawq, compressed_tensors, gptq
from llmc_tpu.export.formats.canonical import ExportError, GpuWeight, gpu_weight
from llmc_tpu.export.formats.constraints import serving
from llmc_tpu.export.formats.folder import float_tensors, write_folder
from llmc_tpu.export.formats.spec import ExportOptions, GptqCheckpointFormat, PackedModel
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat

log = logging.getLogger("llmc_tpu")

__all__ = ["EXPORTS", "ExportError", "ExportKind", "export_options", "write_exports"]


@dataclass(frozen=True)
class ExportKind:
    folder: str
    title: str
    family: str  # constraints.KERNELS key
    build: Callable[[Iterable[tuple[str, GpuWeight]], ExportOptions], PackedModel]


# save.<key> -> what it writes
EXPORTS: dict[str, ExportKind] = {
    "save_autoawq": ExportKind(autoawq.FOLDER, "AutoAWQ GEMM", "autoawq", autoawq.build),
    "save_gptq": ExportKind(gptq.FOLDER, "GPTQ", "gptq", gptq.build),
    "save_vllm": ExportKind(compressed_tensors.VLLM_FOLDER, "compressed-tensors pack-quantized", "compressed-tensors",
                            compressed_tensors.build),
    "save_sgl": ExportKind(compressed_tensors.SGL_FOLDER, "compressed-tensors pack-quantized", "compressed-tensors",
                           compressed_tensors.build),
}


def export_options(fmt: TpuWeightFormat, model: nn.Module, quantized: Iterable[str],
                   gptq_checkpoint_format: GptqCheckpointFormat = "gptq", method: str = "RTN",
                   method_options: dict[str, Any] | None = None) -> ExportOptions:
    """The run-level facts of the exports. W8 per channel (signed int8, z = 0) is symmetric too."""
    quantized = set(quantized)
    not_quantized = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    return ExportOptions(bits=fmt.bits, group_size=fmt.group_size, per_channel=fmt.per_channel,
                         symmetric=fmt.symmetric or (fmt.per_channel and fmt.bits == 8), dtype=fmt.handoff_dtype,
                         not_quantized=not_quantized, gptq_checkpoint_format=gptq_checkpoint_format,
                         method=method, method_options=dict(method_options or {}))


def _describe(opts: ExportOptions, key: str) -> str:
    grid = "symmetric" if opts.symmetric else "asymmetric (zero points)"
    group = "per channel" if opts.per_channel else f"group {opts.group_size}"
    scale = str(opts.dtype).replace("torch.", "") if EXPORTS[key].family == "compressed-tensors" else "float16"
    extra = f", checkpoint_format {opts.gptq_checkpoint_format}" if key == "save_gptq" else ""
    return f"{opts.bits}-bit {grid}, {group}, scales {scale}{extra}"


def write_exports(model: nn.Module, tokenizer: Any, source: Path, results: dict[str, TpuQuantizedWeight],
                  keys: list[str], opts: ExportOptions, tmp_root: Path, final_root: Path) -> dict[str, dict[str, Any]]:
    """Write each requested export under ``tmp_root``; return the report entry of each (``final_root`` paths)."""
    floats = float_tensors(model, set(results), opts.dtype)
    shapes = [(n, r.n_quantized + r.float_rows.shape[0], r.codes.shape[1]) for n, r in results.items()]
    gpu_rows = {n: r.float_rows.shape[0] for n, r in results.items() if r.float_rows.shape[0]}
    records: dict[str, dict[str, Any]] = {}
    for key in keys:
        kind = EXPORTS[key]
        record: dict[str, Any] = {"folder": str(final_root / kind.folder), "format": kind.title,
                                  "weights": _describe(opts, key), "linears": len(results)}
        try:
            packed = kind.build(((n, gpu_weight(r)) for n, r in results.items()), opts)
            write_folder(model, tokenizer, source, tmp_root / kind.folder, {**floats, **packed.tensors},
                         packed.quantization_config, opts.dtype, packed.extra_json)
        except ExportError as exc:
            shutil.rmtree(tmp_root / kind.folder, ignore_errors=True)
            record.update(status="failed", error=str(exc))
            record.pop("folder")
            log.warning("%s failed: %s", key, exc)
            records[key] = record
            continue
        record["status"] = "written"
        if gpu_rows:
            record["rows_quantized_for_gpu_only"] = sum(gpu_rows.values())
            record["note"] = (f"{sum(gpu_rows.values())} rows of {len(gpu_rows)} Linears stay float on the TPU (NPU rule); "
                              "here they are quantized with the same TPU grid, so these weights differ from "
                              "fake_quant_model in those rows")
        record["serving"] = serving(kind.family, opts, shapes)
        records[key] = record
        log.info("%s: wrote %s", key, record["folder"])
    return records
