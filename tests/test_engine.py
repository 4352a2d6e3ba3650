"""The blockwise engine reproduces the whole model."""

import pytest
import torch
from tiny_models import make_tiny_model

from llmc_tpu.engine.blockwise import blocks_of, capture_block_inputs, host_tensors, put_back, run_block
from llmc_tpu.engine.forward import blockwise_logits, whole_model_logits
from llmc_tpu.models.loading import load_model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_block_streaming_equals_whole_model(family, tmp_path):
    loaded = load_model(str(make_tiny_model(tmp_path, family)), torch_dtype="float32")
    win = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    dev = torch.device("cpu")
    whole = torch.cat([lg for _, lg in whole_model_logits(loaded.model, win, 2, dev)])
    streamed = torch.cat([lg for _, lg in blockwise_logits(loaded.model, loaded.spec, win, 2, dev)])
    assert torch.allclose(whole, streamed, atol=1e-5, rtol=1e-5)


def test_capture_keeps_every_kwarg(tiny_llama):
    loaded = load_model(str(tiny_llama), torch_dtype="float32")
    ids = torch.randint(0, 512, (2, 8))
    (inp,) = capture_block_inputs(loaded.model, loaded.spec, [ids])
    assert inp.hidden.shape == (2, 8, 128)
    assert "position_embeddings" in inp.kwargs
    out = run_block(blocks_of(loaded.model, loaded.spec)[0], [inp], torch.device("cpu"))
    assert out[0].hidden.shape == (2, 8, 128) and not torch.equal(out[0].hidden, inp.hidden)
    # the real first block is restored after capturing
    assert type(blocks_of(loaded.model, loaded.spec)[0]).__name__ == "LlamaDecoderLayer"


def test_captured_inputs_are_stored_where_asked(tiny_llama):
    """Hidden states and every tensor kwarg go to ``store_device`` (the pipeline's GPU when they fit): inputs
    left behind in host memory cost a 7B block two pageable copies per sample, 5x its forward."""
    loaded = load_model(str(tiny_llama), torch_dtype="float32")
    (inp,) = capture_block_inputs(loaded.model, loaded.spec, [torch.randint(0, 512, (2, 8))], store_device="meta")
    tensors = [inp.hidden, *inp.kwargs["position_embeddings"]]
    tensors += [v for v in inp.kwargs.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 3 and all(t.device.type == "meta" for t in tensors)


def test_a_block_goes_back_to_its_own_host_tensors(tiny_llama):
    """GPTQ leaves the float weights as they were: after the device work the block points at its host tensors
    again (no copy). 'meta' stands in for the GPU here."""
    loaded = load_model(str(tiny_llama), torch_dtype="float32")
    block = blocks_of(loaded.model, loaded.spec)[0]
    before = {name: (t.data_ptr(), t.clone()) for name, t in block.state_dict().items()}
    saved = host_tensors(block)
    block.to("meta")
    assert all(t.device.type == "meta" for t in block.state_dict().values())
    put_back(saved)
    after = block.state_dict()
    assert after.keys() == before.keys()
    for name, (ptr, value) in before.items():
        assert after[name].data_ptr() == ptr and torch.equal(after[name], value), name
    assert isinstance(block.self_attn.q_proj.weight, torch.nn.Parameter)


@pytest.mark.parametrize("per_block", [False, True])
def test_eval_fake_quantizes_where_it_runs_and_leaves_the_model_as_it_was(tiny_llama, per_block):
    """The fake_quant eval with the results handed to the logits: the same logits as a model whose Linears were
    replaced by their fake-quant weights (the earlier way, a whole fake-quant model in host memory), and after it
    every tensor of the model is the one it had, same storage, same values."""
    from llmc_tpu.fake_quant import apply_fake_quant, quantize_block
    from llmc_tpu.tpu.rtn import TpuWeightFormat

    loaded = load_model(str(tiny_llama), torch_dtype="bfloat16")
    model, spec, dev = loaded.model, loaded.spec, torch.device("cpu")
    fmt = TpuWeightFormat(4, 64)
    results = {}
    for i, block in enumerate(blocks_of(model, spec)):
        results.update(quantize_block(block, spec, fmt, f"{spec.blocks}.{i}"))
    win = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(1))
    before = {name: (t.data_ptr(), t.clone()) for name, t in model.state_dict().items()}

    def logits(res):
        if per_block:
            return torch.cat([lg for _, lg in blockwise_logits(model, spec, win, 2, dev, results=res)])
        return torch.cat([lg for _, lg in whole_model_logits(model, win, 2, dev, results=res)])

    float_logits = logits(None)
    streamed = logits(results)
    after = model.state_dict()
    for name, (ptr, value) in before.items():
        assert after[name].data_ptr() == ptr and torch.equal(after[name], value), name
    apply_fake_quant(model, results)
    assert torch.equal(streamed, logits(None))
    assert not torch.equal(streamed, float_logits)


def test_to_device_moves_every_tensor_module_by_module(tiny_llama):
    """``to_device`` ends where ``model.to`` does: every parameter and buffer on the device ('meta' stands in for
    the GPU), and ``put_back`` brings the model's own host tensors back."""
    from llmc_tpu.engine.forward import to_device

    model = load_model(str(tiny_llama), torch_dtype="float32").model
    saved = host_tensors(model)
    to_device(model, torch.device("meta"))
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    put_back(saved)
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
