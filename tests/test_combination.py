"""quant.method [Awq, GPTQ]: AWQ's scales and clipping on the float weights, then GPTQ's codes on the result."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_model

from llmc_tpu.config import ConfigError, parse_config
from llmc_tpu.export.gptq_checkpoint import read_gptq_checkpoint
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.tpu.rtn import TpuWeightFormat

BASE = {"model": {"path": "m"}, "save": {"save_path": "s"}}


@pytest.mark.parametrize("method", [["Awq", "GPTQ"], ["awq", "gptq"], "Awq+GPTQ", "awq+gptq"])
def test_combination_spellings(method):
    cfg = parse_config({**BASE, "quant": {"method": method}})
    assert cfg.quant.method == "Awq+GPTQ"
    assert cfg.quant.special["trans_version"] == "v2" and cfg.quant.special["percdamp"] == 0.01  # both methods' keys
    assert cfg.save.save_trans is False  # the handoff is the GPTQ checkpoint, as for GPTQ


def test_combination_errors_name_the_allowed_values():
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "quant": {"method": ["GPTQ", "Awq"]}})
    assert "quant.method" in str(info.value) and "[Awq, GPTQ]" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "quant": {"method": ["Awq", "GPTQ"], "special": {"percdmp": 0.1}}})
    msg = str(info.value)
    assert "quant.special.percdmp" in msg and "did you mean 'percdamp'" in msg and "trans_version" in msg
    with pytest.raises(ConfigError, match="static_groups: True"):
        parse_config({**BASE, "quant": {"method": ["Awq", "GPTQ"], "special": {"actorder": True, "static_groups": False}}})


def test_awq_then_gptq_end_to_end(tmp_path, eval_txt):
    model = make_tiny_model(tmp_path / "m", "llama")
    common = {
        "model": {"path": str(model), "torch_dtype": "float32"},
        "calib": {"name": "custom_txt", "path": str(eval_txt), "n_samples": 8, "seq_len": 32},
        "eval": {"eval_pos": ["fake_quant"], "name": "custom_ppl", "path": str(eval_txt), "seq_len": 64},
    }
    reports = {}
    for method in (["Awq", "GPTQ"], "Awq"):
        save = tmp_path / f"out_{'+'.join(method) if isinstance(method, list) else method}"
        cfg = {**common, "quant": {"method": method, "special": {"trans_version": "v1", "clip_sym": False}},
               "save": {"save_path": str(save), "save_fake": True, **({"save_trans": True} if method == "Awq" else {})}}
        reports[str(method)] = Quantizer(parse_config(cfg), progress=False).run(), save
    report, save = reports[str(["Awq", "GPTQ"])]
    awq_report, awq_save = reports["Awq"]
    assert report.method["name"] == "Awq+GPTQ"
    block = report.method["blocks"][0]
    assert block["scaled"] and block["clipped"] and block["gptq"], block  # both steps reported per block
    ckpt = save / "gptq_tpu_model"
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["method"] == "Awq+GPTQ"
    assert "-q auto" in report.next_steps[0]
    # GPTQ solved on AWQ's transformed weights: the checkpoint's float tensors (norms) are AWQ's, the codes are
    # GPTQ's and dequantize to exactly the fake-quant model
    ours = load_file(ckpt / "model.safetensors")
    awq_float = load_file(awq_save / "transformed_model" / "model.safetensors")
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(ours[norm], awq_float[norm].to(ours[norm].dtype))
    fmt = TpuWeightFormat(**{k: report.tpu_format[k] for k in ("bits", "group_size", "symmetric", "scale_dtype", "chip")})
    fake = load_file(save / "fake_quant_model" / "model.safetensors")
    awq_fake = load_file(awq_save / "fake_quant_model" / "model.safetensors")
    differs = 0
    for name, q in read_gptq_checkpoint(ckpt, fmt).items():
        assert torch.equal(fake[f"{name}.weight"], q.dequantize().to(fake[f"{name}.weight"].dtype)), name
        differs += not torch.equal(fake[f"{name}.weight"], awq_fake[f"{name}.weight"])
    assert differs == 14  # GPTQ's codes, not the RTN of AWQ's weights
    for block in report.method["blocks"]:
        for subset in block["gptq"]:
            for name, err in subset["err"].items():
                assert err < subset["err_rtn"][name], (block["block"], name)


def test_signround_config():
    cfg = parse_config({**BASE, "quant": {"method": "signround"}})
    assert cfg.quant.method == "SignRound" and cfg.quant.special["iters"] == 50 and cfg.save.save_trans is False
    cfg = parse_config({**BASE, "quant": {"method": ["Awq", "SignRound"], "special": {"iters": 20}}})
    assert cfg.quant.method == "Awq+SignRound" and cfg.quant.special["iters"] == 20 and "trans_version" in cfg.quant.special
    with pytest.raises(ConfigError, match="quant.weight.granularity.*W8 per channel"):
        parse_config({**BASE, "quant": {"method": "SignRound",
                                        "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}}})
    with pytest.raises(ConfigError, match="quant.special.iters"):
        parse_config({**BASE, "quant": {"method": "SignRound", "special": {"iters": -1}}})
