"""Calibration and eval data: download mapping (with a local stand-in for the hub), readers, preprocs, errors."""

import json

import pytest
import torch
from datasets import Dataset
from tiny_models import make_tokenizer

from llmc_tpu.data.calib import build_samples, calibration_texts
from llmc_tpu.data.download import SOURCES, download
from llmc_tpu.data.text import DataError, eval_text, read_lines

ROWS = {"text": ["", " = Title = ", "first line of text", "second line"], "sentence": ["a b", "c d", "e", "f"],
        "question": ["q1", "q2", "q3", "q4"]}


def fake_hub(calls):
    def load(src):
        calls.append(src)
        return Dataset.from_dict({src.text_field: ROWS[src.text_field]})
    return load


@pytest.mark.parametrize("name,purpose", [(n, p) for n, by in SOURCES.items() for p in by])
def test_download_mapping_and_saved_folder(tmp_path, name, purpose):
    calls = []
    out = download(name, purpose, tmp_path / name, loader=fake_hub(calls))
    (src,) = calls
    assert src == SOURCES[name][purpose]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == name and manifest["rows"] == 4 and manifest["source"]["path"] == src.path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    if name == "mme":
        return
    if purpose == "eval":
        text = eval_text(name, str(out))
        assert ("first line of text" in text) if name != "ptb" else text == "a b c d e f"
    else:
        assert len(calibration_texts(name, str(out))) >= 3


def test_pinned_sources():
    assert SOURCES["wikitext2"]["eval"].name == "wikitext-2-raw-v1" and SOURCES["wikitext2"]["eval"].split == "test"
    assert SOURCES["ptb"]["eval"].text_field == "sentence"
    assert SOURCES["c4"]["eval"].data_files.startswith("en/c4-validation")


def test_download_offline_is_one_clear_error(tmp_path):
    def offline(src):
        raise ConnectionError("Name or service not known")
    with pytest.raises(DataError, match="could not download wikitext .*network reachable"):
        download("wikitext2", "eval", tmp_path / "w", loader=offline)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="allowed for calib: pileval, wikitext2, c4, ptb"):
        download("mme", "calib", tmp_path / "m", loader=offline)


def test_download_refuses_existing_folder(tmp_path):
    (tmp_path / "w").mkdir()
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        download("wikitext2", "eval", tmp_path / "w", loader=fake_hub([]))
    download("wikitext2", "eval", tmp_path / "w", overwrite=True, loader=fake_hub([]))


def test_text_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        eval_text("custom_ppl", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty.txt: no text"):
        eval_text("custom_ppl", str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(DataError, match="bin.txt: not UTF-8"):
        read_lines(tmp_path / "bin.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        read_lines(tmp_path / "d")
    with pytest.raises(DataError, match="default folder data/LLM/eval/wikitext2 does not exist; run `python tools/download_eval_dataset.py --dataset_name wikitext2`"):
        eval_text("wikitext2", None)
    with pytest.raises(DataError, match="eval.path is not set for eval set 'custom_ppl'"):
        eval_text("custom_ppl", None)


def test_preprocs_are_seeded_and_shaped():
    tok = make_tokenizer()
    texts = [f"line {i} of text" for i in range(400)]
    for preproc in ("pileval_awq", "wikitext2_gptq", "random_truncate_txt", "c4_gptq", "ptb_gptq"):
        texts_for = ["word " * 200] * 5 if preproc == "c4_gptq" else texts
        a, info = build_samples(texts_for, tok, preproc, 6, 32, seed=1)
        b, _ = build_samples(texts_for, tok, preproc, 6, 32, seed=1)
        assert a.shape == (6, 32) and torch.equal(a, b), preproc
        assert info["preproc"] == preproc
    c, _ = build_samples(texts, tok, "wikitext2_gptq", 6, 32, seed=2)
    assert not torch.equal(a, c)


def test_too_little_calibration_data_says_how_much(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(DataError, match="need 3200"):
        build_samples(["short text"] * 3, tok, "pileval_awq", 100, 32, seed=0)
    with pytest.raises(DataError, match="fewer than one calib.seq_len window"):
        build_samples(["short"], tok, "random_truncate_txt", 2, 512, seed=0)


def test_open_sets_default_to_the_download_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    download("wikitext2", "eval", tmp_path / "data/LLM/eval/wikitext2", loader=fake_hub([]))
    assert "first line of text" in eval_text("wikitext2", None)
    download("pileval", "calib", tmp_path / "data/LLM/cali/pileval", loader=fake_hub([]))
    assert "second line" in calibration_texts("pileval", None)


def test_chat_template_wraps_each_sample():
    from llmc_tpu.data.calib import apply_chat_template

    tok = make_tokenizer()
    with pytest.raises(DataError, match="no chat template"):
        apply_chat_template(["hi"], tok)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    assert apply_chat_template(["hi", "yo"], tok) == ["<user>hi</user>", "<user>yo</user>"]
