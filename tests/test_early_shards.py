"""The transformed model's shards written as their blocks finish: the final folder is byte for byte the one the
save at the end writes, shards written early are not written again, and anything that changed is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from llmc_tpu.export import hf_folder, safetensors_stream
from llmc_tpu.export.hf_folder import plan_early_shards, save_hf_folder
from llmc_tpu.models.loading import load_model


def folder_bytes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run_config(model_dir: Path, calib_txt: Path, out: Path, method: str = "Awq"):
    """A run of the tiny model with its transformed model saved and no evaluation."""
    from llmc_tpu.config import parse_config

    return parse_config({"model": {"path": str(model_dir)},
                         "calib": {"name": "custom_txt", "path": str(calib_txt), "n_samples": 8, "seq_len": 32},
                         "eval": {"eval_pos": []}, "quant": {"method": method},
                         "save": {"save_path": str(out), "save_trans": True}})


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(hf_folder, "SHARD_SIZE", "150KB")  # a few shards of a tiny model, blocks spread over them


@pytest.fixture
def writes(monkeypatch):
    """The file names the streaming writer writes, in order."""
    seen = []
    real = safetensors_stream.save_file

    def spy(entries, filename, metadata=None):
        seen.append(Path(filename).name)
        return real(entries, filename, metadata)

    monkeypatch.setattr(safetensors_stream, "save_file", spy)
    return seen


def test_shards_are_written_as_blocks_finish_and_not_again(tmp_path, small_shards, writes):
    loaded = load_model(str(make_tiny_model(tmp_path / "m", "llama", layers=4)))
    model, spec = loaded.model, loaded.spec
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "reference")
    reference = folder_bytes(tmp_path / "reference")
    shard_files = [n for n in reference if n.endswith(".safetensors")]
    assert len(shard_files) >= 3
    writes.clear()

    early = plan_early_shards(model, spec.blocks, tmp_path / "early")
    assert early is not None and {s.filename for s in early.shards} == set(shard_files)
    before_blocks = list(writes)  # shards without block weights (the embeddings'), if any
    for i in range(4):
        early.block_done(i, model)
        early.wait()
        for shard in early.shards:  # a shard is written exactly when its last block is done
            assert (shard.written is not None) == (shard.blocks <= set(range(i + 1))), (i, shard.filename)
    early_writes = list(writes)
    assert sorted(early_writes) == sorted(shard_files) and set(before_blocks) <= set(early_writes)

    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "early", early=early)
    assert writes == early_writes  # the final save wrote no shard again
    assert folder_bytes(tmp_path / "early") == reference


def test_a_tensor_changed_after_its_shard_was_written_is_written_again(tmp_path, small_shards, writes):
    loaded = load_model(str(make_tiny_model(tmp_path / "m", "llama", layers=4)))
    model, spec = loaded.model, loaded.spec
    early = plan_early_shards(model, spec.blocks, tmp_path / "early")
    for i in range(4):
        early.block_done(i, model)
    early.wait()
    changed = model.model.layers[2].mlp.up_proj
    changed.weight.data = changed.weight.data * 2  # a new tensor, as a method's change would be
    holder = next(s.filename for s in early.shards if "model.layers.2.mlp.up_proj.weight" in s.keys)
    writes.clear()
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "early", early=early)
    assert writes == [holder]
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "reference")
    assert folder_bytes(tmp_path / "early") == folder_bytes(tmp_path / "reference")


def test_a_written_file_the_final_save_does_not_keep_is_removed(tmp_path, small_shards):
    loaded = load_model(str(make_tiny_model(tmp_path / "m", "llama", layers=4)))
    model, spec = loaded.model, loaded.spec
    early = plan_early_shards(model, spec.blocks, tmp_path / "early")
    early.shards[0].filename = "left-over.safetensors"  # as if the final save had sharded otherwise
    for i in range(4):
        early.block_done(i, model)
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "early", early=early)
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "reference")
    assert not (tmp_path / "early" / "left-over.safetensors").exists()
    assert folder_bytes(tmp_path / "early") == folder_bytes(tmp_path / "reference")


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("qwen3_moe", torch.bfloat16)])
def test_not_planned_where_the_saved_tensors_are_new_ones(tmp_path, family, dtype, monkeypatch):
    """A float32 model saved as bf16 (converted), an MoE model (experts fused): turned down before the handed-over
    tensors are made (a copy of the model's size)."""
    loaded = load_model(str(make_tiny_model(tmp_path / "m", family, dtype=dtype)), torch_dtype=str(dtype)[6:])

    def no_copy(*args, **kwargs):
        raise AssertionError("the handed-over tensors were made")

    monkeypatch.setattr(hf_folder, "handoff_state", no_copy)
    assert plan_early_shards(loaded.model, loaded.spec.blocks, tmp_path / "early", torch.bfloat16) is None
    assert not (tmp_path / "early").exists()


def test_tied_embeddings_are_planned(tmp_path):
    loaded = load_model(str(make_tiny_model(tmp_path / "m", "llama", tie=True)))
    early = plan_early_shards(loaded.model, loaded.spec.blocks, tmp_path / "early")
    assert early is not None
    names = {n for s in early.shards for n in s.keys}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    early.close()


@pytest.mark.parametrize("method", ["Awq", "RTN"])  # weights changed by the method, and left as they came
def test_a_run_writes_the_same_folder_with_and_without_early_shards(method, tmp_path, eval_txt, small_shards,
                                                                    writes, monkeypatch):
    import llmc_tpu.pipeline as pipeline

    model_dir = make_tiny_model(tmp_path / "m", "llama", layers=4)

    def run(out: Path) -> dict[str, str]:
        pipeline.Quantizer(run_config(model_dir, eval_txt, out, method), progress=False).run()
        return folder_bytes(out / "transformed_model")

    saves = []
    real_save = pipeline.save_hf_folder

    def save_spy(*args, **kwargs):
        saves.append(list(writes))  # what was written before the save stage
        return real_save(*args, **kwargs)

    monkeypatch.setattr(pipeline, "save_hf_folder", save_spy)
    with_early = run(tmp_path / "early")
    shards = [n for n in with_early if n.endswith(".safetensors")]
    # each shard written once, most before the save stage began (those with the last block's weights may be
    # under way then)
    assert len(shards) >= 3 and sorted(writes) == sorted(shards) and len(saves[0]) >= len(shards) // 2
    monkeypatch.setattr(pipeline, "plan_early_shards", lambda *a, **k: None)
    writes.clear()
    assert run(tmp_path / "plain") == with_early
    assert sorted(writes) == sorted(shards)


def test_a_run_interrupted_after_early_shards_resumes_to_the_same_folder(tmp_path, eval_txt, small_shards, monkeypatch):
    import llmc_tpu.pipeline as pipeline

    model_dir = make_tiny_model(tmp_path / "m", "llama", layers=4)

    def cfg(out: Path):
        return run_config(model_dir, eval_txt, out)

    pipeline.Quantizer(cfg(tmp_path / "plain"), progress=False).run()
    real = pipeline.Quantizer._block_final

    def interrupted(self, index, model):
        real(self, index, model)
        if index == 2:
            raise KeyboardInterrupt  # as Ctrl-C: the checkpoints (and the shards written so far) stay

    monkeypatch.setattr(pipeline.Quantizer, "_block_final", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        pipeline.Quantizer(cfg(out), progress=False).run()
    assert any((tmp_path / ".resumed.partial" / "transformed_model").glob("*.safetensors"))
    monkeypatch.setattr(pipeline.Quantizer, "_block_final", real)
    pipeline.Quantizer(cfg(out), progress=False, resume=True).run()
    assert folder_bytes(out / "transformed_model") == folder_bytes(tmp_path / "plain" / "transformed_model")


def test_a_vlm_folder_is_the_same_with_early_shards(tmp_path, small_shards, writes):
    """A VLM's language blocks are one part of its weights (and transformers may save its keys under other names)."""
    from tiny_vlm import make_tiny_qwen2_vl

    from llmc_tpu.engine.blockwise import blocks_of

    loaded = load_model(str(make_tiny_qwen2_vl(tmp_path / "m")))
    model, spec = loaded.model, loaded.spec
    early = plan_early_shards(model, spec.blocks, tmp_path / "early")
    assert early is not None and len(early.shards) >= 3
    for i in range(len(blocks_of(model, spec))):
        early.block_done(i, model)
    early.wait()
    early_writes = sorted(writes)
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "early", source_config=True, early=early)
    assert sorted(writes) == early_writes == sorted(s.filename for s in early.shards)  # none written again
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "plain", source_config=True)
    assert folder_bytes(tmp_path / "early") == folder_bytes(tmp_path / "plain")


