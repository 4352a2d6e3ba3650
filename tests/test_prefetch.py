"""The next block staged in page-locked memory moves to the device with the same values as ``block.to``."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from llmc_tpu.engine.prefetch import Prefetcher


def small_block() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 16, bias=False))
    block.register_buffer("table", torch.arange(10, dtype=torch.float32))
    return block


def _moved_like_to(block: nn.Module, device: str, staged: bool) -> None:
    reference = {k: v.detach().clone() for k, v in block.state_dict().items()}
    params = {n: p for n, p in block.named_parameters()}
    sources = {n: t.data_ptr() for n, t in block.state_dict().items()}
    with Prefetcher(torch.device(device), enabled=True) as prefetch:
        if staged:
            prefetch.stage(block)
        prefetch.move(block)
    assert {n: p for n, p in block.named_parameters()} == params  # the same Parameter objects, as .to keeps them
    for name, value in block.state_dict().items():
        assert value.device.type == device, name
        assert torch.equal(value.cpu(), reference[name]), name
        if device == "cpu":  # from the staged copy, or (not staged) left where it was
            assert (value.data_ptr() != sources[name]) == staged, name


@pytest.mark.parametrize("staged", [True, False])
def test_move_gives_the_same_tensors_as_to(staged):
    _moved_like_to(small_block(), "cpu", staged)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("staged", [True, False])
def test_move_to_cuda_from_page_locked_copies(staged):
    _moved_like_to(small_block(), "cuda", staged)


def test_a_tensor_replaced_after_staging_moves_from_its_new_value():
    block = small_block()
    with Prefetcher(torch.device("cpu"), enabled=True) as prefetch:
        prefetch.stage(block)
        block[0].weight.data = torch.full_like(block[0].weight, 3.0)  # changed after its copy was started
        prefetch.move(block)
    assert torch.equal(block[0].weight, torch.full_like(block[0].weight, 3.0))


def test_staging_another_block_drops_the_first():
    first, second = small_block(), small_block()
    kept = first[0].weight.data.data_ptr()
    with Prefetcher(torch.device("cpu"), enabled=True) as prefetch:
        prefetch.stage(first)
        prefetch.stage(second)
        prefetch.move(first)  # no longer staged: moves as .to does (nothing to do on the CPU)
    assert first[0].weight.data.data_ptr() == kept


def test_disabled_off_cuda_by_default():
    assert not Prefetcher(torch.device("cpu")).enabled


def _outputs(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("method", ["Awq", "GPTQ"])
def test_a_run_with_staged_blocks_writes_the_same_bytes(method, tiny_llama, eval_txt, tmp_path, monkeypatch):
    """The quantize loop with staging forced on (the CPU stands in for the device): the same model bytes."""
    import llmc_tpu.pipeline as pipeline
    from llmc_tpu.config import parse_config

    def run(out, staged):
        moves = []

        class Spy(Prefetcher):
            def __init__(self, device):
                super().__init__(device, enabled=staged)

            def move(self, block):
                moves.append(self._staged is not None and self._staged[0] is block)
                super().move(block)

        monkeypatch.setattr(pipeline, "Prefetcher", Spy)
        cfg = parse_config({"model": {"path": str(tiny_llama)},
                            "calib": {"name": "custom_txt", "path": str(eval_txt), "n_samples": 8, "seq_len": 32},
                            "eval": {"eval_pos": []}, "quant": {"method": method},
                            "save": {"save_path": str(out), "save_trans": method == "Awq"}})
        pipeline.Quantizer(cfg, progress=False).run()
        return moves

    moves = run(tmp_path / "staged", True)
    assert moves[0] is False and all(moves[1:]) and len(moves) > 1  # every block after the first came staged
    assert not any(run(tmp_path / "plain", False))
    staged, plain = _outputs(tmp_path / "staged"), _outputs(tmp_path / "plain")
    assert staged and staged == plain
