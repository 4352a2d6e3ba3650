"""save_onnx on CPU (no TPU-MLIR): every piece against torch and the Hugging Face model with onnxruntime,
names and shapes of the layout LLM-TPU's flow expects, compile.sh, and the pipeline wiring."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

from llmc_tpu.config import ConfigError, parse_config  # noqa: E402
from llmc_tpu.export.onnx import TOLERANCE, save_onnx  # noqa: E402
from llmc_tpu.export.onnx.compile_sh import compile_script, piece_commands  # noqa: E402
from llmc_tpu.export.onnx.graph import run_onnx  # noqa: E402
from llmc_tpu.export.onnx.pieces import causal_mask, decode_mask  # noqa: E402
from llmc_tpu.models.loading import load_model  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat, quantize_weight  # noqa: E402
from llmc_tpu.verify.compare import compare_linear  # noqa: E402
from llmc_tpu.verify.onnx_path import read_onnx_lowered  # noqa: E402

SEQ = 16
FMT = TpuWeightFormat(4, 64)
MODELS = {
    "gqa": {"family": "llama", "heads": 4, "kv_heads": 2},  # 4 query heads share 2 kv heads
    "tied": {"family": "qwen2", "heads": 2, "kv_heads": 1, "tie": True},  # tied embeddings, q/k/v biases
    "qwen3": {"family": "qwen3", "heads": 4, "kv_heads": 1},  # per-head q/k norms
    "mistral": {"family": "mistral", "heads": 4, "kv_heads": 2},  # not in llm_convert.py: the ONNX path is its way in
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", **MODELS[request.param])
    loaded = load_model(str(folder))
    report = save_onnx(loaded.model, loaded.spec, folder.parent / "onnx", FMT, SEQ, loaded.model_type)
    reference = load_model(str(folder), torch_dtype="float32").model  # the same bf16 values, run in fp32
    return request.param, loaded, reference, folder.parent / "onnx", report


def _io(path: Path) -> tuple[list, list]:
    graph = onnx.load(str(path)).graph

    def desc(v):
        t = v.type.tensor_type
        return v.name, [d.dim_value or d.dim_param for d in t.shape.dim], onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)

    return [desc(v) for v in graph.input], [desc(v) for v in graph.output]


def test_every_piece_matches_torch_and_the_hf_layer(exported):
    name, loaded, _, onnx_dir, report = exported
    layers = loaded.model.config.num_hidden_layers
    expected = {"embedding", "lm_head", "greedy_head", *(f"block_{i}" for i in range(layers)),
                *(f"block_cache_{i}" for i in range(layers))}
    assert set(report["pieces"]) == expected
    assert {p.stem for p in onnx_dir.glob("*.onnx")} == expected
    for piece, entry in report["pieces"].items():
        assert entry["max_rel_error"] < TOLERANCE, (piece, entry)
    for i in range(layers):
        assert report["pieces"][f"block_{i}"]["hf_max_rel_error"] < TOLERANCE, report["pieces"][f"block_{i}"]
    assert report["max_rel_error"] < TOLERANCE and report["seq_length"] == SEQ


def test_names_shapes_and_dtypes(exported):
    _, loaded, _, onnx_dir, _ = exported
    cfg = loaded.model.config
    h, v, kv, d = cfg.hidden_size, cfg.vocab_size, cfg.num_key_value_heads, cfg.head_dim
    f32, i64 = np.float32, np.int64
    assert kv < cfg.num_attention_heads
    assert _io(onnx_dir / "block_1.onnx") == (
        [("input_states", [1, SEQ, h], f32), ("position_ids", [1, SEQ], i64), ("attention_mask", [1, 1, SEQ, SEQ], f32)],
        [("hidden_states", [1, SEQ, h], f32), ("past_k", [1, SEQ, kv, d], f32), ("past_v", [1, SEQ, kv, d], f32)])
    assert _io(onnx_dir / "block_cache_1.onnx") == (
        [("input_states", [1, 1, h], f32), ("position_ids", [1, 1], i64), ("attention_mask", [1, 1, 1, SEQ + 1], f32),
         ("history_k", [1, SEQ, kv, d], f32), ("history_v", [1, SEQ, kv, d], f32)],
        [("hidden_states", [1, 1, h], f32), ("past_k", [1, 1, kv, d], f32), ("past_v", [1, 1, kv, d], f32)])
    assert _io(onnx_dir / "embedding.onnx") == ([("input_ids", [1, "seq"], i64)], [("input_states", [1, "seq", h], f32)])
    assert _io(onnx_dir / "lm_head.onnx") == ([("hidden_states", [1, h], f32)], [("m_logits", [1, v], f32)])
    assert _io(onnx_dir / "greedy_head.onnx") == ([("m_logits", [1, v], f32)], [("token", [1, 1], i64)])
    # every block Linear is named after its module, with its weight rounded to bf16
    inits = {t.name: t for t in onnx.load(str(onnx_dir / "block_1.onnx")).graph.initializer}
    for linear in loaded.spec.linear_names:
        w = onnx.numpy_helper.to_array(inits[f"model.layers.1.{linear}.weight"]).T
        saved = loaded.model.get_submodule(f"model.layers.1.{linear}").weight.detach().to(torch.bfloat16).float()
        assert np.array_equal(w, saved.numpy())


@torch.no_grad()
def test_pieces_chained_reproduce_the_hf_model(exported):
    """embedding -> blocks -> lm_head gives the model's logits; K/V are the HF cache's (seq-major, after RoPE);
    a decode step through the cache blocks gives the logits of the same position; greedy_head is argmax."""
    from transformers import DynamicCache

    _, loaded, reference, onnx_dir, _ = exported
    layers = reference.config.num_hidden_layers
    ids = torch.randint(0, reference.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=reference.config)
    hf_logits = reference(input_ids=ids, past_key_values=cache, use_cache=True).logits[0]

    pos, mask = torch.arange(SEQ).view(1, SEQ), causal_mask(SEQ)
    (hidden,) = run_onnx(onnx_dir / "embedding.onnx", {"input_ids": ids})
    history = []
    for i in range(layers):
        hidden, k, v = run_onnx(onnx_dir / f"block_{i}.onnx", {"input_states": torch.from_numpy(hidden),
                                                              "position_ids": pos, "attention_mask": mask})
        hf_k, hf_v = cache.layers[i].keys, cache.layers[i].values  # [1, KV, S, D]
        np.testing.assert_allclose(k, hf_k.transpose(1, 2).numpy(), rtol=0, atol=1e-4 * hf_k.abs().max().item())
        np.testing.assert_allclose(v, hf_v.transpose(1, 2).numpy(), rtol=0, atol=1e-4 * hf_v.abs().max().item())
        history.append((k, v))
    (last,) = run_onnx(onnx_dir / "lm_head.onnx", {"hidden_states": torch.from_numpy(hidden[:, -1])})
    assert np.abs(last[0] - hf_logits[-1].numpy()).max() < TOLERANCE * hf_logits.abs().max().item()

    p = SEQ - 3  # decode token p with history 0..p-1 (later history entries are masked out)
    (x,) = run_onnx(onnx_dir / "embedding.onnx", {"input_ids": ids[:, p:p + 1]})
    for i in range(layers):
        x, _, _ = run_onnx(onnx_dir / f"block_cache_{i}.onnx", {
            "input_states": torch.from_numpy(x), "position_ids": torch.tensor([[p]]), "attention_mask": decode_mask(SEQ, p),
            "history_k": torch.from_numpy(history[i][0]), "history_v": torch.from_numpy(history[i][1])})
    (logits,) = run_onnx(onnx_dir / "lm_head.onnx", {"hidden_states": torch.from_numpy(x[:, 0])})
    assert np.abs(logits[0] - hf_logits[p].numpy()).max() < TOLERANCE * hf_logits.abs().max().item()
    (token,) = run_onnx(onnx_dir / "greedy_head.onnx", {"m_logits": torch.from_numpy(logits)})
    assert int(token[0, 0]) == int(np.argmax(logits[0]))


def test_compile_script_runs_the_documented_commands(exported):
    name, loaded, _, onnx_dir, _ = exported
    script = (onnx_dir / "compile.sh").read_text()
    assert (onnx_dir / "compile.sh").stat().st_mode & 0o100
    subprocess.run(["bash", "-n", str(onnx_dir / "compile.sh")], check=True)
    lines = script.splitlines()
    block = next(ln for ln in lines if ln.startswith("model_deploy.py --mlir block_1.mlir"))
    assert "--quantize W4BF16 --q_group_size 64 --quant_input --quant_output --disable_layer_group --chip bm1684x" in block
    assert "--addr_mode" not in block
    cache = next(ln for ln in lines if ln.startswith("model_deploy.py --mlir block_cache_1.mlir"))
    assert "--disable_layer_group --addr_mode io_alone" in cache
    for piece in ("embedding", "embedding_cache", "lm_head"):  # not weight-quantized, as llm_convert.py
        deploy = next(ln for ln in lines if ln.startswith(f"model_deploy.py --mlir {piece}.mlir"))
        assert "--quantize BF16" in deploy
    assert "--input_shapes '[[1,1]]'" in script and f"--input_shapes '[[1,{SEQ}]]'" in script
    combine = next(ln for ln in lines if ln.startswith("model_tool --combine"))
    for i in range(loaded.model.config.num_hidden_layers):
        assert f"block_{i}.bmodel" in combine and f"block_cache_{i}.bmodel" in combine
    assert combine.endswith(f"-o {loaded.model_type}_w4bf16_g64_seq{SEQ}_bm1684x.bmodel")


@pytest.mark.parametrize("fmt, flags, floats", [
    (TpuWeightFormat(8, 128, True, "float16", "bm1688"), "--quantize W8F16 --q_group_size 128 --q_symmetric", "F16"),
    (TpuWeightFormat(4, 0), "--quantize W4BF16 --q_group_size 0 --quant_input", "BF16"),
])
def test_compile_flags_follow_the_format(fmt, flags, floats):
    assert flags in " ".join(piece_commands("block_0", fmt, 512).deploy)
    assert f"--quantize {floats}" in " ".join(piece_commands("lm_head", fmt, 512).deploy)
    assert f"--chip {fmt.chip}" in " ".join(piece_commands("block_cache_3", fmt, 512).deploy)
    assert "block_cache_2.bmodel" in compile_script("llama", 3, fmt, 512)


def _pack_w4(q) -> dict[str, np.ndarray]:
    codes = q.codes.numpy()
    bf16 = q.scale.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return {"uint": (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).reshape(-1), "scale_bf16": bf16,
            "zp": q.zero.numpy().astype(np.uint8).reshape(-1)}


@pytest.mark.parametrize("op", ["_MatMul", ".bias_add_Add"])
def test_onnx_path_lowered_names_are_read(op):
    """model_deploy names a Linear's lowered weights after its op: L_MatMul_* (L.bias_add_Add_* with a fused bias)."""
    name = "model.layers.0.self_attn.q_proj"
    w = (torch.randn(128, 128, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16).float()
    q = quantize_weight(w, FMT)
    npz = {f"{name}{op}_{k}": v for k, v in _pack_w4(q).items()} | {"block.input_layernorm.weight_1_bf16": np.zeros(1)}
    assert compare_linear(name, q, read_onnx_lowered(npz, name, 128, 4)).ok
    other = quantize_weight(w * 1.01, FMT)
    assert not compare_linear(name, other, read_onnx_lowered(npz, name, 128, 4)).ok
    assert read_onnx_lowered(npz, "model.layers.0.self_attn.k_proj", 128, 4) is None


def test_pipeline_writes_onnx_and_reports_errors(tmp_path, eval_txt):
    from llmc_tpu.pipeline import Quantizer

    model = make_tiny_model(tmp_path / "m", "llama", heads=4, kv_heads=2, tie=True)
    save = tmp_path / "out"
    cfg = parse_config({"model": {"path": str(model)}, "eval": {"eval_pos": []}, "quant": {"method": "RTN"},
                        "save": {"save_path": str(save), "save_onnx": True}, "run": {"seq_length": SEQ}})
    report = Quantizer(cfg, progress=False).run()
    data = json.loads((save / "report.json").read_text())
    assert data["onnx"]["max_rel_error"] < TOLERANCE and data["onnx"]["seq_length"] == SEQ
    assert (save / "onnx" / "compile.sh").is_file() and (save / "onnx" / "block_1.onnx").is_file()
    assert any("compile.sh" in s for s in data["next_steps"]) and any("verify --onnx" in s for s in data["next_steps"])
    assert "onnx: 7 pieces" in report.summary()


def test_gptq_with_save_onnx_is_refused():
    with pytest.raises(ConfigError, match="save.save_onnx"):
        parse_config({"model": {"path": "m"}, "quant": {"method": "GPTQ"}, "save": {"save_path": "s", "save_onnx": True}})


def test_pieces_over_the_protobuf_limit_keep_their_weights_in_a_side_file(tmp_path, monkeypatch):
    from llmc_tpu.export.onnx import graph
    from llmc_tpu.export.onnx.pieces import LmHead

    monkeypatch.setattr(graph, "_PROTOBUF_LIMIT", 1000)  # stands in for 2 GiB
    head = torch.nn.Linear(64, 300, bias=False)
    piece = LmHead(torch.nn.LayerNorm(64), head).eval()
    x = torch.randn(1, 64)
    path = graph.export_piece(piece, {"hidden_states": x}, ["m_logits"], tmp_path / "lm_head.onnx", {"lm_head": head})
    assert (tmp_path / "lm_head.onnx.data").stat().st_size >= 64 * 300 * 4
    with torch.no_grad():
        assert graph.max_rel_error(run_onnx(path, {"hidden_states": x})[0], piece(x)) < TOLERANCE


def test_models_the_pieces_would_get_wrong_are_refused_before_any_work():
    from llmc_tpu.export.onnx import OnnxExportError, check_exportable
    from llmc_tpu.models.registry import REGISTRY

    with pytest.raises(ConfigError, match="save.save_onnx"):
        parse_config({"model": {"path": "m"}, "quant": {"method": "RTN"}, "run": {"task_type": "VLM"},
                      "save": {"save_path": "s", "save_onnx": True}})
    import transformers

    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, sliding_window=32))
    check_exportable(mistral, REGISTRY["mistral"], 32)
    with pytest.raises(OnnxExportError, match="sliding window of 32"):
        check_exportable(mistral, REGISTRY["mistral"], 64)
    vlm = next((s for s in REGISTRY.values() if getattr(s, "vision", ())), None)
    if vlm is not None:
        with pytest.raises(OnnxExportError, match="text-only"):
            check_exportable(mistral, vlm, 32)
