"""GPU exports: exact round trips, independent readers, the compressed-tensors package, perplexity from each folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import TEXT, make_tiny_model

from llmc_tpu.config import ConfigError, parse_config
from llmc_tpu.export.formats import autoawq, compressed_tensors, gptq
from llmc_tpu.export.formats.canonical import ExportError, GpuWeight, gpu_weight, scales_as_fp16
from llmc_tpu.export.formats.constraints import serving
from llmc_tpu.export.formats.packing import awq_deinterleave, unpack_int32
from llmc_tpu.export.formats.spec import ExportOptions
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.tpu.rtn import TpuWeightFormat, quantize_weight

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"save_autoawq": "autoawq_quant_model", "save_gptq": "gptq_quant_model",
           "save_vllm": "vllm_quant_model", "save_sgl": "sgl_quant_model"}

# (bits, group_size, symmetric, out, in): odd shapes, several groups, per channel (0), 4 and 8 bits
CASES = [
    (4, 32, False, 72, 96), (4, 64, False, 136, 128), (4, 32, True, 72, 96), (4, 16, False, 40, 48),
    (8, 32, False, 72, 96), (8, 64, True, 136, 128), (4, 0, False, 72, 128), (8, 0, True, 128, 128),
]


def tpu_result(bits, group, sym, out, inp, seed=0):
    torch.manual_seed(seed)
    w = (torch.randn(out, inp) * 0.05).to(torch.bfloat16).float()
    return quantize_weight(w, TpuWeightFormat(bits=bits, group_size=group, symmetric=sym))


def case_id(c):
    return f"w{c[0]}-{'pc' if c[1] == 0 else f'g{c[1]}'}-{'sym' if c[2] else 'asym'}-{c[3]}x{c[4]}"


# -- the canonical result -------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_canonical_keeps_the_tpu_codes_and_quantizes_float_rows_on_the_same_grid(case):
    r = tpu_result(*case)
    w = gpu_weight(r)
    n_q = r.n_quantized
    assert w.n_tpu_rows == n_q and w.out_features == case[3]
    # the TPU's rows: exactly what the TPU multiplies with (folded Linears: before the compiler's bf16 rounding)
    exported = w.dequantize()[:n_q]
    assert torch.equal(exported.to(torch.bfloat16) if r.folded else exported, r.dequantize()[:n_q])
    # the rows the TPU keeps float: the same grid as if the chip had quantized them
    if r.float_rows.shape[0]:
        n_float = r.float_rows.shape[0]
        padded = torch.cat([torch.zeros(n_q, case[4]), r.float_rows, torch.zeros(64 - n_float, case[4])])
        full = quantize_weight(padded, TpuWeightFormat(bits=case[0], group_size=case[1], symmetric=case[2]))
        assert full.n_quantized == padded.shape[0]
        tail = full.dequantize()[n_q:n_q + n_float]
        assert torch.equal(w.dequantize()[n_q:], tail)
    assert int(w.codes.min()) >= 0 and int(w.codes.max()) < 1 << case[0]


def test_w8_per_channel_signed_codes_become_uint8_with_zero_128():
    r = tpu_result(8, 0, True, 64, 128)
    assert r.signed
    w = gpu_weight(r)
    assert w.is_symmetric and torch.equal(w.dequantize(), r.dequantize())


def test_fp16_scales_exact_for_bf16_and_refused_when_they_would_change_weights():
    w = gpu_weight(tpu_result(4, 32, False, 64, 96))
    assert torch.equal(scales_as_fp16(w, "x").float(), w.scale.float())
    tiny = GpuWeight(4, 32, False, w.codes, w.zero, torch.full_like(w.scale, 3e-7), 64)  # below fp16's exact range
    with pytest.raises(ExportError, match="not representable in float16"):
        scales_as_fp16(tiny, "x")
    unused = GpuWeight(4, 32, False, w.zero.repeat_interleave(32, dim=1), w.zero, torch.full_like(w.scale, 3e-7), 64)
    assert torch.equal(scales_as_fp16(unused, "x"), torch.zeros_like(w.scale, dtype=torch.float16))  # all codes at zero


# -- exact round trips: pack -> unpack equals the canonical codes ------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if c[0] == 4], ids=case_id)
def test_autoawq_round_trip(case):
    w = gpu_weight(tpu_result(*case))
    t = autoawq.pack_linear("l", w)
    out, k, g = w.out_features, w.in_features, w.n_groups
    assert t["qweight"].shape == (k, out // 8) and t["qzeros"].shape == (g, out // 8) and t["scales"].shape == (g, out)
    assert t["qweight"].dtype == torch.int32 and t["scales"].dtype == torch.float16
    assert torch.equal(awq_deinterleave(unpack_int32(t["qweight"], 4, 1, out)).t(), w.codes)
    assert torch.equal(awq_deinterleave(unpack_int32(t["qzeros"], 4, 1, out)).t(), w.zero)
    assert torch.equal(t["scales"].t().float(), w.scale.float())


def test_autoawq_refuses_what_it_cannot_hold():
    with pytest.raises(ExportError, match="4-bit only"):
        autoawq.pack_linear("l", gpu_weight(tpu_result(8, 32, False, 72, 96)))
    with pytest.raises(ExportError, match="out_features 36"):
        autoawq.pack_linear("l", gpu_weight(tpu_result(4, 32, False, 36, 96)))


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gptq_round_trip(case, version):
    w = gpu_weight(tpu_result(*case))
    t = gptq.pack_linear("l", w, version)
    bits, out, k, g = case[0], w.out_features, w.in_features, w.n_groups
    assert t["qweight"].shape == (k * bits // 32, out) and t["qzeros"].shape == (g, out * bits // 32)
    assert torch.equal(unpack_int32(t["qweight"], bits, 0, k).t(), w.codes)
    zeros = unpack_int32(t["qzeros"], bits, 1, out).t()
    assert torch.equal(zeros + (1 if version == "gptq" else 0), w.zero)
    assert torch.equal(t["g_idx"], (torch.arange(k) // w.group_size).to(torch.int32))
    if case[2] and bits == 4 and version == "gptq":
        assert (t["qzeros"] == 0x77777777).all()  # sym 4-bit v1: stored 7 everywhere


def test_gptq_v1_refuses_zero_point_0_and_v2_keeps_it():
    w = (torch.randn(64, 64) * 0.05).to(torch.bfloat16).float()
    w[3, :32] = w[3, :32].abs() + 0.01  # a group with min > 0: asymmetric zero point 0
    r = gpu_weight(quantize_weight(w, TpuWeightFormat(group_size=32)))
    assert int(r.zero[3, 0]) == 0
    with pytest.raises(ExportError, match="zero point 0.*gptq_v2"):
        gptq.pack_linear("l", r, "gptq")
    t = gptq.pack_linear("l", r, "gptq_v2")
    assert torch.equal(unpack_int32(t["qzeros"], 4, 1, 64).t(), r.zero)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compressed_tensors_round_trip(case):
    bits, sym = case[0], case[2] or (case[1] == 0 and case[0] == 8)
    w = gpu_weight(tpu_result(*case))
    t = compressed_tensors.pack_linear("l", w, sym)
    out, k = w.out_features, w.in_features
    assert t["weight_packed"].shape == (out, -(-k * bits // 32))
    assert torch.equal(unpack_int32(t["weight_packed"], bits, 1, k), w.codes)
    assert t["weight_scale"].dtype == torch.bfloat16 and torch.equal(t["weight_scale"], w.scale)
    assert t["weight_shape"].tolist() == [out, k]
    if sym:
        assert "weight_zero_point" not in t
    else:
        assert t["weight_zero_point"].shape == (-(-out * bits // 32), w.n_groups)
        assert torch.equal(unpack_int32(t["weight_zero_point"], bits, 0, out), w.zero)


def test_compressed_tensors_package_unpacks_our_bits():
    """compressed-tensors' own unpacker on our packing, odd shapes (padded words), 4 and 8 bits."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for bits, group, sym, out, inp in [(4, 16, False, 36, 48), (8, 16, False, 36, 48), (4, 32, True, 72, 96)]:
        w = gpu_weight(tpu_result(bits, group, sym, out, inp))
        t = compressed_tensors.pack_linear("l", w, False)
        mid = 1 << (bits - 1)
        assert torch.equal(unpack_from_int32(t["weight_packed"], bits, torch.Size([out, inp])).long() + mid, w.codes.long())
        zp = unpack_from_int32(t["weight_zero_point"], bits, torch.Size([out, w.n_groups]), packed_dim=0)
        assert torch.equal(zp.long() + mid, w.zero.long())


