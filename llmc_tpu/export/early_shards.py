"""Write the transformed model's shards while the run goes on, each once every tensor in it is final.

Saving a 7B model at the end of a run writes 13.5 GB after the last block (5.7 s on an H200 host). The shards are
known before the first block: ``plan`` asks transformers' ``save_pretrained`` for them with a writer that only
records (file names, tensor names, and which of the run's tensors each one is). As blocks finish, every shard
whose tensors are all final (blocks done, or outside the blocks) is written in the background with the same
writer the final save uses (``safetensors_stream.save_file``: the same bytes, hashed while written). The final
``save_hf_folder`` then runs ``save_pretrained`` as always and skips a shard only where it hands over the very
tensors (same memory, dtype, shape and strides) that were written; anything else is written again, and a
written file that is not among its shards is removed.

It applies where the handed-over tensors are the model's own (host tensors already in the saved dtype, no key
fused or split on the way): a bf16 model saved as bf16. Elsewhere ``plan`` returns None and the final save
writes everything, as before. The methods change block weights only; the blocks' weights are final once their
checkpoint has landed and the model reads them from it.

Once every shard that holds a block's weights has landed, ``rebind_landed`` points the block at those files (mapped:
the same bytes) instead of its checkpoint, so that the run can remove most checkpoint files while the blocks still
run, not at its end (where removing a 7B's 13 GB of them took 4 to 7 s on an H200 host).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file
from torch import nn

from llmc_tpu.engine.blockwise import View, view_of
from llmc_tpu.export import safetensors_stream

log = logging.getLogger("llmc_tpu")

@dataclass
class Shard:
    filename: str  # the file's name in the folder
    keys: dict[str, str]  # saved name -> the model's state_dict key
    metadata: dict[str, str] | None
    blocks: set[int]  # the blocks whose weights it holds
    written: dict[str, View] | None = None  # saved name -> the view written (once written)
    write: Future | None = None  # the write, once started
    landed: bool = False  # written, and its tensors handed to ``rebind_landed``


@contextmanager
def shard_writes_through(write: Callable[..., None]) -> Iterator[bool]:
    """Inside the block, transformers' ``save_pretrained`` hands each shard (tensors by saved name, file name,
    metadata) to ``write`` instead of writing it; yields False, patching nothing, where transformers no longer writes
    its shards through ``modeling_utils.safe_save_file``."""
    from transformers import modeling_utils

    if not hasattr(modeling_utils, "safe_save_file"):
        yield False
        return
    with mock.patch.object(modeling_utils, "safe_save_file", write):
        yield True


def record_shards(model: nn.Module, state: dict[str, torch.Tensor], max_shard_size: str
                  ) -> list[tuple[str, dict[str, torch.Tensor], dict[str, str] | None]] | None:
    """``save_pretrained``'s shards of ``state`` (file name, tensors by saved name, metadata), nothing written; None
    where its shards cannot be intercepted (``shard_writes_through``)."""
    from transformers.utils import logging as hf_logging

    shards = []

    def record(tensors, filename, metadata=None):
        shards.append((Path(filename).name, dict(tensors), dict(metadata) if metadata else None))

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # nothing is written: no "Writing model shards" bar
    try:
        with tempfile.TemporaryDirectory(prefix="llmc_tpu-plan-") as scratch, shard_writes_through(record) as hooked:
            if not hooked:
                return None
            model.save_pretrained(scratch, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return shards


class EarlyShards:
    """The plan of a transformed model's shards, and their writing as blocks finish (see the module's doc)."""

    def __init__(self, dest: Path, shards: list[Shard], workers: int, blocks_prefix: str) -> None:
        self.dest = dest
        self.blocks_prefix = blocks_prefix
        self.shards = shards
        self.done: set[int] = set()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="llmc_tpu-early-shard")
        self._writes: list[Future] = []
        self._in_files: dict[str, tuple[Shard, str, torch.Tensor]] = {}  # model key -> landed shard, name, mapped
        self.rebound: set[int] = set()  # blocks whose weights the model reads from the shards

    @classmethod
    def plan(cls, model: nn.Module, state: dict[str, torch.Tensor], blocks_prefix: str, dest: Path,
             max_shard_size: str, workers: int) -> EarlyShards | None:
        """``state``: exactly what the final save hands to ``save_pretrained``. None where a saved tensor is not one
        of the model's own host tensors in the saved dtype (the final save then writes every shard)."""
        own: dict[View, set[str]] = {}  # tied weights share one view
        for k, v in model.state_dict().items():
            if v.device.type == "cpu":
                own.setdefault(view_of(v), set()).add(k)
        recorded = record_shards(model, state, max_shard_size)
        if recorded is None:
            return None
        by_id = {id(v): k for k, v in state.items()}
        shards = []
        for filename, tensors, metadata in recorded:
            keys = {}
            for name, t in tensors.items():
                key = by_id.get(id(t))
                if key is None or key not in own.get(view_of(t), ()):  # converted, fused or renamed on the way
                    log.debug("early shards: %s is not the model's own tensor; the save writes every shard", name)
                    return None
                keys[name] = key
            blocks = {int(k[len(blocks_prefix) + 1:].split(".", 1)[0]) for k in keys.values()
                      if k.startswith(blocks_prefix + ".")}
            shards.append(Shard(filename, keys, metadata, blocks))
        dest.mkdir(parents=True, exist_ok=False)
        early = cls(dest, shards, workers, blocks_prefix)
        early._write_ready(model)  # shards without block weights
        return early

    def block_done(self, index: int, model: nn.Module) -> None:
        """Block ``index``'s weights are final (the model reads them where they will stay): write what is ready."""
        self.done.add(index)
        self._write_ready(model)

    def _write_ready(self, model: nn.Module) -> None:
        ready = [s for s in self.shards if s.written is None and s.blocks <= self.done]
        if not ready:
            return
        state = model.state_dict()
        for shard in ready:
            tensors = {name: state[key] for name, key in shard.keys.items()}
            shard.written = {name: view_of(t) for name, t in tensors.items()}
            shard.write = self._pool.submit(safetensors_stream.save_file, tensors, self.dest / shard.filename,
                                            shard.metadata)
            self._writes.append(shard.write)

    def rebind_landed(self, model: nn.Module) -> dict[int, dict[str, tuple[str, str]]]:
        """Blocks whose every weight is in a shard whose write has finished, and not rebound before: their weights
        become the tensors mapped from those files (the same bytes; the final save still sees them as written).
        Returns, per such block, where each of its weights now is: ``{key in the block: (file name, saved name)}``.
        Does not wait for a write under way; a failed write is left for ``wait()`` to raise."""
        for shard in self.shards:
            if shard.write is None or shard.landed or not shard.write.done() or shard.write.exception() is not None:
                continue
            shard.landed = True
            mapped = load_file(str(self.dest / shard.filename))
            for name, key in shard.keys.items():
                if key.startswith(self.blocks_prefix + "."):
                    self._in_files[key] = (shard, name, mapped[name])
        blocks_prefix, moved = self.blocks_prefix, {}
        for index in sorted(self.done - self.rebound):
            block = model.get_submodule(f"{blocks_prefix}.{index}")
            prefix = f"{blocks_prefix}.{index}."
            keys = list(block.state_dict())
            if not keys or any(prefix + k not in self._in_files for k in keys):
                continue
            found = {k: self._in_files.pop(prefix + k) for k in keys}
            block.load_state_dict({k: t for k, (_, _, t) in found.items()}, assign=True)
            state = block.state_dict()
            for k, (shard, name, _) in found.items():
                shard.written[name] = view_of(state[k])  # what the final save will hand over
            self.rebound.add(index)
            moved[index] = {k: (shard.filename, name) for k, (shard, name, _) in found.items()}
        return moved

    def wait(self) -> None:
        """Until every started write has landed (raises the first error)."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def written_as(self, filename: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bool:
        """Whether ``filename`` was written with exactly these tensors (the same views) and metadata."""
        shard = next((s for s in self.shards if s.filename == filename), None)
        if shard is None or shard.written is None or (dict(metadata) if metadata else None) != shard.metadata:
            return False
        return shard.written.keys() == tensors.keys() and all(view_of(t) == shard.written[n] for n, t in tensors.items())

    def stale(self, kept: set[str]) -> list[Path]:
        """Files written here that the final save did not keep."""
        return [self.dest / s.filename for s in self.shards if s.written is not None and s.filename not in kept]
