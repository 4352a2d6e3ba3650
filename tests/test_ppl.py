"""Perplexity, checked by hand on tiny cases."""

import math

import pytest
import torch

from llmc_tpu.eval.ppl import perplexity, token_consistency, windows


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, 7, (3, 5))
    res = perplexity([(ids, torch.zeros(3, 5, 7))])
    assert res.ppl == pytest.approx(7.0)
    assert res.n_tokens == 3 * 4 and res.n_windows == 3


def test_hand_computed_case():
    # one window [0, 1, 1]; predictions at positions 0 and 1 (the last logit predicts nothing)
    ids = torch.tensor([[0, 1, 1]])
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0], [5.0, -5.0]]])
    # p(1 | pos 0) = 1 / (3 + 1) = 0.25; p(1 | pos 1) = 0.5
    expected = math.exp(-(math.log(0.25) + math.log(0.5)) / 2)
    assert perplexity([(ids, logits)]).ppl == pytest.approx(expected, rel=1e-6)


def test_batches_weight_tokens_equally():
    a = torch.tensor([[0, 1, 0]])
    b = torch.tensor([[1, 1, 1], [0, 0, 0]])
    la, lb = torch.randn(1, 3, 2), torch.randn(2, 3, 2)
    split = perplexity([(a, la), (b, lb)]).ppl
    joined = perplexity([(torch.cat([a, b]), torch.cat([la, lb]))]).ppl
    assert split == pytest.approx(joined, rel=1e-6)


def test_windows_drop_the_tail():
    w = windows(torch.arange(10), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(torch.arange(10), 4, max_windows=1).shape == (1, 4)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(torch.arange(3), 4)


def test_token_consistency():
    ids = torch.tensor([[0, 1, 0]])
    l1 = torch.tensor([[[1.0, 0], [0, 1.0], [0, 0]]])
    l2 = torch.tensor([[[1.0, 0], [1.0, 0], [0, 0]]])
    r1 = perplexity([(ids, l1)], keep_predictions=True)
    r2 = perplexity([(ids, l2)], keep_predictions=True)
    assert token_consistency(r1, r2) == 0.5
