"""VLM evaluation on a samples.json set: perplexity of the answers, and MME-style yes/no accuracy.

Answer perplexity: each sample is the prompt (images + question, in the chat template when
``apply_chat_template``) followed by its answer; only the answer's tokens are scored,
``exp(sum NLL / answer tokens)``. MME: the question asks for yes or no; the prediction is whichever
of the "yes" / "no" first tokens the model rates higher right after the prompt. Reported as MME
does: accuracy, accuracy+ (both questions of an image right), and per category ``100 * (acc + acc+)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmc_tpu.data.multimodal import MmBatch
from llmc_tpu.engine.blockwise import move
from llmc_tpu.engine.forward import streamed_logits
from llmc_tpu.eval.ppl import PplResult
from llmc_tpu.models.registry import ModelSpec

Progress = Callable[..., Iterator]


@torch.no_grad()
def vlm_logits(model: nn.Module, spec: ModelSpec, batches: list[MmBatch], device: torch.device, per_block: bool,
               progress: Progress | None = None) -> Iterator[tuple[MmBatch, torch.Tensor]]:
    """(batch, logits) for each batch: the whole model on the device, or one language block at a time."""
    if not per_block:
        model.to(device)
        try:
            for b in progress(batches, desc="eval", unit="batch") if progress else batches:
                yield b, model(**move(b.inputs, device), use_cache=False).logits
        finally:
            model.to("cpu")
        return
    # the vision tower and the prefill run on the CPU; the language blocks stream through the device
    yield from zip(batches, streamed_logits(model, spec, [b.inputs for b in batches], device, progress))


@torch.no_grad()
def answer_perplexity(results: Iterator[tuple[MmBatch, torch.Tensor]]) -> PplResult:
    """Perplexity over the answer tokens of every sample."""
    total, n_tokens, n_samples = 0.0, 0, 0
    for batch, logits in results:
        ids = batch.inputs["input_ids"]
        for j, (a, b) in enumerate(batch.answer_spans):
            if b <= a:
                continue
            pred = logits[j, a - 1:b - 1].float()
            total += float(F.cross_entropy(pred, ids[j, a:b].to(pred.device), reduction="sum").double())
            n_tokens += b - a
            n_samples += 1
    if n_tokens == 0:
        raise ValueError("no answer tokens to score (empty answers?)")
    return PplResult(math.exp(total / n_tokens), total, n_tokens, n_samples)


def yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First token ids of the ways an answer can start with yes / no."""
    def first(words: list[str]) -> list[int]:
        ids = {tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words}
        return sorted(ids)
    return first(["Yes", "yes", " Yes", " yes", "YES"]), first(["No", "no", " No", " no", "NO"])


def _label(answer: str) -> bool | None:
    a = answer.strip().lower().rstrip(".")
    return True if a == "yes" else False if a == "no" else None


@torch.no_grad()
def mme_accuracy(results: Iterator[tuple[MmBatch, torch.Tensor]], tokenizer) -> dict[str, Any]:
    """MME's acc, acc+ and score (overall and per category) from the yes/no logits after each prompt."""
    yes, no = yes_no_ids(tokenizer)
    per_cat: dict[str, list[bool]] = defaultdict(list)
    per_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    skipped = 0
    for batch, logits in results:
        for j, ((a, _), sample) in enumerate(zip(batch.answer_spans, batch.samples)):
            label = _label(sample.answer)
            if label is None:
                skipped += 1
                continue
            row = logits[j, a - 1].float()
            pred = bool(row[yes].max() > row[no].max())
            cat = str(sample.extra.get("category", "all"))
            per_cat[cat].append(pred == label)
            per_image[(cat, "|".join(str(p) for p in sample.images))].append(pred == label)
    if not per_cat:
        raise ValueError("no sample with a yes/no answer")
    cats = {}
    for cat, hits in sorted(per_cat.items()):
        pairs = [all(v) for (c, _), v in per_image.items() if c == cat]
        acc, acc_plus = sum(hits) / len(hits), sum(pairs) / len(pairs)
        cats[cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "questions": len(hits)}
    hits = [h for v in per_cat.values() for h in v]
    return {"acc": sum(hits) / len(hits), "score": sum(c["score"] for c in cats.values()), "questions": len(hits),
            "skipped_not_yes_no": skipped, "categories": cats}
