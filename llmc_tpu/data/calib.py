"""Calibration samples: token windows of ``calib.seq_len`` built by the preprocessing the config names.

Preprocessing (re-derived from the anchors' descriptions, seeded by ``calib.seed``):
- ``pileval_awq``: shuffle the samples, keep those of at most seq_len tokens, concatenate
  them and cut the stream into ``n_samples`` windows of ``seq_len``.
- ``wikitext2_gptq`` / ``ptb_gptq`` / ``random_truncate_txt``: join the text, take
  ``n_samples`` windows of ``seq_len`` at random offsets.
- ``c4_gptq``: for each window pick a random document longer than seq_len and a random
  offset in it.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from llmc_tpu.data.text import DataError, _load_saved_dataset, _split, read_lines, resolve_path

PREPROCS = ("pileval_awq", "wikitext2_gptq", "c4_gptq", "ptb_gptq", "random_truncate_txt")
_TEXT_COLUMN = {"ptb": "sentence"}
_JOIN = {"wikitext2": "\n\n", "ptb": " "}


def calibration_texts(name: str, path: str | None) -> list[str]:
    """The raw calibration samples of a named set from a local path."""
    p = resolve_path("calib", name, path)
    if name == "custom_txt" or p.is_file() or (p.is_dir() and any(p.glob("*.txt"))):
        return read_lines(p)
    ds = _split(_load_saved_dataset(p), ("train", "validation", "test"))
    return [t for t in ds[_TEXT_COLUMN.get(name, "text")] if t and t.strip()]


def _random_windows(tokens: torch.Tensor, n: int, seq_len: int, rng: random.Random, source: str) -> list[torch.Tensor]:
    if tokens.numel() <= seq_len:
        raise DataError(f"{source}: {tokens.numel()} tokens, fewer than one calib.seq_len window ({seq_len})")
    starts = [rng.randint(0, tokens.numel() - seq_len - 1) for _ in range(n)]
    return [tokens[s:s + seq_len] for s in starts]


def build_samples(texts: list[str], tokenizer, preproc: str, n_samples: int, seq_len: int, seed: int,
                  join: str = "\n", source: str = "calibration data") -> tuple[torch.Tensor, dict[str, Any]]:
    """``[n_samples, seq_len]`` token ids and a description for the report."""
    rng = random.Random(seed)
    info: dict[str, Any] = {"preproc": preproc, "n_samples": n_samples, "seq_len": seq_len, "seed": seed,
                            "source_samples": len(texts)}
    if preproc == "pileval_awq":
        order = list(range(len(texts)))
        rng.shuffle(order)
        stream, used, too_long = [], 0, 0
        need = n_samples * seq_len
        for i in order:
            ids = tokenizer(texts[i].strip(), add_special_tokens=False).input_ids
            if len(ids) > seq_len:
                too_long += 1
                continue
            stream += ids
            used += 1
            if len(stream) >= need:
                break
        if len(stream) < need:
            raise DataError(f"{source}: only {len(stream)} tokens in samples of at most {seq_len} tokens "
                            f"({too_long} longer samples skipped); need {need} (calib.n_samples x calib.seq_len)")
        info.update(used_samples=used, skipped_too_long=too_long)
        return torch.tensor(stream[:need]).view(n_samples, seq_len), info
    if preproc == "c4_gptq":
        windows = []
        for _ in range(n_samples):
            for _attempt in range(1000):
                ids = tokenizer(texts[rng.randrange(len(texts))], add_special_tokens=False).input_ids
                if len(ids) > seq_len:
                    start = rng.randint(0, len(ids) - seq_len - 1)
                    windows.append(torch.tensor(ids[start:start + seq_len]))
                    break
            else:
                raise DataError(f"{source}: no document longer than calib.seq_len {seq_len} tokens")
        return torch.stack(windows), info
    if preproc in ("wikitext2_gptq", "ptb_gptq", "random_truncate_txt"):
        tokens = torch.tensor(tokenizer(join.join(texts), add_special_tokens=False, verbose=False).input_ids)
        info["source_tokens"] = int(tokens.numel())
        return torch.stack(_random_windows(tokens, n_samples, seq_len, rng, source)), info
    raise DataError(f"calib.preproc {preproc!r}: allowed: {', '.join(PREPROCS)}")


def apply_chat_template(texts: list[str], tokenizer) -> list[str]:
    """Wrap each sample as one user turn in the model's chat template (``calib.apply_chat_template``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("calib.apply_chat_template is set but the tokenizer has no chat template")
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts]


def calibration_batches(calib, tokenizer) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Batches of calibration token ids (``calib.bs`` samples each, all of them with -1)."""
    if calib.name is None:
        raise DataError("calib.name is not set: give pileval, wikitext2, c4, ptb or custom_txt with calib.path")
    texts = calibration_texts(calib.name, calib.path)
    if calib.apply_chat_template:
        texts = apply_chat_template(texts, tokenizer)
    preproc = calib.preproc or "random_truncate_txt"
    samples, info = build_samples(texts, tokenizer, preproc, calib.n_samples, calib.seq_len, calib.seed,
                                  join=_JOIN.get(calib.name, "\n"), source=f"calib.path {calib.path}")
    info.update(name=calib.name, path=calib.path, bs=calib.bs)
    bs = samples.shape[0] if calib.bs == -1 else calib.bs
    return [samples[i:i + bs] for i in range(0, samples.shape[0], bs)], info
