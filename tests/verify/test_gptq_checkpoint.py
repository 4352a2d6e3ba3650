"""GPTQ's handoff against the real compiler: llm_convert.py -q auto on our checkpoint, code for code (needs TPU-MLIR)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmc_tpu.config import parse_config
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify import format_verify_table
from llmc_tpu.verify.checkpoint import compare_checkpoint_lowered, verify_checkpoint

pytestmark = pytest.mark.tpu_mlir

SEQ_LEN = 64
CASES = {  # name -> (tiny model, quant.weight, run.tpu_dtype, run.chip[, quant.method and special])
    "W4BF16-g64": ("llama", {}, "bf16", "bm1684x"),
    "W8BF16-g64": ("qwen2", {"bit": 8}, "bf16", "bm1684x"),
    "W8BF16-per-channel": ("qwen3", {"bit": 8, "symmetric": True, "granularity": "per_channel"}, "bf16", "bm1684x"),
    "W4F16-g64": ("llama", {}, "f16", "bm1684x"),
    "W4BF16-g32-folded": ("npu", {"group_size": 32}, "bf16", "bm1684x"),  # k/v (32 rows), gate/up (288) fold to bf16
    "Awq+GPTQ-W4BF16-g64": ("llama", {}, "bf16", "bm1684x", {"method": ["Awq", "GPTQ"]}),
    "GPTQ-natural-order-refined-W4BF16-g64": ("llama", {}, "bf16", "bm1684x",  # 3 refine sweeps by default
                                              {"method": "GPTQ", "special": {"actorder": False, "static_groups": False}}),
    "SignRound-W4BF16-g64": ("llama", {}, "bf16", "bm1684x", {"method": "SignRound", "special": {"iters": 20}}),
    "Awq+SignRound-W8BF16-g64": ("qwen2", {"bit": 8}, "bf16", "bm1684x",
                                 {"method": ["Awq", "SignRound"], "special": {"iters": 20}}),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_model, eval_txt, tmp_path_factory):
    """Run GPTQ once per case and compile its checkpoint once; return (checkpoint, fmt, result) by case."""
    done = {}

    def get(case: str):
        if case not in done:
            model, weight, tpu_dtype, chip, *method = CASES[case]
            method = method[0] if method else {"method": "GPTQ"}
            save = tmp_path_factory.mktemp(case) / "out"
            cfg = parse_config({
                "model": {"path": str(tiny_model(model)), "torch_dtype": "float32"},
                "calib": {"name": "custom_txt", "path": str(eval_txt), "n_samples": 8, "seq_len": 32},
                "eval": {"eval_pos": []},
                "quant": {**method, "weight": weight, "quant_out": True},
                "save": {"save_path": str(save)},
                "run": {"tpu_dtype": tpu_dtype, "chip": chip},
            })
            report = Quantizer(cfg, progress=False).run()
            f = report.tpu_format
            fmt = TpuWeightFormat(f["bits"], f["group_size"], f["symmetric"], f["scale_dtype"], f["chip"])
            ckpt = save / "gptq_tpu_model"
            done[case] = ckpt, fmt, verify_checkpoint(ckpt, fmt, SEQ_LEN, save.parent / "verify"), report
        return done[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_every_linear_of_the_checkpoint_matches(checkpoints, case):
    _, _, result, report = checkpoints(case)
    table = format_verify_table(result)
    assert result.ok, table
    assert len(result.rows) == 14, table
    folded = sorted(r.name for r in result.rows if r.folded)
    assert folded == report.quantized["folded_to_float"], table
    if "refined" in case:  # the codes verified are the refined ones
        assert all(s.get("refine_sweeps") == 3 for b in report.method["blocks"] for s in b["gptq"])
    if case == "W4BF16-g32-folded":
        assert folded == sorted(f"model.layers.{i}.{n}" for i in range(2)
                                for n in ("self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"))


def test_a_changed_code_is_caught(checkpoints, tmp_path):
    ckpt, fmt, result, _ = checkpoints("W4BF16-g64")
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.qweight"
    tensors[key][3, 5] = tensors[key][3, 5] ^ torch.tensor(0x10, dtype=torch.int32)  # one nibble of one word
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    checked = compare_checkpoint_lowered(bad, fmt, result.out_dir)  # TPU-MLIR's lowering of the unchanged file
    wrong = {r.name: r for r in checked.rows if not r.ok}
    assert set(wrong) == {"model.layers.1.mlp.up_proj"}, format_verify_table(checked)
    assert wrong["model.layers.1.mlp.up_proj"].code_mismatches == 1


def test_cli_verify_picks_the_checkpoint(checkpoints):
    from llmc_tpu.cli import main

    ckpt, _, _, _ = checkpoints("W4BF16-g64")
    assert main(["-q", "verify", str(Path(ckpt).parent), "--work-dir", str(Path(ckpt).parent.parent / "cli_verify")]) == 0
