"""The quantize stage: load -> evaluate -> transform and quantize block by block -> evaluate -> save."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmc_tpu import vlm_quant
from llmc_tpu.config.load import tpu_format
from llmc_tpu.config.schema import RunConfig, chooses_codes
from llmc_tpu.data.calib import calibration_batches
from llmc_tpu.data.text import DataError, eval_text
from llmc_tpu.engine.blockwise import BlockInput, blocks_of, capture_block_inputs, host_tensors, put_back, run_block
from llmc_tpu.engine.distributed import (
    PARTS,
    WORLD_SIZES,
    Ranks,
    Shard,
    close_process_group,
    init_process_group,
    launched_ranks,
    micro_batches,
    share_cpu_threads,
)
from llmc_tpu.engine.forward import blockwise_logits, whole_model_logits
from llmc_tpu.engine.host_memory import peak_rss_bytes, process_age_s, release_file_pages
from llmc_tpu.engine.microbatch import free_bytes, inputs_device, limit_device_memory, micro_batch_size
from llmc_tpu.engine.prefetch import Prefetcher
from llmc_tpu.eval.ppl import PplResult, perplexity, token_consistency, windows
from llmc_tpu.export.early_shards import EarlyShards
from llmc_tpu.export.formats import EXPORTS, export_options, write_exports
from llmc_tpu.export.gptq_checkpoint import FOLDER as GPTQ_FOLDER
from llmc_tpu.export.gptq_checkpoint import llm_convert_auto_command, save_gptq_checkpoint
from llmc_tpu.export.hf_folder import plan_early_shards, save_hf_folder
from llmc_tpu.export.onnx import check_exportable, save_onnx
from llmc_tpu.export.output_dir import OutputDir
from llmc_tpu.fake_quant import QuantResults, RtnWhereNotChosen, apply_fake_quant, fake_quantized, quantize_block
from llmc_tpu.methods import build_method, needs_calibration
from llmc_tpu.methods.base import BlockContext, Method
from llmc_tpu.models.loading import LoadedModel, load_model
from llmc_tpu.models.registry import ModelSpec
from llmc_tpu.preflight import preflight
from llmc_tpu.report import RunReport, llm_convert_command
from llmc_tpu.resume import Checkpoints, NoCheckpoints

log = logging.getLogger("llmc_tpu")
RESUME_FOLDER = "_resume"  # per-block checkpoints inside the output's temp folder
W8_PER_CHANNEL_WARNING = (
    "TPU-MLIR 1.30.2 stores W8 per-channel codes as signed int8 but computes with them read as unsigned "
    "(-3 as 253; seen in its simulator on both the llm_convert and the ONNX path), so the chip will not compute "
    "the fake_quant perplexity above. Use 8-bit per_group (e.g. group_size 64) until TPU-MLIR is fixed.")


class PipelineError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


def pick_device(name: str, ranks: Ranks | None = None) -> torch.device:
    """``auto``: CUDA when present, else CPU. Under torchrun, ``auto`` and ``cuda`` mean this process's GPU."""
    if ranks is not None and ranks.world > 1 and name in ("auto", "cuda"):
        if name == "auto" and not torch.cuda.is_available():
            return torch.device("cpu")
        if torch.cuda.device_count() <= ranks.local_rank:
            raise PipelineError(f"torchrun started {ranks.world} processes on this host but it has "
                                f"{torch.cuda.device_count()} GPU(s); use --nproc-per-node {torch.cuda.device_count()}")
        return torch.device("cuda", ranks.local_rank)
    if ranks is not None and ranks.world > 1 and name.startswith("cuda:"):
        raise PipelineError(f"run.device {name!r} under torchrun: every process would take that GPU; use auto or "
                            "cuda (each process takes the GPU of its LOCAL_RANK)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"run.device {name!r}: allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"run.device {name!r}: no CUDA device here; use auto or cpu")
    return device


def start_device(device: torch.device) -> threading.Thread | None:
    """Start CUDA on ``device`` in a thread while the main thread loads the model, which is mostly imports: the
    context takes about 0.3 s of an H200 host's time, and it overlaps them. None off CUDA."""
    if device.type != "cuda":
        return None
    thread = threading.Thread(target=torch.zeros, args=(1,), kwargs={"device": device}, name="llmc_tpu-cuda-start",
                              daemon=True)
    thread.start()
    return thread


