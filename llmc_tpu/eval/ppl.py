"""Token perplexity, GPTQ protocol: non-overlapping windows of seq_len, tail dropped.

``ppl = exp(sum of next-token NLL over every predicted token / number of predicted tokens)``;
every window predicts seq_len - 1 tokens, so this equals the mean of the per-window means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LogitBatches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # ([bs, seq] ids, [bs, seq, vocab] logits)


@dataclass
class PplResult:
    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    predictions: torch.Tensor | None = None  # argmax next token per position, for token consistency


def windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows of a 1-D token tensor (the tail is dropped)."""
    n = tokens.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the eval text has {tokens.numel()} tokens, fewer than one window of seq_len {seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL per window, in float32."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = ids[:, 1:].to(shift_logits.device)
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).sum(dim=1)


@torch.no_grad()
def perplexity(batches: LogitBatches, keep_predictions: bool = False) -> PplResult:
    """Perplexity over (ids, logits) batches of equal-length windows."""
    total, n_tokens, n_windows, preds = 0.0, 0, 0, []
    for ids, logits in batches:
        total += float(window_nll(logits, ids).sum().double())
        n_tokens += ids.shape[0] * (ids.shape[1] - 1)
        n_windows += ids.shape[0]
        if keep_predictions:
            preds.append(logits[:, :-1, :].argmax(dim=-1).cpu())
    if n_tokens == 0:
        raise ValueError("no eval windows")
    return PplResult(math.exp(total / n_tokens), total, n_tokens, n_windows, torch.cat(preds) if preds else None)


def token_consistency(a: PplResult, b: PplResult) -> float:
    """Fraction of positions where two evaluations predict the same next token."""
    if a.predictions is None or b.predictions is None:
        raise ValueError("both evaluations need keep_predictions=True")
    return float((a.predictions == b.predictions).float().mean())