def test_kernel_constraints():
    opts = ExportOptions(bits=4, group_size=64, per_channel=False, symmetric=False, dtype=torch.bfloat16)
    shapes = [("a", 128, 256), ("b", 64, 128)]
    by = {s["kernel"]: s for s in serving("compressed-tensors", opts, shapes)}
    assert not by["Machete"]["ok"] and "b (out 64 % 128 != 0)" in by["Machete"]["why"]
    assert by["Marlin"]["ok"] and not by["Exllama"]["ok"] and "symmetric only" in by["Exllama"]["why"]
    by = {s["kernel"]: s for s in serving("gptq", opts, shapes)}
    assert not by["gptq_marlin"]["ok"] and by["gptq (exllama)"]["ok"] and "--dtype float16" in by["gptq (exllama)"]["why"]
    sym8 = ExportOptions(bits=8, group_size=256, per_channel=False, symmetric=True, dtype=torch.float16)
    by = {s["kernel"]: s for s in serving("gptq", sym8, shapes)}
    assert not by["gptq_marlin"]["ok"] and "group size 256" in by["gptq_marlin"]["why"]
    pc = ExportOptions(bits=4, group_size=0, per_channel=True, symmetric=False, dtype=torch.float16)
    by = {s["kernel"]: s for s in serving("autoawq", pc, shapes)}
    assert by["awq_marlin"]["ok"] and not by["awq (GEMM)"]["ok"] and "per-channel" in by["awq (GEMM)"]["why"]
    v2 = ExportOptions(bits=4, group_size=64, per_channel=False, symmetric=True, dtype=torch.float16, gptq_checkpoint_format="gptq_v2")
    by = {s["kernel"]: s for s in serving("gptq", v2, shapes)}
    assert by["gptq_marlin"]["ok"] and not by["gptq (exllama)"]["ok"]


