"""Tiny random-weight models built in a temp dir from transformers configs (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! "
) * 40

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def make_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on a fixed text, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_tiny_model(folder: Path, family: str = "llama", hidden: int = 128, heads: int = 2, kv_heads: int = 1,
                    intermediate: int = 256, layers: int = 2, vocab: int = 512, tie: bool = False,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Save a random-weight causal LM (plus tokenizer) in ``folder`` and return it."""
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    torch.manual_seed(seed)
    cfg = cfg_cls(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=hidden // heads, intermediate_size=intermediate, num_hidden_layers=layers,
                  vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=tie)
    model = getattr(transformers, model_cls)(cfg) if isinstance(model_cls, str) else model_cls(cfg)
    with torch.no_grad():  # larger-than-init weights so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save_pretrained(folder)
    return folder
