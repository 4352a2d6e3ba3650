"""Bad input: a clear message, a non-zero exit, no traceback, and no partial output. One row per case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_models import make_tiny_model

from llmc_tpu.cli import main

BASE = {"model": {"path": "{model}", "torch_dtype": "float32"},
        "eval": {"name": "custom_ppl", "path": "{eval}", "seq_len": 32, "bs": 8},
        "quant": {"method": "RTN"}, "save": {"save_path": "{save}"}}


def merge(base: dict, patch: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in patch.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


DROP = object()

# (id, patch to the base config, expected exit code, text the message must contain)
CONFIG_CASES = [
    ("unknown-section", {"evl": {}}, 2, "evl: unknown key (did you mean 'eval'?)"),
    ("unknown-model-key", {"model": {"tpye": "llama"}}, 2, "model.tpye: unknown key (did you mean 'type'?)"),
    ("missing-model-path", {"model": {"path": DROP}}, 2, "model.path: required key is missing"),
    ("missing-save", {"save": DROP}, 2, "save: required key is missing"),
    ("bit-3", {"quant": {"weight": {"bit": 3}}}, 2, "quant.weight.bit = 3: Input should be 4 or 8"),
    ("granularity-typo", {"quant": {"weight": {"granularity": "per_grop"}}}, 2, "quant.weight.granularity = 'per_grop'"),
    ("w4-per-channel-sym", {"quant": {"weight": {"granularity": "per_channel", "symmetric": True}}}, 2, "4-bit per_channel is asymmetric only"),
    ("w8-per-channel-asym", {"quant": {"weight": {"bit": 8, "granularity": "per_channel"}}}, 2, "8-bit per_channel is symmetric only"),
    ("group-size-0", {"quant": {"weight": {"group_size": 0}}}, 2, "quant.weight.group_size = 0: per_group needs a positive group size"),
    ("chip", {"run": {"chip": "bm1686"}}, 2, "run.chip = 'bm1686'"),
    ("tpu-dtype", {"run": {"tpu_dtype": "fp8"}}, 2, "run.tpu_dtype = 'fp8'"),
    ("calib-bs-0", {"calib": {"bs": 0}}, 2, "calib.bs = 0"),
    ("method", {"quant": {"method": "SmoothQuant"}}, 2, "quant.method = 'SmoothQuant': unknown method; allowed: RTN"),
    ("special-option", {"quant": {"method": "Awq", "special": {"clip_symm": True}}}, 2, "quant.special.clip_symm: not an option of Awq (did you mean 'clip_sym'?)"),
    ("percdamp", {"quant": {"method": "GPTQ", "special": {"percdamp": -0.1}}}, 2, "quant.special.percdamp = -0.1"),
    ("eval-pos", {"eval": {"eval_pos": ["pretrained"]}}, 2, "eval.eval_pos.0 = 'pretrained'"),
    ("torch-dtype", {"model": {"torch_dtype": "fp16"}}, 2, "model.torch_dtype = 'fp16'"),
    ("eval-seq-len-0", {"eval": {"seq_len": 0}}, 2, "eval.seq_len = 0"),
    ("n-samples-negative", {"calib": {"n_samples": -1}}, 2, "calib.n_samples = -1"),
    ("bit-string", {"quant": {"weight": {"bit": "four"}}}, 2, "quant.weight.bit = 'four'"),
    ("vision-without-vlm", {"quant": {"quant_objects": ["vision", "language"]}}, 2, "'vision' needs run.task_type: VLM"),
    # model folder problems
    ("model-missing", {"model": {"path": "{tmp}/nope"}}, 1, "no such folder"),
    ("model-is-file", {"model": {"path": "{eval}"}}, 1, "is a file; give the model folder"),
    ("model-type-mismatch", {"model": {"type": "Qwen2"}}, 1, "does not match config.json's model_type 'llama'"),
    ("model-type-unknown", {"model": {"type": "Gpt5"}}, 1, "model.type 'Gpt5' is unknown"),
    ("group-size-96", {"quant": {"weight": {"group_size": 96}}}, 1, "group_size 96 does not divide in_features"),
    ("per-channel-k", {"model": {"path": "{odd}"}, "quant": {"weight": {"granularity": "per_channel"}}}, 1, "multiple of 128"),
    ("hub-offline", {"model": {"path": "nobody/no-such-model"}}, 1, "could not be fetched from the Hugging Face hub"),
    # data problems
    ("eval-missing", {"eval": {"path": "{tmp}/missing.txt"}}, 1, "eval.path"),
    ("eval-empty", {"eval": {"path": "{empty}"}}, 1, "empty.txt: no text"),
    ("eval-not-utf8", {"eval": {"path": "{binary}"}}, 1, "binary.txt: not UTF-8"),
    ("eval-folder-without-txt", {"eval": {"path": "{tmp}/emptydir"}}, 1, "emptydir: no .txt files in this folder"),
    ("eval-not-a-dataset", {"eval": {"name": "wikitext2", "path": "{tmp}/emptydir"}}, 1, "not a dataset folder saved by `datasets`"),
    ("eval-too-short", {"eval": {"seq_len": 100000}}, 1, "fewer than one window of seq_len 100000"),
    ("eval-default-missing", {"eval": {"name": "wikitext2", "path": DROP}}, 1, "tools/download_eval_dataset.py --dataset_name wikitext2"),
    ("eval-paths-mismatch", {"eval": {"name": ["custom_ppl", "custom_ppl"], "path": ["{eval}"]}}, 1, "eval.path has 1 entries for 2"),
    ("calib-missing", {"quant": {"method": "Awq"}, "calib": {"name": "custom_txt", "path": "{tmp}/nocalib.txt"}}, 1, "calib.path"),
    ("calib-too-little", {"quant": {"method": "Awq"}, "calib": {"name": "custom_txt", "path": "{eval}", "n_samples": 4, "seq_len": 100000}}, 1, "fewer than one calib.seq_len window"),
    ("calib-default-missing", {"quant": {"method": "Awq"}}, 1, "tools/download_calib_dataset.py --dataset_name pileval"),
    # save path problems
    ("save-exists", {"save": {"save_path": "{existing}"}}, 1, "already exists; choose another path or pass --overwrite"),
    ("save-under-a-file", {"save": {"save_path": "{eval}/out"}}, 1, "is a file, not a folder"),
    ("device-cuda", {"run": {"device": "cuda"}}, 1, "no CUDA device here"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("world")
    model = make_tiny_model(tmp / "model", "llama")
    odd = make_tiny_model(tmp / "odd", "llama", hidden=192, heads=3, kv_heads=1, layers=1)
    (tmp / "eval.txt").write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    (tmp / "empty.txt").write_text("\n\n", encoding="utf-8")
    (tmp / "binary.txt").write_bytes(b"abc\xff\xfe\xfd")
    (tmp / "emptydir").mkdir()
    (tmp / "existing").mkdir()
    (tmp / "existing" / "keep.txt").write_text("the user's file")
    return {"tmp": str(tmp), "model": str(model), "odd": str(odd), "eval": str(tmp / "eval.txt"),
            "empty": str(tmp / "empty.txt"), "binary": str(tmp / "binary.txt"), "existing": str(tmp / "existing")}


def fill(obj, values):
    if isinstance(obj, dict):
        return {k: fill(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill(v, values) for v in obj]
    return obj.format(**values) if isinstance(obj, str) else obj


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_nothing_written(save: Path, siblings_before: set[str]):
    assert not save.exists() or save.name == "existing"
    new = {p.name for p in save.parent.iterdir()} - siblings_before if save.parent.is_dir() else set()
    assert not [n for n in new if n.startswith(".")], f"temp folders left: {new}"


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_input(case, world, tmp_path, capsys, monkeypatch):
    name, patch, code, needle = case
    monkeypatch.chdir(tmp_path)  # default data folders (data/LLM/...) do not exist here
    save = tmp_path / "out"
    cfg = fill(merge(BASE, patch), {**world, "save": str(save)})
    cfg_file = tmp_path / "cfg.yml"
    cfg_file.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    before = {p.name for p in tmp_path.iterdir()}
    rc, err = run(["-q", "quantize", "--config", str(cfg_file)], capsys)
    assert rc == code, err
    assert needle in err, err
    assert "Traceback" not in err
    assert_nothing_written(Path(cfg.get("save", {}).get("save_path", save)), before)
    assert (Path(world["existing"]) / "keep.txt").read_text() == "the user's file"


def test_config_file_problems(tmp_path, capsys):
    rc, err = run(["quantize", "--config", str(tmp_path / "missing.yml")], capsys)
    assert rc == 2 and "cannot read the file" in err
    (tmp_path / "bad.yml").write_text("model:\n  path: x\n quant: [\n")
    rc, err = run(["quantize", "--config", str(tmp_path / "bad.yml")], capsys)
    assert rc == 2 and "line" in err and "column" in err
    (tmp_path / "list.yml").write_text("- 1\n")
    rc, err = run(["check-config", str(tmp_path / "list.yml")], capsys)
    assert rc == 2 and "expected a mapping of sections" in err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bin-only", "no-config", "bad-json", "no-model-type", "unsupported"])
def test_broken_model_folders(damage, world, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(world["model"], folder)
    st = folder / "model.safetensors"
    needle = {"garbage": "not a readable safetensors file", "truncated": "not a readable safetensors file",
              "bin-only": "pickled .bin weights are not loaded", "no-config": "no config.json",
              "bad-json": "not valid JSON", "no-model-type": "has no model_type",
              "unsupported": "'gpt2' (config.json) is not supported"}[damage]
    if damage == "garbage":
        st.write_bytes(b"\x00" * 64)
    elif damage == "truncated":
        st.write_bytes(st.read_bytes()[:1000])
    elif damage == "bin-only":
        st.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    elif damage == "no-config":
        (folder / "config.json").unlink()
    elif damage == "bad-json":
        (folder / "config.json").write_text("{not json")
    else:
        cfg = json.loads((folder / "config.json").read_text())
        if damage == "no-model-type":
            cfg.pop("model_type")
        else:
            cfg["model_type"] = "gpt2"
        (folder / "config.json").write_text(json.dumps(cfg))
    save = tmp_path / "out"
    cfg = fill(merge(BASE, {"model": {"path": str(folder)}}), {**world, "save": str(save)})
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    rc, err = run(["-q", "quantize", "--config", str(tmp_path / "cfg.yml")], capsys)
    assert rc == 1 and needle in err and "Traceback" not in err, err
    assert not save.exists()


def test_disk_too_small(world, tmp_path, capsys, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    cfg = fill(BASE, {**world, "save": str(tmp_path / "out")})
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    rc, err = run(["-q", "quantize", "--config", str(tmp_path / "cfg.yml")], capsys)
    assert rc == 1 and "GiB free" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_problem_is_listed_at_once(world, tmp_path, capsys):
    cfg = fill(merge(BASE, {"quant": {"weight": {"group_size": 96}}, "eval": {"path": "{tmp}/missing.txt"},
                            "save": {"save_path": "{existing}"}}), {**world, "save": ""})
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    rc, err = run(["-q", "quantize", "--config", str(tmp_path / "cfg.yml")], capsys)
    assert rc == 1 and "6 problem(s)" in err  # 3 shape problems + "and more", the data, the save path
    assert "group_size 96" in err and "missing.txt" in err and "already exists" in err


def test_out_of_memory_says_what_to_lower(world, tmp_path, capsys, monkeypatch):
    import torch

    from llmc_tpu import pipeline

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(pipeline, "whole_model_logits", boom)
    cfg = fill(BASE, {**world, "save": str(tmp_path / "out")})
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    rc, err = run(["-q", "quantize", "--config", str(tmp_path / "cfg.yml")], capsys)
    assert rc == 1 and "out of memory (CUDA out of memory" in err and "eval.inference_per_block" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_verify_refuses_a_tampered_run(world, tmp_path, capsys):
    cfg = fill(BASE, {**world, "save": str(tmp_path / "out")})
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    assert run(["-q", "quantize", "--config", str(tmp_path / "cfg.yml")], capsys)[0] == 0
    weights = tmp_path / "out" / "transformed_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-2] + b"\x00\x00")
    rc, err = run(["verify", str(tmp_path / "out")], capsys)
    assert rc == 3 and "transformed_model/model.safetensors: changed since the run finished" in err