# -- independent readers, written from formats.md (not our packer run backwards) ------------------
def read_autoawq(folder: Path) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: nibble i of qweight[k, c] is output column 8c + [0,2,4,6,1,3,5,7][i]; w = (q - z) * s."""
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and cfg["bits"] == 4 and cfg["zero_point"]
    sd = load_file(folder / "model.safetensors")
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = {}
    for key in [k for k in sd if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qw = sd[key].numpy().view(np.uint32)
        qz = sd[f"{name}.qzeros"].numpy().view(np.uint32)
        scales = sd[f"{name}.scales"].float().numpy()  # [G, out]
        k_in, words = qw.shape
        q = np.zeros((k_in, words * 8), np.int64)
        z = np.zeros((qz.shape[0], words * 8), np.int64)
        for nib in range(8):
            q[:, order[nib]::8] = (qw >> np.uint32(4 * nib)) & 0xF
            z[:, order[nib]::8] = (qz >> np.uint32(4 * nib)) & 0xF
        g = k_in // scales.shape[0]
        zf = np.repeat(z, g, axis=0).astype(np.float32)
        sf = np.repeat(scales, g, axis=0)
        out[name] = torch.from_numpy(((q.astype(np.float32) - zf) * sf).T.copy())
    return out


def read_gptq(folder: Path) -> dict[str, torch.Tensor]:
    """GPTQ: qweight[i, n] holds in-features (32/b)*i + j at bits b*j; zeros +1 in v1; group of in-feature k = g_idx[k]."""
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits = cfg["bits"]
    plus = 1 if cfg["checkpoint_format"] == "gptq" else 0
    sd = load_file(folder / "model.safetensors")
    per, mask = 32 // bits, (1 << bits) - 1
    out = {}
    for key in [k for k in sd if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qw = sd[key].numpy().view(np.uint32).astype(np.int64)
        qz = sd[f"{name}.qzeros"].numpy().view(np.uint32).astype(np.int64)
        g_idx = sd[f"{name}.g_idx"].numpy()
        scales = sd[f"{name}.scales"].float().numpy()
        q = np.stack([(qw >> (bits * j)) & mask for j in range(per)], axis=1).reshape(-1, qw.shape[1])  # [in, out]
        z = np.stack([(qz >> (bits * j)) & mask for j in range(per)], axis=2).reshape(qz.shape[0], -1) + plus  # [G, out]
        w = (q - z[g_idx]).astype(np.float32) * scales[g_idx]
        out[name] = torch.from_numpy(w.T.copy())
    return out


def read_compressed_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The compressed-tensors package's own decompressor (float32 scales: exact products)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    sd = load_file(folder / "model.safetensors")
    out = {}
    for key in [k for k in sd if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight_")}
        local["weight_scale"] = local["weight_scale"].float()
        out[name] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return out


READERS = {"save_autoawq": read_autoawq, "save_gptq": read_gptq, "save_vllm": read_compressed_tensors,
           "save_sgl": read_compressed_tensors}


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_eval(tmp_path_factory) -> Path:
    """About 16 windows of 32 tokens: each perplexity below takes a second."""
    p = tmp_path_factory.mktemp("short_eval") / "eval.txt"
    p.write_text(TEXT[:1600], encoding="utf-8")
    return p


def run_config(model: Path, eval_txt: Path, save: Path, exports=tuple(FOLDERS), eval_pos=("fake_quant",), **quant) -> dict:
    return {
        "model": {"path": str(model), "torch_dtype": "float32"},
        "eval": {"name": "custom_ppl", "path": str(eval_txt), "seq_len": 32, "bs": 4, "eval_pos": list(eval_pos)},
        "quant": {"method": "RTN", **quant},
        "save": {"save_path": str(save), "save_fake": True, **{k: True for k in exports}},
    }


def folder_model(folder: Path, weights: dict[str, torch.Tensor]):
    """A float32 model from an export folder: its float tensors plus the dequantized Linears."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config")
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = set(model.state_dict())
    state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items() if k in wanted}  # not qweight, ...
    state.update({f"{n}.weight": w for n, w in weights.items()})
    missing, _ = model.load_state_dict(state, strict=False)
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()), missing
    return model.eval()


