"""VLMs end to end on tiny random models (Qwen2-VL, Qwen2.5-VL, Llava, InternVL): image+text calibration,
answer perplexity and MME eval, saving with the processor files, reload; samples.json errors; MME extraction."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_vlm import make_images, make_samples, make_tiny_internvl, make_tiny_llava, make_tiny_qwen2_vl

from llmc_tpu.config import parse_config
from llmc_tpu.config.errors import ConfigError
from llmc_tpu.data.multimodal import load_samples, make_batches
from llmc_tpu.data.text import DataError
from llmc_tpu.engine.blockwise import capture_block_inputs
from llmc_tpu.models.loading import load_model
from llmc_tpu.pipeline import Quantizer
from llmc_tpu.preflight import PreflightError
from llmc_tpu.tpu.rtn import TpuWeightFormat, quantize_weight

REPO = Path(__file__).resolve().parent.parent
BUILDERS = {"qwen2_vl": make_tiny_qwen2_vl, "qwen2_5_vl": lambda p: make_tiny_qwen2_vl(p, "qwen2_5_vl"),
            "llava": make_tiny_llava, "internvl": make_tiny_internvl}
PROCESSOR_FILES = ("preprocessor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = BUILDERS[family](tmp_path_factory.mktemp(family))
        return cache[family]
    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_samples(tmp_path_factory.mktemp("vlm_data"), 4)


def vlm_config(model: Path, data: Path, save_path: Path, method: str, **over) -> dict:
    cfg = {"model": {"path": str(model), "torch_dtype": "float32"},
           "calib": {"name": "custom_mm", "path": str(data), "n_samples": 5, "bs": -1, "seq_len": 512, "padding": True,
                     "apply_chat_template": True, "add_answer": True},
           "eval": {"name": "custom_ppl", "path": str(data), "bs": 2},
           "quant": {"method": method},
           "save": {"save_path": str(save_path), "save_fake": True}, "run": {"task_type": "VLM", "device": "cpu"}}
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def answer_ppl(folder: Path, data: Path) -> float:
    """Answer perplexity of a saved model folder, loaded afresh (fp32)."""
    from llmc_tpu.eval.vlm import answer_perplexity, vlm_logits

    loaded = load_model(str(folder), torch_dtype="float32")
    batches = make_batches(loaded.processor, load_samples(data), 2, True, True, True)
    return answer_perplexity(vlm_logits(loaded.model, loaded.spec, batches, torch.device("cpu"), False)).ppl


@pytest.mark.parametrize("family,method", [("qwen2_vl", "Awq"), ("qwen2_vl", "GPTQ"), ("llava", "Awq"),
                                           ("llava", "GPTQ"), ("internvl", "GPTQ")])
def test_vlm_end_to_end(family, method, models, data, tmp_path):
    save = tmp_path / "out"
    report = Quantizer(parse_config(vlm_config(models(family), data, save, method)), progress=False).run()
    calib = report.data["calib"]
    assert calib["name"] == "custom_mm" and calib["used_samples"] == 5 and calib["images"] == 5
    ev = report.data["eval"][data.name]
    assert ev["kind"] == "answer perplexity" and ev["samples"] == 5 and ev["answer_tokens"] > 0
    assert set(report.ppl) == {"pretrain", "transformed", "fake_quant"}
    assert report.ppl["fake_quant"][data.name] != report.ppl["pretrain"][data.name]
    handoff = "transformed_model" if method == "Awq" else "gptq_tpu_model"
    for folder in (handoff, "fake_quant_model"):  # the whole VLM with its processor files
        for name in PROCESSOR_FILES:
            assert (save / folder / name).is_file(), (folder, name)
    # the saved fake-quant VLM reloads (processor included) and scores what the run reported
    assert answer_ppl(save / "fake_quant_model", data) == pytest.approx(report.ppl["fake_quant"][data.name], rel=2e-3)
    assert report.model["vision"]["quantized"] is False
    text = (save / "report.md").read_text()
    assert "## Data" in text and "custom_mm" in text


def test_gptq_checkpoint_keeps_the_published_key_layout(models, data, tmp_path):
    """TPU-MLIR's Qwen2-VL converter reads model.layers.* and visual.*: the checkpoint keeps that layout."""
    save = tmp_path / "out"
    Quantizer(parse_config(vlm_config(models("qwen2_vl"), data, save, "GPTQ", save={"save_fake": False})),
              progress=False).run()
    keys = set(load_file(save / "gptq_tpu_model" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.qweight" in keys and "visual.blocks.0.attn.qkv.weight" in keys
    assert not any("language_model" in k for k in keys)
    assert set(load_file(models("qwen2_vl") / "model.safetensors")) - {k for k in keys} <= {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
         "mlp.down_proj")}


def test_quant_objects_vision_quantizes_the_tower_with_tpu_rtn(models, data, tmp_path):
    model = models("qwen2_5_vl")
    runs = {}
    for objects in (["language"], ["vision", "language"]):
        save = tmp_path / "_".join(objects)
        cfg = vlm_config(model, data, save, "RTN", quant={"quant_objects": objects})
        runs[len(objects)] = (Quantizer(parse_config(cfg), progress=False).run(), load_file(save / "fake_quant_model" / "model.safetensors"))
    original = load_file(model / "model.safetensors")
    name = "visual.blocks.0.mlp.down_proj.weight"
    assert torch.equal(runs[1][1][name], original[name])  # [language]: the tower stays float
    expected = quantize_weight(original[name].float(), TpuWeightFormat()).dequantize().to(torch.bfloat16)
    assert torch.equal(runs[2][1][name], expected)
    vision = runs[2][0].method["vision"]
    assert vision["linears"] >= 4 and "bf16" in vision["note"]
    assert runs[2][0].ppl["fake_quant"] != runs[1][0].ppl["fake_quant"]


def test_first_block_inputs_come_from_the_multimodal_prefill(models, data):
    loaded = load_model(str(models("qwen2_vl")), torch_dtype="float32")
    samples = load_samples(data)
    batch = make_batches(loaded.processor, samples[:1], 1, True, True, False)[0]
    ids = batch.inputs["input_ids"]
    image = ids[0] == loaded.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image.sum() > 0
    (inp,) = capture_block_inputs(loaded.model, loaded.spec, [batch.inputs])
    assert inp.hidden.shape[:2] == ids.shape
    embed = loaded.model.get_submodule(loaded.spec.embeddings[0])
    text_only = embed(ids)
    assert torch.equal(inp.hidden[0, ~image], text_only[0, ~image])
    assert not torch.allclose(inp.hidden[0, image], text_only[0, image])  # the vision tower's embeddings
    cos, _ = inp.kwargs["position_embeddings"]  # M-RoPE: image tokens share temporal positions
    assert cos.shape[-2] == ids.shape[1]


def test_image_size_limits_change_the_image_tokens(models, tmp_path):
    folder = tmp_path / "big"
    make_images(folder, 1, size=(224, 168))
    (folder / "samples.json").write_text(json.dumps([{"image": "img0.png", "question": "q", "answer": "a"}]))
    n = {}
    for max_pixels in (28 * 28 * 4, 28 * 28 * 16):
        loaded = load_model(str(models("qwen2_vl")), torch_dtype="float32", max_pixels=max_pixels)
        assert loaded.processor.settings["max_pixels"] == max_pixels
        batch = make_batches(loaded.processor, load_samples(folder), 1, True, True, False)[0]
        n[max_pixels] = int(batch.inputs["mm_token_type_ids"].sum())
    assert 0 < n[28 * 28 * 4] < n[28 * 28 * 16] <= 16  # one token per 2x2 patches of 14 px


def test_vlm_defaults_use_the_shipped_data(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped folders are found from anywhere
    cfg = parse_config({"model": {"path": str(models("qwen2_vl")), "torch_dtype": "float32"}, "quant": {"method": "GPTQ"},
                        "save": {"save_path": str(tmp_path / "out")}, "run": {"task_type": "VLM", "device": "cpu"},
                        "eval": {"eval_pos": ["fake_quant"]}})
    assert cfg.calib.name == "custom_mm" and cfg.calib.path.endswith("data/VLM/cali/general_custom_data")
    assert (cfg.calib.n_samples, cfg.calib.bs, cfg.calib.padding, cfg.calib.apply_chat_template, cfg.calib.add_answer) == (
        8, 1, True, True, True)
    assert cfg.eval.name == "custom_ppl" and cfg.eval.path.endswith("data/VLM/eval/general_custom_data")
    report = Quantizer(cfg, progress=False).run()
    assert report.data["calib"]["used_samples"] == 8 and report.data["calib"]["processor"]["max_pixels"] == 256 * 28 * 28
    assert report.data["eval"]["general_custom_data"]["samples"] == 7
    assert "general_custom_data" in (tmp_path / "out" / "report.md").read_text()


def test_shipped_data_is_valid():
    for folder in ("cali", "eval"):
        samples = load_samples(REPO / "data" / "VLM" / folder / "general_custom_data")
        assert len(samples) >= 6 and any(not s.images for s in samples)


def test_samples_longer_than_seq_len_are_dropped_and_counted(models, data, tmp_path):
    cfg = vlm_config(models("qwen2_vl"), data, tmp_path / "out", "GPTQ", calib={"seq_len": 63})
    report = Quantizer(parse_config(cfg), progress=False).run()
    calib = report.data["calib"]
    assert calib["dropped_too_long"] > 0 and calib["used_samples"] + calib["dropped_too_long"] == 5
    assert any("longer than calib.seq_len 63" in n for n in calib["notes"])
    assert any("only 2 usable samples" in n for n in calib["notes"])
    cfg = vlm_config(models("qwen2_vl"), data, tmp_path / "out2", "GPTQ", calib={"seq_len": 5})
    with pytest.raises(DataError, match=r"samples.json: all 5 samples are longer than calib.seq_len 5"):
        Quantizer(parse_config(cfg), progress=False).run()


# -- samples.json errors -------------------------------------------------------------------------
def _folder(tmp_path: Path, content: str | None = None, rows=None) -> Path:
    folder = tmp_path / "d"
    make_images(folder / "images", 2)
    text = content if content is not None else json.dumps(rows)
    (folder / "samples.json").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("content,rows,message", [
    ('[{"image": "images/img0.png", "question": "q" "answer": "a"}]', None, r"not valid JSON: .* line 1, column \d+"),
    ("", None, "empty file"),
    ("  \n", None, "empty file"),
    ("{}", None, "expected a JSON list"),
    ("[]", None, "the list is empty"),
    (None, [{"image": "images/nope.png", "question": "q", "answer": "a"}], r"row 1: image 'images/nope.png' not found"),
    (None, [{"question": "q", "answer": "a"}, {"image": "images/bad.png", "question": "q", "answer": "a"}],
     r"row 2: image 'images/bad.png' is not a readable image"),
    (None, [{"image": "../secret.png", "question": "q", "answer": "a"}], r"row 1: image '../secret.png' is outside the data folder"),
    (None, [{"image": "/etc/hostname", "question": "q", "answer": "a"}], r"row 1: image '/etc/hostname' is outside the data folder"),
    (None, [{"image": "images/../../x.png", "question": "q", "answer": "a"}], "is outside the data folder"),
    (None, [{"image": ["images/img0.png", 3], "question": "q", "answer": "a"}], "row 1: image must be a path"),
    (None, [{"image": "images/img0.png", "answer": "a"}], "row 1: no 'question'"),
    (None, [{"image": "images/img0.png", "question": "q"}], "row 1: no 'answer'"),
    (None, [{"image": "images/img0.png", "question": 3, "answer": "a"}], "row 1: 'question' must be a string"),
    (None, ["just text"], "row 1: expected an object"),
])
def test_samples_json_errors_name_the_file_and_row(tmp_path, content, rows, message):
    folder = _folder(tmp_path, content, rows)
    (folder / "images" / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "secret.png").write_bytes((folder / "images" / "img0.png").read_bytes())
    with pytest.raises(DataError, match=message) as info:
        load_samples(folder)
    assert str(folder / "samples.json") in str(info.value)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = _folder(tmp_path, rows=[{"image": "images/link.png", "question": "q", "answer": "a"}])
    outside = tmp_path / "outside.png"
    outside.write_bytes((folder / "images" / "img0.png").read_bytes())
    os.symlink(outside, folder / "images" / "link.png")
    with pytest.raises(DataError, match="outside the data folder"):
        load_samples(folder)


def test_absolute_paths_inside_the_folder_and_text_only_rows_are_fine(tmp_path):
    folder = _folder(tmp_path, rows=[{"image": str((tmp_path / "d" / "images" / "img0.png").resolve()), "question": "q",
                                      "answer": "a"}, {"question": "text only", "answer": "a", "category": "x"}])
    samples = load_samples(folder)
    assert len(samples[0].images) == 1 and samples[1].images == [] and samples[1].extra == {"category": "x"}


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_samples(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no samples.json in this folder"):
        load_samples(tmp_path / "empty")


def test_preflight_reports_a_bad_samples_file_before_loading(models, tmp_path):
    folder = _folder(tmp_path, rows=[{"image": "images/nope.png", "question": "q", "answer": "a"}])
    cfg = vlm_config(models("qwen2_vl"), folder, tmp_path / "out", "Awq")
    with pytest.raises(PreflightError, match=r"samples.json, row 1: image 'images/nope.png' not found"):
        Quantizer(parse_config(cfg), progress=False).run()
    assert not (tmp_path / "out").exists()


# -- config and model checks -----------------------------------------------------------------------
def test_vlm_config_problems(models, data, tmp_path):
    base = vlm_config(models("qwen2_vl"), data, tmp_path / "out", "Awq")
    with pytest.raises(ConfigError, match="custom_mm .* needs run.task_type: VLM"):
        parse_config({**base, "run": {"task_type": "LLM"}})
    with pytest.raises(ConfigError, match="save.save_vllm.*not available for VLMs"):
        parse_config({**base, "save": {**base["save"], "save_vllm": True}})
    with pytest.raises(ConfigError, match="must include 'language'"):
        parse_config({**base, "quant": {"method": "Awq", "quant_objects": ["vision"]}})


def test_task_type_must_match_the_model(models, data, tmp_path, tiny_llama, eval_txt):
    cfg = vlm_config(models("qwen2_vl"), data, tmp_path / "out", "RTN", calib={"name": None},
                     eval={"name": "custom_ppl", "path": str(eval_txt)}, run={"task_type": "LLM"})
    cfg["calib"] = {}
    with pytest.raises(PreflightError, match="vision-language model; set run.task_type: VLM"):
        Quantizer(parse_config(cfg), progress=False).run()
    cfg = {"model": {"path": str(tiny_llama)}, "quant": {"method": "RTN"}, "eval": {"name": "custom_ppl", "path": str(eval_txt)},
           "save": {"save_path": str(tmp_path / "o2")}, "run": {"task_type": "VLM"}}
    with pytest.raises(PreflightError, match="has no vision tower; set run.task_type: LLM"):
        Quantizer(parse_config(cfg), progress=False).run()


# -- MME --------------------------------------------------------------------------------------------
def _mme_fixture(folder: Path) -> Path:
    """A stand-in for lmms-lab/MME saved with datasets: two categories, two questions per image."""
    from datasets import Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    rows = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for cat, colour in (("color", "red"), ("existence", "blue")):
        for k in range(2):
            img = PILImage.new("RGB", (40, 30), colour if k == 0 else "white")
            for q, a in ((f"Is there {colour} in the image? Please answer yes or no.", "Yes" if k == 0 else "No"),
                         (f"Is the image all {colour}? Please answer yes or no.", "Yes" if k == 0 else "No")):
                rows["question_id"].append(f"{cat}/{k:04d}.png")
                rows["image"].append(img)
                rows["question"].append(q)
                rows["answer"].append(a)
                rows["category"].append(cat)
    feats = Features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                      "answer": Value("string"), "category": Value("string")})
    DatasetDict({"test": Dataset.from_dict(rows, features=feats)}).save_to_disk(str(folder))
    return folder


def test_mme_extract_and_accuracy(models, tmp_path):
    raw = _mme_fixture(tmp_path / "raw")
    out = tmp_path / "MME"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "mme_extract.py"), "--dataset", str(raw), "--save_path", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "8 questions, 4 images, 2 categories" in proc.stdout
    samples = load_samples(out)
    assert len(samples) == 8 and samples[0].extra["category"] == "color" and samples[0].answer == "Yes"
    assert samples[0].images == samples[1].images  # one file for the two questions of an image
    # the MME eval on the extracted folder
    cfg = vlm_config(models("qwen2_vl"), out, tmp_path / "run", "RTN", eval={"name": "mme", "path": str(out)})
    report = Quantizer(parse_config(cfg), progress=False).run()
    assert set(report.vqa) == {"pretrain", "transformed", "fake_quant"}
    mme = report.vqa["fake_quant"]["mme"]
    assert mme["questions"] == 8 and 0 <= mme["acc"] <= 1 and set(mme["categories"]) == {"color", "existence"}
    assert mme["score"] == pytest.approx(sum(c["score"] for c in mme["categories"].values()))
    assert report.data["eval"]["mme"]["kind"] == "MME yes/no accuracy"


