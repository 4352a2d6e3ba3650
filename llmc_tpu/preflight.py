"""Check everything that can be checked before the first block runs, and report every problem at once.

Reads only config.json and the safetensors headers (no weights are loaded): the model type, the
weight files, the Linear shapes against the TPU format, the data paths, and the save path
(free, writable, enough disk for the outputs asked for).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmc_tpu.config.schema import RunConfig
from llmc_tpu.data.text import DataError, resolve_path
from llmc_tpu.models.loading import ModelLoadError, resolve_model_path, resolve_spec
from llmc_tpu.models.registry import EXPERT, ModelSpec, part_rows
from llmc_tpu.tpu.chips import NPU_NUM, quantized_out_features
from llmc_tpu.tpu.rtn import TpuWeightFormat

PER_CHANNEL_K_TILE = 128  # TPU-MLIR lays per-channel scales out in tiles of 128 input features
_MAX_SHAPE_PROBLEMS = 3


class PreflightError(RuntimeError):
    """Every problem found before the run, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) found before starting:\n" + "\n".join(f"  - {p}" for p in problems))


def weight_shapes(folder: Path) -> tuple[dict[str, tuple[int, ...]], int, list[str]]:
    """Tensor shapes and total bytes from the safetensors headers; problems for unreadable files."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    total, problems = 0, []
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return shapes, 0, [f"model.path {folder}: no *.safetensors weights (pickled .bin weights are not loaded, for safety)"]
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    shapes[key] = tuple(st.get_slice(key).get_shape())
            total += f.stat().st_size
        except Exception as exc:  # corrupt header, truncated file, wrong format
            problems.append(f"model.path: {f.name} is not a readable safetensors file ({str(exc).splitlines()[0]})")
    return shapes, total, problems


def _checkpoint_key(shapes: dict[str, tuple[int, ...]], spec: ModelSpec, key: str) -> str | None:
    """The key a weight has in the files (transformers renames some on load: Mixtral's block_sparse_moe)."""
    if key in shapes:
        return key
    for pattern, repl in spec.checkpoint_renames:
        if (alt := re.sub(pattern, repl, key)) in shapes:
            return alt
    return None


def block_linear_keys(shapes: dict[str, tuple[int, ...]], spec: ModelSpec, i: int) -> list[tuple[str, str | None]]:
    """(name in the block, checkpoint key or None if missing) of every Linear of block ``i``: experts counted
    from the keys; a registry entry whose first Linear is not in the files is another variant and left out."""
    prefix = f"{spec.blocks}.{i}."
    out = []
    for entry in spec.subsets:
        experts: list[int | None] = [None]
        if EXPERT in entry.layers[0]:
            first = f"{prefix}{entry.layers[0]}.weight"
            present = lambda e, first=first: _checkpoint_key(shapes, spec, first.replace(EXPERT, str(e)))  # noqa: E731
            experts = list(itertools.takewhile(present, itertools.count()))
        for e in experts:
            names = [n if e is None else n.replace(EXPERT, str(e)) for n in entry.layers]
            keys = [_checkpoint_key(shapes, spec, f"{prefix}{n}.weight") for n in names]
            if keys[0]:
                out += [(n, k) for n, k in zip(names, keys) if (n, k) not in out]
    return out


def llm_convert_layout_problems(spec: ModelSpec, name: str, n: int, where: str, fmt: TpuWeightFormat,
                                config: Any) -> list[str]:
    """Where llm_convert quantizes other matrices than the Linear we quantize, our prediction must still hold."""
    if not spec.llm_convert:
        return []
    npu = NPU_NUM[fmt.chip]
    fused = spec.fused_of(name)
    if fused is not None and fused.tpu_split and config is not None:
        sizes = [len(part_rows(fused, part, n, config)) for part in fused.parts]
        if any(size % npu for size in sizes):
            return [f"{where}: TPU-MLIR's llm_convert cuts it into {'/'.join(fused.parts)} of {sizes} rows and quantizes "
                    f"each; llmc-tpu predicts that only when every part is a multiple of NPU_NUM {npu} ({fmt.chip})"]
    is_expert_in = (spec.experts is not None and name.startswith(spec.experts.path + ".")
                    and name.rsplit(".", 1)[-1] in spec.experts.names[:2])
    if is_expert_in and n % npu:
        return [f"{where}: TPU-MLIR's llm_convert needs the experts' intermediate size to be a multiple of NPU_NUM "
                f"{npu} ({fmt.chip})"]
    return []


def shape_problems(shapes: dict[str, tuple[int, ...]], spec: ModelSpec, fmt: TpuWeightFormat, n_blocks: int,
                   config: Any = None) -> list[str]:
    """Linear shapes TPU-MLIR cannot compile, or compiles wrongly, with this format."""
    problems = []
    for i in range(n_blocks):
        linears = block_linear_keys(shapes, spec, i)
        if not linears:
            problems.append(f"model.path: block {spec.blocks}.{i} has none of the Linears {spec.display_name}'s layout "
                            "names (is model_type right?)")
        for name, key in linears:
            if key is None:
                problems.append(f"model.path: weight {spec.blocks}.{i}.{name}.weight is missing from the safetensors files")
                continue
            n, k = shapes[key]
            where = f"{spec.blocks}.{i}.{name} ([{n}, {k}])"
            problems += llm_convert_layout_problems(spec, name, n, where, fmt, config)
            if not fmt.per_channel and k % fmt.group_size:
                problems.append(f"quant.weight.group_size {fmt.group_size} does not divide in_features of {where}; "
                                "TPU-MLIR needs K % group_size == 0")
            if fmt.per_channel and k % PER_CHANNEL_K_TILE:
                problems.append(f"quant.weight.granularity per_channel needs in_features to be a multiple of "
                                f"{PER_CHANNEL_K_TILE} (TPU-MLIR re-tiles per-channel scales by {PER_CHANNEL_K_TILE}): {where}")
            if fmt.per_channel and fmt.bits == 8 and quantized_out_features(n, 8, fmt.chip, True) == 0:
                problems.append(f"W8 per_channel on {fmt.chip}: out_features of {where} is not a multiple of "
                                f"{NPU_NUM[fmt.chip]}; TPU-MLIR 1.30.2 folds such a Linear with its signed codes read as "
                                "unsigned (wrong weights); use per_group")
    if len(problems) > _MAX_SHAPE_PROBLEMS:
        problems = problems[:_MAX_SHAPE_PROBLEMS] + [f"... and {len(problems) - _MAX_SHAPE_PROBLEMS} more shape problems"]
    return problems


def _config(folder: Path) -> Any:
    """config.json as attributes (for the sizes of fused Linears' parts)."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return SimpleNamespace(**cfg.get("text_config", cfg))


def _n_blocks(folder: Path) -> int:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    return int(next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in cfg), 0))


def _checkpoint_layout(shapes: dict[str, tuple[int, ...]], spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shapes keyed as the model names them: VLM checkpoints keep their original layout (``model.layers``,
    ``language_model.model.layers``), which transformers renames to ``model.language_model.layers`` on load."""
    if not spec.vision:
        return shapes
    probe = f".0.{spec.linear_names[0]}.weight"
    for prefix in (spec.blocks, "model.layers", "language_model.model.layers", "language_model.layers"):
        if prefix + probe in shapes:
            return {spec.blocks + k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix + ".")}
    return shapes