def folder_ppl(folder: Path, weights: dict[str, torch.Tensor], tokenizer, eval_txt: Path) -> float:
    from llmc_tpu.engine.forward import whole_model_logits
    from llmc_tpu.eval.ppl import perplexity, windows

    ids = tokenizer(eval_txt.read_text(), return_tensors="pt").input_ids[0]
    return perplexity(whole_model_logits(folder_model(folder, weights), windows(ids, 32), 4, torch.device("cpu"))).ppl


@pytest.mark.parametrize("family,quant", [("qwen2", {}), ("llama", {"method": "Awq", "special": {"n_grid": 4}})],
                         ids=["qwen2-rtn", "llama-awq"])
def test_every_export_in_one_run_reproduces_the_fake_quant_model(family, quant, tmp_path, short_eval):
    eval_txt = short_eval
    from transformers import AutoTokenizer

    model = make_tiny_model(tmp_path / "m", family, tie=family == "qwen2")  # qwen2: q/k/v biases, tied embeddings
    save = tmp_path / "out"
    cfg = run_config(model, eval_txt, save, **quant)
    if quant:
        cfg["calib"] = {"name": "custom_txt", "path": str(eval_txt), "n_samples": 4, "seq_len": 32}
    report = Quantizer(parse_config(cfg), progress=False).run()
    data = json.loads((save / "report.json").read_text())
    fake = load_file(save / "fake_quant_model" / "model.safetensors")  # bf16 of the exact products
    tokenizer = AutoTokenizer.from_pretrained(save / "fake_quant_model")
    for key, folder in FOLDERS.items():
        entry = data["exports"][key]
        assert entry["status"] == "written" and entry["folder"] == str(save / folder) and entry["serving"]
        assert (save / folder / "tokenizer.json").exists() and (save / folder / "generation_config.json").exists()
        weights = READERS[key](save / folder)
        assert len(weights) == data["quantized"]["n_linears"] == 14
        for name, w in weights.items():  # every quantized Linear: exactly the fake-quant weight
            assert torch.equal(w.to(torch.bfloat16), fake[f"{name}.weight"]), (key, name)
        if key == "save_sgl":  # the same files as save_vllm, in their own folder
            assert (save / folder / "model.safetensors").read_bytes() == (save / FOLDERS["save_vllm"] / "model.safetensors").read_bytes()
            continue
        ppl = folder_ppl(save / folder, weights, tokenizer, eval_txt)
        rel = 1e-6 if not quant else 2e-3  # AWQ: norms with folded scales are saved in bf16 (as for the TPU)
        assert ppl == pytest.approx(report.ppl["fake_quant"]["eval"], rel=rel), key
    assert "## GPU exports" in (save / "report.md").read_text()


