"""The VLM parts of the quantize stage: image+text calibration, answer-perplexity / MME eval, vision-tower RTN."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmc_tpu.data.multimodal import DEFAULT_EVAL, MmBatch, default_folder, is_multimodal_folder, load_samples, make_batches
from llmc_tpu.data.multimodal import calibration_batches as _mm_calibration_batches
from llmc_tpu.data.text import DataError
from llmc_tpu.eval.vlm import answer_perplexity, mme_accuracy, vlm_logits
from llmc_tpu.fake_quant import QuantResults, handoff_weight
from llmc_tpu.models.registry import ModelSpec
from llmc_tpu.tpu.rtn import TpuWeightFormat, quantize_weight

log = logging.getLogger("llmc_tpu")
DEFAULT_MME = "data/VLM/eval/MME"
MME_HINT = ("python tools/download_eval_dataset.py --dataset_name mme --save_path data/VLM/eval/raw && "
            "python tools/mme_extract.py --dataset data/VLM/eval/raw/mme --save_path data/VLM/eval/MME")


@dataclass
class VlmEvalSet:
    kind: str  # "ppl" (answer perplexity) or "mme" (yes/no accuracy)
    batches: list[MmBatch]


def calibration_batches(calib, processor) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """``calib.name: custom_mm``: model-input dicts from a samples.json folder (needs a VLM)."""
    if processor is None:
        raise DataError("calib.name custom_mm is image + text data for a vision-language model; this model has no "
                        "vision tower: use pileval, wikitext2, c4, ptb or custom_txt")
    return _mm_calibration_batches(calib, processor)


def is_vlm_eval(name: str, path: str | None) -> bool:
    return name == "mme" or (name == "custom_ppl" and is_multimodal_folder(path))


def eval_path(name: str, path: str | None) -> str:
    """The eval folder, the shipped default for a VLM's custom_ppl / mme when none is given."""
    if path is not None:
        return path
    if name == "mme":
        if not Path(DEFAULT_MME).exists():
            raise DataError(f"eval.name mme: eval.path is not set and {DEFAULT_MME} does not exist; run `{MME_HINT}`")
        return DEFAULT_MME
    return default_folder(DEFAULT_EVAL)


def eval_sets(name: str, path: str | None, loaded, cfg, report) -> dict[str, VlmEvalSet]:
    """The batches of one VLM eval set, keyed by its report name; the report records what was used."""
    if loaded.processor is None:
        raise DataError(f"eval.name {name} on a samples.json folder needs a vision-language model")
    path = eval_path(name, path)
    samples = load_samples(path)
    chat = bool(loaded.processor.chat_template)
    kept, too_long = [], 0
    for s in samples:
        batch = make_batches(loaded.processor, [s], 1, chat, True, False)[0]
        if batch.inputs["input_ids"].shape[1] > cfg.eval.seq_len:
            too_long += 1
        else:
            kept.append(s)
    if not kept:
        raise DataError(f"{path}: every sample is longer than eval.seq_len {cfg.eval.seq_len} tokens (image tokens "
                        "included); raise eval.seq_len or lower calib.max_pixels")
    key = "mme" if name == "mme" else Path(path).name if Path(path).is_dir() else Path(path).parent.name
    batches = make_batches(loaded.processor, kept, cfg.eval.bs, chat, True, True)
    info = {"name": name, "path": str(path), "kind": "answer perplexity" if name != "mme" else "MME yes/no accuracy",
            "samples": len(kept), "images": sum(len(s.images) for s in kept), "chat_template": chat,
            "answer_tokens": sum(b - a for bt in batches for a, b in bt.answer_spans)}
    if too_long:
        info["notes"] = [f"{too_long} samples dropped: longer than eval.seq_len {cfg.eval.seq_len} tokens"]
    report.data.setdefault("eval", {})[key] = info
    return {key: VlmEvalSet("mme" if name == "mme" else "ppl", batches)}


def evaluate(pos: str, name: str, vlm_set: VlmEvalSet, loaded, device: torch.device, per_block: bool, report,
             progress=None) -> None:
    """Evaluate one set at one eval_pos into the report (ppl table or vqa)."""
    logits = vlm_logits(loaded.model, loaded.spec, vlm_set.batches, device, per_block, progress)
    if vlm_set.kind == "ppl":
        result = answer_perplexity(logits)
        report.ppl.setdefault(pos, {})[name] = result.ppl
        log.info("%s answer ppl on %s: %.4f", pos, name, result.ppl)
    else:
        result = mme_accuracy(logits, loaded.tokenizer)
        report.vqa.setdefault(pos, {})[name] = result
        log.info("%s %s accuracy %.4f, score %.1f", pos, name, result["acc"], result["score"])


def llm_convert_flags(model_type: str, processor_settings: dict[str, Any]) -> str:
    """llm_convert.py's image size for a Qwen-VL (it refuses to guess): the largest square within max_pixels."""
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        return ""
    side = max(28, int(processor_settings.get("max_pixels", 256 * 28 * 28) ** 0.5) // 28 * 28)
    return f" --max_pixels {side},{side}"


def quantize_vision(model: nn.Module, spec: ModelSpec, fmt: TpuWeightFormat) -> tuple[QuantResults, dict[str, Any]]:
    """TPU-grid RTN of every Linear of the vision tower and projector (``quant_objects: [vision, language]``).

    TPU-MLIR compiles vision towers in bf16/f16, so this changes the fake-quant model and its
    evaluation only; the TPU handoff keeps the float tower.
    """
    from llmc_tpu.preflight import PER_CHANNEL_K_TILE

    results: QuantResults = {}
    skipped = []
    for root in spec.vision:
        for name, mod in model.get_submodule(root).named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            full, k = f"{root}.{name}", mod.in_features
            if (fmt.per_channel and k % PER_CHANNEL_K_TILE) or (not fmt.per_channel and k % fmt.group_size):
                skipped.append({"layer": full, "in_features": k, "reason": "in_features not a multiple of the group"})
                continue
            results[full] = quantize_weight(handoff_weight(mod, fmt), fmt)
    info = {"method": "RTN (TPU-MLIR grid)", "linears": len(results), "skipped": skipped,
            "note": "TPU-MLIR keeps vision towers in bf16/f16: this changes fake_quant (evaluation and fake_quant_model) only"}
    return results, info