def check_finite_weights(block: torch.nn.Module, spec: ModelSpec, prefix: str, method: str) -> None:
    """A NaN/Inf weight after the method is named with its block and layer (not found at the end as a NaN PPL)."""
    for name in spec.block_linear_names(block):
        if not torch.isfinite(block.get_submodule(name).weight).all():
            raise PipelineError(f"{prefix}.{name}: the weight has NaN/Inf after {method}; check the calibration data "
                                "and the model's float weights")


def check_finite_outputs(inputs: list[BlockInput], prefix: str) -> None:
    for i, inp in enumerate(inputs):
        if not torch.isfinite(inp.hidden).all():
            raise PipelineError(f"{prefix}: NaN/Inf in the block's outputs (calibration batch {i}); the model overflows "
                                "in its dtype: try model.torch_dtype: float32")


def _head_dim(config) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # VLMs: the language model's
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def samples_lead(inputs: list[BlockInput], batches: list) -> bool:
    """Whether the blocks take their inputs batch-first, one row per calibration sample (``[bs, seq, ...]``)."""
    return all(isinstance(b, torch.Tensor) and tuple(inp.hidden.shape[:2]) == tuple(b.shape[:2])
               for inp, b in zip(inputs, batches))


def check_distributed(cfg: RunConfig, ranks: Ranks, resume: bool) -> None:
    """What a torchrun launch cannot run (yet), said before any work."""
    if ranks.world == 1:
        return
    why = None
    if ranks.world not in WORLD_SIZES:
        why = f"it uses 1, 2, 4 or 8 processes (the calibration samples are cut into {PARTS} equal parts)"
    elif not needs_calibration(cfg.quant.method):
        why = "RTN needs no calibration data: run one process"
    elif "SignRound" in cfg.quant.method.split("+"):
        why = "SignRound's optimizer runs in one process; use GPTQ, Awq or [Awq, GPTQ] with torchrun"
    elif cfg.calib.name == "custom_mm" or "vision" in cfg.quant.quant_objects:
        why = "vision-language calibration runs in one process"
    elif resume:
        why = "--resume continues in one process"
    if why:
        raise PipelineError(f"torchrun --nproc-per-node {ranks.world}: {why}")


class _Timer:
    """Seconds per stage (summed over calls) and, with ``memory``, the peak host and GPU memory once each stage
    has run: a peak that rises after a stage is that stage's."""

    def __init__(self, memory: bool = False) -> None:
        self.times: dict[str, float] = {}
        self.memory: dict[str, dict[str, float]] | None = {} if memory else None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        if self.memory is not None:
            self.memory[name] = peak_memory_gib()


