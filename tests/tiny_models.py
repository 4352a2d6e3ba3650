"""Tiny random-weight models built in a temp dir from transformers configs (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! "
) * 40

_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
FAMILIES = {  # name -> (config class, model class, config arguments beyond the common ones)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"pad_token_id": 0}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),  # Phi-2 layout: parallel attention/MLP from one LayerNorm
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 0}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", {"bos_token_id": 0, "eos_token_id": 0}),
    "opt": ("OPTConfig", "OPTForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}),  # Falcon-7B layout: multi-query, parallel attention/MLP
    # Falcon-40B layout: grouped query_key_value, separate ln_attn / ln_mlp
    "falcon_40b": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_ln_in_parallel_attn": 2,
                                                          "num_attention_heads": 4, "num_kv_heads": 2}),
    # TPU-MLIR sizes the shared expert by intermediate_size: keep both equal (as Qwen1.5-MoE-A2.7B does)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "shared_expert_intermediate_size": 128,
                                                            "intermediate_size": 128, **_MOE}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, **_MOE}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", {
        "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 64, "q_lora_rank": 64,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 64, "n_group": 1, "topk_group": 1, **_MOE}),
}
# different argument names for the same sizes
_RENAMES = {"bloom": {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"},
            "gpt_bigcode": {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                            "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"},
            "opt": {"intermediate_size": "ffn_dim"},
            "falcon": {"num_key_value_heads": "num_kv_heads", "head_dim": None},
            "falcon_40b": {"num_key_value_heads": "num_kv_heads", "head_dim": None}}  # None: not an argument
# all attention heads share k/v (DeepSeek-V2's MLA), or bloom/opt/phi: no grouped-query attention
_NO_GQA = {"deepseek_v2", "bloom", "opt", "gpt_bigcode", "phi"}
_LEGACY = {"llama", "qwen2", "qwen3", "mistral"}  # weights as the first tests were written with (norms 1, biases 0)


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
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0, dead_expert: bool = False, **extra) -> Path:
    """Save a random-weight causal LM (plus tokenizer) in ``folder`` and return it. ``extra``: config arguments.

    ``dead_expert`` (MoE, one expert per token): router rows ``(u, -u, v, ..., 0)``, so the last expert's
    logit 0 is never the largest (``|u . x| > 0``): no token ever reaches it."""
    import transformers

    cfg_name, model_name, family_kw = FAMILIES[family]
    torch.manual_seed(seed)
    kw = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads if family in _NO_GQA else kv_heads,
              head_dim=hidden // heads, intermediate_size=intermediate, num_hidden_layers=layers,
              vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=tie)
    renames = _RENAMES.get(family, {})
    kw = {renames.get(k, k): v for k, v in kw.items() if renames.get(k, k)}
    kw.update(family_kw, **extra)
    cfg = getattr(transformers, cfg_name)(**kw)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():  # larger-than-init weights so quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif family not in _LEGACY and name.endswith("weight"):  # norm scales away from 1 (Gemma: 1 + w)
                p.normal_(0.0 if family == "gemma2" else 1.0, 0.2)
            elif family not in _LEGACY and name.endswith("bias"):  # non-zero biases, so folding them is tested
                p.normal_(0, 0.05)
        if dead_expert:
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p[1] = -p[0]
                    p[-1] = 0
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save_pretrained(folder)
    return folder
