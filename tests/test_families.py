"""Every model family of the registry on a tiny random model: RTN, AWQ and GPTQ through the real pipeline
(load -> calibrate -> fake-quant eval -> save -> reload), and AWQ's fold rules proven by function preservation."""

from __future__ import annotations

import inspect
import io
import json
import re
import shutil
import tokenize
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import TEXT, make_tiny_model

import llmc_tpu.methods.awq as awq_module
from llmc_tpu.algorithms.awq import ScaleSearch
from llmc_tpu.config import parse_config
from llmc_tpu.engine.blockwise import blocks_of, capture_block_inputs, run_block
from llmc_tpu.engine.forward import whole_model_logits
from llmc_tpu.eval.ppl import perplexity, windows
from llmc_tpu.export.gptq_checkpoint import read_gptq_checkpoint
from llmc_tpu.methods.base import BlockContext
from llmc_tpu.models.loading import ModelLoadError, load_model
from llmc_tpu.models.registry import REGISTRY, attention_geometry, find_spec, models_table_markdown
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.preflight import PreflightError
from llmc_tpu.tpu.rtn import TpuWeightFormat, quantize_weight

REPO = Path(__file__).resolve().parent.parent

# tiny model name (tests/tiny_models.py) -> make_tiny_model arguments
MODELS: dict[str, dict] = {
    "llama": {}, "qwen2": {}, "qwen3": {}, "mistral": {}, "stablelm": {}, "gemma2": {}, "phi": {}, "phi3": {},
    "bloom": {}, "gpt_bigcode": {}, "opt": {}, "falcon": {}, "falcon_40b": {},
    # one expert per token and router rows (u, -u, v, 0): expert 3 is never picked (RTN fallback)
    "qwen2_moe": {"dead_expert": True, "num_experts_per_tok": 1},
    "qwen3_moe": {}, "mixtral": {}, "deepseek_v2": {},
}
# AWQ folds beyond a plain RMSNorm -> Linear: LayerNorm biases, Gemma's (1 + w), fused Linears' parts,
# parallel blocks, MoE routers and experts, MLA's inner norms
SPECIAL_FOLDS = ["stablelm", "gemma2", "phi", "phi3", "bloom", "gpt_bigcode", "opt", "falcon", "falcon_40b",
                 "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2"]
FMT = TpuWeightFormat()  # the pipeline's default: W4 asymmetric g64, bf16, bm1684x


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_tiny_model(tmp_path_factory.mktemp(name) / "m", name, **MODELS[name])
        return built[name]

    return get


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "eval.txt"  # the report calls it "eval"
    p.write_text(TEXT[:1200].replace(". ", ".\n"), encoding="utf-8")  # about 10 windows of 32 tokens
    return p


def run(model: Path, method: str, text: Path, save: Path, trust_remote_code: bool = False, **special):
    cfg = {"model": {"path": str(model), "torch_dtype": "float32", "trust_remote_code": trust_remote_code},
           "calib": {"name": "custom_txt", "path": str(text), "n_samples": 4, "seq_len": 32},
           "eval": {"name": "custom_ppl", "path": str(text), "seq_len": 32, "bs": 4},
           "quant": {"method": method, "special": special},
           "save": {"save_path": str(save), "save_fake": True}}
    return Quantizer(parse_config(cfg), progress=False).run()


def block_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every 2-D decoder-block weight of a saved folder, by checkpoint key."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()
                        if re.search(r"\.(layers|h)\.\d+\.", k) and k.endswith(".weight") and len(st.get_slice(k).get_shape()) == 2})
    return out


def reloaded_ppl(folder: Path, text: Path, trust_remote_code: bool = False) -> float:
    loaded = load_model(str(folder), torch_dtype="float32", trust_remote_code=trust_remote_code)
    ids = loaded.tokenizer(text.read_text(), return_tensors="pt").input_ids[0]
    return perplexity(whole_model_logits(loaded.model, windows(ids, 32), 4, torch.device("cpu"))).ppl