def vlm_problems(cfg: RunConfig, spec: ModelSpec) -> list[str]:
    """A VLM needs run.task_type VLM (its data and defaults differ)."""
    if cfg.run.task_type != "VLM":
        return [f"model.path: {spec.display_name} is a vision-language model; set run.task_type: VLM"]
    return []


def save_path_problems(save_path: str, overwrite: bool, needed_bytes: int) -> list[str]:
    final = Path(save_path).expanduser().resolve()
    if final.exists() and not overwrite:
        return [f"save.save_path {str(final)!r} already exists; choose another path or pass --overwrite to replace it"]
    parent = final.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return [f"save.save_path: {parent} is a file, not a folder"]
    if not os.access(parent, os.W_OK):
        return [f"save.save_path: cannot write in {parent}"]
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        return [f"save.save_path: {free / 2**30:.2f} GiB free in {parent}, the outputs need about "
                f"{needed_bytes / 2**30:.2f} GiB"]
    return []


def preflight(cfg: RunConfig, fmt: TpuWeightFormat, overwrite: bool, needs_calibration: bool) -> ModelSpec:
    """Raise PreflightError listing every problem; return the model's registry entry when all is well."""
    problems: list[str] = []
    spec = None
    try:
        folder = resolve_model_path(cfg.model.path)
        spec, _ = resolve_spec(folder, cfg.model.type)
        shapes, weight_bytes, file_problems = weight_shapes(folder)
        problems += file_problems
        if spec.vision:
            problems += vlm_problems(cfg, spec)
        if not file_problems and shapes:
            problems += shape_problems(_checkpoint_layout(shapes, spec), spec, fmt, _n_blocks(folder),
                                       _config(folder))
    except ModelLoadError as exc:
        problems.append(str(exc))
        weight_bytes = 0
    if needs_calibration:
        try:
            if cfg.calib.name == "custom_mm":
                from llmc_tpu.data.multimodal import DEFAULT_CALIB, default_folder, load_samples

                load_samples(cfg.calib.path or default_folder(DEFAULT_CALIB), need_answer=cfg.calib.add_answer)
            else:
                resolve_path("calib", cfg.calib.name, cfg.calib.path)
        except DataError as exc:
            problems.append(str(exc))
    if cfg.eval.eval_pos:
        names = [cfg.eval.name] if isinstance(cfg.eval.name, str) else cfg.eval.name
        paths = cfg.eval.path if isinstance(cfg.eval.path, list) else [cfg.eval.path] * len(names)
        for name, path in zip(names, paths):
            try:
                from llmc_tpu.vlm_quant import eval_path, is_vlm_eval

                if is_vlm_eval(name, path):
                    from llmc_tpu.data.multimodal import load_samples

                    load_samples(eval_path(name, path))
                else:
                    resolve_path("eval", name, path)
            except DataError as exc:
                problems.append(str(exc))
    if spec is not None and not spec.vision and cfg.run.task_type == "VLM":
        problems.append(f"run.task_type is VLM but {spec.display_name} has no vision tower; set run.task_type: LLM")
    if cfg.run.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"run.device {cfg.run.device!r}: no CUDA device here; use auto or cpu")
    exports = sum(1 for k, v in cfg.save.model_dump().items() if k.startswith("save_") and k != "save_path" and v)
    problems += save_path_problems(cfg.save.save_path, overwrite, int(weight_bytes * max(exports, 1) * 1.1))
    if problems:
        raise PreflightError(problems)
    return spec
