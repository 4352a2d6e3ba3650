"""The quantize stage end to end on tiny models: outputs, report, safety of the save path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import make_tiny_model

from llmc_tpu.config import parse_config
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.preflight import PreflightError
from llmc_tpu.tpu.rtn import TpuWeightFormat, quantize_weight

REPO = Path(__file__).resolve().parent.parent


def config(model: Path, eval_txt: Path, save: Path, **quant) -> dict:
    return {
        "model": {"path": str(model), "torch_dtype": "float32"},
        "eval": {"name": "custom_ppl", "path": str(eval_txt), "seq_len": 32, "bs": 4, "eval_token_consist": True},
        "quant": {"method": "RTN", **quant},
        "save": {"save_path": str(save), "save_fake": True},
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_rtn_end_to_end(family, tmp_path, eval_txt):
    model = make_tiny_model(tmp_path / "m", family, tie=family == "qwen2")
    save = tmp_path / "out"
    report = Quantizer(parse_config(config(model, eval_txt, save)), progress=False).run()
    assert sorted(p.name for p in save.iterdir()) == ["fake_quant_model", "manifest.json", "report.json", "report.md",
                                                      "transformed_model"]
    data = json.loads((save / "report.json").read_text())
    assert set(data["ppl"]) == {"pretrain", "transformed", "fake_quant"}
    assert all(isinstance(v, float) for row in data["ppl"].values() for v in row.values())
    assert data["ppl"]["pretrain"]["eval"] == pytest.approx(data["ppl"]["transformed"]["eval"])  # RTN transforms nothing
    assert data["ppl"]["fake_quant"]["eval"] != data["ppl"]["pretrain"]["eval"]
    assert 0 < data["token_consistency"]["eval"] <= 1
    assert data["config"]["run"]["chip"] == "bm1684x" and data["config"]["quant"]["weight"]["group_size"] == 64
    assert "llm_convert.py -m" in data["next_steps"][0] and "-q w4bf16 -g 64 -c bm1684x" in data["next_steps"][0]
    assert report.ppl == data["ppl"]
    # "total" is the process's age at the report: at least the stages outside one another
    times = data["timings_s"]
    outer = ["startup", "load", "quantize", "save", "eval pretrain", "eval transformed", "eval fake_quant"]
    assert times["total"] >= sum(times[k] for k in outer) > 0 and "total" in report.summary()
    # peak memory after each stage: a running peak, never above the process's own count taken after the run
    import resource
    peaks = data["peak_memory_gib"]
    assert {"load", "quantize", "save", "eval pretrain", "quantize: tpu rtn"} <= set(peaks)
    after_run = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert all(0.05 < p["host_rss"] <= after_run + 1e-3 for p in peaks.values())
    assert peaks["save"]["host_rss"] >= peaks["load"]["host_rss"]
    assert "## Peak memory" in (save / "report.md").read_text() and "peak memory: host rss" in report.summary()
    # the handed-over model is bf16 and complete
    trans = save / "transformed_model"
    assert json.loads((trans / "config.json").read_text())["dtype"] == "bfloat16"
    assert (trans / "tokenizer.json").exists() and (trans / "generation_config.json").exists()
    # the fake-quant model holds exactly (q - z) * bf16(s) of the handed-over weights
    tw, fw = load_file(trans / "model.safetensors"), load_file(save / "fake_quant_model" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    expected = quantize_weight(tw[name].float(), TpuWeightFormat()).dequantize()
    assert torch.equal(fw[name].float(), expected.to(torch.bfloat16).float())
    assert torch.equal(tw["model.embed_tokens.weight"], fw["model.embed_tokens.weight"])  # embeddings stay float


def test_fake_quant_eval_uses_tpu_weights(tmp_path, tiny_llama, eval_txt):
    """Re-evaluating the saved fake-quant model (fp32) gives the reported fake_quant perplexity."""
    from llmc_tpu.engine.forward import whole_model_logits
    from llmc_tpu.eval.ppl import perplexity, windows
    from llmc_tpu.models.loading import load_model

    save = tmp_path / "out"
    report = Quantizer(parse_config(config(tiny_llama, eval_txt, save)), progress=False).run()
    # fp32 evaluation of the bf16-saved fake weights; the run evaluated the exact fp32 products
    loaded = load_model(str(save / "fake_quant_model"), torch_dtype="float32")
    ids = loaded.tokenizer(eval_txt.read_text(), return_tensors="pt").input_ids[0]
    ppl = perplexity(whole_model_logits(loaded.model, windows(ids, 32), 4, torch.device("cpu"))).ppl
    assert ppl == pytest.approx(report.ppl["fake_quant"]["eval"], rel=2e-3)


def test_existing_save_path_is_refused_and_overwrite_replaces(tmp_path, tiny_llama, eval_txt):
    save = tmp_path / "out"
    save.mkdir()
    (save / "mine.txt").write_text("user data")
    cfg = parse_config(config(tiny_llama, eval_txt, save))
    with pytest.raises(PreflightError, match="already exists.*--overwrite"):
        Quantizer(cfg, progress=False).run()
    assert (save / "mine.txt").read_text() == "user data"
    Quantizer(cfg, overwrite=True, progress=False).run()
    assert not (save / "mine.txt").exists() and (save / "report.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_failed_run_leaves_nothing(tmp_path, tiny_llama, eval_txt):
    save = tmp_path / "out"
    cfg = parse_config(config(tiny_llama, eval_txt, save, weight={"group_size": 96}))
    with pytest.raises(PreflightError, match="group_size 96 does not divide"):
        Quantizer(cfg, progress=False).run()
    assert list(tmp_path.iterdir()) == []


def test_shapes_tpu_mlir_gets_wrong_are_refused(tmp_path, eval_txt):
    model = make_tiny_model(tmp_path / "m", "llama", hidden=128, heads=4, kv_heads=1)  # k/v out 32
    cfg = config(model, eval_txt, tmp_path / "out", weight={"bit": 8, "symmetric": True, "granularity": "per_channel"})
    with pytest.raises(PreflightError, match="signed codes read as unsigned"):
        Quantizer(parse_config(cfg), progress=False).run()
    cfg["run"] = {"chip": "bm1688"}  # 32 NPUs: k/v keep their codes
    report = Quantizer(parse_config(cfg), progress=False).run()
    assert any("computes with them read as unsigned" in w for w in report.warnings)  # TPU-MLIR 1.30.2's W8 per-channel bug
    odd = make_tiny_model(tmp_path / "odd", "llama", hidden=192, heads=3, kv_heads=1)  # K = 192
    cfg = config(odd, eval_txt, tmp_path / "out2", weight={"bit": 4, "granularity": "per_channel"})
    with pytest.raises(PreflightError, match="multiple of 128"):
        Quantizer(parse_config(cfg), progress=False).run()


def test_bm1688_keeps_fewer_rows_in_float(tmp_path, eval_txt):
    """k/v projections with 32 outputs: folded to bf16 on bm1684x (64 NPUs), W4 codes on bm1688 (32 NPUs)."""
    model = make_tiny_model(tmp_path / "m", "llama", hidden=128, heads=4, kv_heads=1)  # head_dim 32 -> k/v out 32
    reports = {}
    for chip in ("bm1684x", "bm1688"):
        cfg = config(model, eval_txt, tmp_path / chip)
        cfg["run"] = {"chip": chip}
        reports[chip] = Quantizer(parse_config(cfg), progress=False).run().quantized
    assert reports["bm1684x"]["folded_to_float"] == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv")
    assert reports["bm1688"]["folded_to_float"] == []
    # a 96-row Linear keeps codes for 64 rows on bm1684x and all 96 on bm1688
    model96 = make_tiny_model(tmp_path / "m96", "llama", hidden=192, heads=6, kv_heads=3)  # k/v out 96
    rows = {}
    for chip in ("bm1684x", "bm1688"):
        cfg = config(model96, eval_txt, tmp_path / f"{chip}96")
        cfg["run"] = {"chip": chip}
        rows[chip] = Quantizer(parse_config(cfg), progress=False).run().quantized["float_rows"]
    assert rows == {"bm1684x": 2 * 2 * 32, "bm1688": 0}


def test_block_streaming_eval_matches(tmp_path, tiny_llama, eval_txt):
    a = Quantizer(parse_config(config(tiny_llama, eval_txt, tmp_path / "a")), progress=False).run()
    cfg = config(tiny_llama, eval_txt, tmp_path / "b")
    cfg["eval"]["inference_per_block"] = True
    b = Quantizer(parse_config(cfg), progress=False).run()
    for pos in a.ppl:
        assert b.ppl[pos]["eval"] == pytest.approx(a.ppl[pos]["eval"], rel=1e-5)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


def test_entry_script_and_exit_codes(tmp_path, tiny_llama, eval_txt):
    cfg = config(tiny_llama, eval_txt, tmp_path / "out")
    cfg_file = tmp_path / "c.yml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    ok = run_cli("tpu/llm_quant.py", "--config_path", str(cfg_file), "--llmc_tpu_path", ".", "-q")
    assert ok.returncode == 0, ok.stderr
    assert "fake_quant" in ok.stdout and "llm_convert.py" in ok.stdout
    assert "--llmc_tpu_path is no longer needed" in ok.stderr
    again = run_cli("tpu/llm_quant.py", "--config", str(cfg_file))
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    cfg["quant"]["weight"] = {"bit": 5}
    cfg_file.write_text(yaml.safe_dump(cfg))
    bad = run_cli("-m", "llmc_tpu", "quantize", "--config", str(cfg_file))
    assert bad.returncode == 2 and "quant.weight.bit = 5" in bad.stderr and "Traceback" not in bad.stderr


def test_help_teaches():
    out = run_cli("-m", "llmc_tpu", "--help")
    assert out.returncode == 0 and "example" in out.stdout and "exit codes" in out.stdout
    out = run_cli("tpu/llm_quant.py", "--help")
    assert out.returncode == 0 and "--config" in out.stdout


def test_f16_mode_hands_over_float16(tmp_path, tiny_llama, eval_txt):
    """llm_convert takes -q w4f16 only from a float16 model: save it so and quantize the f16 values."""
    cfg = config(tiny_llama, eval_txt, tmp_path / "out")
    cfg["run"] = {"tpu_dtype": "f16"}
    report = Quantizer(parse_config(cfg), progress=False).run()
    trans = tmp_path / "out" / "transformed_model"
    assert json.loads((trans / "config.json").read_text())["dtype"] == "float16"
    assert "-q w4f16" in report.next_steps[0]
    tw = load_file(trans / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert tw[name].dtype == torch.float16
    fmt = TpuWeightFormat(scale_dtype="float16")
    q = quantize_weight(tw[name].float(), fmt)
    assert q.stored_scale.dtype == torch.float16


def test_nan_is_named_with_block_and_layer(tmp_path, eval_txt):
    from safetensors.torch import save_file

    from llmc_tpu.pipeline import PipelineError

    folder = make_tiny_model(tmp_path / "m", "llama", dtype=torch.float32)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = config(folder, eval_txt, tmp_path / "out")
    cfg["quant"]["method"] = "Awq"
    cfg["calib"] = {"name": "custom_txt", "path": str(eval_txt), "n_samples": 4, "seq_len": 32}
    cfg["eval"]["eval_pos"] = []
    with pytest.raises(PipelineError, match=r"model.layers.1(.mlp.up_proj: the weight has NaN/Inf| NaN/Inf in the block's outputs)"):
        Quantizer(parse_config(cfg), progress=False).run()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("eval_pos", "save_fake"), [([], False), (["fake_quant"], False), (["fake_quant"], True)])
def test_rtn_codes_are_kept_only_where_a_later_stage_reads_them(tmp_path, tiny_llama, eval_txt, eval_pos, save_fake):
    """The float handoff alone needs no codes: none are kept (on a GPU they had piled up, a 7B's 13 GB). The
    fake_quant eval alone recomputes them where the model runs: none kept either. save_fake reads them: kept, in
    host memory. The report counts the Linears either way."""
    from llmc_tpu.models.loading import load_model

    cfg = config(tiny_llama, eval_txt, tmp_path / "out")
    cfg["eval"]["eval_pos"] = eval_pos
    cfg["save"]["save_fake"] = save_fake
    q = Quantizer(parse_config(cfg), progress=False)
    q.device = torch.device("cpu")
    results = q.quantize(load_model(str(tiny_llama)))
    assert len(q.quant_counts["names"]) == 7 * 2  # 7 Linears in each of the tiny Llama's 2 blocks
    if save_fake:
        assert len(results) == 14 and all(r.codes.device.type == "cpu" for r in results.values())
    else:
        assert results == {}
    report = Quantizer(parse_config(cfg), progress=False).run()
    assert report.quantized["n_linears"] == 14 and report.quantized["float_rows"] == 0


@pytest.mark.parametrize("per_block", [False, True])
def test_fake_quant_ppl_is_the_same_without_a_fake_quant_model(tmp_path, tiny_llama, eval_txt, per_block):
    """AWQ changes the weights: the fake_quant eval that recomputes RTN where the model runs (no RTN codes kept,
    no fake-quant copy of the model) gives the perplexity of the fake-quant model that save_fake writes, exactly."""
    ppl = {}
    for save_fake in (False, True):
        cfg = config(tiny_llama, eval_txt, tmp_path / f"out_{save_fake}")
        cfg["quant"]["method"] = "Awq"
        cfg["calib"] = {"name": "custom_txt", "path": str(eval_txt), "n_samples": 4, "seq_len": 32}
        cfg["eval"]["eval_pos"] = ["fake_quant"]
        cfg["eval"]["inference_per_block"] = per_block
        cfg["save"]["save_fake"] = save_fake
        ppl[save_fake] = Quantizer(parse_config(cfg), progress=False).run().ppl["fake_quant"]
    assert ppl[False] == ppl[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's start overlaps the model's load on CUDA only")
def test_cuda_starts_in_a_thread_while_the_model_loads():
    from llmc_tpu.pipeline import start_device

    assert start_device(torch.device("cpu")) is None
    thread = start_device(torch.device("cuda"))
    thread.join()
    assert torch.cuda.is_initialized()


def test_load_model_hands_over_the_tokenizer_before_the_model(tiny_llama, monkeypatch):
    import transformers

    from llmc_tpu.models.loading import load_model

    events = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: events.append("model") or real(*a, **k))
    loaded = load_model(str(tiny_llama), on_tokenizer=lambda tok, spec: events.append(("tokenizer", spec.model_type)))
    assert events == [("tokenizer", "llama"), "model"]
    assert loaded.tokenizer is not None


def test_calibration_is_tokenized_in_a_thread_while_the_model_loads(tmp_path, tiny_llama, eval_txt, monkeypatch):
    """The calibration windows are tokenized once, on the calibration thread, and the report describes the samples
    a plain call builds."""
    import threading

    from transformers import AutoTokenizer

    import llmc_tpu.pipeline as pipeline
    from llmc_tpu.data.calib import calibration_batches

    calls = []

    def spy(calib, tokenizer):
        calls.append(threading.current_thread().name)
        return calibration_batches(calib, tokenizer)

    monkeypatch.setattr(pipeline, "calibration_batches", spy)
    cfg = config(tiny_llama, eval_txt, tmp_path / "out")
    cfg["quant"]["method"] = "GPTQ"
    cfg["calib"] = {"name": "custom_txt", "path": str(eval_txt), "n_samples": 4, "seq_len": 32}
    cfg["eval"]["eval_pos"] = []
    report = Quantizer(parse_config(cfg), progress=False).run()
    assert len(calls) == 1 and calls[0].startswith("llmc_tpu-calibration")
    batches, info = calibration_batches(parse_config(cfg).calib, AutoTokenizer.from_pretrained(tiny_llama))
    assert report.data["calib"]["source_tokens"] == info["source_tokens"]
    assert report.data["calib"]["n_samples"] == sum(b.shape[0] for b in batches) == 4