def test_blocks_whose_shards_landed_are_read_from_them(tmp_path, small_shards, writes):
    from safetensors.torch import load_file

    from llmc_tpu.engine.host_memory import file_mappings

    loaded = load_model(str(make_tiny_model(tmp_path / "m", "llama", layers=4)))
    model, spec = loaded.model, loaded.spec
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "reference")
    values = {k: v.clone() for k, v in model.state_dict().items()}
    early = plan_early_shards(model, spec.blocks, tmp_path / "early")
    moved = {}
    for i in range(4):
        early.block_done(i, model)
        early.wait()
        rebound = early.rebind_landed(model)
        assert not set(rebound) & set(moved)  # each block once
        moved.update(rebound)
    assert sorted(moved) == [0, 1, 2, 3]
    shards = [(start, end) for start, end, path in file_mappings() if path.startswith(str(tmp_path / "early"))]
    for key, value in model.state_dict().items():
        assert torch.equal(value, values[key]), key
        if key.startswith(spec.blocks + "."):  # now a view of the shard's mapping
            assert any(start <= value.data_ptr() < end for start, end in shards), key
    for index, where in moved.items():
        for key, (filename, name) in where.items():
            assert torch.equal(load_file(str(tmp_path / "early" / filename))[name], values[f"{spec.blocks}.{index}.{key}"])
    writes.clear()
    save_hf_folder(model, loaded.tokenizer, loaded.path, tmp_path / "early", early=early)
    assert writes == []  # the rebound tensors still count as the ones written
    assert folder_bytes(tmp_path / "early") == folder_bytes(tmp_path / "reference")


