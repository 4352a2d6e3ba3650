"""The model registry and loading: names resolve in real transformers models."""

import json

import pytest
import torch
from tiny_models import FAMILIES, make_tiny_model

from llmc_tpu.models.loading import ModelLoadError, load_model, resolve_spec
from llmc_tpu.models.registry import find_spec


@pytest.mark.parametrize("name,model_type", [("Llama", "llama"), ("LLAMA", "llama"), ("qwen2", "qwen2"), ("Qwen2.5", "qwen2"),
                                             ("Qwen3", "qwen3"), ("mistral", "mistral"), ("Mistral", "mistral")])
def test_anchor_names_and_model_types(name, model_type):
    assert find_spec(name).model_type == model_type


def test_unknown_name():
    assert find_spec("gpt2") is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_spec_names_real_modules(family, tmp_path):
    """Every name resolves, and every Linear of every block is quantized or named as scale-only (routers)."""
    folder = make_tiny_model(tmp_path, family, layers=2)
    loaded = load_model(str(folder), torch_dtype="float32")
    spec, model = loaded.spec, loaded.model
    assert spec.model_type == family.split("_40b")[0]
    for block in model.get_submodule(spec.blocks):
        subsets = spec.block_subsets(block)
        quantized = [n for s in subsets for n in s.layers]
        assert len(quantized) == len(set(quantized))
        for subset in subsets:
            for name in subset.layers:
                assert isinstance(block.get_submodule(name), torch.nn.Linear)
            if subset.prev_op:
                block.get_submodule(subset.prev_op.split(":")[0])
            block.get_submodule(subset.inspect)
        scale_only = {n for s in subsets for n in s.scale_only}
        linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears == set(quantized) | (scale_only & linears)
    for name in (*spec.embeddings, spec.final_norm, spec.lm_head):
        model.get_submodule(name)


def test_declared_type_must_match_config(tiny_llama):
    assert resolve_spec(tiny_llama, "Llama")[0].model_type == "llama"
    with pytest.raises(ModelLoadError, match="does not match config.json's model_type 'llama'"):
        resolve_spec(tiny_llama, "Qwen2")
    with pytest.raises(ModelLoadError, match="model.type 'Gpt5' is unknown"):
        resolve_spec(tiny_llama, "Gpt5")


def test_bad_folders(tmp_path, tiny_llama):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "cfg").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "cfg"))
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="'gpt2' .* not supported"):
        load_model(str(tmp_path / "cfg"))
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "cfg" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickled .bin weights are not loaded"):
        load_model(str(tmp_path / "cfg"))


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local folder and could not be fetched"):
        load_model("someone/not-a-local-model")
