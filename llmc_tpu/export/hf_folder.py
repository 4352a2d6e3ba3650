"""Save a model as a Hugging Face folder TPU-MLIR's llm_convert.py reads (bf16 safetensors + tokenizer files)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from llmc_tpu.export import safetensors_stream
from llmc_tpu.export.early_shards import EarlyShards, shard_writes_through
from llmc_tpu.models.experts import UnfusedExperts, fused_state_dict

log = logging.getLogger("llmc_tpu")

# Files of the source folder that are not weights or the model config: tokenizer,
# processor, chat template, generation config. Copied so the folder is complete.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")
_SKIP_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}

# The hub's usual shard size (transformers 5 writes up to 50 GB per file). Each shard is written and hashed (the
# manifest's sha256, about 1 GB/s on one core) in its own thread: a 7B model's 13.5 GB took 14 s as one file.
SHARD_SIZE = "4GB"
_MAX_WRITERS = 8


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer/processor/chat-template/generation files from the source model folder."""
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _SKIP_NAMES and not f.name.endswith(_SKIP_SUFFIXES) and not f.name.startswith("."):
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
    return copied


def set_dtype_fields(cfg: dict, name: str) -> None:
    """Set ``dtype`` (and a legacy ``torch_dtype``) in a config and its sub-configs (a VLM's text_config is what
    TPU-MLIR reads for the language model)."""
    for sub in (cfg, *(v for k, v in cfg.items() if k.endswith("_config") and isinstance(v, dict))):
        if sub is cfg or "dtype" in sub or "torch_dtype" in sub:
            sub["dtype"] = name
            if "torch_dtype" in sub:
                sub["torch_dtype"] = name


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Record the saved dtype (TPU-MLIR rejects a float32 config even when the weights are bf16)."""
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    set_dtype_fields(cfg, str(dtype).replace("torch.", ""))
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def streamed_shards(early: EarlyShards | None = None) -> Iterator[set[str]]:
    """transformers' ``save_pretrained`` (its sharding, tied weights, renaming) writing each shard with
    ``safetensors_stream.save_file``: the same bytes, without making the whole model resident at once, the shards
    side by side (one thread each, up to the cores). A shard ``early`` wrote with the very tensors handed over is
    not written again. Yields the set the shards' file names are added to; leaving the block waits for every
    shard and raises the first error. Where its shards cannot be intercepted (``early_shards.shard_writes_through``),
    transformers' own writer is kept."""
    names: set[str] = set()
    writes: list[Future] = []
    with ThreadPoolExecutor(max(1, min(_cores(), _MAX_WRITERS)), thread_name_prefix="llmc_tpu-shard") as pool:

        def write_later(tensors, filename, metadata=None):
            names.add(Path(filename).name)
            if early is not None and early.written_as(Path(filename).name, tensors, metadata):
                log.debug("%s: written as its blocks finished", filename)
                return
            if early is not None:  # written early, changed since: a new file (the model may read the old one, mapped)
                Path(filename).unlink(missing_ok=True)
            writes.append(pool.submit(safetensors_stream.save_file, tensors, filename, metadata))

        with shard_writes_through(write_later):
            yield names
    for write in writes:  # the pool has finished them all
        write.result()


def handoff_state(model: nn.Module, dtype: torch.dtype, weights: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """What ``save_hf_folder`` hands to ``save_pretrained``: the weights in transformers' layout (MoE experts fused),
    on the host, floating ones in ``dtype`` (the model's own tensors where they are that already)."""
    state = fused_state_dict(model, weights if weights is not None else model.state_dict())
    return {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu() for k, v in state.items()}


def plan_early_shards(model: nn.Module, blocks_prefix: str, dest: Path, dtype: torch.dtype = torch.bfloat16
                      ) -> EarlyShards | None:
    """The shards ``save_hf_folder(model, ..., dest, dtype)`` will write, to be written as the blocks finish (see
    ``early_shards``); None where they cannot be. A model whose handed-over tensors would be new ones (MoE experts
    fused, floating weights converted to ``dtype``) is turned down before ``handoff_state`` makes them: that would
    be a copy of the model's size, only to be turned down."""
    if any(isinstance(m, UnfusedExperts) for m in model.modules()) or any(
            v.device.type != "cpu" or (v.is_floating_point() and v.dtype != dtype) for v in model.state_dict().values()):
        return None
    return EarlyShards.plan(model, handoff_state(model, dtype), blocks_prefix, dest, SHARD_SIZE,
                            min(_cores(), _MAX_WRITERS))


def save_hf_folder(model: nn.Module, tokenizer, source: Path, dest: Path, dtype: torch.dtype = torch.bfloat16,
                   weights: dict[str, torch.Tensor] | None = None, source_config: bool = False,
                   early: EarlyShards | None = None) -> Path:
    """Write ``model`` (or ``weights`` in its place) in ``dtype`` with the config and side files of ``source``.

    ``source_config``: keep the source's config.json (dtype updated) instead of transformers' re-serialization:
    VLM configs change layout in transformers 5 (``text_config``, ``rope_parameters``) and TPU-MLIR reads the
    published one (top-level ``rope_scaling``, ``hidden_size``). ``early``: the shards already written into ``dest``
    as the blocks finished (``plan_early_shards``); those handed the same tensors again are kept as they are.
    """
    if early is not None:
        early.close()  # every early write landed (or its error raised)
    else:
        dest.mkdir(parents=True, exist_ok=False)
    copy_side_files(source, dest)
    state = handoff_state(model, dtype, weights)
    with streamed_shards(early) as names:
        model.save_pretrained(dest, state_dict=state, safe_serialization=True, max_shard_size=SHARD_SIZE)
    if early is not None:
        for path in early.stale(names):
            path.unlink(missing_ok=True)
    if source_config:
        shutil.copy2(Path(source) / "config.json", dest / "config.json")
    _set_config_dtype(dest / "config.json", dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    return dest