def test_mme_extract_refuses_a_folder_that_is_not_mme(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "ds"))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "mme_extract.py"), "--dataset", str(tmp_path / "ds"),
                           "--save_path", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "columns" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "mme_extract.py"), "--dataset", str(tmp_path / "none"),
                           "--save_path", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a dataset folder" in proc.stderr


def test_mme_without_data_says_how_to_get_it(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = vlm_config(models("qwen2_vl"), tmp_path, tmp_path / "out", "RTN", eval={"name": "mme", "path": None})
    with pytest.raises(PreflightError, match="mme_extract.py"):
        Quantizer(parse_config(cfg), progress=False).run()


def test_internvl_remote_code_layout_is_refused_with_a_pointer(tmp_path):
    from llmc_tpu.models.loading import ModelLoadError, resolve_spec

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "architectures": ["InternVLChatModel"]}))
    with pytest.raises(ModelLoadError, match=r"internvl_chat.*not supported.*'-hf' repos, model_type internvl"):
        resolve_spec(tmp_path, None)


def test_per_block_eval_equals_the_whole_model(models, data):
    """eval.inference_per_block streams the language blocks (prefill and vision tower on the CPU): same answer ppl."""
    from llmc_tpu.eval.vlm import answer_perplexity, vlm_logits

    loaded = load_model(str(models("llava")), torch_dtype="float32")
    batches = make_batches(loaded.processor, load_samples(data), 2, True, True, True)
    cpu = torch.device("cpu")
    whole = answer_perplexity(vlm_logits(loaded.model, loaded.spec, batches, cpu, False))
    per_block = answer_perplexity(vlm_logits(loaded.model, loaded.spec, batches, cpu, True))
    assert per_block.ppl == pytest.approx(whole.ppl, rel=1e-4) and per_block.n_tokens == whole.n_tokens