def test_transformers_loads_the_vllm_folder_through_compressed_tensors(tmp_path, tiny_llama, eval_txt):
    """The real consumer: transformers + compressed-tensors decompress save_vllm to exactly our fake-quant weights."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    save = tmp_path / "out"
    Quantizer(parse_config(run_config(tiny_llama, eval_txt, save, exports=("save_vllm",), eval_pos=())), progress=False).run()
    fake = load_file(save / "fake_quant_model" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(save / "vllm_quant_model", dtype=torch.bfloat16,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    state = model.state_dict()
    assert set(fake) <= set(state)
    for key, value in fake.items():
        assert torch.equal(state[key], value), key


def test_float_rows_are_quantized_for_gpu_only_and_reported(tmp_path, eval_txt):
    """bm1684x keeps 32 of the 96 k/v rows float; the GPU exports quantize them on the same grid."""
    model = make_tiny_model(tmp_path / "m", "llama", hidden=192, heads=6, kv_heads=3)  # k/v out 96
    save = tmp_path / "out"
    Quantizer(parse_config(run_config(model, eval_txt, save, exports=("save_vllm", "save_gptq"), eval_pos=())), progress=False).run()
    data = json.loads((save / "report.json").read_text())
    assert data["quantized"]["float_rows"] == 2 * 2 * 32
    trans = load_file(save / "transformed_model" / "model.safetensors")
    fake = load_file(save / "fake_quant_model" / "model.safetensors")
    for key in ("save_vllm", "save_gptq"):
        assert data["exports"][key]["rows_quantized_for_gpu_only"] == 128 and "differ from" in data["exports"][key]["note"]
        w = READERS[key](save / FOLDERS[key])["model.layers.0.self_attn.k_proj"]
        src = trans["model.layers.0.self_attn.k_proj.weight"].float()
        expected = quantize_weight(src, TpuWeightFormat(chip="bm1688")).dequantize()  # 32 NPUs: every row quantized
        assert torch.equal(w, expected)
        assert torch.equal(w[:64].to(torch.bfloat16), fake["model.layers.0.self_attn.k_proj.weight"][:64])


def test_failed_export_is_reported_others_written_exit_code_4(tmp_path, eval_txt):
    model = make_tiny_model(tmp_path / "m", "llama")
    sd = load_file(model / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"][5, :64] = sd["model.layers.0.mlp.down_proj.weight"][5, :64].abs() + 0.01
    from safetensors.torch import save_file

    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    cfg = run_config(model, eval_txt, tmp_path / "out", exports=("save_gptq", "save_vllm"), eval_pos=())
    cfg_file = tmp_path / "c.yml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "llmc_tpu", "-q", "quantize", "--config", str(cfg_file)],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 4, run.stderr
    assert "WARNING: save_gptq failed" in run.stdout and "zero point 0" in run.stdout and "gptq_v2" in run.stdout
    out = tmp_path / "out"
    assert not (out / "gptq_quant_model").exists() and (out / "vllm_quant_model" / "model.safetensors").exists()
    data = json.loads((out / "report.json").read_text())
    assert data["exports"]["save_gptq"]["status"] == "failed" and data["exports"]["save_vllm"]["status"] == "written"
    assert "save_gptq: FAILED" in (out / "report.md").read_text()
    cfg["save"]["gptq_checkpoint_format"] = "gptq_v2"  # v2 stores the zero point as is
    cfg["save"]["save_path"] = str(tmp_path / "out2")
    report = Quantizer(parse_config(cfg), progress=False).run()
    assert not report.failed_exports
    w = read_gptq(tmp_path / "out2" / "gptq_quant_model")["model.layers.0.mlp.down_proj"]
    fake = load_file(tmp_path / "out2" / "fake_quant_model" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(w.to(torch.bfloat16), fake)


def test_static_impossibilities_are_config_errors():
    base = {"model": {"path": "m"}, "quant": {"method": "RTN", "weight": {"bit": 8}}, "save": {"save_path": "s"}}
    with pytest.raises(ConfigError, match="save.save_autoawq.*4-bit only"):
        parse_config({**base, "save": {"save_path": "s", "save_autoawq": True}})
    cfg = parse_config({**base, "save": {"save_path": "s", "save_gptq": True, "save_vllm": True, "save_sgl": True}})
    assert cfg.save.gptq_checkpoint_format == "gptq"
    with pytest.raises(ConfigError, match="gptq_checkpoint_format"):
        parse_config({**base, "save": {"save_path": "s", "gptq_checkpoint_format": "v3"}})


@pytest.mark.parametrize("weight", [{"symmetric": True, "group_size": 32}, {"bit": 8, "group_size": 128},
                                    {"bit": 8, "symmetric": True, "granularity": "per_channel"},
                                    {"granularity": "per_channel"}],
                         ids=["w4-sym-g32", "w8-asym-g128", "w8-per-channel", "w4-per-channel"])
def test_other_tpu_formats_export_exactly(weight, tmp_path, tiny_llama, eval_txt):
    """Symmetric, 8-bit and per-channel runs: every written folder reads back to the fake-quant weights."""
    exports = ("save_gptq", "save_vllm") if weight.get("bit") == 8 else tuple(FOLDERS)
    save = tmp_path / "out"
    report = Quantizer(parse_config(run_config(tiny_llama, eval_txt, save, exports=exports, eval_pos=(), weight=weight)),
                       progress=False).run()
    assert not report.failed_exports
    fake = load_file(save / "fake_quant_model" / "model.safetensors")
    for key in exports:
        for name, w in READERS[key](save / FOLDERS[key]).items():
            assert torch.equal(w.to(torch.bfloat16), fake[f"{name}.weight"]), (key, name)
    qc = json.loads((save / "vllm_quant_model" / "config.json").read_text())["quantization_config"]
    symmetric = weight.get("symmetric", False)
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] == symmetric
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == ("channel" if "granularity" in weight else "group")
    assert json.loads((save / "gptq_quant_model" / "config.json").read_text())["quantization_config"]["sym"] == symmetric


def test_gptq_runs_gpu_gptq_export_equals_the_tpu_handoff_checkpoint(tmp_path, tiny_llama, eval_txt):
    """For a GPTQ run without float rows, save_gptq holds the very tensors of the TPU handoff (gptq_tpu_model)."""
    cfg = run_config(tiny_llama, eval_txt, tmp_path / "out", exports=("save_gptq",), eval_pos=(), method="GPTQ")
    cfg["calib"] = {"name": "custom_txt", "path": str(eval_txt), "n_samples": 4, "seq_len": 32}
    Quantizer(parse_config(cfg), progress=False).run()
    ours = load_file(tmp_path / "out" / "gptq_quant_model" / "model.safetensors")
    handoff = load_file(tmp_path / "out" / "gptq_tpu_model" / "model.safetensors")
    assert set(ours) == set(handoff)
    for key, value in handoff.items():
        assert torch.equal(ours[key], value), key