def _landed_first(monkeypatch):
    """Every shard started before a block's end has landed when the run looks for landed ones (no timing)."""
    import llmc_tpu.pipeline as pipeline

    real = pipeline.Quantizer._block_final

    def after_writes(self, index, model):
        if self.early is not None:
            self.early.wait()
        real(self, index, model)

    monkeypatch.setattr(pipeline.Quantizer, "_block_final", after_writes)
    return after_writes


def test_a_run_drops_the_checkpoint_weights_of_blocks_in_landed_shards(tmp_path, eval_txt, small_shards, monkeypatch):
    import llmc_tpu.pipeline as pipeline
    from llmc_tpu import resume

    model_dir = make_tiny_model(tmp_path / "m", "llama", layers=4)

    def run(out: Path) -> dict[str, str]:
        pipeline.Quantizer(run_config(model_dir, eval_txt, out), progress=False).run()
        return folder_bytes(out / "transformed_model")

    with monkeypatch.context() as plain:
        plain.setattr(pipeline, "plan_early_shards", lambda *a, **k: None)
        reference = run(tmp_path / "plain")
    _landed_first(monkeypatch)
    removed = []
    real_remove = resume.Checkpoints._remove_once_recorded

    def remove(self, recorded, index):
        weights = self.folder / f"block_{index}.safetensors"
        recorded.result()
        assert weights.is_file() and str(index) in json.loads((self.folder / "state.json").read_text())["moved_weights"]
        real_remove(self, recorded, index)
        assert not weights.exists()
        removed.append(index)

    monkeypatch.setattr(resume.Checkpoints, "_remove_once_recorded", remove)
    assert run(tmp_path / "early") == reference
    assert removed[:1] == [0] and removed == sorted(set(removed))  # in block order, each once


def test_a_run_interrupted_after_moving_weights_resumes_to_the_same_folder(tmp_path, eval_txt, small_shards,
                                                                            monkeypatch):
    import llmc_tpu.pipeline as pipeline

    model_dir = make_tiny_model(tmp_path / "m", "llama", layers=4)

    def cfg(out: Path):
        return run_config(model_dir, eval_txt, out)

    pipeline.Quantizer(cfg(tmp_path / "plain"), progress=False).run()
    real = pipeline.Quantizer._block_final
    landed_first = _landed_first(monkeypatch)

    def interrupted(self, index, model):
        landed_first(self, index, model)
        if index == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Quantizer, "_block_final", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        pipeline.Quantizer(cfg(out), progress=False).run()
    resume_folder = tmp_path / ".resumed.partial" / pipeline.RESUME_FOLDER
    moved = json.loads((resume_folder / "state.json").read_text())["moved_weights"]
    assert moved and all(not (resume_folder / f"block_{i}.safetensors").exists() for i in moved)
    monkeypatch.setattr(pipeline.Quantizer, "_block_final", real)
    pipeline.Quantizer(cfg(out), progress=False, resume=True).run()
    assert folder_bytes(out / "transformed_model") == folder_bytes(tmp_path / "plain" / "transformed_model")
