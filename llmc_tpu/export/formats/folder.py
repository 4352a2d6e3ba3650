"""Write a quantized Hugging Face folder: config with ``quantization_config``, safetensors shards, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from llmc_tpu.export.hf_folder import copy_side_files

SHARD_BYTES = 4 * 1024**3


def float_tensors(model: nn.Module, quantized: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict minus the quantized Linears' weights, float tensors in ``dtype``.

    Tied tensors (embeddings shared with lm_head) are written once, under their first name,
    as ``save_pretrained`` does; the config's ``tie_word_embeddings`` re-ties them on load.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, t in model.state_dict().items():
        if key.endswith(".weight") and key[: -len(".weight")] in quantized:
            continue
        if t.numel():
            same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if same in seen:
                continue
            seen.add(same)
        t = t.detach().to("cpu")
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def _shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def write_folder(model: nn.Module, tokenizer: Any, source: Path, dest: Path, tensors: dict[str, torch.Tensor],
                 quantization_config: dict[str, Any], dtype: torch.dtype,
                 extra_json: dict[str, dict[str, Any]] | None = None) -> Path:
    """A loadable folder: ``tensors`` (float and packed), config.json with ``quantization_config``, side files."""
    dest.mkdir(parents=True, exist_ok=False)
    copy_side_files(source, dest)
    config = model.config.to_dict()
    config["dtype"] = str(dtype).replace("torch.", "")
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    config["use_cache"] = True
    config["quantization_config"] = quantization_config
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name, data in (extra_json or {}).items():
        (dest / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    shards = _shards(tensors)
    if len(shards) == 1:
        save_file(shards[0], dest / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, dest / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    return dest