@pytest.mark.parametrize("method", ["Awq", "GPTQ"])
@pytest.mark.parametrize("name", list(MODELS))
def test_family_end_to_end(name, method, tiny, text_file, tmp_path):
    model = tiny(name)
    report = run(model, method, text_file, tmp_path / "out", **({"n_grid": 4} if method == "Awq" else {}))
    spec = find_spec(report.model["model_type"])
    assert report.model["family"] == spec.display_name
    assert all(torch.isfinite(torch.tensor(v)) for row in report.ppl.values() for v in row.values()), report.ppl
    fake = report.ppl["fake_quant"]["eval"]
    assert fake != report.ppl["pretrain"]["eval"] and abs(fake / report.ppl["pretrain"]["eval"] - 1) < 0.2
    loaded = load_model(str(model), torch_dtype="float32")  # the Linears the registry says a block has
    n_linears = sum(len(spec.block_linear_names(b)) for b in blocks_of(loaded.model, spec))
    assert report.quantized["n_linears"] == n_linears
    # reload: the saved fake-quant model gives the reported fake-quant perplexity (bf16 weights). A router's top-k
    # can pick another expert for a token once its weights are bf16 (seen: mixtral GPTQ 0.30%, dense models <= 0.07%)
    out = tmp_path / "out"
    moe = name in ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2")
    assert reloaded_ppl(out / "fake_quant_model", text_file) == pytest.approx(fake, rel=1e-2 if moe else 3e-3)
    fake_w = block_weights(out / "fake_quant_model")
    if method == "Awq":  # the handoff: TPU-MLIR's RTN of the saved float weights is exactly the fake-quant model
        trans_w = block_weights(out / "transformed_model")
        changed = [k for k in trans_w if not torch.equal(trans_w[k], fake_w[k])]
        assert len(changed) == n_linears
        for k in changed:
            expected = quantize_weight(trans_w[k].float(), FMT).dequantize().to(torch.bfloat16)
            assert torch.equal(fake_w[k], expected), k
    else:  # the GPTQ checkpoint holds every Linear's codes, and the fake-quant model computes with them
        codes = read_gptq_checkpoint(out / "gptq_tpu_model", FMT)
        assert len(codes) == n_linears
        for linear, q in codes.items():
            key = linear + ".weight"
            for pattern, repl in spec.checkpoint_renames:  # Mixtral: transformers writes block_sparse_moe
                key = key if key in fake_w else re.sub(pattern, repl, key)
            assert torch.equal(fake_w[key], q.dequantize().to(torch.bfloat16)), linear
    if spec.experts is not None:  # every expert calibrated with the tokens routed to it, or counted
        blocks = report.method["blocks"]
        if method == "GPTQ":
            tokens = {f"{b['block']}.{n}": note["tokens"] for b in blocks for note in b["gptq"] for n in note["layers"]
                      if ".experts." in n}
            assert tokens and all((t == 0) == (".experts.3." in n and name == "qwen2_moe") for n, t in tokens.items())
        dead = sorted(f"{spec.blocks}.{i}.mlp.experts.3.{p}" for i in range(2) for p in spec.experts.names)
        assert sorted(report.quantized["uncalibrated"]) == (dead if name == "qwen2_moe" else [])


@pytest.mark.parametrize("name", ["llama", "phi3", "falcon", "qwen2_moe", "deepseek_v2"])
def test_family_rtn(name, tiny, text_file, tmp_path):
    report = run(tiny(name), "RTN", text_file, tmp_path / "out")
    assert report.ppl["transformed"] == report.ppl["pretrain"]
    assert report.ppl["fake_quant"]["eval"] == pytest.approx(reloaded_ppl(tmp_path / "out" / "fake_quant_model", text_file),
                                                             rel=3e-3)
    assert report.quantized["uncalibrated"] == []  # RTN needs no calibration: nothing to count


def random_scales(monkeypatch, seed: int = 0) -> None:
    """Make AWQ's search return a random positive scale per channel: the fold itself is what is tested."""
    gen = torch.Generator().manual_seed(seed)

    def search(x_mean, w_mean, loss_fn, n_grid=20, version="v2"):
        s = torch.exp(0.5 * torch.randn(x_mean.shape, generator=gen)).to(x_mean.device)
        return ScaleSearch(s, 0.5, 0.0, 0.0, [])

    monkeypatch.setattr(awq_module, "search_scale", search)


@pytest.mark.parametrize("name", [*SPECIAL_FOLDS, "internlm2_standin"])
def test_awq_fold_preserves_logits(name, tiny, standin_internlm2, monkeypatch):
    """With random scales and no clipping, every fold rule (LayerNorm bias, Gemma's 1 + w, fused parts,
    parallel blocks, MoE routers and experts, GQA repeat over fused v) keeps the float model's function."""
    random_scales(monkeypatch)
    remote = name == "internlm2_standin"
    loaded = load_model(str(standin_internlm2 if remote else tiny(name)), torch_dtype="float32", trust_remote_code=remote)
    model, spec = loaded.model, loaded.spec
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    special = parse_config({"model": {"path": "m"}, "save": {"save_path": "s"},
                            "quant": {"method": "Awq", "special": {"weight_clip": False, "gqa_o_proj": "repeat"}}}).quant.special
    method = awq_module.AwqMethod(special)
    inputs = capture_block_inputs(model, spec, [ids])
    scaled = []
    for i, block in enumerate(blocks_of(model, spec)):
        ctx = BlockContext(i, block, spec, FMT, torch.device("cpu"), inputs, head_dim=attention_geometry(model.config)[2],
                           config=model.config)
        method.process_block(ctx)
        scaled += [f"{spec.blocks}.{i}.{n}" for s in ctx.report["scaled"] for n in s["layers"]]
        for skip in ctx.report["skipped"]:  # only what the registry says cannot be scaled
            assert "no op before it" in skip["reason"] or "no calibration token" in skip["reason"], skip
        inputs = run_block(block, inputs, torch.device("cpu"))
    after = model(input_ids=ids).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    state = model.state_dict()
    assert scaled and all(not torch.equal(state[n + ".weight"], originals[n + ".weight"]) for n in scaled)
    if spec.experts is not None:  # the routers took s too (else the logits above would differ)
        assert not torch.equal(state[f"{spec.blocks}.1.mlp.gate.weight"], originals[f"{spec.blocks}.1.mlp.gate.weight"])