def peak_memory_gib() -> dict[str, float]:
    """Peak host RSS and peak GPU memory allocated by PyTorch (current device), so far in the process, GiB."""
    peaks = {}
    rss = peak_rss_bytes()
    if rss is not None:
        peaks["host_rss"] = round(rss / 2**30, 3)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["gpu_allocated"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return peaks


class Quantizer:
    """Runs one config end to end. ``run()`` returns the report; outputs land in save.save_path."""

    def __init__(self, cfg: RunConfig, overwrite: bool = False, progress: bool = True, resume: bool = False) -> None:
        self.cfg = cfg
        self.fmt = tpu_format(cfg)
        self.overwrite = overwrite
        self.resume = resume
        self.ckpt: Checkpoints | NoCheckpoints = NoCheckpoints()  # run() replaces it with the output's store
        self.progress = progress
        self.timer = _Timer(memory=True)
        self.report = RunReport(config=cfg.model_dump())
        self.vision_results: QuantResults = {}  # quant_objects [vision, language]: fake-quant only (TPU keeps it bf16)
        self.vlm_eval: dict[str, vlm_quant.VlmEvalSet] = {}
        self.ranks = launched_ranks()  # torchrun: this process's share of the calibration samples
        self.shard: Shard | None = None  # set with the calibration inputs
        self.memory_cap: int | None = None  # run.device_memory_gib in bytes, once the device is known
        self.quant_counts: dict = {"names": [], "float_rows": 0, "partly": [], "folded": []}
        self.early: EarlyShards | None = None  # transformed_model's shards, written as their blocks finish
        self.weights_checkpointed = False  # the method changes weights: blocks are checkpointed with their weights
        self.calibration_tokens: tuple[list[torch.Tensor], dict] | None = None  # calibration_batches, made during the load

    def _bar(self, iterable, **kwargs):
        return tqdm(iterable, disable=not self.progress, leave=False, **kwargs)

    # -- stages -------------------------------------------------------------------------------
    def run(self) -> RunReport:
        cfg = self.cfg
        if not self.ranks.main:
            return self._run_helper()
        age = process_age_s()
        if age is not None:  # the interpreter, the imports and the config, before this run began
            self.timer.times["startup"] = age
        check_distributed(cfg, self.ranks, self.resume)
        preflight(cfg, self.fmt, self.overwrite, needs_calibration(cfg.quant.method))  # every problem, before any work
        out = OutputDir(cfg.save.save_path, self.overwrite, self.resume)
        try:
            self.ckpt = Checkpoints(out.path(RESUME_FOLDER), self.report.config)
            if self.ckpt.done_blocks:
                log.info("resuming after block %d of an interrupted run", self.ckpt.done_blocks - 1)
            with self.timer("load"):
                loaded = self._load()
            if cfg.save.save_onnx:  # refuse what the ONNX pieces would get wrong, before any work
                check_exportable(loaded.model, loaded.spec, cfg.run.seq_length)
            self._describe(loaded)
            eval_windows = self._eval_windows(loaded)
            preds: dict[str, dict[str, PplResult]] = {}
            self._evaluate("pretrain", loaded, eval_windows, preds)
            if cfg.save.save_trans:
                with self.timer("save"):
                    shutil.rmtree(out.path("transformed_model"), ignore_errors=True)  # an interrupted run's shards
                    self.early = plan_early_shards(loaded.model, loaded.spec.blocks, out.path("transformed_model"),
                                                   self.fmt.handoff_dtype)
            with self.timer("quantize"):
                results = self.quantize(loaded)
            self._evaluate("transformed", loaded, eval_windows, preds)
            if cfg.save.save_trans:
                with self.timer("save"):
                    save_hf_folder(loaded.model, loaded.tokenizer, loaded.path, out.path("transformed_model"),
                                   dtype=self.fmt.handoff_dtype, source_config=bool(loaded.spec.vision), early=self.early)
                    self.early = None
                self.report.outputs["transformed_model"] = str(out.final / "transformed_model")
            if cfg.save.save_onnx:  # the same float weights, as per-piece ONNX graphs + compile.sh
                with self.timer("save onnx"):
                    self.report.onnx = save_onnx(loaded.model, loaded.spec, out.path("onnx"), self.fmt, cfg.run.seq_length,
                                                 loaded.model_type, progress=self._bar)
                self.report.outputs["onnx"] = str(out.final / "onnx")
            # the handoffs take the language Linears from the results; the fake-quant weights are for the fake_quant
            # eval, fake_quant_model/ and the vision tower's fake quant (written as float weights). The text eval
            # alone makes them where the model runs, block by block or for the whole model, and drops them after:
            # no fake-quant copy of the model in host memory
            if self.needs_fake_model and ("fake_quant" in cfg.eval.eval_pos or cfg.save.save_fake or self.vision_results):
                with self.timer("fake quant"):
                    apply_fake_quant(loaded.model, {**results, **self.vision_results})
            self._evaluate("fake_quant", loaded, eval_windows, preds, None if self.needs_fake_model else
                           RtnWhereNotChosen(loaded.model, self.quant_counts["names"], results, self.fmt))
            if cfg.save.save_fake:
                with self.timer("save"):
                    save_hf_folder(loaded.model, loaded.tokenizer, loaded.path, out.path("fake_quant_model"),
                                   source_config=bool(loaded.spec.vision))
                self.report.outputs["fake_quant_model"] = str(out.final / "fake_quant_model")
            if chooses_codes(cfg.quant.method):  # GPTQ's handoff: a checkpoint llm_convert -q auto reads with our codes
                with self.timer("save"):
                    meta = {"method": cfg.quant.method, "damp_percent": cfg.quant.special.get("percdamp", 0.0),
                            **cfg.quant.special}
                    save_gptq_checkpoint(loaded.model, loaded.tokenizer, loaded.path, out.path(GPTQ_FOLDER), results,
                                         self.fmt, meta=meta, original_keys=bool(loaded.spec.vision))
                self.report.outputs[GPTQ_FOLDER] = str(out.final / GPTQ_FOLDER)
            gpu_exports = [key for key in EXPORTS if getattr(cfg.save, key)]
            if gpu_exports:  # AutoAWQ / GPTQ / compressed-tensors folders; a failed one is reported, the rest written
                with self.timer("save"):
                    opts = export_options(self.fmt, loaded.model, results, cfg.save.gptq_checkpoint_format,
                                          cfg.quant.method, cfg.quant.special)
                    self.report.exports = write_exports(loaded.model, loaded.tokenizer, loaded.path, results,
                                                        gpu_exports, opts, out.tmp, out.final)
                self.report.outputs.update({EXPORTS[k].folder: e["folder"] for k, e in self.report.exports.items()
                                            if e["status"] == "written"})
            if cfg.eval.eval_token_consist and "pretrain" in preds and "fake_quant" in preds:
                for name in preds["fake_quant"]:
                    self.report.token_consistency[name] = token_consistency(preds["pretrain"][name], preds["fake_quant"][name])
            self._summarize_quant()
            self._next_steps(out.final)
            age = process_age_s()
            if age is not None:  # the whole process so far: the stages and whatever ran between them
                self.timer.times["total"] = age
            self.report.timings_s = {k: round(v, 3) for k, v in self.timer.times.items()}
            self.report.peak_memory_gib = dict(self.timer.memory or {})
            self.report.outputs["report"] = str(out.final / "report.md")
            self.report.write(out.tmp)
            start = time.perf_counter()
            shutil.rmtree(out.path(RESUME_FOLDER))
            removed = time.perf_counter()
            out.commit()
            log.info("%s complete (resume checkpoints removed in %.1f s, manifest and rename in %.1f s)",
                     out.final, removed - start, time.perf_counter() - removed)
        except KeyboardInterrupt:
            self._settle_checkpoints()
            raise  # keep the checkpoints: --resume continues from the last finished block
        except BaseException:
            self._settle_checkpoints()
            out.discard()
            raise
        finally:
            close_process_group()
        return self.report

    def _load(self) -> LoadedModel:
        """The model on the CPU; this process's device picked and, under torchrun, the process group joined."""
        cfg = self.cfg
        self.device = pick_device(cfg.run.device, self.ranks)
        starting = start_device(self.device)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmc_tpu-calibration") as pool:
            tokenizing: Future | None = None

            def tokenize_calibration(tokenizer, spec: ModelSpec) -> None:
                # the calibration text's tokens while the model loads: the tokenizer's work runs outside the
                # interpreter's lock, the load's imports inside it. Joined before anything else uses the tokenizer.
                # Text files only: a saved dataset would import `datasets` in this thread while the load imports
                # transformers in the other.
                nonlocal tokenizing
                if needs_calibration(cfg.quant.method) and cfg.calib.name == "custom_txt" and not spec.vision:
                    tokenizing = pool.submit(calibration_batches, cfg.calib, tokenizer)

            loaded = load_model(cfg.model.path, cfg.model.type, cfg.model.torch_dtype, cfg.model.tokenizer_mode,
                                cfg.model.trust_remote_code, cfg.calib.min_pixels, cfg.calib.max_pixels,
                                on_tokenizer=tokenize_calibration)
            if tokenizing is not None:
                self.calibration_tokens = tokenizing.result()
        if starting is not None:
            starting.join()
        init_process_group(self.ranks, self.device)
        self.memory_cap = limit_device_memory(self.device, cfg.run.device_memory_gib)
        threads = share_cpu_threads(self.ranks)
        if threads is not None and self.ranks.main:
            log.info("torchrun set OMP_NUM_THREADS=1: each process uses %d CPU threads instead (set OMP_NUM_THREADS "
                     "to another value to choose)", threads)
        return loaded

    def _settle_checkpoints(self) -> None:
        """A failing run lets the block being written finish (it counts for --resume) before anything is removed."""
        try:
            self.ckpt.wait()
        except Exception as exc:  # the run's own error is the one to report
            log.warning("the last block's checkpoint was not written: %s", exc)
        if self.early is not None:  # shards being written: let them land (a resumed run writes them again)
            try:
                self.early.close()
            except Exception as exc:
                log.debug("an early shard was not written: %s", exc)
            self.early = None

    def _run_helper(self) -> RunReport:
        """Another process of a torchrun launch: its share of the calibration samples through every block (the
        sums over samples are completed with rank 0's); rank 0 evaluates, writes the outputs and reports."""
        cfg = self.cfg
        try:
            check_distributed(cfg, self.ranks, self.resume)
            self.quantize(self._load())
        finally:
            close_process_group()
        return self.report

    def quantize(self, loaded: LoadedModel) -> QuantResults:
        """Transform (method) and quantize (TPU RTN) each block in turn, one block on the device at a time."""
        method: Method = build_method(self.cfg.quant.method, self.cfg.quant.special)
        self.weights_checkpointed = method.changes_weights
        model, spec = loaded.model, loaded.spec
        inputs = self._calibration_inputs(loaded) if method.needs_calibration else None
        results: QuantResults = {}
        blocks = blocks_of(model, spec)
        split = _Timer(memory=True)  # where the quantize stage's time goes, summed over the blocks (report: timings_s)
        with Prefetcher(self.device) as prefetch:  # the next block staged in page-locked memory
            for i, block in enumerate(self._bar(blocks, desc=f"{method.name} blocks", unit="block")):
                prefix = f"{spec.blocks}.{i}"
                host_weights = None  # the block's changed weights as the checkpoint copied them to host memory
                if i < self.ckpt.done_blocks:  # finished before an interruption: restore, only recompute its outputs
                    chosen = self.ckpt.restore_block(i, block)  # the codes the method chose
                    on_host = host_tensors(block)
                    block.to(self.device)
                    block_results = quantize_block(block, spec, self.fmt, prefix, chosen)
                else:
                    with split("transfer"):
                        on_host = host_tensors(block)
                        prefetch.move(block)
                    if self.ckpt.done_blocks <= i + 1 < len(blocks):  # copied to page-locked memory while this one works
                        prefetch.stage(blocks[i + 1])
                    ctx = BlockContext(i, block, spec, self.fmt, self.device, inputs, head_dim=_head_dim(model.config),
                                       config=model.config, shard=self.shard)
                    with split("method"):
                        method.process_block(ctx)
                    chosen = ctx.results
                    for part, seconds in ctx.report.pop("time_s", {}).items():  # the method's own split, e.g. solve
                        split.times[f"method: {part}"] = split.times.get(f"method: {part}", 0.0) + seconds
                    check_finite_weights(block, spec, prefix, method.name)
                    with split("tpu rtn"):
                        block_results = quantize_block(block, spec, self.fmt, prefix, chosen)
                    with split("checkpoint"):
                        host_weights = self.ckpt.save_block(i, block if method.changes_weights else None, ctx.results,
                                                            {"block": i, **ctx.report} if ctx.report else {})
                        if i:  # save_block waited for the previous block's files
                            self._map_from_checkpoint(i - 1, blocks[i - 1], f"{spec.blocks}.{i - 1}", results)
                            self._block_final(i - 1, model)
                self._count(block_results)
                results.update(self._kept(block_results, f"{prefix}.", chosen))
                if inputs is not None and i + 1 < len(blocks):
                    with split("next block inputs"):
                        if self.cfg.quant.quant_out:
                            with fake_quantized(block, block_results, prefix):
                                inputs = run_block(block, inputs, self.device)
                        else:
                            inputs = run_block(block, inputs, self.device)
                    check_finite_outputs(inputs, prefix)
                with split("transfer"):
                    if method.changes_weights:
                        if host_weights is not None:  # onto the checkpoint's host copies: the same values, no second copy
                            block.load_state_dict(host_weights, assign=True)
                        block.to("cpu")
                    else:  # the float weights are those it came with: back to their host tensors (file-backed), no copy
                        put_back(on_host)
                    release_file_pages(t for *_, t in on_host)  # read for the last time in this stage
        with split("checkpoint"):
            self.ckpt.wait()  # the last block's files
            if blocks and self.ckpt.done_blocks == len(blocks):
                self._map_from_checkpoint(len(blocks) - 1, blocks[-1], f"{spec.blocks}.{len(blocks) - 1}", results)
                self._block_final(len(blocks) - 1, model)
                self.ckpt.wait()  # the checkpoint files it removes
        for name, seconds in split.times.items():
            self.timer.times[f"quantize: {name}"] = seconds
        if self.timer.memory is not None:
            self.timer.memory.update({f"quantize: {name}": peaks for name, peaks in (split.memory or {}).items()})
        per_block = [r for r in self.ckpt.state["block_reports"] if r]
        self.report.method = {"name": method.name, "special": self.cfg.quant.special, "blocks": per_block,
                              "calibration": "none (RTN needs no data)" if inputs is None else "see data.calib",
                              # MoE experts no calibration token reached: TPU-MLIR's RTN (GPTQ: identity Hessian)
                              "uncalibrated": [f"{spec.blocks}.{r['block']}.{n}" for r in per_block
                                               for n in r.get("uncalibrated", [])]}
        if "vision" in self.cfg.quant.quant_objects:  # RTN on the TPU grid; the language blocks took the method
            self.vision_results, self.report.method["vision"] = vlm_quant.quantize_vision(model, spec, self.fmt)
        return results

    # -- helpers ------------------------------------------------------------------------------
    @property
    def needs_fake_model(self) -> bool:
        """Whether the fake-quant weights replace the model's own (save_fake writes them, a vision tower's fake quant
        and the VQA eval run on them); otherwise the fake_quant eval makes them where the model runs and drops them."""
        return bool(self.cfg.save.save_fake or "vision" in self.cfg.quant.quant_objects or self.vlm_eval)

    @property
    def keeps_rtn_codes(self) -> bool:
        """Whether a later stage reads TPU RTN's codes of the Linears whose codes the method left to TPU-MLIR: a
        fake-quant model (``needs_fake_model``) for the fake_quant eval, save_fake, the GPU exports or the GPTQ
        checkpoint (a Linear GPTQ left to RTN). The text eval alone recomputes them (``RtnWhereNotChosen``). Only
        this run's main process writes outputs."""
        cfg = self.cfg
        return self.ranks.main and (("fake_quant" in cfg.eval.eval_pos and self.needs_fake_model) or cfg.save.save_fake
                                    or any(getattr(cfg.save, key) for key in EXPORTS)
                                    or chooses_codes(cfg.quant.method) or "vision" in cfg.quant.quant_objects)

    def _kept(self, block_results: QuantResults, prefix: str, chosen: QuantResults) -> QuantResults:
        """What the run keeps of a block's results once the block is done: the codes the method chose (read back
        from the block's checkpoint once it is written) and, where a later stage reads them, TPU RTN's codes in
        host memory, not the device's (a 7B's RTN codes are 13 GB as int16, a 70B's 136 GB)."""
        if not self.ranks.main:
            return {}
        own = {prefix + name for name in chosen}
        if not self.keeps_rtn_codes:
            return {name: r for name, r in block_results.items() if name in own}
        return {name: r if name in own else r.to("cpu") for name, r in block_results.items()}

    def _count(self, block_results: QuantResults) -> None:
        """The summary's counts (the quantized Linears, rows the chip keeps in float, Linears it folds back to float),
        block by block."""
        counts = self.quant_counts
        counts["names"] += list(block_results)
        counts["float_rows"] += sum(r.float_rows.shape[0] for r in block_results.values())
        counts["partly"] += [n for n, r in block_results.items() if r.float_rows.shape[0]]
        counts["folded"] += [n for n, r in block_results.items() if r.folded]

    def _map_from_checkpoint(self, index: int, block: torch.nn.Module, prefix: str, results: QuantResults) -> None:
        """Once a block's checkpoint is written, its changed float weights and chosen codes are read from those
        files (mapped: the same values, in pages the system can drop) instead of kept in the process's memory."""
        mapped = self.ckpt.mapped_block(index)
        if mapped is None:
            return
        weights, chosen = mapped
        if weights is not None:
            block.load_state_dict(weights, assign=True)
        for name, result in chosen.items():
            if f"{prefix}.{name}" not in results:
                raise PipelineError(f"{prefix}.{name}: in the block's checkpoint but not among its results")
            results[f"{prefix}.{name}"] = result

    def _block_final(self, index: int, model: torch.nn.Module) -> None:
        """A block's weights are final and read from its checkpoint: the transformed model's shards that are now
        complete are written in the background, and the blocks whose weights have all landed in written shards are
        read from those instead, their checkpoint's weights file removed in the background (during the run, not at
        its end)."""
        if self.early is not None:
            self.early.block_done(index, model)
            if self.weights_checkpointed:
                for block, where in self.early.rebind_landed(model).items():
                    self.ckpt.weights_moved(block, {key: (f"{self.early.dest.name}/{file}", name)
                                                    for key, (file, name) in where.items()})

    def _calibration_inputs(self, loaded: LoadedModel) -> list[BlockInput]:
        with self.timer("calibration data"):
            if self.cfg.calib.name == "custom_mm":  # images + text through the VLM's processor
                batches, info = vlm_quant.calibration_batches(self.cfg.calib, loaded.processor)
            else:
                tokens, self.calibration_tokens = self.calibration_tokens, None  # tokenized while the model loaded
                batches, info = tokens or calibration_batches(self.cfg.calib, loaded.tokenizer)
                samples = torch.cat(batches)
                n = samples.shape[0]
                size = self.cfg.calib.bs
                if size == -1:  # as many samples per forward as fit the device (within a part, below)
                    size = micro_batch_size(n, samples.shape[1], loaded.model.config, self.device,
                                            free=free_bytes(self.device, self.memory_cap))
                # batches within the parts of the fixed summing order, this process's parts only (torchrun)
                self.shard = Shard(n, self.ranks)
                batches = [samples[r.start:r.stop] for r in micro_batches(n, size) if r.start in self.shard.mine]
                info["micro_batch"] = max(len(b) for b in batches)
                if self.ranks.world > 1:
                    info["processes"] = self.ranks.world
                    info["samples_per_process"] = len(self.shard.mine)
            store = self.device
            if isinstance(batches[0], torch.Tensor):
                n = sum(b.shape[0] for b in batches)
                store = inputs_device(n, batches[0].shape[1], loaded.model.config, self.device,
                                      next(loaded.model.parameters()).element_size(),
                                      free=free_bytes(self.device, self.memory_cap))
            info["inputs_on"] = str(store)  # between blocks: the device while they fit, else (pinned) host memory
            self.report.data["calib"] = info
            inputs = capture_block_inputs(loaded.model, loaded.spec, batches, store_device=store)
            if self.shard is not None and not samples_lead(inputs, batches):
                # blocks that take [seq, batch, ...] (ChatGLM): no row per sample to sum in the fixed order
                if self.ranks.world > 1:
                    raise PipelineError(f"torchrun: {loaded.spec.display_name}'s blocks take their inputs sequence-first, "
                                        "so the calibration samples cannot be shared over processes; run one process")
                self.shard = None
            return inputs

    def _eval_windows(self, loaded: LoadedModel) -> dict[str, torch.Tensor]:
        ev = self.cfg.eval
        if not ev.eval_pos:
            return {}
        names = [ev.name] if isinstance(ev.name, str) else list(ev.name)
        paths = ev.path if isinstance(ev.path, list) else [ev.path] * len(names)
        if len(paths) != len(names):
            raise PipelineError(f"eval.path has {len(paths)} entries for {len(names)} eval.name entries")
        out = {}
        with self.timer("eval data"):
            for name, path in zip(names, paths):
                if vlm_quant.is_vlm_eval(name, path):  # answer perplexity or MME on a samples.json folder
                    self.vlm_eval.update(vlm_quant.eval_sets(name, path, loaded, self.cfg, self.report))
                    continue
                text = eval_text(name, path)
                tokens = loaded.tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # long on purpose
                key = name if name not in ("custom_ppl", "custom_txt") else Path(path).stem
                try:
                    out[key] = windows(tokens, ev.seq_len, max_windows=256 if name == "c4" else None)
                except ValueError as exc:
                    raise DataError(f"eval {name} ({path}): {exc}") from None
                self.report.data.setdefault("eval", {})[key] = {
                    "name": name, "path": path, "tokens": int(tokens.numel()),
                    "windows": int(out[key].shape[0]), "seq_len": ev.seq_len}
        return out

    def _evaluate(self, pos: str, loaded: LoadedModel, eval_windows: dict[str, torch.Tensor],
                  preds: dict[str, dict[str, PplResult]], results: QuantResults | None = None) -> None:
        """Perplexity (and VQA) at ``pos``; ``results``: the Linears to fake-quantize while the text eval runs."""
        if pos not in self.cfg.eval.eval_pos:
            return
        keep = self.cfg.eval.eval_token_consist and pos in ("pretrain", "fake_quant")
        saved = self.ckpt.load_eval(pos) if pos == "pretrain" else None
        if saved is not None:  # evaluated before an interruption
            ppl, predictions = saved
            self.report.ppl[pos] = ppl
            for name, value in ppl.items():
                preds.setdefault(pos, {})[name] = PplResult(value, 0.0, 0, 0, predictions.get(name))
            return
        with self.timer(f"eval {pos}"):
            for name, win in eval_windows.items():
                if self.cfg.eval.inference_per_block:
                    batches = blockwise_logits(loaded.model, loaded.spec, win, self.cfg.eval.bs, self.device, self._bar,
                                               results)
                else:
                    batches = whole_model_logits(loaded.model, win, self.cfg.eval.bs, self.device, self._bar, results)
                result = perplexity(batches, keep_predictions=keep)
                self.report.ppl.setdefault(pos, {})[name] = result.ppl
                preds.setdefault(pos, {})[name] = result
                log.info("%s ppl on %s: %.4f", pos, name, result.ppl)
            for name, vlm_set in self.vlm_eval.items():
                vlm_quant.evaluate(pos, name, vlm_set, loaded, self.device, self.cfg.eval.inference_per_block, self.report,
                                   self._bar)
        if pos == "pretrain":
            self.ckpt.save_eval(pos, self.report.ppl.get(pos, {}), {n: r.predictions for n, r in preds.get(pos, {}).items()})

    def _describe(self, loaded: LoadedModel) -> None:
        n_params = sum(p.numel() for p in loaded.model.parameters())
        self.report.model = {"path": str(loaded.path), "model_type": loaded.model_type,
                             "family": loaded.spec.display_name, "parameters": n_params,
                             "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
                             "llm_convert_supported": loaded.spec.llm_convert,
                             "llm_convert_float": loaded.spec.llm_convert_float, "device": str(self.device)}
        if loaded.spec.vision:
            self.report.model["vision"] = {"modules": list(loaded.spec.vision), "processor": loaded.processor.settings,
                                           "quantized": "vision" in self.cfg.quant.quant_objects}
        fmt = self.fmt
        self.report.tpu_format = {**asdict(fmt), "name": fmt.llm_convert_quantize.upper(),
                                  "granularity": "per_channel" if fmt.per_channel else f"per_group g{fmt.group_size}"}
        if fmt.per_channel and fmt.bits == 8:
            self.report.warnings.append(W8_PER_CHANNEL_WARNING)
            log.warning(W8_PER_CHANNEL_WARNING)

    def _summarize_quant(self) -> None:
        counts = self.quant_counts
        self.report.quantized = {
            "n_linears": len(counts["names"]),
            "format": self.report.tpu_format["name"] + " " + self.report.tpu_format["granularity"],
            "float_rows": counts["float_rows"], "linears_with_float_rows": sorted(counts["partly"]),
            "folded_to_float": sorted(counts["folded"]),  # the compiler keeps no codes for these: (q - z) * s folded into a float weight
            "uncalibrated": self.report.method.get("uncalibrated", []),  # experts no calibration token reached
        }

    def _next_steps(self, final: Path) -> None:
        steps = []
        if chooses_codes(self.cfg.quant.method):
            steps.append(llm_convert_auto_command(final / GPTQ_FOLDER, self.fmt, self.cfg.run.seq_length, final / "bmodel"))
            steps.append(f"llmc-tpu verify {final}")
        if self.cfg.save.save_trans:
            model_dir = final / "transformed_model"
            if self.report.model.get("llm_convert_supported") and not self.report.model.get("llm_convert_float", True):
                steps.append(f"# TPU-MLIR 1.30.2 compiles {self.report.model['model_type']!r} to W4/W8 only from a GPTQ "
                             "checkpoint (quant.method: GPTQ); this float model compiles only as -q bf16/f16")
            elif self.report.model.get("llm_convert_supported"):
                steps.append(llm_convert_command(model_dir, self.fmt, self.cfg.run.seq_length, final / "bmodel"))
            else:
                steps.append(f"# TPU-MLIR's llm_convert.py does not support model_type "
                             f"{self.report.model['model_type']!r}; use the ONNX path")
            steps.append(f"llmc-tpu verify {final}")
        if self.cfg.save.save_onnx:
            steps.append(f"PATH=$HOME/.cache/llmc_tpu/tpu-mlir-1.30.2/venv/bin:$PATH bash {final / 'onnx' / 'compile.sh'}")
            steps.append(f"llmc-tpu verify --onnx {final}")
        if "vision" in self.report.model:  # Qwen-VL: llm_convert needs the image size it compiles the tower for
            flags = vlm_quant.llm_convert_flags(self.report.model["model_type"], self.report.model["vision"]["processor"])
            steps = [s + flags if s.startswith("llm_convert.py") else s for s in steps]
        self.report.next_steps = steps
