"""Host memory of weights mapped from safetensors files is given back once read, and values never change."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import make_tiny_model

from llmc_tpu.engine.host_memory import file_mappings, release_file_pages
from llmc_tpu.models.loading import load_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")


def rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_read_pages_go_back_to_the_file_and_written_ones_stay(tmp_path):
    folder = make_tiny_model(tmp_path, "llama", hidden=256, intermediate=1024, layers=2)
    model = load_model(str(folder), torch_dtype="bfloat16").model
    assert any(path.startswith(str(folder)) for _, _, path in file_mappings())  # transformers maps the file
    tensors = dict(model.state_dict())
    reference = {k: v.clone() for k, v in tensors.items()}
    written = "model.layers.0.mlp.down_proj.weight"
    tensors[written].add_(1)  # its pages are private copies now: the only copy of these values
    before = rss_file_kib()
    released = release_file_pages(tensors.values())
    assert released > 0 and rss_file_kib() < before
    for name, value in model.state_dict().items():  # re-read from the file: the same values
        assert torch.equal(value, reference[name] + 1 if name == written else reference[name]), name


def test_anonymous_memory_is_never_released():
    t = torch.randn(1 << 20)
    copy = t.clone()
    assert release_file_pages([t, torch.empty(0), t[3:]]) == 0
    assert torch.equal(t, copy)


def _mapped_from(t: torch.Tensor, name_part: str) -> bool:
    return any(a <= t.data_ptr() < b and name_part in path for a, b, path in file_mappings())


@pytest.mark.parametrize("method", ["GPTQ", "Awq"])
def test_finished_blocks_are_read_back_from_their_checkpoint_files(method, tiny_llama, eval_txt, tmp_path, monkeypatch):
    """What a block's checkpoint holds (GPTQ's codes, AWQ's changed weights) reaches the outputs from those
    files, mapped, instead of staying in the process's memory; the outputs are unchanged (the demo's bytes are
    compared in CI's README checks and the resume tests)."""
    import llmc_tpu.pipeline as pipeline
    from llmc_tpu.config import parse_config

    seen = {}
    real_gptq, real_hf = pipeline.save_gptq_checkpoint, pipeline.save_hf_folder

    def gptq_spy(model, tokenizer, source, out, results, *args, **kwargs):
        seen["codes"] = {n: _mapped_from(r.codes, "results_") for n, r in results.items()}
        return real_gptq(model, tokenizer, source, out, results, *args, **kwargs)

    def hf_spy(model, *args, **kwargs):
        seen.setdefault("weights", {n: _mapped_from(p, "block_") for n, p in model.named_parameters() if ".layers." in n})
        return real_hf(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "save_gptq_checkpoint", gptq_spy)
    monkeypatch.setattr(pipeline, "save_hf_folder", hf_spy)
    cfg = parse_config({"model": {"path": str(tiny_llama)},
                        "calib": {"name": "custom_txt", "path": str(eval_txt), "n_samples": 8, "seq_len": 32},
                        "eval": {"eval_pos": []}, "quant": {"method": method},
                        "save": {"save_path": str(tmp_path / "out"), "save_trans": method == "Awq"}})
    pipeline.Quantizer(cfg, progress=False).run()
    mapped = seen["codes"] if method == "GPTQ" else seen["weights"]
    assert mapped and all(mapped.values()), [n for n, ok in mapped.items() if not ok]


def test_pagemap_entries_decide_what_may_go():
    import io
    import struct

    from llmc_tpu.engine.host_memory import _FILE_OR_SHARED, _PRESENT, _pages_still_the_files

    def pagemap(*entries: int) -> io.BytesIO:
        return io.BytesIO(struct.pack(f"<{len(entries)}Q", *entries))

    file_page, anon_page = _PRESENT | _FILE_OR_SHARED, _PRESENT
    assert _pages_still_the_files(pagemap(file_page, 0, file_page), 0, 3)
    assert not _pages_still_the_files(pagemap(file_page, anon_page), 0, 2)  # a written page: its values are only here
    assert not _pages_still_the_files(pagemap(0, 0), 0, 2)  # nothing present, or no flags shown: left alone
    assert not _pages_still_the_files(pagemap(file_page), 0, 2)  # a short read
