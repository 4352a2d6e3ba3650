"""Save a model as a Hugging Face folder TPU-MLIR's llm_convert.py reads (bf16 safetensors + tokenizer files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

# Files of the source folder that are not weights or the model config: tokenizer,
# processor, chat template, generation config. Copied so the folder is complete.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")
_SKIP_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer/processor/chat-template/generation files from the source model folder."""
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _SKIP_NAMES and not f.name.endswith(_SKIP_SUFFIXES) and not f.name.startswith("."):
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
    return copied


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Record the saved dtype (TPU-MLIR rejects a float32 config even when the weights are bf16)."""
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    name = str(dtype).replace("torch.", "")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_hf_folder(model: nn.Module, tokenizer, source: Path, dest: Path, dtype: torch.dtype = torch.bfloat16,
                   weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or ``weights`` in its place) in ``dtype`` with the config and side files of ``source``."""
    dest.mkdir(parents=True, exist_ok=False)
    copy_side_files(source, dest)
    state = weights if weights is not None else model.state_dict()
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu() for k, v in state.items()}
    model.save_pretrained(dest, state_dict=state, safe_serialization=True)
    _set_config_dtype(dest / "config.json", dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    return dest
