"""calib.bs -1 on a device too small for one batch: micro-batches, and the same result as one batch."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, LlamaConfig

from llmc_tpu.config import parse_config
from llmc_tpu.engine import microbatch
from llmc_tpu.pipeline import Quantizer


def test_micro_batch_size_follows_the_free_memory():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
    per_sample = microbatch.bytes_per_token(cfg, 2048) * 2048
    assert 1.5 * 2**30 < per_sample < 2 * 2**30  # a Llama-2-7B block over 2048 tokens in fp32: ~1.7 GiB
    cpu = torch.device("cpu")
    assert microbatch.micro_batch_size(128, 2048, cfg, cpu, free=80 * 2**30) == int(0.25 * 80 * 2**30 // per_sample)
    assert microbatch.micro_batch_size(128, 2048, cfg, cpu, free=1) == 1  # never 0
    assert microbatch.micro_batch_size(4, 2048, cfg, cpu, free=2**50) == 4  # never more than the samples
    assert microbatch.free_bytes(cpu) > 0


def test_block_inputs_leave_the_gpu_only_when_they_do_not_fit():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    inputs = 2 * 128 * 2048 * 4096 * 2  # 128 x 2048 bf16 hidden states, in and out: 4 GiB
    assert microbatch.inputs_device(128, 2048, cfg, gpu, 2, free=int(inputs / microbatch.BUDGET_SHARE)) == gpu
    assert microbatch.inputs_device(128, 2048, cfg, gpu, 2, free=int(inputs / microbatch.BUDGET_SHARE) - 1) == cpu
    assert microbatch.inputs_device(128, 2048, cfg, cpu, 2, free=1) == cpu  # a CPU run keeps them where they are


@pytest.mark.parametrize("method", ["GPTQ", "Awq"])
def test_micro_batches_give_the_one_batch_result(method, tiny_llama, eval_txt, tmp_path, monkeypatch):
    def run(name: str) -> tuple[dict, dict, object]:
        save = tmp_path / name
        cfg = parse_config({
            "model": {"path": str(tiny_llama), "torch_dtype": "float32"},
            "calib": {"name": "custom_txt", "path": str(eval_txt), "n_samples": 32, "seq_len": 64},
            "eval": {"eval_pos": []},
            "quant": {"method": method, "quant_out": True},
            "save": {"save_path": str(save), "save_fake": True},
        })
        report = Quantizer(cfg, progress=False).run()
        return json.loads((save / "report.json").read_text())["data"]["calib"], load_file(
            save / "fake_quant_model" / "model.safetensors"), report

    one, one_weights, _ = run("one")
    per_sample = microbatch.bytes_per_token(AutoConfig.from_pretrained(tiny_llama), 64) * 64
    monkeypatch.setattr("llmc_tpu.pipeline.free_bytes", lambda device, cap=None: int(3 * per_sample / microbatch.BUDGET_SHARE))
    split, split_weights, _ = run("split")
    # 32 samples: 8 parts of 4 (engine.distributed), each one batch, or split as 3 + 1
    assert one["micro_batch"] == 4 and split["micro_batch"] == 3
    for name, w in one_weights.items():  # bit for bit: the statistics do not depend on how samples are batched
        assert torch.equal(split_weights[name], w), name


def test_a_device_memory_cap_bounds_the_free_memory(monkeypatch):
    """run.device_memory_gib: what is left of the cap after PyTorch's reserved memory, never more than is free."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 141 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * 2**30)
    assert microbatch.free_bytes(gpu) == 100 * 2**30
    assert microbatch.free_bytes(gpu, cap=24 * 2**30) == 18 * 2**30
    assert microbatch.free_bytes(gpu, cap=200 * 2**30) == 100 * 2**30
    assert microbatch.free_bytes(gpu, cap=4 * 2**30) == 0
    assert microbatch.limit_device_memory(torch.device("cpu"), 24) is None  # no allocator to cap on the host


def test_device_memory_cap_is_validated():
    from llmc_tpu.config import ConfigError, parse_config

    base = {"model": {"path": "m"}, "quant": {"method": "RTN"}, "save": {"save_path": "s"}}
    assert parse_config({**base, "run": {"device_memory_gib": 24}}).run.device_memory_gib == 24
    with pytest.raises(ConfigError, match="device_memory_gib"):
        parse_config({**base, "run": {"device_memory_gib": 0}})


def test_expandable_segments_by_default_unless_the_user_chose(monkeypatch):
    from llmc_tpu.cli import default_allocator_setting

    for key in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(key, raising=False)
    default_allocator_setting()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    default_allocator_setting()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:native")
    default_allocator_setting()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