@pytest.fixture(scope="module")
def standin_internlm2(tmp_path_factory) -> Path:
    """A remote-code model folder (auto_map + modeling .py files) in InternLM2's layout, built through
    transformers' remote-code path; the code is our stand-in (tests/standin_internlm2), not InternLM2's."""
    from tiny_models import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("internlm2_standin") / "m"
    folder.mkdir()
    for f in (Path(__file__).parent / "standin_internlm2").glob("*.py"):
        shutil.copy(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "internlm2", "architectures": ["StandInInternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_standin.StandInInternLM2Config",
                     "AutoModelForCausalLM": "modeling_standin.StandInInternLM2ForCausalLM"},
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                             trust_remote_code=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else p.normal_(1, 0.2)
    model.to(torch.bfloat16).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["Awq", "GPTQ"])
def test_remote_code_layout_end_to_end(method, standin_internlm2, text_file, tmp_path):
    """model.trust_remote_code: true loads the folder's own code; the InternLM2 entry (grouped wqkv, w1/w3/w2)
    drives AWQ and GPTQ on it, and the saved folders reload through the same code."""
    report = run(standin_internlm2, method, text_file, tmp_path / "out", trust_remote_code=True,
                 **({"n_grid": 4, "gqa_o_proj": "repeat"} if method == "Awq" else {}))
    assert report.model["family"] == "InternLM2" and report.quantized["n_linears"] == 2 * 5
    if method == "Awq":  # wo is scaled through the v rows of the grouped wqkv, repeated over 2 q heads per kv head
        assert any(s["layers"] == ["attention.wo"] for b in report.method["blocks"] for s in b["scaled"])
    fake = tmp_path / "out" / "fake_quant_model"
    assert (fake / "modeling_standin.py").is_file()
    assert reloaded_ppl(fake, text_file, trust_remote_code=True) == pytest.approx(report.ppl["fake_quant"]["eval"], rel=3e-3)


@pytest.mark.parametrize("model_type", sorted(n for n, s in REGISTRY.items() if s.remote_code))
def test_remote_code_families_need_trust_remote_code(model_type, tmp_path):
    """InternLM2, ChatGLM, MiniCPM, Qwen (v1) run their own modeling code: only with model.trust_remote_code."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="set model.trust_remote_code: true"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="auto_map names no AutoModelForCausalLM"):
        load_model(str(tmp_path), trust_remote_code=True)


def test_fused_parts_tpu_mlir_splits_must_follow_the_npu_rule(tmp_path, text_file):
    """Phi3's qkv_proj is cut into q/k/v by llm_convert: a 32-row k on bm1684x (64 NPUs) would be
    quantized differently from the fused Linear we quantize, so it is refused before any work."""
    model = make_tiny_model(tmp_path / "m", "phi3", heads=4, kv_heads=1)  # k, v: 32 rows
    with pytest.raises(PreflightError, match=r"cuts it into q/k/v of \[128, 32, 32\] rows"):
        run(model, "RTN", text_file, tmp_path / "out")


def test_algorithms_have_no_family_code():
    """A new family is a registry entry: the methods, engine and pipeline never name a model family (in code
    or messages; comments may give examples)."""
    import llmc_tpu.engine.blockwise
    import llmc_tpu.fake_quant
    import llmc_tpu.methods.gptq
    import llmc_tpu.pipeline

    families = {n for s in REGISTRY.values() for n in (s.model_type, s.display_name, *s.aliases) if len(n) > 2}
    for module in (awq_module, llmc_tpu.methods.gptq, llmc_tpu.fake_quant, llmc_tpu.engine.blockwise, llmc_tpu.pipeline):
        tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(module)).readline)
        source = " ".join(t.string for t in tokens if t.type != tokenize.COMMENT).lower()  # code and strings
        found = sorted(f for f in families if re.search(rf"\b{re.escape(f.lower())}\b", source))
        assert not found, f"{module.__name__} names {found}"


def test_readme_models_table_is_the_registry():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert models_table_markdown() in readme, "README's Models table is stale: paste models_table_markdown()"
