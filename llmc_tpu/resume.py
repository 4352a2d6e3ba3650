"""Per-block checkpoints under the output's temp folder, so ``--resume`` continues a killed run.

After each block, what cannot be recomputed from the model folder is written (safetensors;
``state.json`` last, so a block counts as done only once its files are complete): the block's
float weights where the method changed them (AWQ), and the codes the method chose itself (GPTQ,
SignRound); TPU-MLIR's RTN of the other Linears is recomputed from the weights on resumption. A
resumed run restores the finished blocks, recomputes the next block's inputs by running the
restored blocks (deterministic), and goes on: its outputs are bit-identical to an uninterrupted
run's. The files of a block are written by a background thread while the next block runs (its
tensors are copied to host memory first); ``wait()`` returns once every write has landed.

Where the transformed model's shards are written as the blocks finish, a block whose weights have all landed in
them is read from there: ``weights_moved`` records where each weight is (``state.json``), then removes the
block's weights file in the background. A resumed run first writes such blocks' files again from those shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmc_tpu.engine.transfer import to_host
from llmc_tpu.fake_quant import QuantResults
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat

_TENSORS = ("codes", "scale", "zero", "float_rows")


class ResumeError(RuntimeError):
    pass


def fingerprint(config: dict[str, Any]) -> str:
    """What must not change between a run and its resumption (everything but where it is saved)."""
    cfg = json.loads(json.dumps(config))
    cfg.get("save", {}).pop("save_path", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


class Checkpoints:
    """Read and write the per-block state of one run."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fp = fingerprint(config)
        self._committing = threading.Lock()
        state_file = folder / "state.json"
        if state_file.exists():
            self.state = json.loads(state_file.read_text(encoding="utf-8"))
            if self.state.get("fingerprint") != self.fp:
                raise ResumeError("the interrupted run used a different config; remove its temp folder "
                                  f"({folder.parent}) or run with the same config")
        else:
            self.state = {"fingerprint": self.fp, "done_blocks": 0, "evals": {}, "block_reports": []}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmc_tpu-checkpoint")
        self._pending: Future | None = None
        self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmc_tpu-checkpoint-remove")
        self._moves: list[Future] = []
        self._write_back_moved()

    def _write_back_moved(self) -> None:
        """An interrupted run's blocks whose weights it had moved to the output's shards get their own files back
        (the shards are rewritten, or removed, by the resumed run)."""
        moved = self.state.get("moved_weights", {})
        for index, where in sorted(moved.items(), key=lambda kv: int(kv[0])):
            files: dict[str, dict[str, torch.Tensor]] = {}
            tensors = {}
            for key, (relpath, name) in where.items():
                path = self.folder.parent / relpath
                if not path.is_file():
                    raise ResumeError(f"block {index}'s weights were in {path}, which is gone; delete "
                                      f"{self.folder.parent} and run again without --resume")
                if relpath not in files:
                    files[relpath] = load_file(str(path))
                tensors[key] = files[relpath][name]
            save_file(tensors, str(self.folder / f"block_{index}.safetensors"))
            del moved[index]
            self._commit()

    @property
    def done_blocks(self) -> int:
        return int(self.state["done_blocks"])

    def _commit(self) -> None:
        with self._committing:  # the writer thread and the main one (evaluations) both commit
            _atomic_json(self.folder / "state.json", self.state)

    # -- evaluations -----------------------------------------------------------------------------
    def save_eval(self, pos: str, ppl: dict[str, float], predictions: dict[str, torch.Tensor | None]) -> None:
        preds = {k: v for k, v in predictions.items() if v is not None}
        if preds:
            save_file({k: v.contiguous() for k, v in preds.items()}, str(self.folder / f"eval_{pos}.safetensors"))
        self.state["evals"][pos] = ppl
        self._commit()

    def load_eval(self, pos: str) -> tuple[dict[str, float], dict[str, torch.Tensor]] | None:
        if pos not in self.state["evals"]:
            return None
        f = self.folder / f"eval_{pos}.safetensors"
        return self.state["evals"][pos], (load_file(str(f)) if f.exists() else {})

    # -- blocks ----------------------------------------------------------------------------------
    def save_block(self, index: int, block: nn.Module | None, results: QuantResults, report: dict[str, Any]
                   ) -> dict[str, torch.Tensor] | None:
        """``block``: its float weights, or None where they are the model folder's; ``results``: the codes the
        method chose (the other Linears' RTN is recomputed on resumption). Returns once the tensors are copied,
        with the host copies of the block's weights (the caller may move the block onto them instead of copying
        it again; they must not be changed); the files are written in the background (one block at a time,
        ``state.json`` last)."""
        weights = None if block is None else to_host(block.state_dict())
        tensors, meta = {}, {}
        for name, r in results.items():
            for field in _TENSORS:
                tensors[f"{name}::{field}"] = getattr(r, field)
            meta[name] = {"signed": r.signed, "folded": r.folded, "fmt": r.fmt.__dict__}
        tensors = to_host(tensors)
        self._wait_block_files()  # the previous block's (not the removals queued after them)
        self._pending = self._writer.submit(self._write_block, index, weights, tensors, meta, report)
        return weights

    def weights_moved(self, index: int, where: dict[str, tuple[str, str]]) -> None:
        """Block ``index``'s weights are now read from other files (``{key in the block: (path relative to this
        folder's parent, name in the file)}``): recorded (by the writer, after the block's own files), then its
        weights file is removed by another thread, so that the next blocks' writes do not wait for the removal."""
        recorded = self._writer.submit(self._record_move, index, where)
        self._moves.append(self._remover.submit(self._remove_once_recorded, recorded, index))

    def _record_move(self, index: int, where: dict[str, tuple[str, str]]) -> None:
        self.state.setdefault("moved_weights", {})[str(index)] = where
        self._commit()

    def _remove_once_recorded(self, recorded: Future, index: int) -> None:
        recorded.result()
        (self.folder / f"block_{index}.safetensors").unlink(missing_ok=True)

    def _write_block(self, index: int, weights: dict[str, torch.Tensor] | None, tensors: dict[str, torch.Tensor],
                     meta: dict[str, Any], report: dict[str, Any]) -> None:
        if weights is not None:
            save_file(weights, str(self.folder / f"block_{index}.safetensors"))
        save_file(tensors, str(self.folder / f"results_{index}.safetensors"), metadata={"meta": json.dumps(meta)})
        self.state["done_blocks"] = index + 1
        self.state["block_reports"].append(report)
        self._commit()

    def _wait_block_files(self) -> None:
        """Until the last block's files and state are written (raises what the writer raised)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def wait(self) -> None:
        """Until the last block's files and state are written and the moved weights' files removed (raises what the
        writer raised)."""
        self._wait_block_files()
        moves, self._moves = self._moves, []
        for move in moves:
            move.result()

    def restore_block(self, index: int, block: nn.Module) -> QuantResults:
        """The block's saved float weights put back (if it has any) and the codes its method chose."""
        weights = self.folder / f"block_{index}.safetensors"
        if weights.exists():
            block.load_state_dict(load_file(str(weights)))
        return self._chosen(index)

    def mapped_block(self, index: int) -> tuple[dict[str, torch.Tensor] | None, QuantResults] | None:
        """A written block's float weights (None where the model folder has them) and chosen codes, as tensors
        mapped from its files: the same values as the run's own, in memory the system can page out and in
        (``engine.host_memory``) instead of the process's. Call once the block's write has landed (``wait()``)."""
        if self.done_blocks <= index:
            return None
        weights = self.folder / f"block_{index}.safetensors"
        return (load_file(str(weights)) if weights.exists() else None), self._chosen(index)

    def _chosen(self, index: int) -> QuantResults:
        path = str(self.folder / f"results_{index}.safetensors")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
        tensors = load_file(path)
        return {name: TpuQuantizedWeight(TpuWeightFormat(**m["fmt"]), *(tensors[f"{name}::{fld}"] for fld in _TENSORS),
                                         signed=m["signed"], folded=m["folded"]) for name, m in meta.items()}


class NoCheckpoints:
    """The same interface, keeping nothing on disk (a Quantizer used without ``run()``)."""

    done_blocks = 0

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"block_reports": []}

    def save_eval(self, pos: str, ppl: dict[str, float], predictions: dict[str, torch.Tensor | None]) -> None:
        pass

    def load_eval(self, pos: str) -> None:
        return None

    def save_block(self, index: int, block: nn.Module | None, results: QuantResults, report: dict[str, Any]) -> None:
        self.state["block_reports"].append(report)
        return None

    def wait(self) -> None:
        pass

    def weights_moved(self, index: int, where: dict[str, tuple[str, str]]) -> None:
        pass

    def mapped_block(self, index: int) -> None:
        return None
